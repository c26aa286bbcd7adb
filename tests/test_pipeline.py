"""The pipeline against a real Redis, a loopback Locate2u and a recording HTTP sink.

Tasks run in-process here (their Celery messages are captured and driven by
the test) so retries, breakers and ordering can be stepped deterministically;
tests/test_pipeline_processes.py runs the same flow through real processes.
"""
import email.utils
import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis

from tests.fixtures import STOP_ID, RecordingSink, accept, died_in_first_write, fan_out_job, sim_state
from tests.helpers import admit, wait_for
from tests.payloads import status_change
from workers import tasks
from workers.celery_config import DELIVER, PROCESS_DELIVERY
from workers.domain.events import parse_event
from workers.pipeline.fan_out import cache_stop, resume_fan_out
from workers.pipeline.replay import replay_dead_letter
from workers.pipeline.routes import Route
from workers.resilience.errors import NotYet
from workers.resilience.retries import MAX_RETRY_AFTER
from workers.store import keys
from workers.store.queue_positions import QueueTickets


def test_delivery_is_enriched_and_applied(driver, sink_server, l2u):
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T14:16:40.9450989+10:00"))
    driver.run()
    record = sim_state(sink_server).records[f"l2u-stop-{STOP_ID}"]
    assert record == {"name": "Locate2u", "status": "Arrived", "version": "2022-04-27T14:16:40.9450989+10:00"}
    entry = driver.rt.ledger.get(delivery_id)
    assert entry["status"] == "applied"
    assert entry["sinks"]["storepoint"]["state"] == "applied"
    assert entry["sinks"]["storepoint"]["remote_id"] == f"rec-l2u-stop-{STOP_ID}"
    history = driver.rt.ledger.history(delivery_id)
    assert [line["what"] for line in history] == ["validated", "enriched", "routed", "applied"]
    validated, enriched, routed, applied = history
    assert float(entry["received_at"]) <= validated["at"] <= enriched["at"] <= routed["at"] <= applied["at"]
    assert enriched["from"] == "locate2u" and 0 <= enriched["took"] <= enriched["at"] - validated["at"] + 0.001
    assert routed["sinks"] == ["storepoint"]
    assert applied["sink"] == "storepoint" and 0 <= applied["took"] <= applied["at"] - routed["at"] + 0.001
    # the next event for the stop within the cache's life reads the stop from the cache
    later = accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T14:20:00+10:00"))
    driver.run()
    assert [(line["what"], line.get("from")) for line in driver.rt.ledger.history(later)][:2] == [
        ("validated", None), ("enriched", "cache")]


def test_a_write_kept_with_a_lone_surrogate_before_they_were_repaired_poisons_no_later_write(driver, sink_server):
    """A relay upgraded past the repair of lone surrogates (``workers/domain/json_text.py``) still holds the
    writes it kept before: the newest write of a key, a sink's outcome, a retry waiting in the due set.
    Redis's cjson refused them, so every later write of that key, every outcome beside it and every
    release of due retries failed. The scripts read them with the same repair."""
    key = f"l2u-stop-{STOP_ID}"
    versions = driver.rt.versions("storepoint")
    poisoned = json.dumps({"delivery_id": "d-old", "received_at": 1.0, "action": "upsert",
                           "record": {"key": key, "notes": "Left at door \ud83d"}})
    redis_client = driver.rt.redis
    redis_client.hset(versions.key, key, "1651000000.000000000")  # a day before the event below
    redis_client.hset(versions.writes_key, key, poisoned)
    driver.rt.scheduler.schedule(PROCESS_DELIVERY, ["d-old", "stop.status-changed", 1, False, None, "\ud83d"], 60)
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T14:16:40.9450989+10:00"))
    driver.rt.ledger.sink_outcome(delivery_id, "forward", "retrying", reason="cut \ud83d")  # an outcome beside it
    assert driver.rt.scheduler.release_due(now=time.time() + 120) == 1  # refused (cjson) before
    driver.sent.clear()  # d-old is not in the ledger: nothing to run
    driver.sent.append((PROCESS_DELIVERY, [delivery_id, "stop.status-changed"]))
    driver.run()
    assert driver.rt.ledger.get(delivery_id)["sinks"]["storepoint"]["state"] == "applied"
    assert versions.newest(key)["delivery_id"] == delivery_id


