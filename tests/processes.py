"""Real processes for integration tests: gunicorn serving the receiver, Celery workers and beat."""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from workers.devstack import REPO_ROOT, free_port

BIN = Path(sys.executable).parent


def process_env(settings, **extra):
    """Environment for a child process: the settings as variables plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RELAY_", "LOCATE", "B2B_",
                                                                                   "STOREPOINT_", "DELIVERYCOM_",
                                                                                   "FORWARD_", "REDIS_URL"))}
    env.update(settings.to_env())
    env.update({key: str(value) for key, value in extra.items()})
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Process:
    """A child process whose output goes to a file the test can read."""

    def __init__(self, name, command, env, log_path=None):
        self.name = name
        self.log = open(log_path, "w") if log_path else tempfile.NamedTemporaryFile(
            prefix=f"{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self):
        return Path(self.log.name).read_text(errors="replace")

    def wait_for_output(self, text, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not print {text!r}:\n{self.output()[-3000:]}")

    def kill(self, sig=9):
        """Send ``sig`` to the whole process group (SIGKILL by default)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(15)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class Gunicorn(Process):
    """``gunicorn receiver.wsgi:app`` on a free loopback port."""

    def __init__(self, env, workers=2):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__("gunicorn", [str(BIN / "gunicorn"), "receiver.wsgi:app", "-b", f"127.0.0.1:{self.port}",
                                      "-w", str(workers), "--graceful-timeout", "2"], env)
        self._wait_ready()

    def _wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited:\n{self.output()[-3000:]}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).ok:
                    return
            except requests.RequestException:  # not listening yet, or slow on a loaded machine
                time.sleep(0.1)
        raise AssertionError(f"gunicorn not ready:\n{self.output()[-3000:]}")


class CeleryWorker(Process):
    """``celery -A workers.app worker`` (add ``beat=True`` for an embedded beat)."""

    def __init__(self, env, concurrency=2, pool="prefork", beat=False, name="worker"):
        command = [str(BIN / "celery"), "-A", "workers.app", "worker", "-l", "info", "-P", pool,
                   "-c", str(concurrency), "-n", f"{name}-{free_port()}@%h", "--without-gossip", "--without-mingle"]
        if beat:
            command.append("-B")
        super().__init__(name, command, env)
        self.wait_for_output("ready.", timeout=60)
