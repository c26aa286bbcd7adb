"""Ordering guarantees (issue 14, items 2 and 3): an older event never ends in a sink, even when a
sink call outlives the per-key lock, and equal ``actionDate``s end in the same state whatever the timing.

Real Redis, the loopback recording sink with its fault plan's latency for slow calls, tasks run in
process (the Driver of tests/fixtures.py) so the interleaving is chosen by the test.
"""
import dataclasses
import json
import os
import signal
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from tests.fixtures import KEY, STOP_ID, accept, died_in_first_write, fan_out_job, in_worker_process, sim_state
from tests.payloads import status_change
from workers import tasks
from workers.celery_config import make_celery
from workers.config import Settings
from workers.pipeline import deliver, sweeper
from workers.store.mappings import MappingStore
from workers.store.queue_positions import ticketed
from workers import sinks

LOCK_KEY = f"l2u:lock:storepoint:{KEY}"
BUCKET_KEY = "l2u:bucket:storepoint"


pytestmark = pytest.mark.usefixtures("driver_mappings")


def _in_thread(work):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=work()), daemon=True)
    thread.start()
    return thread, outcome


def _wait_for_key(redis_client, key, timeout=30):
    deadline = time.monotonic() + timeout
    while not redis_client.exists(key):
        assert time.monotonic() < deadline, f"the slow write never got as far as {key}"
        time.sleep(0.02)


def test_a_sink_call_slower_than_the_lock_keeps_the_lock(driver, sink_server, monkeypatch):
    """Item 2: the lock lasted a fixed time while a sink call could take longer; an older write then
    took the lapsed lock, passed the version check and landed after the newer one."""
    monkeypatch.setattr(deliver, "lock_seconds", lambda sink: (2, 2 / 3))
    sink_server.app.config["FAULTS"].latency(5)  # every sink call takes 5 s, far beyond the lock
    newer = accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    older = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    newer_args, older_args = fan_out_job(driver, newer), fan_out_job(driver, older)
    thread, outcome = _in_thread(lambda: tasks.deliver.run(*newer_args))
    _wait_for_key(driver.rt.redis, LOCK_KEY)
    time.sleep(3)  # longer than the lock's 2 s: only a renewed lock is still held
    tasks.deliver.run(*older_args)
    thread.join(60)
    driver.run()
    assert outcome["result"] == "applied"
    assert sim_state(sink_server).records[KEY]["status"] == "Complete"
    assert driver.rt.ledger.get(older)["status"] == "stale"
    assert driver.rt.redis.hget(driver.rt.versions("storepoint").key, KEY) == "1651039200.000000000"  # 06:00 UTC


def _older_write_landed_last(driver, sink_server):
    """The newer write's lock lapses while it is sent (latency 4 s), and an older write sent 1 s
    later lands after it; ``(newer, older)``, each with its outcome checked."""
    sink_server.app.config["FAULTS"].latency(4)
    newer = accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    older = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    newer_args, older_args = fan_out_job(driver, newer), fan_out_job(driver, older)
    thread, newer_outcome = _in_thread(lambda: tasks.deliver.run(*newer_args))
    _wait_for_key(driver.rt.redis, BUCKET_KEY)  # its rate-limit token is taken right before the call
    driver.rt.redis.delete(LOCK_KEY)  # the lock lapses while the newer write is on its way
    time.sleep(1)
    older_outcome = tasks.deliver.run(*older_args)  # lands after the newer one
    thread.join(60)
    assert newer_outcome["result"] == "applied"  # not an outage: the write is not sent twice by redelivery
    assert older_outcome == "stale"  # superseded while it was being written
    sink_server.app.config["FAULTS"].latency(0)
    assert sim_state(sink_server).records[KEY]["status"] == "Arrived"  # until the newest is sent again
    return newer, older


def test_a_write_whose_lock_lapsed_cannot_leave_the_sink_regressed(driver, sink_server):
    """Item 2: the lock lapsed anyway (a frozen worker, Redis gone for longer than the lock). The
    unconditional HSET stored whichever version finished last, the older write landed last in the
    sink, and the lapsed lock's release raised a Redis error that re-queued a write already done."""
    newer, older = _older_write_landed_last(driver, sink_server)
    driver.run()  # the newest write is asserted again
    assert sim_state(sink_server).records[KEY]["status"] == "Complete"
    assert driver.rt.redis.hget(driver.rt.versions("storepoint").key, KEY) == "1651039200.000000000"
    assert driver.rt.ledger.get(newer)["status"] == "applied"
    assert driver.rt.ledger.get(older)["status"] == "stale"


