"""The receiver's hand-off: ledger write and Celery message in one script when the broker is the same Redis."""
import base64
import json

import pytest

from receiver.handoff import Handoff, RedisTaskMessage, Unavailable, broker_is_ledger_redis
from tests.helpers import wait_for
from tests.payloads import PUBLISHED
from workers.celery_config import INGEST_QUEUE, PROCESS_DELIVERY, make_celery
from workers.ops.devstack import EmbeddedRedis
from workers.store import keys
from workers.store.ledger import Ledger
from workers.store.queue_positions import QueueTickets
from workers.store.redis_client import connect

BODY = json.dumps(PUBLISHED["trip.created"])


def queued(redis_client):
    return [json.loads(raw) for raw in redis_client.lrange(INGEST_QUEUE, 0, -1)]


def test_pushed_message_is_the_one_send_task_publishes(settings, redis_client):
    app = make_celery(settings, "l2u-receiver")
    args = ["a" * 64, "stop.status-changed"]
    app.send_task(PROCESS_DELIVERY, args=args, queue=INGEST_QUEUE, retry=False)
    redis_client.lpush(INGEST_QUEUE, RedisTaskMessage(app, PROCESS_DELIVERY, INGEST_QUEUE).build(args))
    ours, celerys = queued(redis_client)
    assert ours["body"] == celerys["body"]
    assert json.loads(base64.b64decode(ours["body"])) == [args, {}, {"callbacks": None, "errbacks": None,
                                                                    "chain": None, "chord": None}]
    assert {k: v for k, v in ours.items() if k not in ("headers", "properties")} == \
        {k: v for k, v in celerys.items() if k not in ("headers", "properties")}
    assert ours["headers"].keys() == celerys["headers"].keys()
    for name, value in celerys["headers"].items():
        if name not in ("id", "root_id"):
            assert ours["headers"][name] == value, name
    assert ours["headers"]["root_id"] == ours["headers"]["id"] == ours["properties"]["correlation_id"]
    assert ours["headers"]["id"] != celerys["headers"]["id"]
    assert ours["properties"].keys() == celerys["properties"].keys()
    for name in ("reply_to", "delivery_mode", "delivery_info", "priority", "body_encoding"):
        assert ours["properties"][name] == celerys["properties"][name], name
    assert ours["properties"]["delivery_tag"] != celerys["properties"]["delivery_tag"]


def test_accept_records_and_queues_in_one_script(settings, redis_client):
    handoff = Handoff.from_settings(settings)
    assert handoff.messages is not None  # the broker is the ledger's Redis
    assert handoff.accept("d-1", "trip.created", BODY) == "accepted"
    [message] = queued(redis_client)
    assert message["headers"]["task"] == PROCESS_DELIVERY
    assert json.loads(base64.b64decode(message["body"]))[0] == ["d-1", "trip.created"]
    entry = Ledger(redis_client).get("d-1")
    assert entry["status"] == "received" and entry["body"] == BODY
    assert redis_client.zscore(Ledger.OPEN, "d-1") is not None
    assert entry["queued"] == f"{INGEST_QUEUE}:1"  # its queue ticket, kept by the same script


def test_duplicate_is_neither_recorded_again_nor_queued(settings, redis_client):
    handoff = Handoff.from_settings(settings)
    assert handoff.accept("d-1", "trip.created", BODY) == "accepted"
    received_at = Ledger(redis_client).get("d-1")["received_at"]
    assert handoff.accept("d-1", "trip.created", BODY) == "duplicate"
    assert len(queued(redis_client)) == 1
    assert Ledger(redis_client).get("d-1")["received_at"] == received_at


def test_redis_down_is_unavailable_and_nothing_is_half_written(settings, tmp_path):
    own = EmbeddedRedis(tmp_path / "own-redis", appendonly=False).start()
    try:
        handoff = Handoff.from_settings(settings.replace(redis_url=own.url))
        own.stop()
        with pytest.raises(Unavailable):
            handoff.accept("d-1", "trip.created", BODY)
        own.start()  # no persistence: nothing can have survived, so check the retry is accepted whole
        assert handoff.accept("d-1", "trip.created", BODY) == "accepted"
        client = connect(own.url)
        assert client.llen(INGEST_QUEUE) == 1 and Ledger(client).get("d-1")["status"] == "received"
    finally:
        own.stop()


