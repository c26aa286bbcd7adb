"""Deliveries posted to the real receiver (gunicorn) and applied by a real Celery worker
to the loopback Storepoint and B2B simulators, with Locate2u simulated for enrichment."""
import subprocess
import time

from tests.fixtures import KEY, STOP_ID, b2b_locations, kill_worker_mid_write, storepoint_locations
from tests.helpers import post, settled, wait_for
from tests.payloads import status_change
from tests.processes import BIN, process_env
from workers.store import keys
from workers.store.stores import MappingStore


def test_status_change_becomes_one_location_in_each_system(stack, sims, redis_client):
    delivery = post(stack.url, "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    entry = wait_for(lambda: settled(redis_client, delivery.json()["delivery_id"]))
    assert entry["status"] == "applied", entry
    [sp] = storepoint_locations(sims)
    assert sp["name"] == "Locate2u"
    assert sp["address"] == "Level 4, Suite 4.11, 55 Miller St, Pyrmont NSW 2009, Australia"
    assert sp["coordinates"] == {"lat": -33.8706672, "lng": 151.192487}
    assert "arrived" in sp["tags"]
    [location] = b2b_locations(sims)
    assert (location["name"], location["city"], location["postalCode"], location["active"]) == (
        "Locate2u", "Pyrmont", "2009", True)

    # The same delivery again is a duplicate; a newer event for the same stop updates in place.
    assert post(stack.url, "stop.status-changed",
                status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00")).json()["status"] == "duplicate"
    later = post(stack.url, "stop.status-changed", status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    assert wait_for(lambda: settled(redis_client, later.json()["delivery_id"]))["status"] == "applied"
    [sp] = storepoint_locations(sims)
    assert "complete" in sp["tags"] and len(b2b_locations(sims)) == 1


def test_cancellation_deletes_from_storepoint_and_deactivates_in_b2b(stack, sims, redis_client):
    first = post(stack.url, "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    wait_for(lambda: settled(redis_client, first.json()["delivery_id"]))
    assert len(storepoint_locations(sims)) == 1
    cancel = post(stack.url, "stop.status-changed", status_change(STOP_ID, "Cancelled", "2022-04-27T05:30:00+00:00"))
    assert wait_for(lambda: settled(redis_client, cancel.json()["delivery_id"]))["status"] == "applied"
    assert storepoint_locations(sims) == []
    [location] = b2b_locations(sims)
    assert location["active"] is False


def test_a_cancellation_whose_stop_was_deleted_in_locate2u_since_is_applied_in_both(stack, sims, redis_client):
    """The stop was cancelled, then deleted in Locate2u before the relay read it (a backlog, the
    cached read expired). Storepoint deletes and needs only the key; B2B deactivates, which took the
    stop's fields, so the read's 404 dead-lettered the whole delivery: both locations stayed live.
    B2B deactivates by key (its update is partial), so neither needs the stop."""
    first = post(stack.url, "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    wait_for(lambda: settled(redis_client, first.json()["delivery_id"]))
    del sims["locate2u"].app.config["STATE"].stops[STOP_ID]
    redis_client.delete(keys.stop_cache(STOP_ID))
    cancel = post(stack.url, "stop.status-changed", status_change(STOP_ID, "Cancelled", "2022-04-27T05:30:00+00:00"))
    assert wait_for(lambda: settled(redis_client, cancel.json()["delivery_id"]))["status"] == "applied"
    assert storepoint_locations(sims) == []
    [location] = b2b_locations(sims)
    assert (location["active"], location["name"], location["city"]) == (False, "Locate2u", "Pyrmont")  # the rest kept


def test_wiped_mapping_is_rebuilt_by_reconcile_without_duplicates(stack, stack_settings, sims, redis_client):
    first = post(stack.url, "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    wait_for(lambda: settled(redis_client, first.json()["delivery_id"]))
    [original] = storepoint_locations(sims)
    redis_client.delete("l2u:map:storepoint")
    result = subprocess.run([str(BIN / "l2u-relay"), "reconcile", "storepoint"], env=process_env(stack_settings),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr  # a rebuilt mapping is drift
    assert "mappings rebuilt: 1" in result.stdout
    assert MappingStore(redis_client, "storepoint").get(KEY) == original["id"]
    later = post(stack.url, "stop.status-changed", status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    wait_for(lambda: settled(redis_client, later.json()["delivery_id"]))
    [updated] = storepoint_locations(sims)
    assert updated["id"] == original["id"] and "complete" in updated["tags"]


def test_worker_killed_mid_delivery_still_applies_once(stack_settings, start_process, sims, redis_client):
    """SIGKILL of the whole worker while a write is in flight: another worker finishes it."""
    web = start_process("gunicorn", stack_settings)

    def deliver():
        return post(web.url, "stop.status-changed",
                    status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00")).json()["delivery_id"]

    entry = kill_worker_mid_write(start_process, stack_settings, sims, redis_client, deliver, write_timeout=30,
                                  settle_timeout=150)  # the killed write's lock: 70 s
    assert entry["status"] == "applied", entry
    time.sleep(1)
    assert len(storepoint_locations(sims)) == 1
    assert len(b2b_locations(sims)) == 1
