"""The sweeper against a real Redis broker: lost messages, a processing lease, a deep backlog.

Tasks are published for real (Celery onto the Redis lists, so every message gets
its queue ticket) and taken off the lists the way kombu's Redis transport takes
them (from the right end), then run in-process. A lost message is simulated the
way a broker loses one: taken off the list and never run, or its list deleted.
Locate2u and Storepoint are the loopback simulators.
"""
import base64
import json
import socket
import threading
import time

import pytest

from receiver.handoff import RedisTaskMessage
from tests.fixtures import STOP_ID, died_in_first_write, sims_settings
from tests.payloads import status_change
from workers import tasks
from workers.celery_config import DELIVER, DELIVER_QUEUE, INGEST_QUEUE, PROCESS_DELIVERY, make_celery
from workers.pipeline import fan_out, sweeper
from workers.runtime import Runtime
from workers.store.ledger import Ledger
from workers.store.queue_positions import work_queues

SP_TOKEN = "sp-sweeper-token"


@pytest.fixture
def l2u(simulator):
    return simulator("locate2u", stops=(STOP_ID, STOP_ID + 1))


@pytest.fixture
def sp(simulator):
    return simulator("storepoint", token=SP_TOKEN)


class Broker:
    """The real Redis lists as a worker sees them; tasks run in-process."""

    TASKS = {PROCESS_DELIVERY: tasks.process_delivery, DELIVER: tasks.deliver}

    def __init__(self, rt):
        self.rt = rt

    def take(self, queue):
        """Pop the next message off ``queue`` as kombu does; ``(task name, args)`` or None."""
        raw = self.rt.redis.rpop(queue)
        if raw is None:
            return None
        message = json.loads(raw)
        return message["headers"]["task"], json.loads(base64.b64decode(message["body"]))[0]

    def queued(self, queue):
        """``(task name, args)`` of every message in ``queue``, next first."""
        messages = [json.loads(raw) for raw in reversed(self.rt.redis.lrange(queue, 0, -1))]
        return [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages]

    def drain(self, limit=200):
        """Run every queued task (due retries fast-forwarded) until nothing is left."""
        for _ in range(limit):
            taken = self.take(INGEST_QUEUE) or self.take(DELIVER_QUEUE)
            if taken is None:
                if self.rt.scheduler.release_due(now=time.time() + 10 ** 6):
                    continue
                return
            self.TASKS[taken[0]].run(*taken[1])
        raise AssertionError("tasks kept coming")


@pytest.fixture
def broker(settings, l2u, sp, monkeypatch):
    settings = sims_settings(settings, {"locate2u": l2u, "storepoint": sp}, retry_schedule=(0, 1, 2, 3))
    rt = Runtime(settings, make_celery(settings).send_task)
    monkeypatch.setattr(tasks, "runtime", lambda: rt)
    return Broker(rt)


def accept(rt, stop_id=STOP_ID, status="Arrived", at="2022-04-27T05:00:00+00:00"):
    """What the receiver does: record and push the process_delivery message in one script."""
    body = json.dumps(status_change(stop_id, status, at))
    delivery_id = f"d-{stop_id}-{status}-{at}"
    message = RedisTaskMessage(make_celery(rt.settings), PROCESS_DELIVERY, INGEST_QUEUE)
    args = [delivery_id, "stop.status-changed"]
    assert rt.ledger.record(delivery_id, args[1], body, 3600, enqueue=(message.key, message.build(args)))
    return delivery_id


def stop_fetches(l2u):
    return [entry for entry in l2u.app.config["STATE"].requests_log if "/v1/Stops/" in entry[1]]


def past_sweep_after(rt):
    time.sleep(rt.settings.sweep_after + 0.3)


# Defect 1: a delivery set to "retrying" after a failed stop fetch was in no index.

