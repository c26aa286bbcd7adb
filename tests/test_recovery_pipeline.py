"""Recovery-aware retries against a real Redis, tasks stepped in-process (``Driver`` of tests/fixtures.py).

A retry held only by its sink's health goes out as soon as the sink answers again (a success, or
the short-cadence probe with the oldest held retry), its attempt not spent for the wait; a
delivery the sink refused itself (429 with Retry-After) keeps its schedule.
tests/test_recovery.py runs an outage through real processes.
"""
import dataclasses
import json
import time

import pytest

from tests.fixtures import FORWARD_SECRET, accept, sim_faults, sim_state, sims_settings
from tests.payloads import status_change
from workers.celery_config import DELIVER
from workers.pipeline.fan_out import cache_stop
from workers.pipeline.routes import DEFAULT_ROUTES, Route
from workers.resilience.admission import CircuitBreaker
from workers.resilience.beat_schedules import RetriesDue
from workers.resilience.retries import RetryScheduler
from workers.sinks.forward import ENDPOINT_FAILURES, ENDPOINT_PAUSE_SECONDS, ForwardSink
from workers.store.mappings import MappingStore

SCHEDULE = (0, 300, 1800)  # a held retry would wait five minutes by the schedule


def post_for_stops(rt, stop_ids, minute=0):
    ids = []
    for stop_id in stop_ids:
        cache_stop(rt.redis, stop_id, {"stopId": stop_id, "name": f"S{stop_id}"}, time.time())
        ids.append(accept(rt, status_change(stop_id, "Arrived", f"2022-04-27T05:0{minute}:00+00:00")))
    return ids


def outcome(rt, delivery_id):
    return rt.ledger.get(delivery_id)["sinks"]["storepoint"]


def test_outage_held_retries_go_out_on_recovery_oldest_first_without_spending_attempts(driver, sink_server):
    rt = driver.rt
    rt.settings = rt.settings.replace(retry_schedule=SCHEDULE)
    rt.routes["storepoint"] = Route("storepoint", breaker={"threshold": 3, "cooldown": 60.0})
    faults = sink_server.app.config["FAULTS"]
    faults.fail_rate(1.0, 503)
    failed = post_for_stops(rt, [1, 2, 3])
    driver.run(release_retries=False)  # three 503s: retries held for five minutes, breaker open
    paused = post_for_stops(rt, [4, 5])
    driver.run(release_retries=False)  # the breaker holds these back for its cooldown
    assert rt.breaker("storepoint").state() == "open"
    held = rt.scheduler.held("storepoint")
    assert sorted(args[0] for args, _ in held) == sorted(failed + paused)
    assert all(due > time.time() + 50 for _, due in held)
    # beat sends the release for the probe, though no retry is due for a minute
    assert RetriesDue(rt.settings.redis_url).next_due() <= time.time() + RetryScheduler.PROBE_SECONDS

    # Still failing: one probe (the oldest held) every few seconds, its attempt not spent.
    writes = faults.counts["503"]
    assert rt.scheduler.release_due(now=time.time() + RetryScheduler.PROBE_SECONDS + 0.5) == 1
    [(task, probe)] = driver.sent
    assert task == DELIVER and probe[0] == held[0][0][0]
    driver.run(release_retries=False)
    assert faults.counts["503"] == writes + 1  # the probe reached the sink through the open breaker
    # Back in its place: same attempt, same due time. Writes the breaker paused share one due time, so
    # among them the order is Redis' (by member), which a re-inserted probe may change.
    again = rt.scheduler.held("storepoint")
    assert sorted(json.dumps(args) for args, _ in again) == sorted(json.dumps(args) for args, _ in held)
    due_of = {args[0]: due for args, due in held}
    assert [due for _, due in again] == pytest.approx([due_of[args[0]] for args, _ in again], abs=0.01)
    assert {outcome(rt, delivery_id)["attempts"] for delivery_id in failed} == {1}

    # Storepoint answers again: the next probe succeeds and every held retry goes out at once.
    faults.clear()
    assert rt.scheduler.release_due(now=time.time() + 2 * RetryScheduler.PROBE_SECONDS + 0.5) == 1
    driver.run(release_retries=False)
    assert rt.scheduler.held("storepoint") == [] and rt.scheduler.pending() == []
    assert rt.breaker("storepoint").state() == "closed"
    applied_order = [key for _, key, _ in sim_state(sink_server).writes]
    stop_of = {delivery_id: stop for delivery_id, stop in zip(failed + paused, [1, 2, 3, 4, 5])}
    assert applied_order == [f"l2u-stop-{stop_of[args[0]]}" for args, _ in again]  # oldest (earliest due) first
    for delivery_id in failed:
        assert rt.ledger.get(delivery_id)["status"] == "applied"
        assert outcome(rt, delivery_id)["attempts"] == 2  # the 503, then the write: the wait spent none
    for delivery_id in paused:
        assert rt.ledger.get(delivery_id)["status"] == "applied"
        assert outcome(rt, delivery_id)["attempts"] == 1


