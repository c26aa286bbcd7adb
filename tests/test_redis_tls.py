"""``rediss://`` end to end against a real redis-server that speaks only TLS with its own certificate.

By default (like Heroku Key-Value Store's self-signed certificate) the connection is encrypted and the
certificate is not verified; ``RELAY_REDIS_CA_FILE`` makes every client verify it against that CA.
"""
import subprocess

import pytest
import requests

from tests.fixtures import sims_settings
from tests.helpers import TEST_SECRET, post, wait_for
from tests.payloads import status_change
from tests.processes import BIN, CeleryWorker, Gunicorn, ProcfileProcess, make_tls_certificates, process_env
from workers.config import ConfigError, Settings
from workers.store.ledger import Ledger
from workers.store.redis_client import connect

STOPS = (164601, 164602)
SP_TOKEN = "sp-tls-token-123"
FLOWER_AUTH = ("ops", "flower-test-password")


@pytest.fixture
def tls_settings(tls_redis, tmp_path):
    connect(tls_redis.url, tls_redis.ca_file).flushall()
    return Settings(webhook_secret=TEST_SECRET, redis_url=tls_redis.url, data_dir=str(tmp_path / "data"),
                    visibility_timeout=10, sweep_after=1, flower_basic_auth=":".join(FLOWER_AUTH))


@pytest.fixture
def sims(simulators):
    return simulators(STOPS, storepoint={"token": SP_TOKEN})


def with_sinks(settings, sims):
    return sims_settings(settings, sims, retry_schedule=(0, 1, 1, 2, 3))


def status_command(settings):
    return subprocess.run([str(BIN / "l2u-relay"), "status", "--json"], env=process_env(settings),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def processes():
    started = []
    yield started
    for proc in reversed(started):
        proc.stop()


def test_relay_runs_end_to_end_on_tls_redis_and_survives_a_worker_kill(tls_settings, sims, processes):
    settings = with_sinks(tls_settings, sims)
    env = process_env(settings)
    processes.append(Gunicorn(env))
    web = processes[-1]
    processes.append(ProcfileProcess("beat", env))
    processes.append(CeleryWorker(env, name="first"))
    flower = ProcfileProcess("flower", env)
    processes.insert(0, flower)
    ledger = Ledger(connect(settings.redis_url))
    sp_state = sims["storepoint"].app.config["STATE"]

    def applied(stop_id):
        delivery = post(web.url, "stop.status-changed", status_change(stop_id, "Arrived", "2022-04-27T05:00:00+00:00"))
        assert delivery.status_code == 200, delivery.text
        entry = wait_for(lambda: (ledger.get(delivery.json()["delivery_id"]) or {}).get("status") in (
            "applied", "dead_lettered") and ledger.get(delivery.json()["delivery_id"]), timeout=120)
        assert entry["status"] == "applied", (entry, processes[-1].output()[-4000:])
        assert sp_state.find(lambda location: f"l2u:l2u-stop-{stop_id}" in location["tags"])

    applied(STOPS[0])
    processes[-1].kill()  # SIGKILL the whole worker, then a new one on the same TLS Redis
    processes.append(CeleryWorker(env, name="second"))
    applied(STOPS[1])

    def flower_saw_tasks():  # Flower follows the workers' events over the TLS broker
        tasks = requests.get(flower.url + "/api/tasks", auth=FLOWER_AUTH, timeout=30).json()
        # process_delivery writes to the sinks itself: one task per event
        return "l2u.process_delivery" in {task["name"] for task in tasks.values() if task.get("state") == "SUCCESS"}

    wait_for(flower_saw_tasks, timeout=60, interval=1)

    status = status_command(settings)
    assert status.returncode == 0, status.stderr
    assert '"queues"' in status.stdout


def test_ca_file_makes_every_client_verify_the_certificate(tls_redis, tls_settings, tmp_path):
    right = tls_settings.replace(redis_ca_file=tls_redis.ca_file)
    assert status_command(right).returncode == 0

    wrong_ca, _, _ = make_tls_certificates(tmp_path / "other", name="other")
    failed = status_command(tls_settings.replace(redis_ca_file=wrong_ca))
    assert failed.returncode == 2
    assert "certificate verify failed" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_ca_file_setting_is_checked_at_start_up(tmp_path):
    environ = {"RELAY_WEBHOOK_SECRET": TEST_SECRET, "REDIS_URL": "rediss://127.0.0.1:6380/0"}
    with pytest.raises(ConfigError) as missing:
        Settings.from_env({**environ, "RELAY_REDIS_CA_FILE": str(tmp_path / "nope.pem")})
    assert "no such file" in missing.value.problems["RELAY_REDIS_CA_FILE"]
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError) as junk:
        Settings.from_env({**environ, "RELAY_REDIS_CA_FILE": str(tmp_path / "junk.pem")})
    assert "not a readable PEM CA certificate" in junk.value.problems["RELAY_REDIS_CA_FILE"]
    ca_file, _, _ = make_tls_certificates(tmp_path)
    with pytest.raises(ConfigError) as plain:
        Settings.from_env({**environ, "REDIS_URL": "redis://127.0.0.1:6379/0", "RELAY_REDIS_CA_FILE": ca_file})
    assert "rediss://" in plain.value.problems["RELAY_REDIS_CA_FILE"]
    assert Settings.from_env({**environ, "RELAY_REDIS_CA_FILE": ca_file}).redis_ca_file == ca_file
