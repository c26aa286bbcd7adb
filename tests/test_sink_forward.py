"""The signed forward sink against a loopback receiver that verifies Standard Webhooks signatures."""
import base64
import json
import threading
import time
from urllib.parse import urlsplit

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.fixtures import FORWARD_SECRET
from tests.helpers import wait_for
from tests.sink_contract import SinkContract, sample_location
from workers.config import ConfigError, Settings
from workers.resilience.admission import SlowCalls
from workers.resilience.errors import CredentialsRefused, NotYet, PermanentError, RelayError, RetriableError
from workers.sinks.forward import (ENDPOINT_BUSY_AFTER, ENDPOINT_CROWDED_SECONDS, ENDPOINT_FAILURES,
                                   ENDPOINT_PAUSE_SECONDS, ForwardSink)

NEW_SECRET = "whsec_" + base64.b64encode(b"forward-rotated-secret-987654321").decode()


@pytest.fixture
def sim(simulator):
    return simulator("forward", secrets={"a": FORWARD_SECRET, "b": FORWARD_SECRET})


def make_forward(urls, mappings, secrets=(FORWARD_SECRET,)):
    settings = Settings(webhook_secret="x" * 16, forward_urls=tuple(urls), forward_secret=tuple(secrets))
    return ForwardSink.from_settings(settings, mappings)


def encoded(sink, action, location):
    """The exact body the sink sends."""
    return json.dumps(sink.message(action, location), sort_keys=True, separators=(",", ":"))


def received(sim, name="a"):
    return [headers for endpoint, headers in sim.app.config["STATE"].log if endpoint == name]


class TestForwardContract(SinkContract):
    def make_sink(self, sim, mappings):
        return make_forward([f"{sim.url}/hooks/a"], mappings)

    def remote(self, sim, key):
        message = sim.app.config["STATE"].messages["a"].get(key)
        return [message] if message and message["action"] != "delete" else []

    def remote_name(self, record):
        return record["location"]["name"]

    def is_active(self, record):
        return record["action"] == "upsert"

    def invalid_location(self):
        return sample_location(name="")


def test_message_is_the_event_with_action_and_location(sim, mappings):
    location = sample_location()
    make_forward([f"{sim.url}/hooks/a"], mappings).apply("deactivate", location)
    message = sim.app.config["STATE"].messages["a"][location.key]
    assert {name: message[name] for name in location.event} == location.event
    assert message["action"] == "deactivate"
    assert message["location"]["name"] == "Locate2u" and "event" not in message["location"]


def test_non_stop_event_carries_no_location(sim, mappings):
    trip = sample_location(stop_id=None, key="l2u-trip-46659", event={"delivery_id": "d-9", "entity": "trip"})
    make_forward([f"{sim.url}/hooks/a"], mappings).apply("upsert", trip)
    assert "location" not in sim.app.config["STATE"].messages["a"]["d-9"]


def test_signature_verifies_with_reference_library(sim, mappings):
    sink = make_forward([f"{sim.url}/hooks/a"], mappings)
    webhook_id = sink.apply("upsert", sample_location())
    [headers] = received(sim)
    assert headers["Webhook-Id"] == webhook_id and webhook_id.startswith("d-1.forward.")
    assert abs(int(headers["Webhook-Timestamp"]) - time.time()) < 60
    assert headers["Webhook-Signature"].startswith("v1,") and " " not in headers["Webhook-Signature"]
    data = encoded(sink, "upsert", sample_location())
    assert Webhook(FORWARD_SECRET).verify(data, headers) == sink.message("upsert", sample_location())
    with pytest.raises(WebhookVerificationError):
        Webhook(NEW_SECRET).verify(data, headers)


