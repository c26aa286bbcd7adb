"""Redis bytes per delivery, from ``INFO memory`` deltas around real deliveries.

A warm-up batch, one delivery per stop, first creates what exists once (metrics, mappings and
versions of the stops, the Locate2u token, kombu's bindings); the measured deliveries then only
update those stops, enough of them that writes to one stop (serialised by its lock) seldom
wait; a write that does wait is put back for a second later, and the bench sends it when due, as
beat's release task does (beat itself does not run here: its sweeper would compact the settled
entries before they are measured). Then the receiver records N deliveries with no worker running (pending: ledger entry,
dedup key, index members, the queued Celery message); a worker applies them to the Storepoint
and B2B simulators (settled, full entry), the sweeper's compaction runs (settled, compacted),
and the dedup keys go as they do after ``RELAY_DEDUP_WINDOW`` (the record kept for the
history). Last, M deliveries whose stop Locate2u
does not know are dead-lettered (entry kept whole for a replay, plus the dead letter).

Deltas are of ``used_memory`` without the client and AOF buffers (``mem_clients_normal``,
``mem_aof_buffer``: they follow connections and writes in flight, not what is stored); those
buffers plus the warm-up are the empty relay's fixed ``used_memory``, taken off each plan's size
before it is divided. Per location (mappings, versions, last write per sink) is reported apart:
it grows with the number of stops written to, not with deliveries.
"""
import json
import time

import redis

from bench import e2e, sims
from bench.load import STOP_BASE, post_all, status_change
from bench.stack import Stack
from receiver.webhooks import delivery_id_for
from tests.processes import process_env
from workers.celery_config import make_celery
from workers.config import Settings
from workers.pipeline.fan_out import STOP_CACHE_SECONDS
from workers.resilience.retries import RetryScheduler
from workers.store.dead_letters import DeadLetterStore
from workers.store.ledger import SETTLE_GRACE, Ledger

MIB = 1024 * 1024
# Heroku Key-Value Store plans (deploy-facts.md): name, maxmemory.
PLANS = (("mini", 25 * MIB), ("premium-0", 50 * MIB), ("premium-1", 100 * MIB), ("premium-2", 250 * MIB),
         ("premium-3", 500 * MIB), ("premium-5", 1024 * MIB))


def run(workdir, profile, secret, path):
    """Measure; return every figure (bytes per delivery, plan capacities)."""
    count, dead_count, stops = profile["memory_deliveries"], profile["memory_dead_letters"], profile["memory_stops"]
    warm_up = [json.dumps(event).encode() for event in e2e.make_events(stops, 0, stops, "W")]
    bodies = [json.dumps(event).encode() for event in e2e.make_events(count, 0, stops, "M")]
    unknown = [json.dumps({**status_change(n, "X", stops=stops), "stopId": STOP_BASE + stops + n}).encode()
               for n in range(dead_count)]
    with Stack(workdir / "memory") as stack:
        redis_url = stack.start_redis()
        urls = stack.simulators(e2e.SINKS + ("locate2u",), "--stops", str(stops), "--first-stop", str(STOP_BASE))
        settings = sims.relay_settings(Settings(webhook_secret=secret, redis_url=redis_url,
                                                data_dir=str(workdir / "data"), sweep_after=3600), urls, workdir)
        env = process_env(settings)
        web = stack.gunicorn("receiver", "receiver.wsgi:app", env)
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        server = client.info("server")["redis_version"], client.info("memory")["mem_allocator"]
        ledger = Ledger(client)
        release_due = RetryScheduler(client, make_celery(settings, "l2u-bench").send_task).release_due

        worker = _worker(stack, env, "warm-up")
        before = e2e.settled_counts(client)
        _post(web.url, path, warm_up, profile["connections"])
        _settle(client, profile, before, len(warm_up), release_due)
        _compact(ledger)
        worker.stop()  # so the next deliveries stay pending
        base = dataset(client)

        _post(web.url, path, bodies, profile["connections"])
        pending = (dataset(client) - base) / count

        before = e2e.settled_counts(client)
        _worker(stack, env, "worker")
        _settle(client, profile, before, count, release_due)
        full = (dataset(client) - base) / count
        _compact(ledger)
        compacted = (dataset(client) - base) / count
        client.delete(*[Ledger.dedup_key(delivery_id_for(e2e.EVENT_TYPE, body)) for body in bodies])
        record = (dataset(client) - base) / count

        start = dataset(client)
        _post(web.url, path, unknown, profile["connections"])
        _wait(lambda: client.zcard(DeadLetterStore.INDEX) >= dead_count, profile["settle_timeout"])
        _quiet(client)
        dead = (dataset(client) - start) / dead_count
        fixed = used(client) - (dataset(client) - base)  # the relay with every process connected, no delivery
        location = per_location(client, stops)
    history_days, dedup_days = settings.history_days, settings.dedup_window / 86400
    settled = record + (compacted - record) * dedup_days / history_days
    return {"deliveries": count, "dead_letters": dead_count, "redis": f"Redis {server[0]} ({server[1]})",
            "empty_relay_bytes": fixed, "pending": round(pending), "settled_full": round(full),
            "settled_compacted": round(compacted), "settled_record": round(record),
            "dedup_key": round(compacted - record), "settled_at_default_retention": round(settled),
            "dead_lettered": round(dead), "history_days": history_days, "per_location": round(location),
            "plans": {name: plan(size, fixed, settled, history_days, settings.history_trim_percent)
                      for name, size in PLANS}}


