"""The receiver served by real gunicorn against a real Redis."""
import json
import time

import pytest
import requests

from tests.helpers import TEST_SECRET, post
from tests.payloads import PUBLISHED
from workers.locate2u.webhook_auth import url_token
from workers.ops.devstack import EmbeddedRedis
from workers.store.ledger import Ledger
from workers.store.quarantine import Quarantine
from workers.store.redis_client import connect

STOP = PUBLISHED["stop.status-changed"]


@pytest.fixture
def web(settings, start_process):
    return start_process("gunicorn", settings.replace(webhook_secret_previous="previous-secret-0123456789",
                                                      max_body_bytes=4096))


def queued(redis_client, queue="ingest"):
    return [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)]


def test_accepted_delivery_is_in_the_ledger_and_queued(web, redis_client):
    response = post(web.url, "stop.status-changed", STOP)
    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == "accepted" and len(answer["delivery_id"]) == 64
    entry = Ledger(redis_client).get(answer["delivery_id"])
    assert entry["event_type"] == "stop.status-changed"
    assert json.loads(entry["body"]) == STOP
    assert entry["status"] == "received" and float(entry["received_at"]) > 0
    [message] = queued(redis_client)
    assert message["headers"]["task"] == "l2u.process_delivery"
    assert message["headers"]["argsrepr"] == repr([answer["delivery_id"], "stop.status-changed"])


def test_duplicate_is_recognised_and_not_queued_twice(web, redis_client):
    first = post(web.url, "stop.status-changed", STOP).json()
    second = post(web.url, "stop.status-changed", STOP)
    assert second.status_code == 200
    assert second.json() == {"status": "duplicate", "delivery_id": first["delivery_id"]}
    assert len(queued(redis_client)) == 1
    # The same body on another event type's URL is a different delivery.
    assert post(web.url, "stop.assigned", STOP).json()["status"] == "accepted"


def test_previous_secret_is_accepted_during_rotation(web):
    response = post(web.url, "stop.status-changed", STOP, secret="previous-secret-0123456789")
    assert response.json()["status"] == "accepted"


@pytest.mark.parametrize("event_type, token, status, error", [
    ("stop.teleported", "x", 404, "unknown_event_type"),
    ("stop.status-changed", "wrong-token", 401, "invalid_token"),
    ("stop.status-changed", url_token(TEST_SECRET, "stop.assigned"), 401, "invalid_token"),
    ("stop.status-changed", url_token("some-other-secret-123456", "stop.status-changed"), 401, "invalid_token"),
])
def test_rejected_requests_store_nothing(web, redis_client, event_type, token, status, error):
    response = post(web.url, event_type, STOP, token=token)
    assert response.status_code == status
    assert response.json()["error"] == error
    assert redis_client.keys("l2u:*") == [] and queued(redis_client) == []


@pytest.mark.parametrize("body, error, message", [
    (b"{not json", "invalid_body", "body is not valid JSON: Expecting property name enclosed in double quotes"),
    (b"", "empty_body", "the request body is empty; a JSON object is required"),
    (b" \r\n", "empty_body", "the request body is empty; a JSON object is required"),
    (b"[1, 2]", "invalid_body", "body must be a JSON object, not list"),
    (b"\xff\xfe", "invalid_body", "body is not valid JSON"),
    # Python's json reads these; JSON has no such tokens, and a forward endpoint's parser refuses them
    (b'{"stopId": 1, "actionDate": "2022-04-27T05:00:00Z", "x": NaN}', "invalid_body",
     "body is not valid JSON: NaN is not a JSON number"),
    (b'{"stopId": 1, "actionDate": "2022-04-27T05:00:00Z", "x": -Infinity}', "invalid_body",
     "body is not valid JSON: -Infinity is not a JSON number"),
])
def test_bad_bodies_get_400_saying_what_is_wrong(web, redis_client, body, error, message):
    response = post(web.url, "stop.status-changed", body)
    assert response.status_code == 400
    assert response.json()["error"] == error
    assert response.json()["message"].startswith(message)
    assert redis_client.keys("l2u:*") == []


