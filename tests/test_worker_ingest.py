"""A real Celery worker consuming what the receiver recorded."""
import json
import time

import pytest

from tests.helpers import post, wait_for
from tests.payloads import PUBLISHED
from workers.pipeline import sweeper
from workers.runtime import Runtime
from workers.store.ledger import LEDGER_RETENTION, Ledger
from workers.store.quarantine import Quarantine


@pytest.fixture
def stack(settings, start_process):
    web = start_process("gunicorn", settings)
    worker = start_process("worker", settings)
    return web, worker


def settled(ledger, delivery_id):
    """The ledger entry once the worker is done with it ("processing" is its lease while it reads), else None."""
    entry = ledger.get(delivery_id)
    return entry if entry and entry["status"] not in ("received", "processing") else None


def test_worker_validates_and_records_the_outcome(stack, redis_client):
    web, _ = stack
    ledger = Ledger(redis_client)
    delivery_id = post(web.url, "trip.created", PUBLISHED["trip.created"]).json()["delivery_id"]
    entry = wait_for(lambda: settled(ledger, delivery_id))
    assert entry["status"] == "unrouted"
    assert entry["entity"] == "trip"
    assert redis_client.zscore(Ledger.OPEN, delivery_id) is None


def test_schema_invalid_delivery_is_quarantined_with_the_messages(stack, redis_client):
    web, _ = stack
    body = dict(PUBLISHED["stop.assigned"], actionDate="not a date")
    delivery_id = post(web.url, "stop.assigned", body).json()["delivery_id"]
    ledger = Ledger(redis_client)
    entry = wait_for(lambda: (e := ledger.get(delivery_id)) and e["status"] == "quarantined" and e)
    assert "actionDate" in entry["reason"]
    [item] = Quarantine(redis_client).items()
    assert item["delivery_id"] == delivery_id
    assert item["errors"] == {"actionDate": ["Not a valid datetime."]}
    assert json.loads(item["body"]) == body


def test_sweeper_requeues_an_orphaned_ledger_entry(settings, start_process, redis_client):
    """A crash between "recorded" and "queued": the ledger has it, the queue does not."""
    ledger = Ledger(redis_client)
    body = json.dumps(PUBLISHED["trip.assigned"])
    assert ledger.record("orphan-1", "trip.assigned", body, 3600, received_at=time.time() - 10)
    assert redis_client.llen("ingest") == 0
    start_process("worker", settings, beat=True)
    entry = wait_for(lambda: settled(ledger, "orphan-1"), timeout=60)
    assert entry["status"] == "unrouted"


def test_a_deep_body_recorded_before_the_receiver_refused_it_is_quarantined_and_the_worker_lives(
        settings, start_process, redis_client):
    """Bodies nested hundreds of levels deep, recorded by a receiver from before the depth check: the
    worker retried them forever, or died handing their write to its pool. They are quarantined."""
    ledger = Ledger(redis_client)
    for depth in (40, 960):
        body = json.dumps(PUBLISHED["stop.assigned"])[:-1] + ', "x": %s}' % ("[" * depth + "]" * depth)
        assert ledger.record(f"deep-{depth}", "stop.assigned", body, 3600, received_at=time.time() - 10)
    worker = start_process("worker", settings, beat=True)  # the sweeper queues them
    for depth in (40, 960):
        entry = wait_for(lambda: settled(ledger, f"deep-{depth}"), timeout=60)
        assert entry["status"] == "quarantined" and "nested" in entry["reason"], entry
    # and the worker still takes work: a delivery recorded after them is processed
    assert ledger.record("after", "stop.assigned", json.dumps(PUBLISHED["stop.assigned"]), 3600,
                         received_at=time.time() - 10)
    assert wait_for(lambda: settled(ledger, "after"), timeout=60)["status"] not in ("quarantined", "dead_lettered")
    assert worker.proc.poll() is None


def test_ledger_index_forgets_deliveries_past_retention(redis_client):
    ledger = Ledger(redis_client)
    now = time.time()
    ledger.record("old", "trip.created", "{}", 3600, received_at=now - LEDGER_RETENTION - 10)
    ledger.record("new", "trip.created", "{}", 3600, received_at=now)
    assert ledger.prune(now) == 1
    assert ledger.ids() == ["new"]


def test_sweeper_leaves_received_deliveries_alone_during_a_backlog(settings, redis_client):
    """A backlog older than RELAY_SWEEP_AFTER is waiting its turn, not lost: no re-queue storm."""
    ledger = Ledger(redis_client)
    ledger.record("waiting", "trip.created", "{}", 3600, received_at=time.time() - 100,
                  enqueue=("ingest", "a message still queued"))
    assert sweeper.sweep(Runtime(settings, send_task=None)) == 0
    assert ledger.get("waiting")["status"] == "received"
    assert redis_client.llen("ingest") == 1
