"""The README's run command in demo mode: a bounded smoke test of the whole mission, run twice in a row."""
import os
import subprocess

from tests.processes import BIN
from workers.devstack import REPO_ROOT, free_port


def demo_env():
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("LOCATE2U_", "REDIS_URL", "RELAY_", "STOREPOINT_", "B2B_", "LOCATE_",
                                   "DELIVERYCOM_", "FORWARD_", "FLOWER_", "PORT", "GUNICORN_"))}


def run_demo(data_dir, *options, port=None):
    return subprocess.run([str(BIN / "l2u-relay"), "run", "--port", str(port or free_port()), "--data-dir",
                           str(data_dir), "--demo-then-exit", *options], env=demo_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_demo_summary(result, data_dir):
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "DEMO MODE" in output
    assert "demo: waiting for the workers:" in output  # progress while it waits
    summary = result.stdout.split("=== demo summary ===")[1]  # the summary comes last and stands alone
    assert "demo: Locate2u delivered 17 events: 16 accepted, 1 recognised as duplicates" in summary
    assert "demo: all 16 deliveries settled" in summary
    for name in ("storepoint", "b2b active", "locate", "deliverycom", "dead letters"):
        assert any(line.lstrip().startswith(name) and line.endswith("✓") for line in summary.splitlines()), name
    assert "demo: all downstream state as expected" in summary
    assert "stale" in summary  # the out-of-order pair
    assert f"process logs: {data_dir / 'demo.log'}" in summary
    assert '"level"' not in result.stdout  # the processes' JSON lines went to the log file...
    assert "l2u.process_delivery" in (data_dir / "demo.log").read_text()  # ...which has them


def test_the_demo_runs_twice_in_one_data_dir_with_clean_state_each_time(tmp_path):
    data_dir = tmp_path / "data"
    first = run_demo(data_dir)
    assert_demo_summary(first, data_dir)
    assert not (data_dir / "stack.json").exists()  # removed once the stack stopped
    second = run_demo(data_dir)
    assert_demo_summary(second, data_dir)


def test_a_busy_port_is_named_with_what_to_do(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_demo(tmp_path / "data", port=port)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"port {port} is already in use" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
