"""The chaos run (tests/chaos.py): its CI profile in the normal suite, the large one marked slow.

A run that breaks a guarantee fails the build: a lost delivery, a duplicate
record downstream, a wrong final state, an unexplained dead letter, a 503
that was not accepted on retry, or a secret in any process's output. The
run also has to show that the chaos happened, so a quiet run cannot pass.
"""
import random
from datetime import datetime, timedelta, timezone

import pytest

from tests import chaos


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
    assert figures["redis_restarts_survived"] == 1, report.summary()
    assert figures["deliveries_503_in_redis_restart"] > 0, report.summary()
    assert (figures["deliveries_503_in_redis_restart_accepted_on_retry"]
            == figures["deliveries_503_in_redis_restart"]), report.summary()
    assert figures["sink_503_injected"] > 0 and figures["sink_429_injected"] > 0, report.summary()
    assert figures["retries"] > 0 and figures["stops_newest_cancelled"] > 0, report.summary()


@pytest.mark.timeout(300)
def test_ci_profile_keeps_every_guarantee(tmp_path):
    profile = chaos.PROFILES["ci"]
    report = chaos.run(profile, workdir=tmp_path / "chaos")
    print(report.summary())
    assert_guarantees(report, profile)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_large_profile_keeps_every_guarantee(tmp_path):
    profile = chaos.PROFILES["large"]
    report = chaos.run(profile, workdir=tmp_path / "chaos")
    print(report.summary())
    assert_guarantees(report, profile)


# The checks themselves, so a green run means what it says.

def test_the_newest_event_is_the_latest_instant_whatever_its_offset():
    rng = random.Random(7)
    early = datetime(2022, 4, 27, 9, 7, 44, tzinfo=timezone.utc)
    events = [chaos.make_event(500001, early + timedelta(minutes=24), rng),
              chaos.make_event(500001, early, rng)]
    newest = max(events, key=lambda event: event.instant)
    assert chaos.expected_final(events) == {500001: newest.status}
    assert events[0].instant > events[1].instant


def test_a_secret_in_any_log_is_reported():
    outputs = {"worker-1": '{"message": "GET /locations with Authorization: Bearer sp-token-123456"}',
               "gunicorn-1": "nothing to see"}
    problems, figures = chaos.check_logs(outputs, {"storepoint token": "sp-token-123456"})
    assert figures["secrets_leaked"] == 1
    assert problems == ["secret storepoint token appears 1 times in the worker-1 log"]