def test_the_newest_write_sent_again_is_sent_once_more_when_the_broker_lost_it(driver, sink_server, monkeypatch):
    """The newest write was sent again as a bare message; a broker that lost it (a deleted queue, a
    Redis failover) left the older write last in the sink for good, since its delivery had settled.
    While its message merely waits behind a backlog, it is not sent twice."""
    def published_too(name, args):  # run in process, and published by Celery onto the real Redis list
        captured(name, args)           # as the worker's broker would hold it (its ticket kept as Runtime does)
        publish(name, args=args)

    captured, publish = driver.send_task, make_celery(driver.rt.settings).send_task
    monkeypatch.setattr(driver.rt.scheduler, "send_task", ticketed(published_too, driver.rt.redis))
    newer, _older = _older_write_landed_last(driver, sink_server)
    assert driver.sent and all(args[0] == newer for _name, args in driver.sent)
    assert driver.rt.redis.llen(deliver.DELIVER_LIST) == len(driver.sent)
    driver.sent.clear()  # not run yet: their messages wait in the list
    assert sweeper.sweep(driver.rt) == 0  # not yet: the message may still be on its way
    time.sleep(driver.rt.settings.sweep_after + 0.1)
    assert sweeper.sweep(driver.rt) == 0 and driver.sent == []  # queued behind a backlog: not sent twice
    driver.rt.redis.delete(deliver.DELIVER_LIST)  # the broker loses them
    time.sleep(driver.rt.settings.sweep_after + 0.1)
    assert sweeper.sweep(driver.rt) == 1
    driver.run()
    assert sim_state(sink_server).records[KEY]["status"] == "Complete"
    sweeper.sweep(driver.rt)  # confirmed by the write's record: nothing is sent again
    assert driver.sent == []
    assert [line["what"] for line in driver.rt.ledger.history(newer)].count("reasserted") >= 2


def test_a_newest_write_refused_when_sent_again_is_dead_lettered_once_not_sent_forever(driver, sink_server):
    """Its dead letter is where it is kept: the sweeper does not send it again every sweep."""
    newer, _older = _older_write_landed_last(driver, sink_server)
    sink_server.app.config["FAULTS"].inject(400, times=2, body={"error": "address refused"})
    driver.run()
    assert driver.rt.dead_letters.get(f"{newer}:storepoint") is not None
    time.sleep(driver.rt.settings.sweep_after + 0.1)
    assert sweeper.reassert_again(driver.rt) == 0 and driver.sent == []


def test_a_resend_held_while_the_sink_fails_is_not_sent_again_every_sweep(driver, sink_server):
    """The resend, refused by a failing sink, waited as a held retry (its message consumed), so the
    sweeper took it for lost and sent one more copy every ``RELAY_SWEEP_AFTER`` of the outage, each
    its own held retry."""
    newer, _older = _older_write_landed_last(driver, sink_server)
    faults = sink_server.app.config["FAULTS"]
    faults.inject(503, times=1000, path_prefix="/records")  # the sink is down
    driver.run(release_retries=False)  # the resend: refused, held for the sink's health
    assert driver.rt.ledger.history(newer)[-1]["what"] == "retry"
    time.sleep(driver.rt.settings.sweep_after + 0.1)
    assert sweeper.reassert_again(driver.rt) == 0 and driver.sent == []  # held, not lost
    faults.clear()
    driver.run()  # the held retry goes out once the sink answers
    assert sim_state(sink_server).records[KEY]["status"] == "Complete"
    assert driver.rt.redis.zcard(driver.rt.versions("storepoint").reasserts_key) == 0


