"""A second terminal in the same working directory as ``l2u-relay run``: every command finds the local
stack's settings (stack.json in the data dir; secrets re-read, never written) without any variable set."""
import json
import os
import subprocess
import time

import pytest

from tests.processes import BIN, demo_env
from workers.ops.devstack import free_port


def wait_for_text(path, text, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if text in path.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"l2u-relay run did not print {text!r}:\n{path.read_text()[-3000:]}")


def test_a_cli_in_a_second_process_finds_the_running_local_stack(tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        stack = subprocess.Popen([str(BIN / "l2u-relay"), "run", "--port", str(free_port())], env=demo_env(),
                                 cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_text(log, "=== demo summary ===", stack, timeout=240)
        stack_file = tmp_path / ".l2u-relay" / "stack.json"
        written = stack_file.read_text()
        for secret in ("RELAY_WEBHOOK_SECRET", "STOREPOINT_API_TOKEN", "LOCATE2U_CLIENT_SECRET"):
            assert f'"{secret}": "' not in written.split('"secrets_from"')[0], secret  # never written
        assert json.loads(written)["secrets_from"]["RELAY_WEBHOOK_SECRET"] == "webhook-secret"

        env = demo_env()  # no REDIS_URL, no secret, no sink settings: only the working directory is shared
        status = subprocess.run([str(BIN / "l2u-relay"), "status", "--json"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        data = json.loads(status.stdout)
        assert set(data["sinks"]) == {"storepoint", "b2b", "locate", "deliverycom", "forward"}
        assert data["sinks"]["storepoint"]["mapped"] == 3
        assert data["locate2u"]["configured"] and "error" not in data["locate2u"]["subscriptions"]
        letters = subprocess.run([str(BIN / "l2u-relay"), "dlq", "list"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
        assert letters.returncode == 0, letters.stdout + letters.stderr
        assert "dead letter(s)" in letters.stdout and "l2u-stop-7004 to Delivery.com" in letters.stdout
        # A second `run` in the same folder overwrote the first's stack file and, without a demo, shared
        # its embedded Redis's append-only file with it (two servers writing one file).
        second = subprocess.run([str(BIN / "l2u-relay"), "run", "--port", str(free_port())], env=demo_env(),
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"another `l2u-relay run` (pid {stack.pid}) uses" in second.stderr, \
            second.stdout + second.stderr
        assert stack_file.read_text() == written
        ping = subprocess.run([str(BIN / "celery"), "-A", "workers.app", "inspect", "ping", "--timeout", "10"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, 2)  # Ctrl-C: the stack stops its processes and removes its stack file
            stack.wait(60)
    deadline = time.monotonic() + 10
    while stack_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not stack_file.exists()
    after = subprocess.run([str(BIN / "l2u-relay"), "status"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert after.returncode == 2 and "Traceback" not in after.stderr  # the stack is gone: a plain config message


@pytest.mark.parametrize("argv, env, said", [
    (["--port", "70000"], {}, "70000 is not in the range 1<=x<=65535"),
    ([], {"PORT": "abc"}, "PORT must be a port number (1-65535), not 'abc'"),
    (["--data-dir", "a-file"], {}, "cannot use"),
    (["--host", "192.0.2.1", "--port", "18124"], {}, "cannot listen on 192.0.2.1: Cannot assign requested address"),
])
def test_run_with_a_port_or_data_dir_it_cannot_use_says_which(tmp_path, argv, env, said):
    """These ended in OverflowError, ValueError or FileExistsError tracebacks; an address not of this machine
    (192.0.2.1 is for documentation) was said to have its port "already in use"."""
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([str(BIN / "l2u-relay"), "run", *argv], env={**demo_env(), **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
