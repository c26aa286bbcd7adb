"""``CELERY_BROKER_URL=amqp://…``: the queues on a real RabbitMQ node (started here), the ledger in Redis.

The receiver then publishes ``process_delivery`` with ``send_task`` after the ledger write; a worker
SIGKILLed mid-task leaves the message unacknowledged, RabbitMQ hands it to the next worker, and the
delivery is applied once. While the ledger's Redis is down and RabbitMQ is not, a message put back
for later comes straight back: each worker process pauses before putting one back, so the outage is
not a loop. The sweeper tells a message waiting in RabbitMQ behind a backlog from a lost one, as it
does on Redis. Task events, which Flower shows, stay on with RabbitMQ: the step that sends them only
while someone watches asks Redis's ``PUBSUB NUMPAT`` and is off for another broker.
"""
import json
import threading
import time

import amqp.exceptions
import pytest

from tests.fixtures import STOP_ID, kill_worker_mid_write, sims_settings, storepoint_locations
from tests.helpers import post, settled, wait_for
from tests.payloads import status_change
from workers.celery_config import SWEEP_RECEIVED, make_celery
from workers.ops.devstack import EmbeddedRedis
from workers.pipeline.sweeper import sweep
from workers.runtime import Runtime
from workers.store.keys import INGEST_QUEUE
from workers.store.ledger import Ledger
from workers.store.redis_client import connect


@pytest.fixture
def amqp_settings(settings, sims, rabbitmq):
    return sims_settings(settings, {kind: sims[kind] for kind in ("locate2u", "storepoint")}, broker_url=rabbitmq.url,
                         retry_schedule=(0, 1, 1, 2, 3), visibility_timeout=10)


@pytest.mark.timeout(900)  # the node's start counts too: minutes on a busy machine
def test_delivery_is_applied_through_rabbitmq_and_survives_a_worker_kill(amqp_settings, start_process, sims,
                                                                         redis_client):
    web = start_process("gunicorn", amqp_settings)

    def deliver():
        delivery_id = post(web.url, "stop.status-changed",
                           status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00")).json()["delivery_id"]
        assert redis_client.llen("ingest") == 0  # queued in RabbitMQ, not in Redis
        return delivery_id

    entry = kill_worker_mid_write(start_process, amqp_settings, sims, redis_client, deliver, write_timeout=60,
                                  settle_timeout=180)  # the killed write's lock: 70 s
    assert entry["status"] == "applied", entry
    time.sleep(1)
    assert len(storepoint_locations(sims)) == 1

    later = post(web.url, "stop.status-changed", status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    assert wait_for(lambda: settled(redis_client, later.json()["delivery_id"]), timeout=120)["status"] == "applied"
    [location] = storepoint_locations(sims)
    assert "complete" in location["tags"]


@pytest.mark.timeout(900)
def test_while_the_ledgers_redis_is_down_messages_are_put_back_at_a_walk_not_in_a_loop(amqp_settings, start_process,
                                                                                       tmp_path):
    """RabbitMQ stays up and hands a message put back (``Reject(requeue=True)``) straight to a worker
    again; it used to go round ~250 times a second for three messages, a two-traceback WARNING each
    time, for the whole outage."""
    ledger_redis = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    try:
        settings = amqp_settings.replace(redis_url=ledger_redis.url)
        web = start_process("gunicorn", settings)
        delivery_ids = [post(web.url, "stop.status-changed", status_change(STOP_ID, status, f"2022-04-27T0{hour}:00:00+00:00"))
                        .json()["delivery_id"] for hour, status in ((5, "Arrived"), (6, "Complete"), (7, "Enroute"))]
        ledger_redis.stop()  # queued in RabbitMQ, and no worker has taken them yet
        worker = start_process("worker", settings, beat=True)
        worker.wait_for_output("reject requeue=True", timeout=60)
        time.sleep(10)
        put_back = worker.output().count("reject requeue=True")
        assert put_back <= 40, f"{put_back} messages put back in about 10 s"  # 4 processes, the first pause 1 s
        ledger_redis.start()
        client = connect(ledger_redis.url)
        for delivery_id in delivery_ids:
            assert wait_for(lambda: settled(client, delivery_id), timeout=120)["status"] in ("applied", "stale")
    finally:
        ledger_redis.stop()


def ready_in(app, queue):
    """How many messages wait in RabbitMQ's ``queue`` (not taken by a consumer); 0 before it exists."""
    with app.connection_for_read() as connection, connection.channel() as channel:
        try:
            return channel.queue_declare(queue=queue, passive=True).message_count
        except amqp.exceptions.NotFound:
            return 0


@pytest.mark.timeout(900)
def test_a_backlog_waiting_in_rabbitmq_is_left_alone_by_the_sweeper_and_a_lost_delivery_is_not(
        amqp_settings, start_process, sims, redis_client):
    """No worker takes the ingest queue for three ``RELAY_SWEEP_AFTER``s. Each sweep used to queue the
    whole backlog again (no queue positions with RabbitMQ): 20 messages became 80, and a backlog of
    an hour's outage grew by itself once per ``RELAY_SWEEP_AFTER``, its redundant work quadratic."""
    settings = amqp_settings.replace(sweep_after=2)
    web = start_process("gunicorn", settings)
    app = make_celery(settings, "rabbitmq-sweep-test")
    before = ready_in(app, INGEST_QUEUE)
    posted = [post(web.url, "stop.status-changed", status_change(STOP_ID, "Arrived", f"2022-04-27T05:{minute:02}:00+00:00"))
              .json()["delivery_id"] for minute in range(20)]
    lost = "lost-before-its-publish"  # recorded, then the receiver died before publishing it
    assert Ledger(redis_client).record(lost, "stop.status-changed",
                                       json.dumps(status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00")), 3600)
    rt = Runtime(settings, app.send_task)
    swept = []
    for _ in range(3):
        time.sleep(settings.sweep_after + 0.5)
        swept.append(sweep(rt))
    assert swept == [1, 0, 0], swept  # the lost one once, none of those waiting their turn
    assert ready_in(app, INGEST_QUEUE) - before == len(posted) + 1
    start_process("worker", settings, beat=True)
    for delivery_id in [*posted, lost]:
        assert wait_for(lambda: settled(redis_client, delivery_id), timeout=120)["status"] in ("applied", "stale")
    [location] = storepoint_locations(sims)
    assert "complete" in location["tags"]


@pytest.mark.timeout(900)
def test_an_events_watcher_sees_task_events_through_rabbitmq(amqp_settings, start_process):
    start_process("worker", amqp_settings)
    app = make_celery(amqp_settings, "rabbitmq-events-test")
    succeeded = threading.Event()
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"task-succeeded": lambda event: succeeded.set()})
        watching = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False),
                                    daemon=True)
        watching.start()  # Flower's kind of receiver: its queue is bound once it consumes
        try:
            deadline = time.monotonic() + 120
            while not succeeded.is_set() and time.monotonic() < deadline:
                app.send_task(SWEEP_RECEIVED)  # again until the receiver's queue caught an event
                succeeded.wait(2)
            assert succeeded.is_set(), "no task-succeeded event came through RabbitMQ"
        finally:
            receiver.should_stop = True
            watching.join(10)