def test_a_writer_that_vanished_after_its_lock_lapsed_has_the_newest_write_sent_again(
        driver, sink_server, monkeypatch):
    """A worker lost its key lock while its older write was on its way (a freeze longer than the
    lock; here a 2 s lock), a newer write was applied meanwhile, then the older request landed and
    the worker was killed (SIGKILL) before its compare-and-set. Nothing noticed: its delivery's
    retry was stale and sent nothing, so the sink kept the older write for good."""
    monkeypatch.setattr(deliver, "lock_seconds", lambda sink: (2.0, 1.0))  # a writer mark due 3 s on
    faults = sink_server.app.config["FAULTS"]
    faults.slow(4, path_prefix="/records")  # the older write reaches the sink, applied 4 s later
    older = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    newer = accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    older_args, newer_args = fan_out_job(driver, older), fan_out_job(driver, newer)
    worker = in_worker_process(lambda: tasks.deliver.run(*older_args), driver.rt.sinks.values())
    _wait_until(lambda: faults.in_progress, "the older write never reached the sink")
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    _wait_until(lambda: not driver.rt.redis.exists(LOCK_KEY), "the killed worker's lock never lapsed")
    assert tasks.deliver.run(*newer_args) == "applied"
    _wait_until(lambda: sim_state(sink_server).records[KEY]["status"] == "Arrived",
                "the older write never landed")  # last, after the newer one
    _wait_until(lambda: _swept(driver) and sim_state(sink_server).records[KEY]["status"] == "Complete",
                "the sink kept the older write", timeout=10)
    assert driver.rt.ledger.get(older)["status"] == "stale"  # its retry: a newer write is applied
    assert "reasserted" in [line["what"] for line in driver.rt.ledger.history(newer)]
    assert driver.rt.redis.zcard(driver.rt.versions("storepoint").writers_key) == 0


def _swept(driver):
    """One sweep, and every task it sent run; True."""
    sweeper.sweep(driver.rt)
    driver.run()
    return True


def _wait_until(condition, failure, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)


def test_a_writer_killed_before_anything_landed_for_its_key_is_forgotten_without_a_resend(
        driver, sink_server, caplog):
    """A worker SIGKILLed in the first write ever sent for a key leaves a writer mark with no newest
    write behind it: the sweeper drops the mark, and neither counts nor logs a resend (it reported
    "sent 1 writes again" for nothing, and its sweep's count with it)."""
    accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    _, args = driver.sent.pop(0)
    died_in_first_write(args, driver.rt)
    marks = driver.rt.versions("storepoint").writers_key
    assert driver.rt.redis.zcard(marks) == 1
    time.sleep(1.0 + driver.rt.settings.sweep_after + 0.2)  # its 1 s lock lapsed sweep_after ago
    assert sweeper.reassert_again(driver.rt) == 0
    assert driver.rt.redis.zcard(marks) == 0
    assert driver.sent == [] and "sweeper sent" not in caplog.text
    assert sim_state(sink_server).records == {}


def test_no_writer_mark_outlives_a_write_that_let_go_of_its_lock(driver, sink_server):
    """Applied, stale, refused or unanswered: the writer let go under its lock, so the sweeper has
    nothing to send again for it."""
    marks = driver.rt.versions("storepoint").writers_key
    older = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    newer = accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    newest = accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T07:00:00+00:00"))
    older_args, newer_args, newest_args = (fan_out_job(driver, delivery) for delivery in (older, newer, newest))
    assert tasks.deliver.run(*newer_args) == "applied"
    assert tasks.deliver.run(*older_args) == "stale"
    sink_server.app.config["FAULTS"].inject(503, path_prefix="/records")
    assert tasks.deliver.run(*newest_args) == "retrying"
    assert driver.rt.redis.zcard(marks) == 0
    driver.rt.sinks["storepoint"].client.timeout = (1, 0.5)
    sink_server.app.config["FAULTS"].slow(0.7, path_prefix="/records")
    assert tasks.deliver.run(*newest_args[:4], 1, *newest_args[5:]) == "retrying"  # no answer: settling
    assert driver.rt.redis.get(LOCK_KEY).startswith("settling:")
    assert driver.rt.redis.zcard(marks) == 0


def _newer_after_one_without_answer(driver, sink_server):
    """An older write for a key sent and held by the sink past the client's read timeout (settle time
    1 s), applied by the sink afterwards; then a newer one for the key: ``(newer, its outcome)``."""
    driver.rt.sinks["storepoint"].client.timeout = (1, 0.5)  # settle time: 1 s
    sink_server.app.config["FAULTS"].slow(0.7, path_prefix="/records")  # applied after the client gave up
    older = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    newer = accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    older_args, newer_args = fan_out_job(driver, older), fan_out_job(driver, newer)
    assert tasks.deliver.run(*older_args) == "retrying"  # read timeout; the sink still holds it
    return newer, tasks.deliver.run(*newer_args)


