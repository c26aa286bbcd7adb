"""End to end: deliveries posted to the receiver, applied by the workers to Storepoint and B2B.

``relay_run`` posts the deliveries and waits until every one has a final outcome
at both sinks; events/s and receipt-to-applied latency come from the ledger
(``received_at`` and each sink outcome's ``at``). ``plain_loop`` is the baseline:
threads with a ``requests.Session`` each, making the same calls (the stop fetch,
cached per stop for 10 s like the workers do, then the Storepoint and B2B
create-or-update) for the same events, without a receiver, queue or ledger.
"""
import json
import queue
import threading
import time

import redis
import requests

from bench import sims
from bench.load import percentile, post_all, status_change
from receiver.webhooks import delivery_id_for
from workers.metrics import COUNTERS
from workers.store.ledger import Ledger

EVENT_TYPE = "stop.status-changed"
SINKS = ("storepoint", "b2b")
FINAL = ("applied", "stale", "dead_lettered")
STOP_CACHE_SECONDS = 10


def make_events(count, start, stops, tag):
    """``count`` distinct status changes, round robin over ``stops`` stops, action dates increasing."""
    return [status_change(n, tag, stops=stops) for n in range(start, start + count)]


def settled_counts(client):
    """Final outcomes recorded so far, per sink (from the workers' counters)."""
    totals = dict.fromkeys(SINKS, 0)
    for field, value in client.hgetall(COUNTERS).items():
        name, labels = json.loads(field)
        labels = dict(labels)
        if name == "l2u_worker_deliveries" and labels.get("outcome") in FINAL and labels.get("sink") in totals:
            totals[labels["sink"]] += int(value)
    return totals


def wait_settled(client, before, count, timeout, progress_every=15, tick=None):
    """True once ``count`` more deliveries than ``before`` are settled at every sink, else False after
    ``timeout`` seconds; ``tick()`` runs on every look."""
    started = time.monotonic()
    reported = started
    while time.monotonic() < started + timeout:
        if tick:
            tick()
        now = settled_counts(client)
        done = {sink: now[sink] - before[sink] for sink in SINKS}
        if all(value >= count for value in done.values()):
            return True
        if time.monotonic() - reported >= progress_every:
            reported = time.monotonic()
            print(f"    {int(reported - started)} s: settled " + ", ".join(f"{sink} {done[sink]}/{count}"
                                                                        for sink in SINKS), flush=True)
        time.sleep(0.2)
    return False


def ledger_outcomes(client, delivery_ids):
    """Per delivery: received_at and each sink's final outcome (``state``, ``at``), compacted or not."""
    rows, ledger = [], Ledger(client)
    for start in range(0, len(delivery_ids), 500):
        entries = ledger.get_many(delivery_ids[start:start + 500])
        for delivery_id in delivery_ids[start:start + 500]:
            entry = entries.get(delivery_id)
            rows.append((float(entry["received_at"]), {sink: entry["sinks"].get(sink) for sink in SINKS})
                        if entry else (None, dict.fromkeys(SINKS)))
    return rows


