"""``CELERY_BROKER_URL=amqp://…``: the queues on a real RabbitMQ node (started here), the ledger in Redis.

The receiver then publishes ``process_delivery`` with ``send_task`` after the ledger write; a worker
SIGKILLed mid-task leaves the message unacknowledged, RabbitMQ hands it to the next worker, and the
delivery is applied once.
"""
import time

import pytest

from tests.fixtures import STOP_ID, kill_worker_mid_write, sims_settings, storepoint_locations
from tests.helpers import post, settled, wait_for
from tests.payloads import status_change


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
