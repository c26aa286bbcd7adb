"""Deliveries through the real receiver and worker to LOCATE, Delivery.com and the signed forward."""
import pytest

from tests.fixtures import FORWARD_SECRET, sims_settings
from tests.helpers import post, settled, wait_for
from tests.payloads import PUBLISHED, status_change
from workers.store.dead_letters import DeadLetterStore

US_STOP, AU_STOP = 501, 502
LOCATE_KEY, DC_TOKEN = "locate-e2e-key-123", "dc-e2e-token-123"


@pytest.fixture
def sims(simulators):
    park_avenue = dict(stopId=US_STOP, name="Park Ave office", address="235 Park Ave S, New York, NY 10003, USA",
                       location={"latitude": 40.73771, "longitude": -73.987949},
                       contact={"name": "Ann", "phone": "212-555-0123", "email": "ann@example.com"})
    return simulators([park_avenue, AU_STOP],  # AU_STOP: the spec's example, an Australian address
                      locate={"api_key": LOCATE_KEY}, deliverycom={"access_token": DC_TOKEN},
                      forward={"secrets": {"a": FORWARD_SECRET}})


@pytest.fixture
def web(settings, sims, start_stack):
    return start_stack(sims_settings(settings, sims, retry_schedule=(0, 1, 2)))


def locate_records(sims, stop_id):
    return [r for r in sims["locate"].app.config["STATE"].rows("customeraddress", with_trashed=True)
            if r.get("remote_key") == f"l2u-stop-{stop_id}"]


def test_us_stop_reaches_locate_deliverycom_and_the_forward(web, sims, redis_client):
    answer = post(web.url, "stop.status-changed", status_change(US_STOP, "Arrived", "2022-04-27T05:00:00+00:00"))
    entry = wait_for(lambda: settled(redis_client, answer.json()["delivery_id"]))
    assert entry["status"] == "applied", entry
    assert set(entry["sinks"]) == {"locate", "deliverycom", "forward"}
    [record] = locate_records(sims, US_STOP)
    assert (record["name"], record["address1"], record["deleted_at"]) == (
        "Park Ave office", "235 Park Ave S, New York, NY 10003, USA", None)
    [address] = sims["deliverycom"].app.config["STATE"].locations.values()
    assert (address["street"], address["city"], address["state"], address["zip_code"]) == (
        "235 PARK AVE S", "NEW YORK", "NY", "10003")
    message = sims["forward"].app.config["STATE"].messages["a"][f"l2u-stop-{US_STOP}"]
    assert message["event_type"] == "stop.status-changed" and message["location"]["name"] == "Park Ave office"


def test_cancellation_soft_deletes_in_locate_and_keeps_the_deliverycom_address(web, sims, redis_client):
    for status, when in (("Arrived", "05:00"), ("Cancelled", "05:30")):
        answer = post(web.url, "stop.status-changed", status_change(US_STOP, status, f"2022-04-27T{when}:00+00:00"))
        wait_for(lambda: settled(redis_client, answer.json()["delivery_id"]))
    [record] = locate_records(sims, US_STOP)
    assert record["deleted_at"] is not None
    assert len(sims["deliverycom"].app.config["STATE"].locations) == 1  # delete only when the routes say so


def test_non_us_stop_is_dead_lettered_for_deliverycom_only(web, sims, redis_client):
    answer = post(web.url, "stop.status-changed", status_change(AU_STOP, "Arrived", "2022-04-27T05:00:00+00:00"))
    entry = wait_for(lambda: settled(redis_client, answer.json()["delivery_id"]))
    assert entry["status"] == "dead_lettered"
    assert {sink: outcome["state"] for sink, outcome in entry["sinks"].items()} == {
        "locate": "applied", "deliverycom": "dead_lettered", "forward": "applied"}
    [letter] = DeadLetterStore(redis_client).list()
    assert letter["sink"] == "deliverycom" and "not in the US" in letter["reason"]
    assert sims["deliverycom"].app.config["STATE"].locations == {}


def test_trip_events_reach_the_forward_only(web, sims, redis_client):
    answer = post(web.url, "trip.created", PUBLISHED["trip.created"])
    entry = wait_for(lambda: settled(redis_client, answer.json()["delivery_id"]))
    assert entry["status"] == "applied" and set(entry["sinks"]) == {"forward"}
    [message] = [m for m in sims["forward"].app.config["STATE"].messages["a"].values()
                 if m["event_type"] == "trip.created"]
    assert message["keys"] == {"tripId": 46660} and "location" not in message