def test_webhook_id_is_stable_across_retries(sim, mappings):
    sink = make_forward([f"{sim.url}/hooks/a"], mappings)
    sim.app.config["FAULTS"].inject(503)
    with pytest.raises(RetriableError):
        sink.apply("upsert", sample_location())
    first = sink.apply("upsert", sample_location())
    assert first == sink.webhook_id(sample_location(), encoded(sink, "upsert", sample_location()))
    assert [headers["Webhook-Id"] for headers in received(sim)] == [first]
    assert sink.apply("upsert", sample_location(name="Other")) != first


def test_rotation_signs_with_every_secret(simulator, mappings):
    server = simulator("forward", secrets={"old": FORWARD_SECRET, "new": NEW_SECRET})
    sink = make_forward([f"{server.url}/hooks/old", f"{server.url}/hooks/new"], mappings,
                        secrets=(FORWARD_SECRET, NEW_SECRET))
    sink.apply("upsert", sample_location())
    state = server.app.config["STATE"]
    assert set(state.messages["old"]) == set(state.messages["new"]) == {"l2u-stop-164557"}
    assert len(received(server, "old")[0]["Webhook-Signature"].split(" ")) == 2


def test_a_signature_refused_with_401_is_credentials_refused(sim, mappings):
    sink = make_forward([f"{sim.url}/hooks/a"], mappings, secrets=(NEW_SECRET,))
    with pytest.raises(CredentialsRefused) as caught:
        sink.apply("upsert", sample_location())
    assert caught.value.status == 401 and "signature" in caught.value.body.lower()


def test_gone_endpoint_is_reported_by_url_and_others_still_delivered(sim, mappings):
    sink = make_forward([f"{sim.url}/hooks/a", f"{sim.url}/hooks/b"], mappings)
    sim.app.config["FAULTS"].inject(410, path_prefix="/hooks/b")
    with pytest.raises(PermanentError) as caught:
        sink.apply("upsert", sample_location())
    assert caught.value.status == 410 and f"{sim.url}/hooks/b" in str(caught.value)
    assert "disabled" in str(caught.value)
    assert len(received(sim, "a")) == 1


def test_retry_does_not_repeat_delivered_endpoints(sim, mappings):
    sink = make_forward([f"{sim.url}/hooks/a", f"{sim.url}/hooks/b"], mappings)
    sim.app.config["FAULTS"].inject(503, times=2, path_prefix="/hooks/b", retry_after=3)
    for _ in range(2):
        with pytest.raises(RetriableError) as caught:
            sink.apply("upsert", sample_location())
        assert caught.value.retry_after == 3 and "/hooks/b" in str(caught.value)
    sink.apply("upsert", sample_location())
    sink.apply("upsert", sample_location())  # a redelivery after success sends nothing
    assert len(received(sim, "a")) == 1 and len(received(sim, "b")) == 1


def test_mixed_failures_are_retriable_and_name_every_url(sim, mappings):
    sink = make_forward([f"{sim.url}/hooks/a", f"{sim.url}/hooks/b"], mappings)
    sim.app.config["FAULTS"].inject(410, path_prefix="/hooks/a")
    sim.app.config["FAULTS"].inject(502, path_prefix="/hooks/b")
    with pytest.raises(RetriableError) as caught:
        sink.apply("delete", sample_location())
    assert "2 of 2" in str(caught.value) and "/hooks/a" in str(caught.value) and "/hooks/b" in str(caught.value)
    assert caught.value.status == 502