def test_a_failing_push_leaves_the_delivery_for_the_sweeper(settings, redis_client):
    """Scripts are atomic, not transactional: a push refused after the ledger write keeps the entry
    "received" (and in the sweeper's index) and answers 503, so nothing accepted is lost."""
    redis_client.set(INGEST_QUEUE, "not a list")
    handoff = Handoff.from_settings(settings)
    with pytest.raises(Unavailable):
        handoff.accept("d-1", "trip.created", BODY)
    assert redis_client.zscore(Ledger.OPEN, "d-1") is not None


def test_another_broker_falls_back_to_send_task(settings, redis_client):
    other = settings.redis_url.replace("127.0.0.1", "localhost")  # the same server, named as another broker
    handoff = Handoff.from_settings(settings.replace(broker_url=other))
    assert handoff.messages is None
    assert handoff.accept("d-1", "trip.created", BODY) == "accepted"
    [message] = queued(redis_client)
    assert message["headers"]["argsrepr"] == repr(["d-1", "trip.created"])


@pytest.mark.parametrize("redis_url, broker_url, expected", [
    ("redis://127.0.0.1:6379/0", None, True),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", True),
    ("rediss://cache.example:6380/0", None, True),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1", False),
    ("redis://127.0.0.1:6379/0", "amqp://guest@rabbit//", False),
])
def test_broker_is_ledger_redis(settings, redis_url, broker_url, expected):
    assert broker_is_ledger_redis(settings.replace(redis_url=redis_url, broker_url=broker_url)) is expected


def test_the_broker_key_prefix_names_every_list_the_relay_reads_or_writes(settings, monkeypatch):
    """kombu gets ``keys.BROKER_KEY_PREFIX`` as its global_keyprefix; the receiver's push, the queue
    tickets the sweeper reads and the queue depths of status and /metrics use the same lists."""
    monkeypatch.setattr(keys, "BROKER_KEY_PREFIX", "relay:")
    app = make_celery(settings, "l2u-receiver")
    assert app.conf.broker_transport_options["global_keyprefix"] == "relay:"
    assert RedisTaskMessage(app, PROCESS_DELIVERY, INGEST_QUEUE).key == "relay:ingest"
    assert sorted(QueueTickets(connect(settings.redis_url)).snapshot(
        [keys.queue_list(queue) for queue in keys.WORK_QUEUES]).queues) == ["relay:deliver", "relay:ingest"]


def test_a_real_worker_runs_what_the_script_pushed(settings, start_process, redis_client):
    handoff = Handoff.from_settings(settings)
    for number in range(3):
        assert handoff.accept(f"d-{number}", "trip.created", BODY) == "accepted"
    start_process("worker", settings)
    ledger = Ledger(redis_client)
    for number in range(3):
        entry = wait_for(lambda: (e := ledger.get(f"d-{number}")) and e["status"] not in ("received", "processing") and e)
        assert entry["status"] == "unrouted"
    assert redis_client.llen(INGEST_QUEUE) == 0


def test_the_webhook_path_builds_and_calls_no_sink(settings, redis_client, monkeypatch):
    """The web process imports the sink modules for their declarations (README, "The code"), but
    accepting a delivery builds no sink and makes no HTTP call, with sinks configured."""
    from receiver import create_app
    from workers.locate2u.webhook_auth import url_token
    from workers.resilience.http import HttpClient
    from workers.sinks.base import Sink

    def refuse(*_args, **_kwargs):
        raise AssertionError("the webhook path built or called a sink")

    monkeypatch.setattr(Sink, "__init__", refuse)
    monkeypatch.setattr(HttpClient, "request", refuse)
    client = create_app(settings.replace(storepoint_api_token="sp-token-123", b2b_api_token="b2b-token-123",
                                         b2b_business_partner_id="BP-1", b2b_country_id="AU")).test_client()
    token = url_token(settings.webhook_secret, "stop.status-changed")
    answer = client.post(f"/webhooks/locate2u/stop.status-changed/{token}", json=PUBLISHED["stop.status-changed"])
    assert answer.status_code == 200 and answer.get_json()["status"] == "accepted"
    assert queued(redis_client)
