"""``CELERY_BROKER_URL=amqp://…``: the queues on a real RabbitMQ node (started here), the ledger in Redis.

The receiver then publishes ``process_delivery`` with ``send_task`` after the ledger write; a worker
SIGKILLed mid-task leaves the message unacknowledged, RabbitMQ hands it to the next worker, and the
delivery is applied once. Task events, which Flower shows, stay on with RabbitMQ: the step that sends
them only while someone watches asks Redis's ``PUBSUB NUMPAT`` and is off for another broker.
"""
import threading
import time

import pytest

from tests.fixtures import STOP_ID, kill_worker_mid_write, sims_settings, storepoint_locations
from tests.helpers import post, settled, wait_for
from tests.payloads import status_change
from workers.celery_config import SWEEP_RECEIVED, make_celery


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