@pytest.mark.parametrize("fields, named", [
    ({"status": 3}, "status is 3, not text"),  # an enum as .NET may write it
    ({"contact": "someone"}, "contact is 'someone', not an object"),
    ({"location": {"latitude": float("nan"), "longitude": 151.19}}, "location.latitude is nan, not a number"),
    ({"name": {"first": "x"}}, "name is {'first': 'x'}, not text"),
])
def test_a_stop_record_of_another_shape_is_dead_lettered_naming_the_field(driver, l2u, fields, named):
    """Each ended in "internal error: AttributeError…" (or InvalidJSONError) with a traceback logged,
    as if the relay had a bug; the spec asks for what breaks processing to be refused naming the field."""
    sim_state(l2u).add_stop(stopId=STOP_ID + 7, **fields)
    delivery_id = accept(driver.rt, {"stopId": STOP_ID + 7, "actionDate": "2022-04-27T05:00:00+00:00"},
                         "stop.assigned")
    driver.run()
    entry = driver.rt.ledger.get(delivery_id)
    assert entry["status"] == "dead_lettered"
    assert entry["reason"] == f"Locate2u's stop {STOP_ID + 7} cannot be mapped: {named}"
    assert driver.rt.redis.get(keys.stop_cache(STOP_ID + 7)) is None  # not kept for the next event


def test_an_event_that_happened_after_the_cached_read_reads_the_stop_again(driver, sink_server, l2u):
    """The stop cache served a read taken before the event happened: a stop renamed in Locate2u
    between two events a few seconds apart kept its old name downstream, with no later event
    bound to come and correct it. A read is reused only for events that happened before it."""
    def happened(at):
        return datetime.fromtimestamp(at, timezone.utc).isoformat()

    accept(driver.rt, status_change(STOP_ID, "Arrived", happened(time.time() - 60)))
    driver.run()  # the stop is read and cached
    l2u.app.config["STATE"].stops[STOP_ID]["name"] = "Locate2u Depot"  # renamed after that read
    renamed_at = time.time()
    later = accept(driver.rt, status_change(STOP_ID, "Complete", happened(renamed_at)))
    driver.run()
    assert sim_state(sink_server).records[f"l2u-stop-{STOP_ID}"]["name"] == "Locate2u Depot"
    assert driver.rt.ledger.history(later)[1]["from"] == "locate2u"
    earlier = accept(driver.rt, status_change(STOP_ID, "Delayed", happened(renamed_at - 30)))
    driver.run()  # it happened before the second read: that read serves it
    assert driver.rt.ledger.history(earlier)[1]["from"] == "cache"


def test_burst_for_one_stop_fetches_it_once(driver, l2u):
    for minute in range(5):
        accept(driver.rt, status_change(STOP_ID, "Enroute", f"2022-04-27T05:0{minute}:00+00:00"))
    driver.run()
    fetches = [path for method, path in l2u.app.config["STATE"].requests_log if path.startswith("/v1/Stops/")]
    assert fetches == [f"/v1/Stops/{STOP_ID}"]


def test_newest_first_ends_in_the_newest_state(driver, sink_server):
    newest = status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00")
    older = status_change(STOP_ID, "Arrived", "2022-04-27T15:30:00+10:00")  # 05:30 UTC
    newest_id, older_id = accept(driver.rt, newest), accept(driver.rt, older)
    driver.run()
    assert sim_state(sink_server).records[f"l2u-stop-{STOP_ID}"]["status"] == "Complete"
    assert len(sim_state(sink_server).writes) == 1
    assert driver.rt.ledger.get(older_id)["sinks"]["storepoint"]["state"] == "stale"
    assert driver.rt.ledger.get(older_id)["status"] == "stale"
    assert driver.rt.ledger.get(newest_id)["status"] == "applied"


