"""Deliveries by stop (``workers/store/stop_index.py``): the index the console and ``deliveries --stop`` read."""
import json
import time

from tests.payloads import status_change
from workers.store.ledger import Ledger
from workers.store.stop_index import StopIndex

STOP = 424242


def test_a_search_by_stop_finds_deliveries_beyond_the_20000_recorded_since_the_last_refresh(redis_client):
    """A refresh read at most 20,000 deliveries and the search answered from that: a busy day before
    the first search (or between two housekeeping runs) left the rest out, and the stop showed nothing."""
    ledger, start = Ledger(redis_client), time.time() - 3600
    other = json.dumps(status_change(1, "Arrived", "2022-04-27T05:00:00+00:00"))
    for n in range(25_000):
        ledger.record(f"{n:064x}", "stop.status-changed", other, 86400, received_at=start + n * 0.1)
    mine = json.dumps(status_change(STOP, "Arrived", "2022-04-27T06:00:00+00:00"))
    ledger.record("f" * 64, "stop.status-changed", mine, 86400, received_at=start + 2600)
    index = StopIndex(redis_client)
    index.refresh()
    assert index.deliveries(str(STOP)) == ["f" * 64]
