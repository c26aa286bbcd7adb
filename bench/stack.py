"""The processes a benchmark run starts: Redis, gunicorn apps, Celery worker and beat, simulators.

Everything listens on 127.0.0.1 and is stopped by ``Stack.close()``; each
process writes its output to a log file in the run's folder.
"""
import os
import shutil
import sys
import time
from pathlib import Path

import requests

from tests.processes import Process as TestProcess
from workers.ops.devstack import REPO_ROOT, EmbeddedRedis, free_port
from workers.store.redis_client import connect

BIN = Path(sys.executable).parent


class Process(TestProcess):
    """A process whose output goes to the run's folder, with its pids for the CPU and memory figures."""

    def __init__(self, name, command, env, logdir):
        super().__init__(name, command, env, log_path=Path(logdir) / f"{name}.log")

    @property
    def pid(self):
        return self.proc.pid

    def check(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")

    def children(self):
        """Pids of this process's children (gunicorn workers, Celery pool processes)."""
        return children_of(self.pid)

    def pids(self):
        return [self.pid] + self.children()


def children_of(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def cpu_seconds(pids):
    """User + system CPU seconds used so far by the live processes ``pids``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def peak_rss_mib(pid):
    """Peak resident set size (VmHWM) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def wait_http(url, timeout=30, process=None):
    """Wait until ``url`` answers at all (any status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            process.check()
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class Stack:
    """Processes started for one phase; ``close()`` stops them in reverse order."""

    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.started = []
        self.redis = None

    def cpu(self):
        """CPU seconds used so far, by role: each process's name (with its children), and redis."""
        used = {proc.name: cpu_seconds(proc.pids()) for proc in self.started}
        if self.redis:
            used["redis"] = cpu_seconds([self.redis.process.pid])
        return used

    def redis_commands(self):
        """Redis commands run so far, by command (``INFO commandstats``; a script's own calls included)."""
        if not self.redis:
            return {}
        stats = connect(self.redis.url).info("commandstats")
        return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}

    def start_redis(self):
        """A real redis-server with an append-only file, as production runs it; always empty at start."""
        folder = self.logdir / "redis"
        shutil.rmtree(folder, ignore_errors=True)
        self.redis = EmbeddedRedis(folder, appendonly=True).start()
        return self.redis.url

    def gunicorn(self, name, app_spec, env, wait=True):
        """``gunicorn -c gunicorn.conf.py APP`` on a free port: the project's web settings for every app
        (``WEB_CONCURRENCY`` sync workers)."""
        port = free_port()
        proc = self._add(Process(name, [str(BIN / "gunicorn"), "-c", str(REPO_ROOT / "gunicorn.conf.py"),
                                        "-b", f"127.0.0.1:{port}", app_spec], env, self.logdir))
        proc.url = f"http://127.0.0.1:{port}"
        proc.ready = lambda: wait_http(proc.url + "/healthz", process=proc)
        if wait:
            proc.ready()
        return proc

    def celery(self, name, args, env, ready="ready.", wait=True, app="workers.app"):
        proc = self._add(Process(name, [str(BIN / "celery"), "-A", app, *args], env, self.logdir))
        proc.ready = (lambda: proc.wait_for_output(ready)) if ready else (lambda: None)
        if wait:
            proc.ready()
        return proc

    def simulators(self, names, *args):
        """Start the simulators ``names`` (in parallel); ``{name: url}``."""
        procs = [self._add(Process(name, [sys.executable, "-m", "bench.sims", name, *args],
                                   dict(os.environ, PYTHONUNBUFFERED="1"), self.logdir)) for name in names]
        for proc in procs:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not proc.output().startswith("http"):
                proc.check()
                time.sleep(0.05)
            proc.url = proc.output().splitlines()[0].strip()
            wait_http(proc.url + "/_bench/count", process=proc)
        return {proc.name: proc.url for proc in procs}

    def _add(self, proc):
        self.started.append(proc)
        return proc

    def close(self):
        for proc in reversed(self.started):
            proc.stop()
        self.started = []
        if self.redis:
            self.redis.stop()
            self.redis = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

