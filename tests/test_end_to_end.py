"""Deliveries posted to the real receiver (gunicorn) and applied by a real Celery worker
to the loopback Storepoint and B2B simulators, with Locate2u simulated for enrichment."""
import subprocess
import time

import pytest

from tests.payloads import status_change
from tests.processes import BIN, process_env
from workers.ops.simulators import b2b, locate2u, storepoint
from workers.ops.simulators.base import SimulatorServer
from tests.test_receiver import post
from tests.test_worker_ingest import wait_for
from workers.stores import Ledger, MappingStore

STOP_ID = 164557
KEY = f"l2u-stop-{STOP_ID}"
SP_TOKEN, B2B_TOKEN = "sp-e2e-token-123", "b2b-e2e-token-123"


@pytest.fixture
def sims():
    l2u_state = locate2u.Locate2uState()
    l2u_state.add_stop(stopId=STOP_ID)
    servers = {"locate2u": SimulatorServer(locate2u.create_app(l2u_state)).start(),
               "storepoint": SimulatorServer(storepoint.create_app(storepoint.StorepointState(token=SP_TOKEN))).start(),
               "b2b": SimulatorServer(b2b.create_app(b2b.B2BState(token=B2B_TOKEN))).start()}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def stack_settings(settings, sims):
    l2u_state = sims["locate2u"].app.config["STATE"]
    return settings.replace(
        locate2u_client_id=l2u_state.client_id, locate2u_client_secret=l2u_state.client_secret,
        locate2u_api_url=sims["locate2u"].url, locate2u_id_url=sims["locate2u"].url,
        storepoint_api_url=sims["storepoint"].url, storepoint_api_token=SP_TOKEN,
        b2b_api_url=sims["b2b"].url, b2b_api_token=B2B_TOKEN, b2b_business_partner_id="BP-1", b2b_country_id="AU",
        retry_schedule=(0, 1, 1, 2, 3), visibility_timeout=10)


@pytest.fixture
def stack(stack_settings, start_process):
    web = start_process("gunicorn", stack_settings)
    start_process("worker", stack_settings, beat=True)
    return web


def storepoint_locations(sims):
    return sims["storepoint"].app.config["STATE"].find(lambda location: f"l2u:{KEY}" in location["tags"])


def b2b_locations(sims):
    return [item for item in sims["b2b"].app.config["STATE"].locations.values() if item["idRemote"] == KEY]


def settled(redis_client, delivery_id):
    entry = Ledger(redis_client).get(delivery_id)
    return entry if entry and entry["status"] in ("applied", "stale", "dead_lettered") else None


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


def test_cancellation_deletes_from_storepoint_and_deactivates_in_b2b(stack, sims, redis_client):
    first = post(stack.url, "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    wait_for(lambda: settled(redis_client, first.json()["delivery_id"]))
    assert len(storepoint_locations(sims)) == 1
    cancel = post(stack.url, "stop.status-changed", status_change(STOP_ID, "Cancelled", "2022-04-27T05:30:00+00:00"))
    assert wait_for(lambda: settled(redis_client, cancel.json()["delivery_id"]))["status"] == "applied"
    assert storepoint_locations(sims) == []
    [location] = b2b_locations(sims)
    assert location["active"] is False


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
    sims["storepoint"].app.config["FAULTS"].latency(2.0)
    victim = start_process("worker", stack_settings, beat=True, name="victim")
    delivery_id = post(web.url, "stop.status-changed",
                       status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00")).json()["delivery_id"]
    sp_state = sims["storepoint"].app.config["STATE"]
    wait_for(lambda: any(path == "/locations" for _, path, _ in sp_state.requests_log), timeout=30, interval=0.05)
    victim.kill()
    assert Ledger(redis_client).get(delivery_id)["status"] != "applied"
    sims["storepoint"].app.config["FAULTS"].latency(0)
    start_process("worker", stack_settings, beat=True, name="rescuer")
    entry = wait_for(lambda: settled(redis_client, delivery_id), timeout=90)
    assert entry["status"] == "applied", entry
    time.sleep(1)
    assert len(storepoint_locations(sims)) == 1
    assert len(b2b_locations(sims)) == 1