def plan(size, base, per_settled, history_days, trim_percent):
    """What a plan of ``size`` bytes holds: settled deliveries in all, and the daily volume whose
    whole history stays under the trim threshold (the rest is headroom for pending work)."""
    return {"settled_deliveries": int((size - base) / per_settled),
            "daily_volume": int((size * trim_percent / 100 - base) / per_settled / history_days)}


def used(client):
    return client.info("memory")["used_memory"]


def dataset(client):
    """``used_memory`` without the client and AOF buffers."""
    info = client.info("memory")
    return info["used_memory"] - info["mem_clients_normal"] - info.get("mem_aof_buffer", 0)


def per_location(client, stops):
    """Bytes (MEMORY USAGE) of the per-location stores (``l2u:map:*``, ``l2u:version:*``) per stop."""
    return sum(client.memory_usage(key) or 0 for pattern in ("l2u:map:*", "l2u:version:*")
               for key in client.scan_iter(pattern)) / stops


def _worker(stack, env, name):
    return stack.celery(name, ["worker", "-n", f"{name}@%h", "--without-gossip", "--without-mingle"], env)


def _settle(client, profile, before, count, release_due):
    """Wait until ``count`` more deliveries than the counters had ``before`` are final at both sinks,
    sending the writes put back for later when they are due (``release_due``)."""
    if not e2e.wait_settled(client, before, count, profile["settle_timeout"], tick=release_due):
        raise RuntimeError("the memory phase's deliveries did not settle in time")
    _quiet(client)


def _compact(ledger):
    while ledger.compact(now=time.time() + SETTLE_GRACE):
        pass


def _post(url, path, bodies, connections):
    posted = post_all(url, path, bodies, concurrency=connections)
    if posted["errors"]:
        raise RuntimeError(f"{len(posted['errors'])} deliveries refused, e.g. {posted['errors'][:3]}")


def _quiet(client):
    """Wait for what is transient to go: queued and unacknowledged messages, cached stop records."""
    _wait(lambda: not any(client.llen(queue) for queue in ("ingest", "deliver")) and not client.hlen("unacked"),
          60)
    time.sleep(STOP_CACHE_SECONDS + 1)


def _wait(done, timeout):
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError("the memory phase timed out waiting for its deliveries")
        time.sleep(0.2)


def lines(result):
    """The figures as the bench prints them."""
    plans = result["plans"]
    return [f"Redis bytes per delivery ({result['redis']}, INFO used_memory deltas without client buffers, "
            f"{result['deliveries']:,} deliveries, {result['dead_letters']:,} dead-lettered):",
            f"  pending (recorded and queued)            {result['pending']:>6,}",
            f"  settled, full entry (before compaction)  {result['settled_full']:>6,}",
            f"  settled, compacted                       {result['settled_compacted']:>6,}  "
            f"(dedup key {result['dedup_key']:,} of it, kept RELAY_DEDUP_WINDOW)",
            f"  settled, at default retention            {result['settled_at_default_retention']:>6,}  "
            f"({result['history_days']} days of history, 1 of dedup)",
            f"  dead-lettered (entry kept for a replay)  {result['dead_lettered']:>6,}",
            f"  per location written to (both sinks)     {result['per_location']:>6,}  "
            "(mappings, versions, last write; not per delivery)",
            f"a 25 MB plan (mini) holds {plans['mini']['settled_deliveries']:,} settled deliveries; "
            "daily volume whose full history stays under the trim threshold: "
            + ", ".join(f"{name} {figures['daily_volume']:,}/day" for name, figures in plans.items())]