def test_a_url_failing_in_a_row_is_paused_and_then_tried_by_one_message_every_few_seconds(sim, mappings):
    """Before, every message called a URL that was down (a timeout each, when it hangs) and every
    failure counted against the whole forward."""
    sink = make_forward([f"{sim.url}/hooks/a", f"{sim.url}/hooks/b"], mappings)
    faults = sim.app.config["FAULTS"]
    faults.fail_rate(1.0, 503, path_prefix="/hooks/b")
    caught = []
    for n in range(ENDPOINT_FAILURES + 2):
        with pytest.raises(RetriableError) as error:
            sink.apply("upsert", sample_location(stop_id=n))
        caught.append(error.value)
    assert faults.counts["503"] == ENDPOINT_FAILURES and len(received(sim, "a")) == ENDPOINT_FAILURES + 2
    assert [error.status for error in caught] == [503] * ENDPOINT_FAILURES + [None, None]
    assert str(caught[-1]) == (f"forward endpoint {sim.url}/hooks/b is paused: it failed {ENDPOINT_FAILURES} times "
                               f"in a row; a message tries it every {ENDPOINT_PAUSE_SECONDS} s")
    assert all(error.others_answer for error in caught)  # a answers: not the forward's own failure

    time.sleep(ENDPOINT_PAUSE_SECONDS)  # paused for that long: the next message tries b, once
    faults.clear()
    sink.apply("upsert", sample_location(stop_id=0))
    sink.apply("upsert", sample_location(stop_id=99))
    assert len(received(sim, "b")) == 2


def test_a_paused_url_has_one_probe_out_at_a_time_however_long_it_takes(sim, mappings):
    """A paused URL that hangs: its probe waits for an answer longer than the pause. The probe's slot
    lasted the pause (3 s), so every message after it sent one more call into the hang, each tying
    up a worker process until its timeout."""
    sink = make_forward([f"{sim.url}/hooks/a", f"{sim.url}/hooks/b"], mappings)
    faults = sim.app.config["FAULTS"]
    faults.fail_rate(1.0, 503, path_prefix="/hooks/b")
    for n in range(ENDPOINT_FAILURES):
        with pytest.raises(RetriableError):
            sink.apply("upsert", sample_location(stop_id=n))
    faults.clear()
    time.sleep(ENDPOINT_PAUSE_SECONDS)
    faults.slow(ENDPOINT_PAUSE_SECONDS + 2, path_prefix="/hooks/b")  # the probe's answer takes that long
    probe = threading.Thread(target=sink.apply, args=("upsert", sample_location(stop_id=10)))
    probe.start()
    time.sleep(ENDPOINT_PAUSE_SECONDS + 0.5)  # the probe still waits
    with pytest.raises(RetriableError, match="is paused"):
        sink.apply("upsert", sample_location(stop_id=11))
    probe.join()
    assert faults.counts["slow"] == 1 and len(received(sim, "b")) == 1
    sink.apply("upsert", sample_location(stop_id=11))  # the probe answered: b takes messages again
    assert len(received(sim, "b")) == 2


def test_a_url_with_a_call_waiting_over_2_s_is_skipped_until_that_call_ends(sim, mappings):
    """A URL that hangs: before, every message called it (each tying up a worker process for the
    read timeout) until its third timeout paused it, and a URL listed after it got each message only
    once that call was over."""
    sink = make_forward([f"{sim.url}/hooks/b", f"{sim.url}/hooks/a"], mappings)
    faults = sim.app.config["FAULTS"]
    faults.slow(SlowCalls.SLOW_AFTER + 3, path_prefix="/hooks/b")  # one call into b answered 5 s late
    first = threading.Thread(target=sink.apply, args=("upsert", sample_location(stop_id=1)))
    first.start()
    time.sleep(SlowCalls.SLOW_AFTER + 0.5)
    for n in (2, 3):
        with pytest.raises(RetriableError) as caught:
            sink.apply("upsert", sample_location(stop_id=n))
        assert str(caught.value) == (f"forward endpoint {sim.url}/hooks/b is slow: a call to it has waited over "
                                     f"{SlowCalls.SLOW_AFTER:g} s; messages skip it until that call ends")
        assert caught.value.others_answer
    assert len(received(sim, "a")) == 2 and len(received(sim, "b")) == 0  # a has them; b's call still waits
    first.join()
    assert faults.counts["slow"] == 1 and len(received(sim, "a")) == 3 and len(received(sim, "b")) == 1
    sink.apply("upsert", sample_location(stop_id=2))  # b answered: messages go to it again
    assert len(received(sim, "b")) == 2


