"""The README's run command in demo mode: a bounded smoke test of the whole mission, run twice in a row."""
import subprocess

from tests.processes import BIN, assert_demo_summary, demo_env
from workers.ops.devstack import REPO_ROOT, free_port


def run_demo(data_dir, *options, port=None):
    return subprocess.run([str(BIN / "l2u-relay"), "run", "--port", str(port or free_port()), "--data-dir",
                           str(data_dir), "--demo-then-exit", *options], env=demo_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


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