def relay_run(receiver_url, path, redis_url, events, concurrency, rate=None, timeout=900):
    """Post ``events`` (at ``rate``/s, else at full speed) and measure until all are settled at both sinks."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    before = settled_counts(client)
    bodies = [json.dumps(event).encode() for event in events]
    recorded = Ledger(client).count()
    posted = post_all(receiver_url, path, bodies, concurrency=concurrency, rate=rate)
    if posted["errors"]:
        raise RuntimeError(f"{len(posted['errors'])} deliveries refused, e.g. {posted['errors'][:3]}")
    if Ledger(client).count() - recorded != len(bodies):
        raise RuntimeError("some deliveries were duplicates of earlier ones: the events must be distinct")
    complete = wait_settled(client, before, len(bodies), timeout)
    rows = ledger_outcomes(client, [delivery_id_for(EVENT_TYPE, body) for body in bodies])
    client.close()
    received = [received_at for received_at, _ in rows if received_at]
    result = {"events": len(bodies), "complete": complete, "post_seconds": posted["seconds"],
              "ack_p50_ms": posted["p50"], "ack_p99_ms": posted["p99"], "sinks": {}}
    last = 0.0
    for sink in SINKS:
        states, latencies = {}, []
        for received_at, outcomes in rows:
            outcome = outcomes[sink]
            state = outcome["state"] if outcome else "missing"
            states[state] = states.get(state, 0) + 1
            if outcome and state in FINAL and received_at:
                latencies.append(outcome["at"] - received_at)
                last = max(last, outcome["at"])
        result["sinks"][sink] = {"states": states, "p50_ms": (percentile(latencies, 50) or 0) * 1000,
                                 "p99_ms": (percentile(latencies, 99) or 0) * 1000}
    result["seconds"] = last - min(received) if received and last else None
    result["rate"] = len(bodies) / result["seconds"] if result["seconds"] else 0.0
    return result


class PlainClient:
    """The same HTTP calls as the relay's workers, made directly from a thread."""

    def __init__(self, urls, token, cache, lock):
        self.urls, self.cache, self.lock = urls, cache, lock
        self.session = requests.Session()
        self.session.trust_env = False
        self.l2u_auth = {"Authorization": f"Bearer {token}"}
        self.sp_auth = {"Authorization": f"Bearer {sims.SP_TOKEN}"}
        self.b2b_auth = {"Authorization": f"Bearer {sims.B2B_TOKEN}"}

    def stop(self, stop_id):
        now = time.monotonic()
        with self.lock:
            cached = self.cache.get(stop_id)
        if cached and cached[0] > now:
            return cached[1]
        stop = self._ok(self.session.get(f"{self.urls['locate2u']}/v1/Stops/{stop_id}", headers=self.l2u_auth,
                                         timeout=30)).json()
        with self.lock:
            self.cache[stop_id] = (now + STOP_CACHE_SECONDS, stop)
        return stop

    def apply(self, event, sp_ids, b2b_keys):
        stop = self.stop(event["stopId"])
        key = f"l2u-stop-{event['stopId']}"
        status = event["newStatus"]
        body = {"name": stop["name"], "address": stop["address"], "description": stop.get("notes") or "",
                "tags": ["locate2u", status.lower(), f"l2u:{key}"],
                "contact": {"phone": stop["contact"]["phone"], "email": stop["contact"]["email"]},
                "coordinates": {"lat": stop["location"]["latitude"], "lng": stop["location"]["longitude"]}}
        sp_id = sp_ids.get(key)
        if sp_id is not None:
            self._ok(self.session.post(f"{self.urls['storepoint']}/locations/{sp_id}", json=body,
                                       headers=self.sp_auth, timeout=30))
        else:
            answer = self._ok(self.session.post(f"{self.urls['storepoint']}/locations", json=body,
                                                headers=self.sp_auth, timeout=30)).json()
            sp_ids[key] = answer["location"]["id"]
        fields = {"name": stop["name"], "address": stop["address"], "city": "Pyrmont", "postalCode": "2009",
                  "active": status != "Cancelled", "countryId": sims.B2B_COUNTRY, "shippingAddress": True,
                  "billingAddress": False, "default": False}
        if key in b2b_keys:
            self._ok(self.session.put(f"{self.urls['b2b']}/Location/update/{key}", json=fields,
                                      headers=self.b2b_auth, timeout=30))
        else:
            item = {"idRemote": key, "businessPartnerId": sims.B2B_PARTNER, **fields}
            self._ok(self.session.post(f"{self.urls['b2b']}/Location/create", json=[item], headers=self.b2b_auth,
                                       timeout=30))
            b2b_keys.add(key)

    @staticmethod
    def _ok(response):
        response.raise_for_status()
        return response


def l2u_token(url):
    answer = requests.post(f"{url}/connect/token", data={"grant_type": "client_credentials", "client_id": sims.L2U_CLIENT,
                                                         "client_secret": sims.L2U_SECRET, "scope": "integrations-api"},
                           timeout=10)
    answer.raise_for_status()
    return answer.json()["access_token"]


def plain_loop(urls, events, threads):
    """The baseline: ``threads`` threads applying ``events`` directly; events/s and per-event latency."""
    token = l2u_token(urls["locate2u"])
    work = queue.Queue()
    for event in events:
        work.put(event)
    cache, lock, sp_ids, b2b_keys, latencies, failures = {}, threading.Lock(), {}, set(), [], []

    def loop():
        client = PlainClient(urls, token, cache, lock)
        while True:
            try:
                event = work.get_nowait()
            except queue.Empty:
                return
            began = time.perf_counter()
            try:
                client.apply(event, sp_ids, b2b_keys)
            except requests.RequestException as exc:
                failures.append(repr(exc))
                continue
            latencies.append(time.perf_counter() - began)

    started = time.monotonic()
    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    seconds = time.monotonic() - started
    return {"events": len(events), "failures": len(failures), "seconds": seconds, "rate": len(latencies) / seconds,
            "p50_ms": (percentile(latencies, 50) or 0) * 1000, "p99_ms": (percentile(latencies, 99) or 0) * 1000}