def test_answers_that_are_not_the_apis_are_retried_not_dead_lettered(driver, sink_server, l2u):
    """A proxy in front of Locate2u, then one in front of the sink, answered 200 with its own HTML
    page. The stop read was dead-lettered at once as permanent ("answered non-JSON"), the sink's
    write as an internal error of ours (a JSONDecodeError). Both are retried now."""
    l2u_faults, sink_faults = l2u.app.config["FAULTS"], sink_server.app.config["FAULTS"]
    l2u_faults.fail_after_apply("garbled", path_prefix="/v1/Stops/", methods=("GET",))
    sink_faults.fail_after_apply("garbled", path_prefix="/records/")
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    assert l2u_faults.counts["applied then garbled"] == sink_faults.counts["applied then garbled"] == 1
    entry = driver.rt.ledger.get(delivery_id)
    assert entry["status"] == "applied" and entry["sinks"]["storepoint"]["attempts"] == 2
    assert driver.rt.dead_letters.list() == []
    assert [line["what"] for line in driver.rt.ledger.history(delivery_id)][:5] == [
        "validated", "enrich retry", "validated", "enriched", "routed"]
    assert sim_state(sink_server).records[f"l2u-stop-{STOP_ID}"]["status"] == "Arrived"


def test_503_then_success_is_retried(driver, sink_server):
    sink_server.app.config["FAULTS"].inject(503, times=2)
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    entry = driver.rt.ledger.get(delivery_id)
    assert entry["status"] == "applied" and entry["sinks"]["storepoint"]["attempts"] == 3
    history = driver.rt.ledger.history(delivery_id)
    assert [line["what"] for line in history] == ["validated", "enriched", "routed", "retry", "retry", "applied"]
    assert [(line.get("status"), line["took"] >= 0) for line in history[3:]] == [(503, True), (503, True), (None, True)]


def test_retry_waits_at_least_retry_after(driver, sink_server):
    sink_server.app.config["FAULTS"].inject(429, retry_after=120)
    accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run(release_retries=False)
    [(task, args, due)] = driver.rt.scheduler.pending()
    assert task == DELIVER and args[4] == 1
    assert due - time.time() > 115
    assert driver.rt.scheduler.release_due() == 0  # not due yet


def test_a_retry_after_of_more_than_a_day_is_cut_to_a_day_and_said(driver, sink_server, caplog):
    """A sink whose clock is a year fast (or that bans the client for a month) answers 429 with a
    Retry-After a year ahead: honoured, the write would wait past the ledger's 14-day retention, its
    delivery forgotten while it waits. It waits a day instead (``MAX_RETRY_AFTER``; each such wait
    spends an attempt, so the schedule ends in a dead letter within days), and a warning names
    what was asked."""
    a_year_ahead = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(days=365), usegmt=True)
    sink_server.app.config["FAULTS"].inject(429, retry_after=a_year_ahead)
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run(release_retries=False)
    [(task, args, due)] = driver.rt.scheduler.pending()
    longest = MAX_RETRY_AFTER  # the test schedule's steps are seconds
    assert task == DELIVER and longest - 5 < due - time.time() <= longest
    [retry] = [line for line in driver.rt.ledger.history(delivery_id) if line["what"] == "retry"]
    assert retry["delay"] == longest
    assert any("asked to wait 31,5" in record.getMessage() and f"{longest:,.0f} s" in record.getMessage()
               for record in caplog.records if record.levelname == "WARNING"), caplog.text


def test_permanent_error_is_dead_lettered_at_once_with_its_body(driver, sink_server, l2u):
    l2u.app.config["STATE"].stops[STOP_ID]["name"] = ""  # the sink refuses a nameless location
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    [entry] = driver.rt.dead_letters.list()
    assert entry["sink"] == "storepoint" and entry["delivery_id"] == delivery_id
    assert entry["attempts"] == 1 and entry["error"]["status"] == 400
    assert json.loads(entry["error"]["body"]) == {"error": "validation_error", "details": {"name": ["required"]}}
    assert driver.rt.ledger.get(delivery_id)["status"] == "dead_lettered"


