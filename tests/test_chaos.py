"""The chaos run (tests/chaos.py): its CI profile in the normal suite, the large one marked slow.

A run that breaks a guarantee fails the build: a lost delivery, a duplicate
record downstream, a wrong final state, an unexplained dead letter, a 503
that was not accepted on retry, or a secret in any process's output. The
run also has to show that every kind of fault happened, so a quiet run cannot
pass.
"""
import random
import time
from datetime import datetime, timedelta, timezone

import pytest
import requests

from tests import chaos
from workers.ops.simulators import storepoint
from workers.ops.simulators.base import SimulatorServer


def assert_guarantees(report, profile):
    figures = report.figures
    assert report.problems == [], report.summary()
    assert figures["lost"] == 0
    assert figures["wrong_final_state"] == 0 and figures["duplicates_downstream"] == 0
    assert figures.get("secrets_leaked", 0) == 0
    assert figures["accepted"] == figures["unique_deliveries"], report.summary()
    assert figures["duplicates_recognised"] >= figures["exact_duplicates_sent"], report.summary()
    # The chaos happened.
    assert figures["worker_kills_survived"] == profile.kills, report.summary()
    assert figures["worker_kills_in_sink_call"] > 0, report.summary()
    assert figures["redis_sigkills_survived"] == 1, report.summary()
    assert figures["deliveries_503_in_redis_restart"] > 0, report.summary()
    assert (figures["deliveries_503_in_redis_restart_accepted_on_retry"]
            == figures["deliveries_503_in_redis_restart"]), report.summary()
    assert figures["queue_deletions"] == profile.queue_drops, report.summary()
    # ... and took a message of a delivery not yet settled, so its recovery was put to the test
    assert figures["deliveries_hit_by_deletions"] > figures["settled_deliveries_hit_by_deletions"], report.summary()
    assert figures["locate2u_503_injected"] > 0 and figures["locate2u_429_injected"] > 0, report.summary()
    assert figures["locate2u_timeouts_injected"] > 0, report.summary()
    assert figures["sink_503_injected"] > 0 and figures["sink_429_injected"] > 0, report.summary()
    assert figures["sink_applied_then_503"] > 0 and figures["sink_applied_then_dropped"] > 0, report.summary()
    assert figures["sink_applied_then_garbled"] > 0, report.summary()
    assert figures["sink_writes_applied_after_timeout"] > 0, report.summary()
    assert figures["stops_with_equal_instants"] > 0, report.summary()
    assert figures["retries"] > 0 and figures["stops_newest_cancelled"] > 0, report.summary()


def run_and_check(name, tmp_path):
    """Run chaos profile ``name`` in ``tmp_path``, print its summary and check every guarantee."""
    profile = chaos.PROFILES[name]
    report = chaos.run(profile, workdir=tmp_path / "chaos")
    print(report.summary())
    assert_guarantees(report, profile)


@pytest.mark.timeout(480)
def test_ci_profile_keeps_every_guarantee(tmp_path):
    run_and_check("ci", tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_large_profile_keeps_every_guarantee(tmp_path):
    run_and_check("large", tmp_path)


# The checks themselves, so a green run means what it says.

def test_the_newest_event_is_the_latest_instant_whatever_its_offset():
    rng = random.Random(7)
    early = datetime(2022, 4, 27, 9, 7, 44, tzinfo=timezone.utc)
    events = [chaos.make_event(500001, early + timedelta(minutes=24), rng),
              chaos.make_event(500001, early, rng)]
    newest = max(events, key=lambda event: event.instant)
    assert chaos.expected_final(events) == {500001: newest.status}
    assert events[0].instant > events[1].instant


def test_equal_instants_are_ordered_by_receipt_then_delivery_id():
    rng = random.Random(7)
    at = datetime(2022, 4, 27, 9, 7, 44, tzinfo=timezone.utc)
    first, second = (chaos.make_event(500001, at, rng, exact=True) for _ in range(2))
    assert first.instant == second.instant
    assert chaos.expected_final([first, second], {first.delivery_id: 2.0, second.delivery_id: 1.0}) == {
        500001: first.status}
    assert chaos.expected_final([first, second], {first.delivery_id: 1.0, second.delivery_id: 2.0}) == {
        500001: second.status}


def test_a_secret_in_any_log_is_reported():
    outputs = {"worker-1": '{"message": "GET /locations with Authorization: Bearer sp-token-123456"}',
               "gunicorn-1": "nothing to see"}
    problems, figures = chaos.check_logs(outputs, {"storepoint token": "sp-token-123456"})
    assert figures["secrets_leaked"] == 1
    assert problems == ["secret storepoint token appears 1 times in the worker-1 log"]


def test_simulator_faults_apply_then_fail_and_hold_requests():
    """The faults the run injects into sinks: the write lands, the answer does not; a slow call."""
    state = storepoint.StorepointState(token="t")
    body = {"name": "A", "address": "1 A St", "coordinates": {"lat": 1.0, "lng": 2.0}}
    headers = {"Authorization": "Bearer t"}
    with SimulatorServer(storepoint.create_app(state)) as server:
        faults = server.app.config["FAULTS"]
        faults.fail_after_apply(503, path_prefix="/locations")
        assert requests.post(f"{server.url}/locations", json=body, headers=headers, timeout=5).status_code == 503
        faults.fail_after_apply("drop", path_prefix="/locations")
        with pytest.raises(requests.ConnectionError):
            requests.post(f"{server.url}/locations", json=body, headers=headers, timeout=5)
        faults.fail_after_apply("garbled", path_prefix="/locations")
        garbled = requests.post(f"{server.url}/locations", json=body, headers=headers, timeout=5)
        assert garbled.status_code == 200 and garbled.text.startswith("<html>")
        assert len(state.locations) == 3  # every write took effect
        faults.slow(0.5, path_prefix="/locations")
        started = time.monotonic()
        assert requests.get(f"{server.url}/locations", headers=headers, timeout=5).ok
        assert time.monotonic() - started >= 0.5
        assert requests.get(f"{server.url}/locations", headers=headers, timeout=5).ok  # only once
    assert faults.counts == {"applied then 503": 1, "applied then drop": 1, "applied then garbled": 1, "slow": 1}
    assert faults.in_progress == {}