def test_oversized_body_gets_413(web, redis_client):
    response = post(web.url, "stop.status-changed", dict(STOP, notes="x" * 5000))
    assert response.status_code == 413
    assert response.json()["message"] == "request body is larger than the limit of 4096 bytes"
    assert redis_client.keys("l2u:*") == []


def test_missing_key_field_gets_422_and_is_quarantined(web, redis_client):
    body = {key: value for key, value in STOP.items() if key != "stopId"}
    response = post(web.url, "stop.status-changed", body)
    assert response.status_code == 422
    assert response.json() == {"error": "missing_field", "field": "stopId",
                               "message": "field 'stopId' is required for stop.status-changed"}
    [item] = Quarantine(redis_client).items()
    assert item["event_type"] == "stop.status-changed"
    assert json.loads(item["body"]) == body
    assert item["errors"] == {"stopId": ["Missing data."]}
    assert queued(redis_client) == []


def test_unknown_route_and_method_answer_json(web):
    assert requests.get(web.url + "/nope", timeout=5).json()["error"] == "not_found"
    response = requests.get(f"{web.url}/webhooks/locate2u/stop.assigned/x", timeout=5)
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"


def test_health_and_readiness(web):
    assert requests.get(web.url + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(web.url + "/readyz", timeout=5)
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert ready.json()["status"] == "ready"
    assert {name: checks[name] for name in ("redis", "broker", "locate2u")} == {
        "redis": "ok", "broker": "ok", "locate2u": "not configured"}
    assert checks["redis_health"]["maxmemory_policy"] == "noeviction"  # the suite's Redis: nothing evicted


def test_redis_down_gives_503_then_the_retry_is_accepted(settings, start_process, tmp_path):
    own = EmbeddedRedis(tmp_path / "own-redis", appendonly=False).start()
    try:
        web = start_process("gunicorn", settings.replace(redis_url=own.url))
        own.stop()
        refused = post(web.url, "stop.status-changed", STOP)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "5"
        assert refused.json()["error"] == "unavailable"
        not_ready = requests.get(web.url + "/readyz", timeout=10)
        assert not_ready.status_code == 503 and not_ready.json()["checks"]["redis"].startswith("error:")
        own.start()
        accepted = post(web.url, "stop.status-changed", STOP)
        assert accepted.status_code == 200 and accepted.json()["status"] == "accepted"
        assert Ledger(connect(own.url)).get(accepted.json()["delivery_id"])["status"] == "received"
    finally:
        own.stop()


def test_a_redis_that_closes_idle_connections_costs_no_delivery(settings, start_process, tmp_path):
    """Heroku's Key-Value Store closes connections idle past its ``timeout`` (``heroku redis:timeout``):
    a webhook after a quiet spell must find its pooled connection gone and still be accepted, not 503."""
    own = EmbeddedRedis(tmp_path / "own-redis", appendonly=False).start()
    try:
        checker = connect(own.url)
        checker.config_set("timeout", 1)
        web = start_process("gunicorn", settings.replace(redis_url=own.url))
        assert post(web.url, "stop.status-changed", STOP).status_code == 200
        for stop_id in (101, 102):
            time.sleep(2.5)
            others = [client for client in checker.client_list() if not client["cmd"].startswith("client")]
            assert others == []  # the server closed every connection the web workers held
            assert post(web.url, "stop.status-changed", dict(STOP, stopId=stop_id)).status_code == 200
    finally:
        own.stop()


def test_broker_down_releases_the_dedup_key(settings, start_process, redis_client):
    web = start_process("gunicorn", settings.replace(broker_url="redis://127.0.0.1:1/0"))
    refused = post(web.url, "stop.status-changed", STOP)
    assert refused.status_code == 503
    assert redis_client.keys("l2u:*") == []
    assert requests.get(web.url + "/readyz", timeout=10).json()["checks"]["broker"].startswith("error:")