def test_exhausted_retries_are_dead_lettered(driver, sink_server):
    sink_server.app.config["FAULTS"].inject(500, times=10)
    driver.rt.routes["storepoint"] = Route("storepoint", breaker={"threshold": 100, "cooldown": 1.0})
    accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    [entry] = driver.rt.dead_letters.list()
    assert entry["reason"].startswith("retries exhausted:") and entry["attempts"] == 4


def test_unknown_stop_is_dead_lettered_with_that_reason(driver):
    delivery_id = accept(driver.rt, status_change(999999, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    [entry] = driver.rt.dead_letters.list()
    assert entry["stage"] == "enrich" and entry["error"]["status"] == 404
    assert driver.rt.ledger.get(delivery_id)["status"] == "dead_lettered"


def test_breaker_opens_pauses_without_spending_attempts_and_closes(driver, sink_server):
    faults = sink_server.app.config["FAULTS"]
    faults.inject(503, times=3)
    for stop_id in (1, 2, 3):
        cache_stop(driver.rt.redis, stop_id, {"stopId": stop_id, "name": f"S{stop_id}"}, time.time())
        accept(driver.rt, status_change(stop_id, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run(release_retries=False)
    breaker = driver.rt.breaker("storepoint")
    assert breaker.state() == "open"
    verdict, wait = admit(breaker)
    assert verdict == "open" and 50 < wait <= 60
    # While open, a due retry goes back to wait without another request or attempt.
    writes_before = len(sim_state(sink_server).writes)
    driver.rt.scheduler.release_due(now=time.time() + 5)
    driver.run(release_retries=False)
    assert len(sim_state(sink_server).writes) == writes_before
    attempts = [args[4] for _, args, _ in driver.rt.scheduler.pending()]
    assert attempts == [1, 1, 1]
    # After the cooldown one probe goes through, succeeds and closes the breaker.
    driver.rt.redis.hset(breaker.key, "open_until", time.time() - 1)
    driver.run()
    assert breaker.state() == "closed"
    assert set(sim_state(sink_server).records) == {"l2u-stop-1", "l2u-stop-2", "l2u-stop-3"}


def test_replay_applies_a_fixed_dead_letter(driver, sink_server, l2u):
    stops = l2u.app.config["STATE"].stops
    stops[STOP_ID]["name"] = ""
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    [entry] = driver.rt.dead_letters.list()
    entry["record"]["name"] = "Fixed name"  # what an operator's fix upstream amounts to
    replay_dead_letter(driver.rt, entry)
    assert driver.rt.dead_letters.get(entry["id"]) is not None  # kept until applied
    driver.run()
    assert driver.rt.dead_letters.list() == []
    assert sim_state(sink_server).records[f"l2u-stop-{STOP_ID}"]["name"] == "Fixed name"
    assert driver.rt.ledger.get(delivery_id)["status"] == "applied"


def test_cancellation_routes_to_delete(driver, sink_server):
    accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    accept(driver.rt, status_change(STOP_ID, "Cancelled", "2022-04-27T05:10:00+00:00"))
    driver.run()
    assert sim_state(sink_server).records == {}
    assert [w[0] for w in sim_state(sink_server).writes] == ["PUT", "DELETE"]


def test_a_cancellation_whose_stop_was_deleted_in_locate2u_since_still_deletes_it_downstream(driver, sink_server,
                                                                                             l2u):
    """The stop of a Cancelled event was gone from Locate2u by the time the event was processed
    (deleted after the cancellation, while a backlog waited): its read answered 404, the delivery
    was dead-lettered at enrichment and the location stayed live downstream. A delete needs only
    the key, so it goes on without the stop."""
    accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    assert f"l2u-stop-{STOP_ID}" in sim_state(sink_server).records
    del l2u.app.config["STATE"].stops[STOP_ID]
    driver.rt.redis.delete(keys.stop_cache(STOP_ID))  # the cached read expired meanwhile
    cancelled = accept(driver.rt, status_change(STOP_ID, "Cancelled", "2022-04-27T05:10:00+00:00"))
    driver.run()
    assert sim_state(sink_server).records == {}
    assert driver.rt.ledger.get(cancelled)["status"] == "applied"
    enriched = next(line for line in driver.rt.ledger.history(cancelled) if line["what"] == "enriched")
    assert enriched["from"] == "locate2u, no such stop"
    arrived_again = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:20:00+00:00"))
    driver.run()  # an upsert cannot do without the stop: dead-lettered as before, with why
    assert driver.rt.ledger.get(arrived_again)["status"] == "dead_lettered"


def test_events_no_sink_takes_are_unrouted(driver):
    driver.rt.routes = {"storepoint": Route("storepoint")}
    delivery_id = accept(driver.rt, {"tripId": 4, "actionDate": "2022-04-27T05:00:00+00:00"}, "trip.created")
    driver.run()
    assert driver.rt.ledger.get(delivery_id)["status"] == "unrouted"


def test_every_delivery_ends_applied_stale_or_dead_lettered(driver, sink_server, l2u):
    sink_server.app.config["FAULTS"].fail_rate(0.3)
    driver.rt.routes["storepoint"] = Route("storepoint", breaker={"threshold": 1000, "cooldown": 1.0})
    ids = [accept(driver.rt, status_change(STOP_ID if i % 3 else 424242, "Enroute",
                                           f"2022-04-27T05:{i:02d}:00+00:00")) for i in range(30)]
    driver.run(limit=2000)
    statuses = [driver.rt.ledger.get(delivery_id)["status"] for delivery_id in ids]
    counts = {status: statuses.count(status) for status in set(statuses)}
    assert set(counts) <= {"applied", "stale", "dead_lettered"}
    assert sum(counts.values()) == len(ids)
    assert counts["dead_lettered"] == len(driver.rt.dead_letters.list()) >= 10  # the unknown stop


def test_replayed_dead_letter_superseded_by_a_newer_event_ends_stale(driver, sink_server):
    sink_server.app.config["FAULTS"].inject(400)
    accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    [entry] = driver.rt.dead_letters.list()
    accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    driver.run()
    replay_dead_letter(driver.rt, entry)
    driver.run()
    assert driver.rt.dead_letters.list() == []
    assert driver.rt.ledger.get(entry["delivery_id"])["status"] == "stale"
    assert sim_state(sink_server).records[f"l2u-stop-{STOP_ID}"]["status"] == "Complete"


# Found by the chaos run (tests/chaos.py): each of these once left a delivery unfinished for good.

def test_fan_out_interrupted_before_its_write_is_resumed_on_redelivery(driver, sink_server):
    """The worker died between marking the sinks pending and writing to them; the redelivered
    process_delivery found the entry "routed" and returned, so that sink never got the write."""
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    _, args = driver.sent.pop(0)
    died_in_first_write(args, driver.rt)
    assert driver.rt.ledger.get(delivery_id)["sinks"]["storepoint"]["state"] == "pending"
    assert tasks.process_delivery.run(*args) == "routed"  # its lease is not known to be dead yet
    time.sleep(driver.rt.settings.sweep_after)  # Celery redelivers it after the visibility timeout, longer
    assert tasks.process_delivery.run(*args) == "resumed"
    driver.run()
    assert driver.rt.ledger.get(delivery_id)["status"] == "applied"
    assert sim_state(sink_server).records[f"l2u-stop-{STOP_ID}"]["status"] == "Arrived"
    steps = [(line["what"], line.get("from")) for line in driver.rt.ledger.history(delivery_id)]
    resumed = steps.index(("resumed", None))
    assert steps[resumed - 1] == ("enriched", "cache")  # the resumed fan-out's own stop read, then the resume


def test_sweeper_resumes_a_fan_out_whose_worker_died_and_whose_message_was_lost(driver, sink_server):
    """The worker died in the fan-out's write and the broker lost its message too (a worker killed
    between BRPOP and recording it unacked, or Redis stopping then): nothing would ever redeliver
    it, so the sink stayed pending for good."""
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    _, args = driver.sent.pop(0)
    died_in_first_write(args, driver.rt)
    assert driver.sent == []
    assert tasks.sweep_received.run() == 0  # not stalled yet: it may just be in progress
    time.sleep(driver.rt.settings.sweep_after + 0.1)
    assert tasks.sweep_received.run() == 1
    assert tasks.sweep_received.run() == 0  # re-queued once per sweep_after, not every sweep
    driver.run()
    assert driver.rt.ledger.get(delivery_id)["status"] == "applied"
    assert sim_state(sink_server).records[f"l2u-stop-{STOP_ID}"]["status"] == "Arrived"
    assert driver.rt.redis.zcard(driver.rt.ledger.OPEN) == 0


def test_a_resume_that_read_the_entry_before_the_write_landed_leaves_the_sink_settled(driver, sink_server):
    """Large chaos run (seed 316591250): the sweeper queued a resume for a slow write, which landed
    between the resume's read of the entry and its "pending" mark. The mark reopened an applied
    sink of a settled delivery; the compaction packed it so, and the resumed write's outcome found
    nothing to update: the delivery stayed "applied" with that sink "pending" for good."""
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    held_write = fan_out_job(driver, delivery_id)  # a slow worker still holds the fan-out's write
    time.sleep(driver.rt.settings.sweep_after)  # and its lease lapsed (frozen, or its renewals failed)
    read_by_the_resume = driver.rt.ledger.entry(delivery_id)
    assert read_by_the_resume.stalled_sinks(0) == ["storepoint"]
    assert tasks.deliver.run(*held_write) == "applied"  # then it lands
    event = parse_event(delivery_id, "stop.status-changed", json.loads(read_by_the_resume.body))

    assert resume_fan_out(driver.rt, event, read_by_the_resume) == "applied"

    entry = driver.rt.ledger.get(delivery_id)
    assert entry["status"] == "applied" and entry["sinks"]["storepoint"]["state"] == "applied"
    assert driver.sent == [] and driver.rt.redis.zscore(driver.rt.ledger.OPEN, delivery_id) is None


def test_a_second_copy_of_a_write_that_fails_leaves_the_settled_sink_settled(driver, sink_server):
    """Large chaos run (seed 1227332774): a write ran twice (a redelivered message, a resume of a
    slow one); the first applied and the delivery settled, the second got a 503 (or waited for the
    key) and recorded "retrying" over "applied". The compaction packed the delivery so, and the
    retry's final outcome found nothing to update: a sink "retrying" for good."""
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    write = fan_out_job(driver, delivery_id)
    assert tasks.deliver.run(*write) == "applied"
    sink_server.app.config["FAULTS"].inject(503)
    assert tasks.deliver.run(*write) == "retrying"  # the second copy

    entry = driver.rt.ledger.get(delivery_id)
    assert entry["status"] == "applied" and entry["sinks"]["storepoint"]["state"] == "applied"
    assert driver.rt.redis.zscore(driver.rt.ledger.OPEN, delivery_id) is None
    driver.run()  # its retry still goes out, and ends final
    assert driver.rt.ledger.get(delivery_id)["sinks"]["storepoint"]["state"] in ("applied", "stale")


def test_sweeper_leaves_a_fan_out_alone_while_its_retry_is_not_due(driver, sink_server):
    sink_server.app.config["FAULTS"].inject(503)
    driver.rt.settings = driver.rt.settings.replace(retry_schedule=(0, 60))
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run(release_retries=False)
    assert driver.rt.ledger.get(delivery_id)["sinks"]["storepoint"]["state"] == "retrying"
    time.sleep(driver.rt.settings.sweep_after + 0.1)
    assert tasks.sweep_received.run() == 0 and driver.sent == []


def test_a_fan_out_whose_write_is_slow_is_left_to_its_live_worker(driver, sink_server):
    """A sink that answers only after the sweeper's patience (a hang, a read timeout): the fan-out's
    worker is alive and still in the write. The sweeper and a redelivered process_delivery (the
    visibility timeout passed) took the sink for stalled and queued a second copy of the write,
    which waited behind the first's key lock or went out into the same hang."""
    driver.rt.settings = driver.rt.settings.replace(sweep_after=2)  # renewed every 0.7 s: room on a busy machine
    write_seconds = driver.rt.settings.sweep_after * 3
    sink_server.app.config["FAULTS"].slow(write_seconds)
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    _, args = driver.sent.pop(0)
    fan_out = threading.Thread(target=tasks.process_delivery.run, args=args)
    fan_out.start()
    try:
        wait_for(lambda: sink_server.app.config["FAULTS"].counts["slow"] == 1, timeout=5)
        time.sleep(driver.rt.settings.sweep_after * 1.5)  # the sink has been "pending" past the sweeper's patience

        assert tasks.sweep_received.run() == 0
        assert tasks.process_delivery.run(*args) == "routed"
        assert driver.sent == []
    finally:
        fan_out.join()
    assert driver.rt.ledger.get(delivery_id)["status"] == "applied"
    assert len(sim_state(sink_server).writes) == 1


def test_broker_outage_while_fanning_out_is_redelivered_not_dead_lettered(driver, monkeypatch):
    """Redis restarting: a fan-out's write, then its resume's deliver message, failed with Redis'
    and kombu's connection errors, which were taken for a bug and dead-lettered as an internal error
    (when the dead letter itself could still be written)."""
    from celery.exceptions import Reject
    from kombu.exceptions import OperationalError

    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    _, args = driver.sent.pop(0)

    def redis_down(*_args, **_kwargs):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def broker_down(name, args):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    with monkeypatch.context() as patch:
        patch.setattr(driver.rt.versions("storepoint"), "begin", redis_down)
        with pytest.raises(Reject):
            tasks.process_delivery.run(*args)
    driver.rt.scheduler.send_task = broker_down
    time.sleep(driver.rt.settings.sweep_after)  # redelivered after the visibility timeout: the lease lapsed
    with pytest.raises(Reject):
        tasks.process_delivery.run(*args)  # the redelivery resumes the fan-out: its message fails
    assert driver.rt.dead_letters.list() == []
    driver.rt.scheduler.send_task = driver.send_task
    assert tasks.process_delivery.run(*args) == "resumed"
    driver.run()
    assert driver.rt.ledger.get(delivery_id)["status"] == "applied"


def test_a_stale_write_does_not_use_up_the_breaker_probe(driver, sink_server):
    """With the breaker open, every probe went to a write that turned out stale and never called
    the sink; with many such writes queued, B2B stayed paused for minutes after it recovered."""
    cache_stop(driver.rt.redis, 2, {"stopId": 2, "name": "S2"}, time.time())
    accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    driver.run()
    breaker = driver.rt.breaker("storepoint")
    driver.rt.redis.hset(breaker.key, mapping={"state": "open", "open_until": time.time() - 1})  # cooldown over
    older = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    other = accept(driver.rt, status_change(2, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run(release_retries=False)
    assert driver.rt.ledger.get(older)["status"] == "stale"
    assert driver.rt.ledger.get(other)["status"] == "applied"  # it got the probe, which closed the breaker
    assert breaker.state() == "closed"


def test_a_sink_that_must_wait_keeps_its_attempt_and_the_breakers_probe(driver, sink_server, monkeypatch):
    """A sink's own wait (an earlier create may still land) is not a failure of the sink: the same
    attempt comes back after ``retry_after``, and a half-open breaker's probe goes to another write."""
    waits = [NotYet("an earlier create may still land", retry_after=30)]

    def upsert(location, options):
        if waits:
            raise waits.pop()
        return RecordingSink.upsert(driver.rt.sinks["storepoint"], location, options)

    monkeypatch.setattr(driver.rt.sinks["storepoint"], "upsert", upsert)
    breaker = driver.rt.breaker("storepoint")
    driver.rt.redis.hset(breaker.key, mapping={"state": "open", "open_until": time.time() - 1})  # cooldown over
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run(release_retries=False)
    sink = driver.rt.ledger.get(delivery_id)["sinks"]["storepoint"]
    assert (sink["state"], sink["attempts"], sink["next_in"]) == ("waiting", 0, 30)
    [(task, args, due)] = driver.rt.scheduler.pending()
    assert task == DELIVER and args[4] == 0 and due - time.time() > 25
    assert breaker.state() == "open" and admit(breaker)[0] == "probe"  # the probe slot was given back
    breaker.abandon_probe()
    driver.run()
    assert driver.rt.ledger.get(delivery_id)["status"] == "applied"
    assert breaker.state() == "closed"


def test_activity_on_one_sink_does_not_hide_another_sinks_stall(redis_client):
    from workers.store.ledger import Ledger

    ledger = Ledger(redis_client)
    ledger.record("d-1", "stop.status-changed", "{}", 3600)
    ledger.start_fan_out("d-1", ["storepoint", "b2b"])
    ledger.sink_outcome("d-1", "b2b", "retrying", attempts=1, next_in=100)  # b2b busy retrying
    time.sleep(0.01)
    assert ledger.stalled(0) == ["d-1"]  # storepoint has made no progress since the fan-out


def test_sweeper_backs_off_a_fan_out_it_already_resumed(driver):
    """A deliver held by a worker (or one that died holding it, until the visibility timeout) is
    not lost; each further resume of the same fan-out waits twice as long, so duplicates stay few."""
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    _, args = driver.sent.pop(0)
    died_in_first_write(args, driver.rt)  # and its message is lost
    grace = driver.rt.settings.sweep_after
    time.sleep(grace + 0.1)
    assert tasks.sweep_received.run() == 1
    [(name, args)] = driver.sent
    assert name == PROCESS_DELIVERY and tasks.process_delivery.run(*args) == "resumed"
    driver.sent.clear()  # both deliver messages still held
    time.sleep(grace + 0.1)
    assert tasks.sweep_received.run() == 0  # resumed once: now it waits twice as long
    time.sleep(grace + 0.1)
    assert tasks.sweep_received.run() == 1
    assert driver.rt.ledger.get(delivery_id)["resumes"] == "1"


def test_sweeper_does_not_resume_while_the_queues_have_a_backlog(driver):
    """Chaos finding (large profile): thousands of tasks queued on a loaded machine, and the sweeper
    resumed every fan-out whose deliver had merely waited longer than RELAY_SWEEP_AFTER in the queue."""
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    _, args = driver.sent.pop(0)
    died_in_first_write(args, driver.rt)
    tickets = QueueTickets(driver.rt.redis)  # what publishing onto the Redis broker records
    for owner, message in (("l2u:delivery:other", "a message ahead of this delivery's"),
                           (driver.rt.ledger.key(delivery_id), "this delivery's deliver")):
        driver.rt.redis.lpush("deliver", message)
        tickets.pushed("deliver", owner, "queued:storepoint")
    time.sleep(driver.rt.settings.sweep_after + 0.1)
    assert tasks.sweep_received.run() == 0
    driver.rt.redis.delete("deliver")  # the broker lost the list: this delivery's write is gone
    time.sleep(driver.rt.settings.sweep_after + 0.1)  # the clock restarted when it was seen queued
    assert tasks.sweep_received.run() == 1
    driver.run()
    assert driver.rt.ledger.get(delivery_id)["status"] == "applied"
