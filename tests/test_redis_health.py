"""Redis health (memory against maxmemory, eviction policy, persistence) in the three places that show it,
and a full Redis answered with 503 + Retry-After, never a 500, against a real Redis with a tiny maxmemory."""
import json

import pytest
import redis
from celery.exceptions import Reject

from tests.fixtures import flushed_redis
from tests.helpers import TEST_SECRET, post
from tests.payloads import PUBLISHED
from receiver import create_app
from workers import tasks
from workers.config import Settings
from workers.ops import status
from workers.ops.devstack import EmbeddedRedis
from workers.runtime import Runtime
from workers.store import redis_health
from workers.store.ledger import Ledger
from workers.store.redis_client import connect

STOP = PUBLISHED["stop.status-changed"]


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """A Redis of this module's own, so its configuration can change without touching the suite's."""
    with EmbeddedRedis(tmp_path_factory.mktemp("health-redis"), appendonly=False) as server:
        yield server


@pytest.fixture
def client(own_redis):
    with flushed_redis(own_redis.url) as client:
        yield client
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("save", "")


@pytest.fixture
def own_settings(own_redis, client, tmp_path):
    return Settings(webhook_secret=TEST_SECRET, redis_url=own_redis.url, data_dir=str(tmp_path / "data"))


def test_no_persistence_is_a_warning_and_rdb_snapshots_are_enough(client):
    report = redis_health.check(client)
    assert report["status"] == "warning" and report["maxmemory_policy"] == "noeviction"
    assert [w for w in report["warnings"] if w.startswith("no persistence")]
    client.config_set("save", "900 1")
    report = redis_health.check(client)
    assert report["status"] == "ok" and report["rdb"] and report["warnings"] == []


def test_an_evicting_policy_is_a_loud_warning(client):
    client.config_set("save", "900 1")
    client.config_set("maxmemory-policy", "allkeys-lru")
    [warning] = redis_health.check(client)["warnings"]
    assert warning.startswith("EVICTION ENABLED: maxmemory-policy is allkeys-lru")


def test_memory_from_80_percent_of_maxmemory_is_a_warning(client):
    client.config_set("save", "900 1")
    used = client.info("memory")["used_memory"]
    client.config_set("maxmemory", int(used / 0.85))
    report = redis_health.check(client)
    assert report["status"] == "warning" and 80 <= report["used_percent"] < 100
    assert report["warnings"][0].startswith("memory 8")
    client.config_set("maxmemory", used * 2)
    assert redis_health.check(client)["status"] == "ok"


def test_an_unreachable_redis_is_an_error_report_not_an_exception():
    report = redis_health.check(connect("redis://127.0.0.1:1/0"))
    assert report["status"] == "error" and report["warnings"][0].startswith("Redis unreachable")


def test_start_up_log_readyz_and_status_show_the_same_report(own_settings, client, capsys):
    client.config_set("maxmemory-policy", "volatile-lru")
    app = create_app(own_settings)
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    logged = [(line["level"], line["message"]) for line in logged if line["name"] == "receiver"]
    assert logged[0][0] == "INFO" and logged[0][1].startswith("redis: memory") and "volatile-lru" in logged[0][1]
    assert ("WARNING", "redis: EVICTION ENABLED") in [(level, message[:23]) for level, message in logged]

    ready = app.test_client().get("/readyz").get_json()
    assert ready["checks"]["redis_health"]["maxmemory_policy"] == "volatile-lru"
    assert ready["checks"]["redis_health"]["status"] == "warning"

    data = status.collect(Runtime(own_settings, send_task=None))
    assert data["redis"]["maxmemory_policy"] == "volatile-lru"
    shown = status.render(data).splitlines()
    assert shown[0].startswith("redis: memory") and shown[1].startswith("WARNING redis: EVICTION ENABLED")


def test_a_full_redis_answers_503_with_retry_after_and_accepts_again_once_there_is_room(
        own_settings, client, start_process):
    web = start_process("gunicorn", own_settings)
    client.config_set("maxmemory", 1)  # every write is refused: OOM command not allowed
    full = post(web.url, "stop.status-changed", STOP)
    assert full.status_code == 503 and full.headers["Retry-After"] == "5"
    assert full.json()["error"] == "unavailable"
    missing_field = post(web.url, "stop.status-changed", {**STOP, "stopId": None})  # the quarantine write
    assert missing_field.status_code == 503 and missing_field.headers["Retry-After"]

    client.config_set("maxmemory", 0)
    accepted = post(web.url, "stop.status-changed", STOP)
    assert accepted.status_code == 200 and accepted.json()["status"] == "accepted"
    assert Ledger(client).get(accepted.json()["delivery_id"])["status"] == "received"


def test_workers_treat_a_full_redis_as_an_outage_to_retry_later(client):
    client.config_set("maxmemory", 1)
    ledger = Ledger(client)
    with pytest.raises(redis.RedisError) as plain:
        ledger.trace("d-1", "routed")
    with pytest.raises(redis.RedisError) as scripted:
        ledger.record("d-1", "stop.status-changed", "{}", 60)
    assert tasks.redis_outage(plain.value) and tasks.redis_outage(scripted.value)
    with pytest.raises(Reject) as rejected, tasks._redis_outage():
        ledger.set_status("d-1", "routed")
    assert rejected.value.requeue  # the message goes back for later, it is not dead-lettered as a bug