def fill_calls(sim, sink, url, seconds):
    """Start as many calls into ``url`` as ``sink`` lets be in flight, each answered ``seconds`` late;
    return their threads once the simulator holds them all."""
    faults, limit = sim.app.config["FAULTS"], sink.calls[url].limit
    faults.slow(seconds, times=limit, path_prefix=urlsplit(url).path)
    calls = [threading.Thread(target=sink.apply, args=("upsert", sample_location(stop_id=n))) for n in range(limit)]
    for call in calls:
        call.start()
    wait_for(lambda: len(faults.in_progress) == limit, timeout=1)
    return calls


@pytest.mark.parametrize("failed_before", [False, True], ids=["healthy", "after-a-failure"])
def test_a_url_takes_at_most_half_of_a_workers_processes_in_calls_at_once(sim, mappings, failed_before):
    """Before a call into a hang has waited long enough to be seen, each message called it: a burst
    could tie up every process of the worker. Now a message finding half of them in calls to the URL
    that have waited over ``ENDPOINT_BUSY_AFTER`` (or in any calls, when its last call failed: the
    burst of messages waiting for it) waits a moment without spending an attempt (NotYet), after the
    others got it."""
    sink = make_forward([f"{sim.url}/hooks/b", f"{sim.url}/hooks/a"], mappings)
    faults, limit = sim.app.config["FAULTS"], sink.calls[f"{sim.url}/hooks/b"].limit
    if failed_before:
        faults.inject(503, path_prefix="/hooks/b")
        with pytest.raises(RetriableError):
            sink.apply("upsert", sample_location(stop_id=99))
    calls = fill_calls(sim, sink, f"{sim.url}/hooks/b", SlowCalls.SLOW_AFTER - 0.1)  # busy, never slow
    if not failed_before:
        time.sleep(ENDPOINT_BUSY_AFTER)  # a URL answering sooner is not limited
    with pytest.raises(NotYet) as caught:
        sink.apply("upsert", sample_location(stop_id=limit))
    assert str(caught.value) == f"forward endpoint {sim.url}/hooks/b is busy: {limit} calls to it are in flight " \
                                "from this worker"
    assert caught.value.retry_after == ENDPOINT_CROWDED_SECONDS and len(received(sim, "a")) == 1 + failed_before
    for call in calls:
        call.join()
    sink.apply("upsert", sample_location(stop_id=limit))  # the calls ended: the message goes to b
    assert faults.counts["slow"] == limit and len(received(sim, "b")) == limit + 1


@pytest.mark.parametrize("failed_before", [False, True], ids=["healthy", "after-a-failure"])
def test_a_urls_admission_goes_by_the_age_of_its_calls_and_its_last_outcome(mappings, failed_before):
    """The rules behind the skips, at chosen instants on a real Redis. Healthy: any number of calls
    younger than ``ENDPOINT_BUSY_AFTER`` go (a URL answering sooner is never limited); half the pool
    older than that holds the next one back ("crowded"). After a failure, half the pool of any age
    does. One call older than ``SLOW_AFTER``: "slow". A call older than its probe slot has lapsed."""
    sink = make_forward(["http://127.0.0.1:9/hooks/b"], mappings)
    [url] = sink.urls
    endpoint, calls = sink.endpoints[url], sink.calls[url]
    assert calls.key.startswith("l2u:calls:forward:") and calls.limit == SlowCalls.processes // 2
    if failed_before:
        endpoint.failure()
    start = time.time()

    def admit(call, after):
        return endpoint.admit(calls, SlowCalls.Call(call, endpoint.probe_seconds), ENDPOINT_BUSY_AFTER,
                              now=start + after)[0]

    young = [admit(f"young-{n}", n / 100) for n in range(calls.limit + 1)]
    if failed_before:
        assert young == ["closed"] * calls.limit + ["crowded"]
    else:
        assert young == ["closed"] * (calls.limit + 1)
        assert admit("later", ENDPOINT_BUSY_AFTER + 0.1) == "crowded"
    assert admit("slower", SlowCalls.SLOW_AFTER + 0.1) == "slow"
    assert admit("after-the-lapse", endpoint.probe_seconds + 1) == "closed"


