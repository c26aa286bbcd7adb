"""A sink's rate limit against a vendor that enforces its own, through real processes: gunicorn, a
Celery worker with beat, and the Locate2u and Storepoint simulators on loopback.

The Storepoint simulator answers 429 to writes beyond 6 a second (bursts of 6), as a vendor's
gateway does, and the route's ``rate_limit`` is set under it (4 a second, bursts of 2), as a user
configures a published limit. The relay must stay within it when a burst of deliveries arrives at
once, and when the writes it held during an outage are released as the sink answers again (issue
15: released "within the sink's rate limit"). Every 429 the vendor answered is a write the relay
sent over the limit.
"""
import time

import pytest

from tests.fixtures import sims_settings
from tests.helpers import post, sink_outcomes, wait_for
from tests.payloads import status_change

SP_TOKEN = "sp-rate-limit-token-123"
RATE, BURST = 4, 2  # the route's
VENDOR_RATE, VENDOR_BURST = 6, 6  # the simulator's: room for a write held up ~1 s between its token and its send
BURST_STOPS = range(6001, 6025)  # posted at once
OUTAGE_STOPS = range(6101, 6117)  # posted while Storepoint answers 503


@pytest.fixture
def sims(simulators):
    stops = [{"stopId": stop_id, "name": f"Stop {stop_id}"} for stop_id in (*BURST_STOPS, *OUTAGE_STOPS)]
    return simulators(stops, storepoint={"token": SP_TOKEN})


@pytest.fixture
def stack(settings, sims, start_stack, tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"storepoint:\n  rate_limit: {{rate: {RATE}, burst: {BURST}}}\n")
    return start_stack(sims_settings(settings, sims, routes_file=str(routes)))


def applied_within_limit(redis_client, faults, delivery_ids, timeout):
    """Their Storepoint outcomes once every delivery is applied; fails at the vendor's first 429."""
    def done():
        assert faults.counts["429 over the rate limit"] == 0, "a write went over the vendor's rate limit"
        found = sink_outcomes(redis_client, delivery_ids)
        return all(outcome.get("state") == "applied" for outcome in found.values()) and found
    return wait_for(done, timeout=timeout)


def test_a_burst_and_the_writes_released_after_an_outage_stay_within_the_sinks_rate_limit(stack, sims, redis_client):
    faults = sims["storepoint"].app.config["FAULTS"]
    faults.rate_limit(VENDOR_RATE, VENDOR_BURST)

    started = time.time()
    burst = [post(stack.url, "stop.status-changed", status_change(stop_id, "Arrived", "2022-04-27T05:00:00+00:00"))
             .json()["delivery_id"] for stop_id in BURST_STOPS]
    outcomes = applied_within_limit(redis_client, faults, burst, timeout=90)
    spread = max(outcome["at"] for outcome in outcomes.values()) - started
    assert spread >= (len(burst) - BURST) / RATE - 1  # the limit paced them
    assert all(outcome["attempts"] == 1 for outcome in outcomes.values()), outcomes  # waiting spent none

    faults.fail_rate(1.0, 503)  # an outage: every write is refused (each still counts at the gateway)
    held = []
    for stop_id in OUTAGE_STOPS:
        body = status_change(stop_id, "Arrived", "2022-04-27T05:00:00+00:00")
        held.append(post(stack.url, "stop.status-changed", body).json()["delivery_id"])
    wait_for(lambda: all(outcome.get("state") in ("retrying", "waiting")
                         for outcome in sink_outcomes(redis_client, held).values()), timeout=60)
    time.sleep(2)
    faults.fail_rate(0.0)  # Storepoint answers again; its rate limit stays
    recovered_at = time.time()
    outcomes = applied_within_limit(redis_client, faults, held, timeout=90)
    seconds = max(outcome["at"] for outcome in outcomes.values()) - recovered_at
    print(f"\n{len(burst)} deliveries at once applied over {spread:.1f} s; {len(held)} held during an outage "
          f"applied {seconds:.1f} s after Storepoint answered again; none over the vendor's limit")
    assert len(sims["storepoint"].app.config["STATE"].find(lambda location: True)) == len(burst) + len(held)
