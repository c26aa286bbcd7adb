"""Bounds on what Redis keeps, applied by the sweeper on every run.

- settled deliveries are compacted (``Ledger.compact``) and their history expires after
  ``RELAY_HISTORY_DAYS``;
- once Redis uses ``RELAY_HISTORY_TRIM_PERCENT`` of its ``maxmemory``, settled history is
  trimmed oldest first until it is below again; pending work (full ledger entries, queues,
  retries, dead letters) is never trimmed, so history cannot crowd it out;
- dead letters are kept ``RELAY_DEAD_LETTER_DAYS`` and at most ``RELAY_DEAD_LETTER_LIMIT``;
  the quarantine keeps the newest ``RELAY_QUARANTINE_LIMIT`` (``Quarantine.add`` trims it);
- what is kept per location and sink (the version and last write applied, the mapping to the
  remote id, the fields written, a create intent) goes once nothing was written for that
  location for ``RELAY_LOCATION_DAYS``; a later event for it creates the record again
  (``l2u-relay reconcile`` can rebuild the mapping first).
"""
import json
import logging
import time

import redis

from workers.store import redis_health
from workers.store.stop_index import StopIndex
from workers.store import keys

log = logging.getLogger(__name__)
DAY = 86400
LOCATION_SCAN = 1000  # last writes looked at per sink and sweep
# Per-location hashes of a sink (keyed by location key); the last-write hash says when it was written.


def location_hashes(sink):
    """The sink's per-location hashes (keyed by location key); the last one says when each was written.
    ("applied" is what versions before 2026-11-28 kept of the last write; it goes with the rest.)"""
    return (keys.versions(sink), keys.mappings(sink), keys.mappings(sink, "applied"), keys.mappings(sink, "written"),
            keys.mappings(sink, "intent"), keys.versions(sink, "writes"))


def run(rt, now=None):
    """Apply every bound once; return what each step removed (None: skipped, Redis is full).

    Trimming comes first: deleting works even when Redis is full; the steps that write (scripts,
    the scan cursor, the stop index) are then skipped until there is room again.
    """
    settings = rt.settings
    done = {"trimmed": trim_for_memory(rt.redis, rt.ledger, settings.history_trim_percent),
            "expired_ids": rt.ledger.prune(now),
            "dead_letters": _unless_full(rt.dead_letters.trim, settings.dead_letter_limit,
                                         settings.dead_letter_days * DAY, now),
            "locations": _unless_full(prune_locations, rt.redis, rt.sinks, settings.location_days * DAY, now)}
    if settings.console_password or settings.console_operators:  # index bodies by stop before they go
        _unless_full(StopIndex(rt.redis).refresh)
    done["compacted"] = _unless_full(rt.ledger.compact, now)
    if done["compacted"] is None:
        log.error("Redis is full even after trimming settled history: new deliveries get 503 until the "
                  "workers catch up or the plan grows")
    if done["trimmed"]:
        log.warning("Redis memory above %d%% of maxmemory: trimmed the %d oldest settled deliveries",
                    settings.history_trim_percent, done["trimmed"])
    if done["locations"]:
        log.info("forgot the state of %d locations not written for RELAY_LOCATION_DAYS", done["locations"])
    if done["dead_letters"]:
        log.warning("dropped %d dead letters past RELAY_DEAD_LETTER_DAYS or RELAY_DEAD_LETTER_LIMIT",
                    done["dead_letters"])
    return done


def _unless_full(step, *args):
    """``step(*args)``, or None when Redis refused it for being full."""
    try:
        return step(*args)
    except redis.ResponseError as exc:
        if not redis_health.is_full(exc):
            raise
        return None


def prune_locations(client, sinks, max_age, now=None, count=LOCATION_SCAN):
    """Forget the per-location state of ``sinks`` for locations last written ``max_age`` seconds ago or
    more; return how many. Walks each sink's last writes a slice per call (the cursor stays in Redis)."""
    cutoff = (time.time() if now is None else now) - max_age
    forgotten = 0
    for sink in sinks:
        cursor_key = keys.housekeeping_cursor(sink)
        cursor, writes = client.hscan(keys.versions(sink, "writes"), int(client.get(cursor_key) or 0), count=count)
        old = [key for key, raw in writes.items() if json.loads(raw).get("received_at", cutoff) < cutoff]
        with client.pipeline(transaction=False) as pipe:
            for name in location_hashes(sink) if old else ():
                pipe.hdel(name, *old)
            if old:
                pipe.zrem(keys.versions(sink, "reassert"), *old)
                pipe.hdel(keys.versions(sink, "reassert:queued"), *old)
            pipe.set(cursor_key, cursor)
            pipe.execute()
        forgotten += len(old)
    return forgotten


def trim_for_memory(client, ledger, percent):
    """Trim settled history, oldest first, while Redis uses ``percent`` % of its maxmemory or more."""
    def below():
        used, limit = redis_health.memory(client)
        return not limit or used < limit * percent / 100

    return 0 if below() else ledger.trim_history(below)
