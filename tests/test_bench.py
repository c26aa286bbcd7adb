"""The benchmark's tiny CI profile still runs every phase (ingest, end to end, Redis memory) and prints its table;
no number is asserted; and the worker banner it reads names a pool it can start."""
import json
import subprocess
import sys

import pytest
from celery.bin.worker import worker
from celery.concurrency import ALIASES

from bench.run import worker_banner
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
    for run in ("relay", "paced"):  # what each event cost, saturated and at half rate
        assert numbers["e2e"][run]["cpu_ms_per_event"]["worker"] > 0, run
        assert numbers["e2e"][run]["redis_commands_per_event"]["by_command"]["evalsha"] > 0, run
    assert "relay at half rate (idle time included): CPU worker " in result.stdout
    assert numbers["e2e"]["plain"]["failures"] == 0
    for run in ("naive", "naive_relay"):  # the naive consumer fed straight, then through its send_task app
        naive = numbers["e2e"][run]
        assert naive["complete"] and naive["done"] == naive["events"] == numbers["settings"]["deliveries"], run
    assert "| end to end | naive Celery consumer (" in result.stdout
    assert "| end to end | the same consumer behind a Flask app that calls send_task per webhook |" in result.stdout
    memory = numbers["redis_memory"]
    assert memory["deliveries"] == 100 and memory["dead_letters"] == 20
    assert set(memory["plans"]) == {"mini", "premium-0", "premium-1", "premium-2", "premium-3", "premium-5"}


@pytest.mark.parametrize("option", sorted(set(ALIASES) - {"custom"}))
def test_the_pool_read_from_a_worker_banner_is_one_the_naive_consumer_can_be_started_with(option):
    """The naive consumer is started with the relay worker's pool as its banner names it ("thread"
    for ``-P threads``); the name given back must be a ``-P`` value for the same pool."""
    module = ALIASES[option].partition(":")[0]
    pool, concurrency = worker_banner(f".> concurrency: 8 ({module.split('.')[-1]})")
    pool_option = next(param for param in worker.params if "--pool" in param.opts)
    assert pool in pool_option.type.choices and ALIASES[pool].partition(":")[0] == module
    assert concurrency == 8
