"""The benchmark's tiny CI profile still runs every phase (ingest, end to end, Redis memory) and prints its table;
no number is asserted."""
import json
import subprocess
import sys

from workers.ops.devstack import REPO_ROOT

HEADER = "| phase | what | throughput | p50 | p99 | ratio |"


def test_ci_profile_completes_and_prints_the_table(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench.run", "--profile", "ci", "--json", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert HEADER in result.stdout
    for phase in ("| ingest |", "| end to end |", "| latency |", "| memory |"):
        assert phase in result.stdout, phase
    assert "targets: " in result.stdout
    for line in ("| memory | Redis bytes per pending delivery |", "| memory | Redis bytes per dead-lettered delivery |",
                 "| memory | Redis bytes per settled delivery, compacted, at default retention |",
                 "| memory | settled deliveries a 25 MB plan holds |"):
        assert line in result.stdout, line
    numbers = json.loads(out.read_text())
    assert numbers["e2e"]["relay"]["complete"] and numbers["e2e"]["paced"]["complete"]
    assert numbers["e2e"]["plain"]["failures"] == 0
    for run in ("naive", "naive_relay"):  # the naive consumer fed straight, then through its send_task app
        naive = numbers["e2e"][run]
        assert naive["complete"] and naive["done"] == naive["events"] == numbers["settings"]["deliveries"], run
    assert "| end to end | naive Celery consumer (" in result.stdout
    assert "| end to end | the same consumer behind a Flask app that calls send_task per webhook |" in result.stdout
    memory = numbers["redis_memory"]
    assert memory["deliveries"] == 100 and memory["dead_letters"] == 20
    assert set(memory["plans"]) == {"mini", "premium-0", "premium-1", "premium-2", "premium-3", "premium-5"}
