"""Helpers many test modules use: posting a delivery to a receiver, waiting for a condition, reading the
ledger and /metrics."""
import json
import re
import time
import tracemalloc

import requests

from workers.locate2u.webhook_auth import url_token
from workers.resilience.admission import RateLimiter, SlowCalls
from workers.store.dead_letters import DeadLetterStore
from workers.store.ledger import Ledger

TEST_SECRET = "test-webhook-secret-0123456789"


def post(base, event_type, body, secret=TEST_SECRET, token=None, **kwargs):
    """POST ``body`` as a Locate2u delivery to the receiver at ``base``, with the URL token of ``secret``."""
    token = token if token is not None else url_token(secret, event_type)
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{base}/webhooks/locate2u/{event_type}/{token}", data=data,
                         headers={"Content-Type": "application/json"}, timeout=10, **kwargs)


def wait_for(predicate, timeout=30, interval=0.1):
    """The first truthy value of ``predicate()``, polled every ``interval`` s; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def sink_outcomes(redis_client, delivery_ids, sink="storepoint"):
    """``{delivery id: its outcome at sink}`` ({} while it has none)."""
    ledger = Ledger(redis_client)
    return {delivery_id: (ledger.get(delivery_id) or {}).get("sinks", {}).get(sink, {})
            for delivery_id in delivery_ids}


def settled(redis_client, delivery_id):
    """The delivery's ledger entry once it is applied, stale or dead-lettered; else None."""
    entry = Ledger(redis_client).get(delivery_id)
    return entry if entry and entry["status"] in ("applied", "stale", "dead_lettered") else None


def metric(text, name, **labels):
    """The value of one sample in Prometheus text, or None."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(sample_labels.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def admit(breaker, now=None):
    """``(verdict, wait)`` of ``breaker`` for a write, asked as the pipeline asks it (a token taken
    from a bucket of its own that never runs dry, no retries held, no call in flight)."""
    roomy = RateLimiter(breaker.redis, "test-roomy", rate=10_000, burst=10_000)
    calls = SlowCalls("test-roomy")
    return breaker.admit_and_take(roomy, "l2u:test:held", calls, SlowCalls.Call("test-call", 0.001), now)[:2]


def seed_dead_letters_up_to(client, count, body):
    """Dead letters ``d-<n>:storepoint`` until the store holds ``count``, each keeping ``body`` (a JSON
    text) as a real one keeps its delivery's body and record."""
    letters = DeadLetterStore(client)
    for number in range(client.zcard(letters.INDEX), count):
        letters.add(f"d-{number}", "storepoint", "HTTP 422 from storepoint: invalid", stage="deliver",
                    action="upsert", record={"key": f"k-{number}", "event": json.loads(body)}, body=body,
                    event_type="stop.status-changed", attempts=1, received_at=time.time() - 60)


def peak_allocated(work):
    """``(the peak of Python's allocations while work() ran, in bytes, what it returned)``: exact
    (tracemalloc), so a memory bound can be tested without timing anything."""
    tracemalloc.start()
    try:
        result = work()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()
