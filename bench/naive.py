"""The naive Celery consumer the end-to-end phase measures beside the relay: ``celery -A bench.naive worker``.

Issue #15 took it as the reference for its end-to-end target ("a naive Celery consumer, one task
per event, reaches about 0.7× the plain loop"). One task per event makes the plain loop's calls
(``e2e.PlainClient``) with Celery's defaults otherwise: early ack, no result, no retry (``bench.run``
starts it logging at INFO, as the relay's worker does), and no ledger, key lock, breaker or outcome
of its own. What it created is kept in its Redis, since the
pool's processes must share it, and each event done is counted there (``DONE``). ``run`` feeds it
straight with ``send_task``, or through ``bench.apps:naive_receiver()`` (a Flask app that calls
``send_task`` per webhook). ``BENCH_NAIVE`` (JSON) gives its broker URL and the simulators' URLs.
"""
import functools
import json
import os
import threading
import time

import redis
from celery import Celery

from bench import e2e

TASK = "bench.naive.apply"
DONE = "bench:naive:done"
CREATED = "bench:naive:storepoint"  # our key -> Storepoint's location id
B2B_KEYS = "bench:naive:b2b"
CONFIG = json.loads(os.environ.get("BENCH_NAIVE", "{}"))

app = Celery("bench-naive", broker=CONFIG.get("broker_url"))
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)


class StorepointIds:
    """The plain loop's ``sp_ids`` dict, in Redis."""

    def __init__(self, client):
        self.client = client

    def get(self, key):
        return self.client.hget(CREATED, key)

    def __setitem__(self, key, location_id):
        self.client.hset(CREATED, key, location_id)


class B2BKeys:
    """The plain loop's ``b2b_keys`` set, in Redis."""

    def __init__(self, client):
        self.client = client

    def __contains__(self, key):
        return bool(self.client.sismember(B2B_KEYS, key))

    def add(self, key):
        self.client.sadd(B2B_KEYS, key)


@functools.cache
def _clients():
    """This pool process's HTTP client (its own session and stop cache) and Redis client."""
    urls = CONFIG["urls"]
    store = redis.Redis.from_url(CONFIG["broker_url"], decode_responses=True)
    return e2e.PlainClient(urls, e2e.l2u_token(urls["locate2u"]), {}, threading.Lock()), store


@app.task(name=TASK)
def apply(event):
    """Apply one event to Storepoint and B2B, as the plain loop does, and count it done."""
    client, store = _clients()
    client.apply(event, StorepointIds(store), B2BKeys(store))
    store.incr(DONE)


def run(redis_url, events, timeout, post=None):
    """Feed ``events`` to the consumer whose broker is ``redis_url`` and wait until all are done:
    through ``post(bodies)`` (posting them to the naive receiver) when given, else with
    ``send_task`` straight onto its queue. events/s run from the first post or publish to the
    last event counted done."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    before = int(client.get(DONE) or 0)
    started = time.monotonic()
    if post is not None:
        posted = post([json.dumps(event).encode() for event in events])
        if posted["errors"]:
            raise RuntimeError(f"{len(posted['errors'])} posts refused, e.g. {posted['errors'][:3]}")
    else:
        producer = Celery("bench-naive-producer", broker=redis_url)
        with producer.producer_or_acquire() as publisher:
            for event in events:
                producer.send_task(TASK, [event], producer=publisher)
    fed = time.monotonic() - started
    done = 0
    while time.monotonic() < started + timeout:
        done = int(client.get(DONE) or 0) - before
        if done >= len(events):
            break
        time.sleep(0.02)
    seconds = time.monotonic() - started
    client.close()
    return {"events": len(events), "done": done, "complete": done >= len(events), "feed_seconds": fed,
            "seconds": seconds, "rate": done / seconds}