def test_a_lost_enrich_retry_is_found_by_the_sweeper(broker, l2u, sp):
    rt = broker.rt
    l2u.app.config["FAULTS"].inject(503, times=4, path_prefix="/v1/Stops")  # every try of the client's one call
    delivery_id = accept(rt)
    assert tasks.process_delivery.run(*broker.take(INGEST_QUEUE)[1]) == "retrying"
    assert rt.ledger.get(delivery_id)["status"] == "retrying"
    rt.redis.delete(rt.scheduler.KEY)  # the retry is lost (a broker restart, the pop-then-ack window)
    time.sleep(1.5)  # the retry was due within about a second
    past_sweep_after(rt)
    assert tasks.sweep_received.run() == 1
    [(name, args)] = broker.queued(INGEST_QUEUE)
    assert name == PROCESS_DELIVERY and args[:3] == [delivery_id, "stop.status-changed", 1]  # attempt kept
    broker.drain()
    assert rt.ledger.get(delivery_id)["status"] == "applied"
    assert rt.redis.zscore(Ledger.OPEN, delivery_id) is None


def test_every_state_before_the_end_is_in_the_sweepers_index(broker, l2u):
    """received, processing, retrying and routed are each in the one index the sweeper reads."""
    rt = broker.rt
    l2u.app.config["FAULTS"].inject(503, times=4, path_prefix="/v1/Stops")
    delivery_id = accept(rt)
    seen = {}

    def note():
        seen[rt.ledger.get(delivery_id)["status"]] = rt.redis.zscore(Ledger.OPEN, delivery_id)

    note()
    real_fetch, real_deliver = fan_out.fetch_stop, fan_out.deliver_now

    def fetch_and_note(rt_, stop_id, happened_at):
        note()
        return real_fetch(rt_, stop_id, happened_at)

    def note_and_deliver(rt_, job, received_at):
        note()
        return real_deliver(rt_, job, received_at)

    fan_out.fetch_stop, fan_out.deliver_now = fetch_and_note, note_and_deliver
    try:
        tasks.process_delivery.run(*broker.take(INGEST_QUEUE)[1])
        note()
        rt.scheduler.release_due(now=time.time() + 60)
        tasks.process_delivery.run(*broker.take(INGEST_QUEUE)[1])
    finally:
        fan_out.fetch_stop, fan_out.deliver_now = real_fetch, real_deliver
    assert set(seen) == {"received", "processing", "retrying", "routed"}
    assert all(score is not None for score in seen.values()), seen


# Defect 6: a delivery stayed "received" while a worker enriched it, so the sweeper queued it again.

def test_a_delivery_being_enriched_is_not_queued_a_second_time(broker, l2u):
    rt = broker.rt
    l2u.app.config["FAULTS"].latency(rt.settings.sweep_after * 3)  # a slow stop fetch
    delivery_id = accept(rt)
    _, args = broker.take(INGEST_QUEUE)
    worker = threading.Thread(target=tasks.process_delivery.run, args=args)
    worker.start()
    try:
        past_sweep_after(rt)
        past_sweep_after(rt)
        assert tasks.sweep_received.run() == 0  # its lease is renewed: a live worker holds it
        assert rt.ledger.get(delivery_id)["status"] == "processing"
        assert broker.queued(INGEST_QUEUE) == []
    finally:
        worker.join(60)
    l2u.app.config["FAULTS"].clear()
    broker.drain()
    assert rt.ledger.get(delivery_id)["status"] == "applied"
    assert len(stop_fetches(l2u)) == 1


def test_a_redelivered_message_leaves_a_live_lease_alone(broker, l2u):
    rt = broker.rt
    delivery_id = accept(rt)
    _, args = broker.take(INGEST_QUEUE)
    assert rt.ledger.take_up(delivery_id, "another-worker", rt.settings.sweep_after)[1]
    assert tasks.process_delivery.run(*args) == "processing"
    assert stop_fetches(l2u) == []


def test_a_dead_workers_lease_lapses_and_the_sweeper_takes_it_up(broker):
    rt = broker.rt
    delivery_id = accept(rt)
    broker.take(INGEST_QUEUE)  # taken by a worker that then died: its lease is never renewed
    assert rt.ledger.take_up(delivery_id, "dead-worker", rt.settings.sweep_after)[1]
    assert tasks.sweep_received.run() == 0
    past_sweep_after(rt)
    assert tasks.sweep_received.run() == 1
    broker.drain()
    assert rt.ledger.get(delivery_id)["status"] == "applied"


