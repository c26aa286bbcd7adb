"""The README's run command in demo mode: a bounded smoke test of the whole mission, run twice in a row."""
import os
import signal
import subprocess
import time

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


def test_ctrl_c_while_the_demo_waits_for_its_workers_stops_it_without_a_traceback(tmp_path):
    """Ctrl-C while the demo waited for its workers printed a thread's traceback (its Redis was already
    stopped under it): the first thing a new user may see when they stop the README's run command."""
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen([str(BIN / "l2u-relay"), "run", "--port", str(free_port()), "--data-dir",
                                str(tmp_path / "data")], env=demo_env(), cwd=REPO_ROOT, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "demo: waiting for the workers" not in log.read_text() and time.monotonic() < deadline:
            assert run.poll() is None, log.read_text()
            time.sleep(0.1)
        os.killpg(run.pid, signal.SIGINT)
        run.wait(60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    time.sleep(1)  # a daemon thread's traceback would be written as the process exits
    output = log.read_text()
    assert "demo: waiting for the workers" in output and "Traceback" not in output, output[-3000:]