def test_a_failure_is_the_forwards_own_when_no_other_url_answers(sim, mappings):
    faults = sim.app.config["FAULTS"]
    faults.fail_rate(1.0, 503, path_prefix="/hooks/")
    both = make_forward([f"{sim.url}/hooks/a", f"{sim.url}/hooks/b"], mappings)
    only = make_forward([f"{sim.url}/hooks/a"], mappings)
    for sink in (both, only):
        with pytest.raises(RetriableError) as caught:
            sink.apply("upsert", sample_location())
        assert caught.value.others_answer is False
    faults.clear()
    both.apply("upsert", sample_location(stop_id=1))  # a and b answer again
    faults.fail_rate(1.0, 503, path_prefix="/hooks/b")
    with pytest.raises(RetriableError) as caught:
        both.apply("upsert", sample_location(stop_id=2))
    assert caught.value.others_answer is True


def test_redirect_is_not_success(sim, mappings):
    sink = make_forward([f"{sim.url}/hooks/a"], mappings)
    sim.app.config["FAULTS"].inject(307)
    with pytest.raises(PermanentError, match="redirect"):
        sink.apply("upsert", sample_location())


def test_secret_never_in_errors(sim, mappings):
    sink = make_forward([f"{sim.url}/hooks/a"], mappings)
    sim.app.config["FAULTS"].inject(400, body={"echo": FORWARD_SECRET})
    with pytest.raises(PermanentError) as caught:
        sink.apply("upsert", sample_location())
    assert FORWARD_SECRET not in str(caught.value.to_json())


def test_a_credential_in_a_forward_url_is_in_no_error_status_or_redis_key(sim, mappings):
    """A forward URL may carry its receiver's credential: a token in its query, a password before its
    host. Before, the errors (so dead letters and log lines), the paused URLs of ``status`` and the
    set of URLs a message reached showed it whole."""
    token, password = "tok-5f3a9c", "pw-77d1e0"
    answering = f"http://relay:{password}@{sim.url.split('//')[1]}/hooks/b?token={token}"
    refusing = f"http://relay:{password}@127.0.0.1:9/hooks/c?token={token}"  # nothing listens there
    sink = make_forward([f"{sim.url}/hooks/a", answering, refusing], mappings)
    faults = sim.app.config["FAULTS"]
    shown = []
    for n, status in enumerate((503, 410, 307, 503)):  # refusing is paused after its third refusal
        faults.inject(status, path_prefix="/hooks/b")
        with pytest.raises(RelayError) as caught:
            sink.apply("upsert", sample_location(stop_id=n))
        shown.append(json.dumps(caught.value.to_json()))
        shown.append(str(caught.value))
    shown.extend(sink.paused_endpoints())
    with pytest.raises(RetriableError, match="is paused"):  # b answers: the message reached a and b
        sink.apply("upsert", sample_location(stop_id=0))
    redis = mappings.redis
    shown.extend(str(redis.smembers(key)) for key in redis.scan_iter() if redis.type(key) == b"set")
    assert "answered 410" in shown[2] and "redirect (307)" in shown[4] and "is paused" in shown[6]
    assert "ConnectionError" in shown[0] and "127.0.0.1:9/hooks/c" in shown[0]
    assert [text for text in shown if token in text or password in text] == []


@pytest.mark.parametrize("secret", ["whsec_", "not base64!"])
def test_invalid_secret_is_a_config_error(mappings, secret):
    with pytest.raises(ConfigError) as caught:
        make_forward(["http://127.0.0.1:9/hook"], mappings, secrets=(secret,))
    assert list(caught.value.problems) == ["FORWARD_SECRET"] and "not base64!" not in str(caught.value)
