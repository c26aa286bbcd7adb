"""The naive Celery consumer the end-to-end phase measures beside the relay: ``celery -A bench.naive worker``.

Issue #15 took it as the reference for its end-to-end target ("a naive Celery consumer, one task
per event, reaches about 0.7× the plain loop"). One task per event makes the plain loop's calls
(``e2e.PlainClient``) with Celery's defaults otherwise: early ack, no result, no retry, and no
receiver, ledger, key lock, breaker or outcome of its own. What it created is kept in its Redis,
since the pool's processes must share it, and each event done is counted there (``DONE``).
``BENCH_NAIVE`` (JSON) gives its broker URL and the simulators' URLs.
"""
import functools
import json
import os
import threading

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