def test_a_write_that_got_no_answer_is_not_overtaken_while_it_may_still_land(driver, sink_server):
    """The sink held a write past the client's read timeout and applied it afterwards (a server
    finishes a request whose client gave up). The lock was released with the error, so a newer
    write went out at once, and the older one landed after it: the sink ended regressed."""
    newer, outcome = _newer_after_one_without_answer(driver, sink_server)
    assert outcome == "waiting"
    assert driver.rt.ledger.get(newer)["sinks"]["storepoint"]["reason"].endswith("may still land")
    time.sleep(1.2)  # the held write landed, and the key's settle time is over
    driver.run()
    assert sim_state(sink_server).records[KEY]["status"] == "Complete"
    assert driver.rt.ledger.get(newer)["status"] == "applied"


def test_an_unordered_routes_next_write_does_not_wait_for_one_that_got_no_answer(driver, sink_server):
    """A route that is not ordered (the forward's: its consumers order events themselves) promises no
    order per key, yet a write without an answer held the key for the sink's settle time (60 s by
    default): with the forward, one URL that hung held every other URL's next message for that stop."""
    driver.rt.routes["storepoint"] = dataclasses.replace(driver.rt.routes["storepoint"], ordered=False)
    assert _newer_after_one_without_answer(driver, sink_server)[1] == "applied"
    assert driver.rt.redis.get(LOCK_KEY) is None


def _older_write_unanswered(driver, sink_server):
    """An older and a newer write for one key; the older one sent and timed out (settle time: 3 s
    after sending), the sink applying it 2 s after it came. ``(older, newer, older_args, newer_args,
    when the older one was sent)``."""
    driver.rt.sinks["storepoint"].client.timeout = (1, 1.5)
    sink_server.app.config["FAULTS"].slow(2, path_prefix="/records")  # applied after the client gave up
    older = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    newer = accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    older_args, newer_args = fan_out_job(driver, older), fan_out_job(driver, newer)
    sent = time.monotonic()
    assert tasks.deliver.run(*older_args) == "retrying"  # read timeout; the sink still holds it
    return older, newer, older_args, newer_args, sent


def test_the_retry_of_a_write_that_got_no_answer_goes_out_at_once_and_another_write_still_waits(
        driver, sink_server):
    """The same write's retry waited for the key's whole settle time too: after a sink that hung
    answered again, each delivery it had held waited up to 30 s more for its own earlier attempt to
    lapse. Sending the very same write again cannot reorder anything; another write for the key
    still waits until the unanswered one can no longer land."""
    older, newer, older_args, newer_args, sent = _older_write_unanswered(driver, sink_server)
    assert tasks.deliver.run(*older_args[:4], 1, *older_args[5:]) == "applied"  # the same write again, at once
    assert driver.rt.redis.get(LOCK_KEY).startswith("settling:")  # what is left of its settle time
    assert tasks.deliver.run(*newer_args) == "waiting"
    assert driver.rt.ledger.get(newer)["sinks"]["storepoint"]["reason"].endswith("may still land")
    time.sleep(max(0.0, sent + 3.2 - time.monotonic()))  # the held write landed; its settle time is over
    driver.run()
    assert sim_state(sink_server).records[KEY]["status"] == "Complete"
    assert driver.rt.ledger.get(older)["status"] == "applied"
    assert driver.rt.ledger.get(newer)["status"] == "applied"


def test_a_retry_that_took_the_settling_key_and_failed_leaves_it_settling(driver, sink_server):
    """A retry that takes its own write's settling key and is refused (an answer, so nothing of it is
    in flight) gives the key back settling for the rest of the first attempt's time."""
    _, _, older_args, newer_args, _ = _older_write_unanswered(driver, sink_server)
    sink_server.app.config["FAULTS"].inject(503, path_prefix="/records")
    assert tasks.deliver.run(*older_args[:4], 1, *older_args[5:]) == "retrying"
    assert driver.rt.redis.get(LOCK_KEY).startswith("settling:")
    assert 0 < driver.rt.redis.pttl(LOCK_KEY) <= 1500
    assert tasks.deliver.run(*newer_args) == "waiting"


def test_a_killed_holders_lock_outlasts_every_request_it_may_have_sent(redis_client):
    """A lock lapses between ``length - renew`` and ``length`` after its holder's last request."""
    settings = Settings(webhook_secret="x" * 16, forward_urls=("http://127.0.0.1:9/hook",),
                        b2b_api_url="http://127.0.0.1:9/b2b", locate_api_url="http://127.0.0.1:9/locate")
    for sink_class in sinks.BUILT_IN:
        sink = sink_class.from_settings(settings, MappingStore(redis_client, sink_class.name))
        length, renew = deliver.lock_seconds(sink)
        assert length - renew >= sink.settle_seconds >= 60, sink_class.name


