"""Deliveries posted to the real receiver (gunicorn) and applied by a real Celery worker
to the loopback Storepoint and B2B simulators, with Locate2u simulated for enrichment."""
import json
import subprocess
import time

from tests.fixtures import (KEY, STOP_ID, b2b_locations, kill_worker_mid_write, sim_faults, sim_state,
                            storepoint_locations)
from tests.helpers import post, settled, wait_for
from tests.payloads import status_change
from tests.processes import BIN, process_env
from workers.store import keys
from workers.store.mappings import MappingStore


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


def test_an_emoji_cut_in_half_is_read_as_a_replacement_character_and_poisons_no_later_write(
        stack, sims, redis_client):
    """A sender that cuts text to a length can cut an emoji in half: JSON then carries a lone UTF-16
    surrogate (``"\\ud83d"``), valid JSON that is not text. Here one is in the webhook's notes and
    one in the stop's name as Locate2u's API answers it, and Storepoint's first answer is a 503, so
    the write waits in the due set. The write the relay keeps for each key held that escape, which
    Redis's cjson cannot decode: every later write of the stop was dead-lettered ("internal error: …
    invalid unicode escape"), and the waiting write made the release of every due retry fail. A lone
    surrogate is now read as U+FFFD, as a decoder reads any other invalid sequence."""
    other_stop = STOP_ID + 1
    sim_state(sims["locate2u"]).add_stop(stopId=other_stop, name="Pier \ud83d")
    sim_faults(sims["storepoint"]).inject(503, times=1, path_prefix="/locations")
    cut = {**status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"), "notes": "Left at door \ud83d"}
    firsts = [post(stack.url, "stop.status-changed", json.dumps(cut)),
              post(stack.url, "stop.status-changed", status_change(other_stop, "Arrived", "2022-04-27T05:00:00+00:00"))]
    laters = [post(stack.url, "stop.status-changed", status_change(stop_id, "Complete", "2022-04-27T06:00:00+00:00"))
              for stop_id in (STOP_ID, other_stop)]
    for answer, settles_as in [*((first, ("applied", "stale")) for first in firsts),
                               *((later, ("applied",)) for later in laters)]:
        entry = wait_for(lambda: settled(redis_client, answer.json()["delivery_id"]))
        assert entry["status"] in settles_as, entry["sinks"]  # a first whose retry came after its later: stale
    [named] = storepoint_locations(sims, f"l2u-stop-{other_stop}")
    assert named["name"] == "Pier \ufffd" and "complete" in named["tags"]
    assert "complete" in storepoint_locations(sims)[0]["tags"]


def test_a_body_nested_deeper_than_a_delivery_can_be_is_refused_not_left_to_crash_the_worker(
        stack, sims, redis_client):
    """gunicorn's JSON parser took bodies nested up to ~970 levels (in a field the schema ignores). The
    worker then either retried the delivery forever (RecursionError reading it) or, once its write went
    out as a message of its own (a 503, a busy key), died handing it to its pool (``Unrecoverable error:
    RecursionError … pickling``), and so did every worker started after it. A Locate2u delivery nests
    three levels; the receiver refuses more than 32 and names the rule."""
    sim_faults(sims["storepoint"]).inject(503, times=1, path_prefix="/locations")
    body = json.dumps(status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))[:-1] + ', "x": %s}'
    for depth in (33, 600, 960):
        refused = post(stack.url, "stop.status-changed", body % ("[" * depth + "]" * depth))
        assert refused.status_code == 400, refused.text
        assert refused.json()["message"] == "body is nested deeper than 32 levels"
    accepted = post(stack.url, "stop.status-changed", body % ("[" * 31 + "]" * 31))
    entry = wait_for(lambda: settled(redis_client, accepted.json()["delivery_id"]))
    assert entry["status"] == "applied", entry["sinks"]


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
