"""Locate2uClient against the loopback simulator: endpoints, retries, error classes, redaction."""
import logging
import time

import pytest

from workers.ops.simulators.locate2u import EXAMPLE_STOP
from workers.resilience.errors import BadAnswer, NotFound, PermanentError, RetriableError
from workers.locate2u.client import Locate2uClient, ReauthorizationRequired, RetryPolicy


@pytest.fixture
def client(sim, settings, redis_client):
    return Locate2uClient.from_settings(sim.configure(settings), redis_client)


def test_unconfigured_gives_no_client(settings, redis_client):
    assert Locate2uClient.from_settings(settings, redis_client) is None


def test_get_stop_as_in_the_spec(client, sim):
    sim.state.add_stop(stopId=164557)
    assert client.get_stop(164557) == EXAMPLE_STOP
    assert client.get_stop("164557")["stopId"] == 164557
    with pytest.raises(NotFound) as caught:
        client.get_stop(999)
    error = caught.value
    assert (error.method, error.status) == ("GET", 404) and error.url == f"{sim.url}/v1/Stops/999"
    assert "Stop 999 not found" in error.body


def test_endpoints(client, sim):
    assert client.whoami()["teamName"] == "Simulated Team"
    created = client.create_stop({"name": "A", "address": "1 A St"})
    assert client.get_stop(created["stopId"])["name"] == "A"
    assert len(client.import_stops([{"name": "B", "address": "2 B St"}])["created"]) == 1
    assert "stop.assigned" in client.event_types()
    hook = client.create_webhook("trip.created", "https://relay.example/h")
    assert client.get_webhook(hook["id"]) == hook == client.list_webhooks()[0]
    assert client.update_webhook(hook["id"], "trip.created", "https://relay.example/g")["url"].endswith("/g")
    assert client.delete_webhook(hook["id"]) is None and sim.state.webhooks == {}


def test_429_waits_for_retry_after(client, sim):
    sim.state.add_stop(stopId=1)
    client.whoami()  # token in hand
    sim.faults.inject(429, times=1, retry_after=1, path_prefix="/v1/Stops")
    started = time.monotonic()
    assert client.get_stop(1)["stopId"] == 1
    assert 1.0 <= time.monotonic() - started < 2.5


def test_retry_after_beyond_the_budget_is_raised_at_once(client, sim):
    client.whoami()
    sim.faults.inject(429, times=1, retry_after=120, path_prefix="/v1/")
    started = time.monotonic()
    with pytest.raises(RetriableError) as caught:
        client.whoami()
    assert time.monotonic() - started < 1 and caught.value.retry_after == 120 and caught.value.status == 429


def test_5xx_retried_on_get_not_on_post(client, sim):
    client.whoami()
    sim.faults.inject(503, times=2, path_prefix="/v1/")
    assert client.whoami()["userId"] == 12345
    sim.faults.inject(503, times=1, path_prefix="/v1/Stops")
    with pytest.raises(RetriableError) as caught:
        client.create_stop({"name": "A", "address": "1 A St"})
    assert (caught.value.method, caught.value.status) == ("POST", 503) and sim.state.stops == {}


def test_attempts_are_bounded(sim, settings, redis_client):
    sleeps = []
    client = Locate2uClient.from_settings(sim.configure(settings), redis_client,
                                          RetryPolicy(attempts=3, sleep=sleeps.append))
    client.whoami()
    sim.faults.inject(500, times=5, path_prefix="/v1/")
    with pytest.raises(RetriableError):
        client.whoami()
    assert len(sleeps) == 2 and sim.faults.injected == 3


def test_other_4xx_is_permanent_and_keeps_the_body(client):
    with pytest.raises(PermanentError) as caught:
        client.create_webhook("stop.created", "https://relay.example/h")
    error = caught.value
    assert not error.retriable and error.status == 400 and "eventType" in error.body
    assert error.to_json()["method"] == "POST"


