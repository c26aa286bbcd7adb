"""A sink that hangs or crawls may take only half of a worker's pool (``SlowCalls``),
against a real Redis with tasks stepped in-process (``Driver`` of tests/fixtures.py), and once
through a real worker. The calls of other processes are put in flight by hand, started when each
test says. tests/test_recovery.py has a hung sink under traffic through real processes.
"""
import time

from tests.fixtures import STOP_ID, accept, sims_settings
from tests.helpers import post, wait_for
from tests.payloads import status_change
from tests.test_recovery_pipeline import post_for_stops
from workers import tasks
from workers.celery_config import DELIVER
from workers.resilience.admission import SlowCalls
from workers.store import keys
from workers.store.ledger import Ledger


def in_flight(rt, count, started_ago):
    """``count`` calls to storepoint from other processes of this worker, started ``started_ago`` s ago."""
    rt.redis.zadd(rt.calls("storepoint").key, {f"other-{n}|0": time.time() - started_ago for n in range(count)})


def write(driver, minute):
    """The storepoint outcome of a new delivery for the stop, and its id."""
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", f"2022-04-27T05:{minute:02d}:00+00:00"))
    driver.run(release_retries=False)
    return driver.rt.ledger.get(delivery_id)["sinks"]["storepoint"], delivery_id


def test_a_write_waits_for_its_sinks_health_while_half_the_processes_are_in_slow_calls(driver, sink_server):
    rt, limit = driver.rt, driver.rt.calls("storepoint").limit
    assert limit == SlowCalls.processes // 2 == 2
    in_flight(rt, limit, started_ago=SlowCalls.SLOW_AFTER + 1)
    held, delivery_id = write(driver, 0)
    assert held["state"] == "waiting" and held["attempts"] == 0, held  # no attempt spent
    assert held["reason"] == "storepoint is slow: 2 calls to it are in flight from this worker"
    assert sink_server.app.config["STATE"].writes == []
    [(args, due)] = rt.scheduler.held("storepoint")  # released by a success or probe, else a minute on
    assert args[0] == delivery_id and time.time() + 50 < due <= time.time() + 60

    rt.redis.zrem(rt.calls("storepoint").key, "other-0|0")  # one slow call ended: one may go again
    assert write(driver, 1)[0]["state"] == "applied"
    assert len(sink_server.app.config["STATE"].writes) == 1


def test_busy_but_quick_calls_never_hold_a_write_back(driver, sink_server):
    in_flight(driver.rt, 3, started_ago=SlowCalls.SLOW_AFTER / 2)  # more than half, none slow yet
    assert write(driver, 0)[0]["state"] == "applied"


def test_a_killed_callers_call_lapses_with_its_sinks_settle_time(driver, sink_server):
    settle = driver.rt.sinks["storepoint"].settle_seconds
    in_flight(driver.rt, 2, started_ago=settle + 1)  # their processes died mid-call
    assert write(driver, 0)[0]["state"] == "applied"
    assert driver.rt.redis.zrange(driver.rt.calls("storepoint").key, 0, -1) == []  # gone, and so is ours


def test_the_sink_stays_slow_until_a_call_ends_quickly(driver, sink_server):
    rt = driver.rt
    calls = rt.calls("storepoint")
    in_flight(rt, 2, started_ago=SlowCalls.SLOW_AFTER + 1)
    assert write(driver, 0)[0]["state"] == "waiting"  # seen slow: marked so
    rt.redis.delete(calls.key)  # those two ended (timed out: no quick end among them)
    in_flight(rt, 2, started_ago=0)  # two new calls, quick so far, but the sink is still slow
    assert write(driver, 1)[0]["state"] == "waiting"
    rt.redis.zrem(calls.key, "other-0|0")
    assert write(driver, 2)[0]["state"] == "applied"  # one in flight: this one may go, and ends quickly
    assert not rt.redis.exists(calls.slow_key)
    in_flight(rt, 3, started_ago=0)
    assert write(driver, 3)[0]["state"] == "applied"  # not slow any more: no limit


def test_while_the_sink_is_slow_a_success_releases_only_as_many_held_writes_as_may_go(driver, sink_server):
    rt = driver.rt
    in_flight(rt, 2, started_ago=SlowCalls.SLOW_AFTER + 1)
    held = post_for_stops(rt, [11, 12, 13, 14])
    driver.run(release_retries=False)
    assert sorted(args[0] for args, _ in rt.scheduler.held("storepoint")) == sorted(held)
    rt.redis.zrem(rt.calls("storepoint").key, "other-0|0")  # one ended; the sink is still marked slow
    post_for_stops(rt, [15])
    name, args = driver.sent.pop(0)
    tasks.process_delivery.run(*args)  # its write goes, and succeeds: two of the held may follow
    assert [name for name, _ in driver.sent] == [DELIVER] * rt.calls("storepoint").limit
    assert len(rt.scheduler.held("storepoint")) == len(held) - 2


def test_a_real_worker_counts_the_calls_of_its_own_pool_and_allows_half_of_it(simulators, settings, start_process,
                                                                              redis_client):
    """The worker names itself and sizes the limit at start-up, before its pool forks: a worker run
    with ``-c 6`` holds a write to a sink with 3 slow calls in flight from it, from its own key."""
    sims = simulators([{"stopId": STOP_ID, "name": "Stop"}], storepoint={"token": "sp-slow-calls-token"})
    relay = sims_settings(settings, sims)
    web = start_process("gunicorn", relay)
    worker = start_process("worker", relay, concurrency=6)
    key = keys.sink_calls("storepoint", SlowCalls.name_worker(worker.proc.pid))
    redis_client.zadd(key, {f"other-{n}|0": time.time() - SlowCalls.SLOW_AFTER - 1 for n in range(3)})
    body = status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00")
    delivery_id = post(web.url, "stop.status-changed", body).json()["delivery_id"]
    outcome = wait_for(lambda: Ledger(redis_client).get(delivery_id)["sinks"].get("storepoint", {}).get("reason"))
    assert outcome == "storepoint is slow: 3 calls to it are in flight from this worker"
    assert sims["storepoint"].app.config["STATE"].find(lambda location: True) == []