# Defect 7: the sweepers acted only while the work queues were empty.

def test_a_lost_message_behind_a_deep_backlog_is_requeued_and_the_backlog_left_alone(broker):
    rt = broker.rt
    lost = accept(rt, status="Arrived")
    waiting = [accept(rt, stop_id=STOP_ID + i, status="Enroute") for i in range(1, 301)]
    assert broker.take(INGEST_QUEUE)[1][0] == lost  # taken off the list, then lost with its worker
    past_sweep_after(rt)
    assert tasks.sweep_received.run() == 1
    queued = broker.queued(INGEST_QUEUE)
    assert [args[0] for _, args in queued] == waiting + [lost]  # nothing waiting was queued again
    assert tasks.sweep_received.run() == 0


def test_a_lost_deliver_behind_a_deep_backlog_is_resumed_and_the_backlog_left_alone(broker, sp):
    rt = broker.rt
    lost = accept(rt, status="Arrived")
    accept(rt, stop_id=STOP_ID + 1)
    for _ in range(2):  # both fan-outs' workers die in their write; the sweeper resumes them
        died_in_first_write(broker.take(INGEST_QUEUE)[1], rt)
    past_sweep_after(rt)
    assert tasks.sweep_received.run() == 2
    for _ in range(2):
        assert tasks.process_delivery.run(*broker.take(INGEST_QUEUE)[1]) == "resumed"
    for i in range(300):  # a backlog of other deliveries' writes behind both resumed ones
        rt.scheduler.send_task(DELIVER, args=[f"other-{i}", "storepoint", "upsert", {}, 0, False])
    assert broker.take(DELIVER_QUEUE)[1][0] == lost
    past_sweep_after(rt)
    past_sweep_after(rt)  # a resumed fan-out's patience doubles
    assert tasks.sweep_received.run() == 1
    [(name, args)] = broker.queued(INGEST_QUEUE)
    assert name == PROCESS_DELIVERY and args[0] == lost
    assert len(broker.queued(DELIVER_QUEUE)) == 301  # the waiting write is still queued once
    assert tasks.process_delivery.run(*broker.take(INGEST_QUEUE)[1]) == "resumed"
    assert tasks.sweep_received.run() == 0


def test_a_deleted_queue_is_recovered_whatever_its_length(broker):
    rt = broker.rt
    ids = [accept(rt, stop_id=STOP_ID + i) for i in range(50)]
    rt.redis.delete(INGEST_QUEUE)  # the broker lost the whole list
    past_sweep_after(rt)
    assert tasks.sweep_received.run() == 50
    assert sorted(args[0] for _, args in broker.queued(INGEST_QUEUE)) == sorted(ids)


def test_overlapping_sweeps_queue_a_lost_message_once(broker):
    """Large chaos run: sweep tasks piled up behind a backlog ran side by side (the first one's
    lock had expired) and each queued the same lost deliveries again, six times over."""
    rt = broker.rt
    lost = accept(rt)
    broker.take(INGEST_QUEUE)
    past_sweep_after(rt)
    deadline = time.monotonic() + 10
    results = []
    sweeps = [threading.Thread(target=lambda: results.append(sweeper.sweep_open(rt, deadline))) for _ in range(4)]
    for sweep in sweeps:
        sweep.start()
    for sweep in sweeps:
        sweep.join(30)
    assert sorted(results) == [0, 0, 0, 1]
    assert [args[0] for _, args in broker.queued(INGEST_QUEUE)] == [lost]


def test_a_broker_the_sweeper_cannot_read_makes_every_message_count_as_gone(settings, caplog):
    """With another broker, the queue lengths come from it; one that does not answer (RabbitMQ down)
    leaves no positions, so a delivery without progress is queued again, as before tickets there."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    rt = Runtime(settings.replace(broker_url=f"amqp://guest:guest@127.0.0.1:{port}//"), lambda *a, **k: None)
    rt.redis.set("l2u:queued:ingest", 5)
    snapshot = work_queues(rt)
    assert snapshot.queues == {} and not snapshot.waiting("ingest:5")
    assert "cannot read the broker's queue lengths" in caplog.text
