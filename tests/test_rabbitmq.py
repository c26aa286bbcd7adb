"""``CELERY_BROKER_URL=amqp://…``: the queues on a real RabbitMQ node (started here), the ledger in Redis.

The receiver then publishes ``process_delivery`` with ``send_task`` after the ledger write; a worker
SIGKILLed mid-task leaves the message unacknowledged, RabbitMQ hands it to the next worker, and the
delivery is applied once.
"""
import time

import pytest

from tests.payloads import status_change
from tests.processes import RabbitMQ
from tests.test_end_to_end import KEY, STOP_ID, settled, sims  # noqa: F401  (sims is a fixture)
from tests.test_receiver import post
from tests.test_worker_ingest import wait_for
from tests.tools import require_binary
from workers.stores import Ledger

SP_TOKEN = "sp-e2e-token-123"


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory):
    server = RabbitMQ(require_binary("rabbitmq-server", "rabbitmq-server"), tmp_path_factory.mktemp("rabbitmq"))
    yield server
    server.stop()


@pytest.fixture
def amqp_settings(settings, sims, rabbitmq):  # noqa: F811
    l2u_state = sims["locate2u"].app.config["STATE"]
    return settings.replace(
        broker_url=rabbitmq.url,
        locate2u_client_id=l2u_state.client_id, locate2u_client_secret=l2u_state.client_secret,
        locate2u_api_url=sims["locate2u"].url, locate2u_id_url=sims["locate2u"].url,
        storepoint_api_url=sims["storepoint"].url, storepoint_api_token=SP_TOKEN,
        retry_schedule=(0, 1, 1, 2, 3), visibility_timeout=10)


def storepoint_locations(sims):  # noqa: F811
    return sims["storepoint"].app.config["STATE"].find(lambda location: f"l2u:{KEY}" in location["tags"])


@pytest.mark.timeout(900)  # the node's start counts too: minutes on a busy machine
def test_delivery_is_applied_through_rabbitmq_and_survives_a_worker_kill(amqp_settings, start_process, sims,  # noqa: F811
                                                                         redis_client):
    web = start_process("gunicorn", amqp_settings)
    sims["storepoint"].app.config["FAULTS"].latency(2.0)
    victim = start_process("worker", amqp_settings, beat=True, name="victim")
    delivery_id = post(web.url, "stop.status-changed",
                       status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00")).json()["delivery_id"]
    assert redis_client.llen("ingest") == 0  # queued in RabbitMQ, not in Redis
    sp_state = sims["storepoint"].app.config["STATE"]
    wait_for(lambda: any(path == "/locations" for _, path, _ in sp_state.requests_log), timeout=60, interval=0.05)
    victim.kill()
    assert Ledger(redis_client).get(delivery_id)["status"] != "applied"
    sims["storepoint"].app.config["FAULTS"].latency(0)
    start_process("worker", amqp_settings, beat=True, name="rescuer")
    entry = wait_for(lambda: settled(redis_client, delivery_id), timeout=120)
    assert entry["status"] == "applied", entry
    time.sleep(1)
    assert len(storepoint_locations(sims)) == 1

    later = post(web.url, "stop.status-changed", status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    assert wait_for(lambda: settled(redis_client, later.json()["delivery_id"]), timeout=120)["status"] == "applied"
    [location] = storepoint_locations(sims)
    assert "complete" in location["tags"]