def test_a_success_releases_held_retries_but_not_one_the_sink_refused_with_retry_after(driver, sink_server):
    rt = driver.rt
    rt.settings = rt.settings.replace(retry_schedule=SCHEDULE)
    faults = sink_server.app.config["FAULTS"]
    faults.inject(429, retry_after=120)
    [refused] = post_for_stops(rt, [1])
    driver.run(release_retries=False)
    faults.inject(503)
    [unavailable] = post_for_stops(rt, [2])
    driver.run(release_retries=False)
    assert {args[0] for _, args, _ in rt.scheduler.pending()} == {refused, unavailable}

    [healthy] = post_for_stops(rt, [3])  # any write the sink takes shows it is healthy again
    driver.run(release_retries=False)
    assert rt.ledger.get(healthy)["status"] == "applied"
    assert rt.ledger.get(unavailable)["status"] == "applied"
    assert outcome(rt, unavailable)["attempts"] == 2
    [(task, args, due)] = rt.scheduler.pending()  # Retry-After still wins for the refused one
    assert args[0] == refused and args[4] == 1 and due - time.time() > 100
    assert rt.ledger.get(refused)["status"] != "applied"


def test_enrich_retries_are_not_sink_retries(driver, sink_server, l2u):
    rt = driver.rt
    rt.settings = rt.settings.replace(retry_schedule=SCHEDULE)
    l2u.app.config["FAULTS"].inject(503, times=10, path_prefix="/v1/Stops/")
    waiting = accept(rt, status_change(164557, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run(release_retries=False)
    [healthy] = post_for_stops(rt, [3])
    driver.run(release_retries=False)
    assert rt.ledger.get(healthy)["status"] == "applied"
    [(_, args, due)] = rt.scheduler.pending()
    assert args[0] == waiting and due - time.time() > 250
    assert rt.scheduler.held("storepoint") == []


def test_concurrent_releasers_send_each_held_retry_once(redis_client):
    sent = []
    scheduler = RetryScheduler(redis_client, lambda name, args: sent.append(args[0]))
    breaker = CircuitBreaker(redis_client, "sp")
    for n in range(20):
        scheduler.hold([f"d{n}", "sp", "upsert", {}, 1, False], 1 + n)
    later = time.time() + 10  # half of them due by the schedule, the first also as the probe
    assert scheduler.recovered("sp", breaker, limit=5) + scheduler.release_due(now=later) \
        + scheduler.recovered("sp", breaker) + scheduler.release_due(now=later) == 20
    assert sorted(sent) == sorted(f"d{n}" for n in range(20))
    assert sent[:5] == ["d0", "d1", "d2", "d3", "d4"]
    assert scheduler.held("sp") == [] and redis_client.zcard(RetryScheduler.CLAIMED) == 0


def test_one_forward_endpoint_failing_holds_up_neither_the_others_nor_its_own_catch_up(driver, simulator):
    """Two forward URLs, one answering 503. Before, its failures opened the forward's one breaker,
    which then held every message back: the URL that answered got messages only as probes went out
    instead of each as it came, for as long as the other was down. Now the URL that fails is paused on its own
    (not called for every message), and once it answers again all it missed goes out at once."""
    receiver = simulator("forward", secrets={"a": FORWARD_SECRET, "b": FORWARD_SECRET})
    rt = driver.rt
    rt.settings = rt.settings.replace(retry_schedule=SCHEDULE)
    rt.routes = {"forward": dataclasses.replace(DEFAULT_ROUTES["forward"], breaker={"threshold": 3, "cooldown": 60.0})}
    rt.sinks = {"forward": ForwardSink.from_settings(sims_settings(rt.settings, {"forward": receiver}),
                                                     MappingStore(rt.redis, "forward"))}
    faults, messages = sim_faults(receiver), sim_state(receiver).messages
    faults.fail_rate(1.0, 503, path_prefix="/hooks/b")
    ids = post_for_stops(rt, range(1, 9))
    driver.run(release_retries=False)
    assert sorted(messages["a"]) == sorted(ids)  # each as it came (a message without a stop read: by delivery id)
    assert rt.breaker("forward").state() == "closed"
    assert faults.counts["503"] == ENDPOINT_FAILURES  # then b was paused, not called for every message
    assert sorted(args[0] for args, _ in rt.scheduler.held("forward")) == sorted(ids)

    faults.clear()  # b answers again: a message tries it within a pause, and its success releases the rest
    time.sleep(ENDPOINT_PAUSE_SECONDS)
    assert rt.scheduler.release_due(now=time.time() + RetryScheduler.PROBE_SECONDS + 0.5) == 1
    driver.run(release_retries=False)
    assert sorted(messages["b"]) == sorted(messages["a"])
    assert {rt.ledger.get(delivery_id)["status"] for delivery_id in ids} == {"applied"}
    assert rt.scheduler.held("forward") == [] and rt.scheduler.pending() == []
