"""Real processes for integration tests: gunicorn serving the receiver, Celery workers, beat and Flower, and
`l2u-relay run`'s demo."""
import datetime
import ipaddress
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from workers.ops.devstack import REPO_ROOT, free_port, procfile_commands

BIN = Path(sys.executable).parent


def from_a_terminal(command):
    """``command`` as a shell runs a foreground command, Ctrl-C's SIGINT at its default. A background
    job (``&`` without job control, as a CI script may start the tests) passes SIGINT on ignored, and
    Python then never raises KeyboardInterrupt, whatever the test sends."""
    restore = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
               "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", restore, *map(str, command)]


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

    def signal(self, sig):
        """Send ``sig`` to the whole process group while it runs; True if sent."""
        if self.proc.poll() is not None:
            return False
        os.killpg(self.proc.pid, sig)
        return True

    def kill(self, sig=9):
        """Send ``sig`` to the whole process group (SIGKILL by default) and wait for it to end."""
        if self.signal(sig):
            self.proc.wait(15)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


    def wait_for_http(self, url, timeout=60):
        """Wait until ``url`` answers 2xx."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.output()[-3000:]}")
            try:
                if requests.get(url, timeout=2).ok:
                    return
            except requests.RequestException:  # not listening yet, or slow on a loaded machine
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready at {url}:\n{self.output()[-3000:]}")


class Gunicorn(Process):
    """``gunicorn receiver.wsgi:app`` on a free loopback port."""

    def __init__(self, env, workers=2):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__("gunicorn", [str(BIN / "gunicorn"), "receiver.wsgi:app", "-b", f"127.0.0.1:{self.port}",
                                      "-w", str(workers), "--graceful-timeout", "2"], env)
        self.wait_for_http(self.url + "/healthz")


class CeleryWorker(Process):
    """``celery -A workers.app worker`` (add ``beat=True`` for an embedded beat, ``queues`` to consume only those)."""

    def __init__(self, env, concurrency=2, pool="prefork", beat=False, name="worker", queues=None):
        command = [str(BIN / "celery"), "-A", "workers.app", "worker", "-l", "info", "-P", pool,
                   "-c", str(concurrency), "-n", f"{name}-{free_port()}@%h", "--without-gossip", "--without-mingle"]
        if beat:
            command.append("-B")
        if queues:  # only these (comma-separated), e.g. to leave the work it queues waiting
            command += ["-Q", queues]
        super().__init__(name, command, env)
        self.wait_for_output("ready.", timeout=60)


class ProcfileProcess(Process):
    """One Procfile process run exactly as a dyno runs it: the Procfile's command, a free ``PORT``.

    ``web`` and ``flower`` are waited for on ``url``; ``worker`` until it is ready; ``beat``
    until it has started.
    """

    READY_OUTPUT = {"worker": "ready.", "beat": "beat: Starting"}

    def __init__(self, name, env):
        self.port = free_port()
        env = {**env, "PORT": str(self.port)}
        if name == "flower":
            env.update(FLOWER_PORT=str(self.port), FLOWER_ADDRESS="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(name, shlex.split(procfile_commands()[name]), env)
        if name in self.READY_OUTPUT:
            self.wait_for_output(self.READY_OUTPUT[name], timeout=90)
        else:
            self.wait_for_http(self.url + ("/healthz" if name == "web" else "/healthcheck"), timeout=90)


def make_tls_certificates(folder, name="test"):
    """A CA and a server certificate it signs for 127.0.0.1/localhost, as PEM files in ``folder``.

    Returns ``(ca_file, cert_file, key_file)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, issuer, public_key, signing_key, is_ca, extensions=()):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = certificate(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    server = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name,
                         server_key.public_key(), ca_key, False,
                         [x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                       x509.DNSName("localhost")])])
    paths = folder / f"{name}-ca.pem", folder / f"{name}-server.pem", folder / f"{name}-server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return tuple(str(path) for path in paths)


class TlsRedis(Process):
    """A redis-server (Debian's, TLS built in) that speaks only TLS on a free loopback port, like Heroku's."""

    def __init__(self, binary, folder):
        folder = Path(folder)
        self.ca_file, cert_file, key_file = make_tls_certificates(folder)
        self.port = free_port()
        self.url = f"rediss://127.0.0.1:{self.port}/0"
        super().__init__("redis-tls", [binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                                       "--tls-cert-file", cert_file, "--tls-key-file", key_file,
                                       "--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no",
                                       "--dir", str(folder), "--save", "", "--appendonly", "no"],
                         {"PATH": os.environ.get("PATH", "")})
        self.wait_for_output("Ready to accept connections", timeout=30)


class RabbitMQ(Process):
    """A RabbitMQ node of its own (Debian's rabbitmq-server) on free loopback ports, with its own data and
    log folders, HOME (Erlang cookie) and epmd port, so it touches no system-wide node."""

    SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # the package's wrapper switches user and folder

    def __init__(self, binary, folder):
        folder = Path(folder)
        self.port, self.epmd_port = free_port(), free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(folder), "ERL_EPMD_PORT": str(self.epmd_port),
               "RABBITMQ_NODENAME": f"l2u-test-{self.port}@localhost", "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
               "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(free_port()),
               "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"), "RABBITMQ_LOG_BASE": str(folder / "log"),
               "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
               "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid")}
        super().__init__("rabbitmq", [str(self.SERVER if self.SERVER.exists() else binary)], env)
        try:
            self.wait_for_output("Starting broker... completed", timeout=300)  # minutes on a busy machine
        except AssertionError:
            self.stop()
            raise

    def stop(self):
        """Stop the node, then its epmd (which refuses until the node has gone)."""
        super().stop()
        deadline = time.monotonic() + 30
        while subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"], capture_output=True, text=True,
                             timeout=30).stdout.startswith("Killing not allowed") and time.monotonic() < deadline:
            time.sleep(0.5)


def demo_env():
    """The environment for ``l2u-relay run``: this one without any of the relay's settings."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("LOCATE2U_", "REDIS_URL", "RELAY_", "STOREPOINT_", "B2B_", "LOCATE_",
                                   "DELIVERYCOM_", "FORWARD_", "FLOWER_", "PORT", "GUNICORN_"))}


def assert_demo_summary(result, data_dir):
    """``l2u-relay run --demo-then-exit`` succeeded and its summary says every check passed."""
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


def answer_when_asked(args, env, meanwhile, answer="y\n"):
    """Run ``l2u-relay *args``, call ``meanwhile()`` once it asks its ``[y/N]`` question, then answer;
    ``(the question, the rest of its output, its exit status)``."""
    command = subprocess.Popen([str(BIN / "l2u-relay"), *args], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    asked = ""
    while not asked.endswith("[y/N]: "):
        character = command.stdout.read(1)
        if not character:
            command.wait(timeout=60)
            raise AssertionError(f"it ended without asking: {asked}")
        asked += character
    meanwhile()
    output, _ = command.communicate(answer, timeout=60)
    return asked, output, command.returncode