def test_unreachable_api_is_a_clear_retriable_error(sim, settings, redis_client):
    client = Locate2uClient.from_settings(sim.configure(settings, locate2u_api_url="http://127.0.0.1:9"),
                                          redis_client, RetryPolicy(sleep=lambda s: None))
    with pytest.raises(RetriableError) as caught:
        client.whoami()
    assert str(caught.value) == "GET http://127.0.0.1:9/v1/Discovery/User failed: ConnectionError"


def test_401_renews_once_and_retries(client, sim):
    client.whoami()
    sim.state.revoke_access_tokens()
    assert client.whoami()["userId"] == 12345
    assert [r["grant_type"] for r in sim.state.token_requests] == ["client_credentials"] * 2


def test_code_grant_without_consent_needs_reauthorization(sim, settings, redis_client):
    client = Locate2uClient.from_settings(
        sim.configure(settings, locate2u_grant="authorization_code", public_url="https://relay.example"),
        redis_client)
    with pytest.raises(ReauthorizationRequired) as caught:
        client.get_stop(1)
    # retriable: what needs Locate2u waits for the new consent instead of being dead-lettered
    assert isinstance(caught.value, RetriableError) and "l2u-relay oauth url" in str(caught.value)
    assert client.tokens.status().startswith("reauthorization required: ")
    assert sim.state.token_requests == []


def test_secrets_never_in_errors_or_logs(sim, settings, redis_client, caplog):
    caplog.set_level(logging.DEBUG)
    client = Locate2uClient.from_settings(sim.configure(settings), redis_client, RetryPolicy(sleep=lambda s: None))
    client.whoami()
    token = client.tokens.access_token()
    sim.faults.inject(500, times=4, body={"echo": f"Bearer {token}"}, path_prefix="/v1/")
    with pytest.raises(RetriableError) as caught:
        client.whoami()
    sim.faults.inject(500, times=4, body={"echo": sim.state.client_secret}, path_prefix="/connect/")
    sim.state.revoke_access_tokens()
    with pytest.raises(RetriableError) as from_token_endpoint:
        client.whoami()
    text = " ".join([str(caught.value), str(caught.value.to_json()), str(from_token_endpoint.value.to_json()),
                     caplog.text])
    assert "[redacted]" in text
    assert token not in text and sim.state.client_secret not in text and "Bearer " + token not in text
    assert token not in str(redis_client.get("l2u:locate2u:tokens"))


def test_wrong_client_secret_is_permanent_and_names_the_settings(sim, settings, redis_client):
    client = Locate2uClient.from_settings(sim.configure(settings, locate2u_client_secret="wrong-secret-value"),
                                          redis_client)
    with pytest.raises(PermanentError) as caught:
        client.whoami()
    message = str(caught.value)
    assert caught.value.status == 401 and "invalid_client" in message and "LOCATE2U_CLIENT_SECRET" in message
    assert "wrong-secret-value" not in message + str(caught.value.to_json())


def test_429_is_retried_even_on_post(client, sim):
    client.whoami()
    sim.faults.inject(429, times=1, retry_after=0, path_prefix="/v1/Stops")
    assert client.create_stop({"name": "A", "address": "1 A St"})["status"] == "Created"
    assert len(sim.state.stops) == 1


@pytest.mark.parametrize("answer, why", [
    ({**EXAMPLE_STOP, "stopId": 6}, "with stop 6"),  # a caching proxy keyed without the path, an API bug
    ([EXAMPLE_STOP], "with a body without stopId"),
    ({**EXAMPLE_STOP, "stopId": None}, "with a body without stopId"),  # a null is as good as missing
    (None, "with a body without stopId"),
])
def test_a_stop_read_answered_with_another_stop_or_none_is_a_bad_answer(client, sim, answer, why):
    """Written on, another stop's record would put its name and address under this stop's key in
    every sink; nothing would ever flag it. Retried instead, as an answer that is not the API's."""
    sim.state.add_stop(stopId=5)
    client.whoami()  # token in hand
    sim.faults.inject(200, times=3, body=answer, path_prefix="/v1/Stops")
    with pytest.raises(BadAnswer) as caught:
        client.get_stop(5)
    assert f"GET {sim.url}/v1/Stops/5 answered 200 {why}" in caught.value.message