def test_equal_instants_end_in_the_later_received_state_whatever_the_processing_order(driver, sink_server):
    """Item 3: with the same actionDate the state processed last won, so the end state depended on timing."""
    instant = "2022-04-27T05:00:00+00:00"
    first = accept(driver.rt, status_change(STOP_ID, "Arrived", instant))
    second = accept(driver.rt, status_change(STOP_ID, "Failed", instant))
    driver.sent.reverse()  # the later-received event is processed first
    driver.run()
    assert sim_state(sink_server).records[KEY]["status"] == "Failed"
    assert driver.rt.ledger.get(first)["status"] == "stale"
    assert driver.rt.ledger.get(second)["status"] == "applied"


def test_equal_instants_in_receipt_order_apply_both(driver, sink_server):
    instant = "2022-04-27T05:00:00+00:00"
    accept(driver.rt, status_change(STOP_ID, "Arrived", instant))
    accept(driver.rt, status_change(STOP_ID, "Failed", instant))
    driver.run()
    assert [body["status"] for _, _, body in sim_state(sink_server).writes] == ["Arrived", "Failed"]


def test_instants_a_tenth_of_a_microsecond_apart_are_ordered_by_instant_not_by_receipt(driver, sink_server):
    """``actionDate`` has seven fractional digits (.NET's 100 ns tick). The relay kept six, so two
    changes within one microsecond were a tie broken by receipt: the older, received later, won."""
    newer = accept(driver.rt, status_change(STOP_ID, "Complete", "2022-04-27T14:16:40.9450989+10:00"))
    older = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T14:16:40.9450981+10:00"))
    driver.run()
    assert sim_state(sink_server).records[KEY]["status"] == "Complete"
    assert driver.rt.ledger.get(newer)["status"] == "applied"
    assert driver.rt.ledger.get(older)["status"] == "stale"


@pytest.mark.parametrize("when, status", [("2022-04-27T06:00:00.4999999+00:00", "stale"),
                                          ("2022-04-27T06:00:00.5000001+00:00", "applied")])
def test_a_version_recorded_as_epoch_seconds_before_nanoseconds_were_kept_still_orders_writes(
        driver, sink_server, when, status):
    """Versions written before the upgrade are a float's text; the comparison reads them as the same
    instant. The newest write's receipt is later than any, so only the instant can make a write newer."""
    versions = driver.rt.versions("storepoint")
    driver.rt.redis.hset(versions.key, KEY, repr(1651039200.5))  # 06:00:00.5 UTC
    driver.rt.redis.hset(versions.writes_key, KEY, json.dumps({"delivery_id": "f" * 64, "received_at": 9e9,
                                                                "action": "upsert", "record": {}}))
    delivery = accept(driver.rt, status_change(STOP_ID, "Arrived", when))
    driver.run()
    assert driver.rt.ledger.get(delivery)["status"] == status


def test_an_actiondate_from_a_clock_a_year_ahead_does_not_freeze_the_key_until_then(driver, sink_server):
    """One delivery stamped a year ahead (a clock set wrong) was the newest write for a year: every real
    change after it was stale, and the sink kept its state."""
    ahead = (datetime.now(timezone.utc) + timedelta(days=365)).isoformat()
    wrong = accept(driver.rt, status_change(STOP_ID, "Arrived", ahead))
    time.sleep(0.01)
    later = accept(driver.rt, status_change(STOP_ID, "Complete", datetime.now(timezone.utc).isoformat()))
    driver.run()
    assert driver.rt.ledger.get(later)["status"] == "applied"
    assert sim_state(sink_server).records[KEY]["status"] == "Complete"
    assert driver.rt.ledger.get(wrong)["status"] == "applied"  # it was newest when it came


def test_an_actiondate_a_few_seconds_ahead_of_its_receipt_keeps_its_order(driver, sink_server):
    """Clocks a little apart are not a wrong clock: within a minute, the actionDate still decides."""
    soon = datetime.now(timezone.utc) + timedelta(seconds=20)
    newer = accept(driver.rt, status_change(STOP_ID, "Complete", soon.isoformat()))
    older = accept(driver.rt, status_change(STOP_ID, "Arrived", (soon - timedelta(seconds=1)).isoformat()))
    driver.run()
    assert driver.rt.ledger.get(older)["status"] == "stale" and driver.rt.ledger.get(newer)["status"] == "applied"
