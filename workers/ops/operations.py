"""Operator services over the stores, shared by the CLI (``workers/ops/commands.py``) and the console.

Dead letters (select, replay, purge, what became of a replay), quarantine items
(list, show, purge) and delivery search. Each takes a ``Runtime``.
"""
import collections
import hashlib
import heapq
import itertools
import json
import time
from datetime import datetime, timezone

from workers.domain.instants import exact_instant
from workers.ops import live_records, status
from workers.resilience.retries import RetryScheduler

from workers.pipeline.replay import batch_ids, batch_progress, start_batch
from workers.store.ledger import FINAL_STATES, SETTLED_BUCKET_SECONDS, Ledger
from workers.store.quarantine import Quarantine
from workers.store.stop_index import StopIndex, stop_keys

ACTIVITY_SCAN_LIMIT = 5000  # newest deliveries read for the applied-per-sink series
SEARCH_SCAN_LIMIT = 20000  # ledger entries one search reads at most
QUARANTINE_SCAN_LIMIT = 10000
REPLAY_ROWS = 500  # dead letters of a replay batch whose outcome the console lists
REPLAY_COUNTED = 5000  # dead letters of a replay batch whose outcomes the console counts


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_moment(value, now=None):
    """An ISO date/time (UTC unless it names an offset) or a duration back from now (30m, 2h, 7d),
    as epoch seconds; None for an empty value; ValueError otherwise."""
    if not value:
        return None
    if value[-1:] in DURATION_UNITS and value[:-1].isdigit():
        return (time.time() if now is None else now) - int(value[:-1]) * DURATION_UNITS[value[-1]]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("use an ISO date/time (2026-11-01T08:00) or a duration (30m, 2h, 7d)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


# ------------------------------------------------------------------ overview

def overview(rt, now=None):
    """``status.collect`` plus what the console's overview adds: quarantine, retries due, breaker
    details, Redis memory against its limit and the last hour's activity."""
    now = time.time() if now is None else now
    data = status.collect(rt)
    memory = rt.redis.info("memory")
    data.update(quarantined=quarantine_count(rt), retries_due=rt.redis.zcount(RetryScheduler.KEY, "-inf", now),
                redis_memory={"used": memory["used_memory"], "limit": memory.get("maxmemory", 0)},
                breakers={name: breaker_details(rt, name) for name in rt.sinks},
                activity=activity(rt, now))
    return data


def breaker_details(rt, sink):
    """A sink's breaker: state, failures counted, and while open since and until when (epoch seconds)."""
    breaker = rt.breaker(sink)
    raw = rt.redis.hgetall(breaker.key)
    details = {"state": raw.get("state", "closed"), "failures": int(raw.get("failures", 0))}
    if details["state"] == "open" and raw.get("open_until"):
        until = float(raw["open_until"])
        details.update(open_until=until, opened_at=until - breaker.cooldown)
    return details


def activity(rt, now, window=3600, buckets=12):
    """Deliveries received, and applied per sink, in ``buckets`` slices of the last ``window`` seconds.

    ``{"starts": [epoch…], "received": [n…], "applied": {sink: [n…]}, "capped": bool}``; both count
    the deliveries received in the window, full ledger entries and compacted (settled) ones alike,
    the newest ``ACTIVITY_SCAN_LIMIT`` of each.
    """
    width = window / buckets
    begin = now - window
    starts = [begin + i * width for i in range(buckets)]
    ids = rt.redis.zrevrangebyscore(Ledger.ALL, now, begin, start=0, num=ACTIVITY_SCAN_LIMIT)
    settled = []  # a delivery received in the window settled in it too (or later)
    for key in rt.ledger.settled_buckets(now):
        if float(key.rpartition(":")[2]) + SETTLED_BUCKET_SECONDS >= begin:
            settled += rt.redis.hkeys(key)
    capped = len(ids) == ACTIVITY_SCAN_LIMIT or len(settled) > ACTIVITY_SCAN_LIMIT
    received, applied = [0] * buckets, {name: [0] * buckets for name in rt.sinks}

    def slot(moment):
        return min(buckets - 1, int((moment - begin) // width))

    for entry in rt.ledger.get_many(ids + settled[-ACTIVITY_SCAN_LIMIT:]).values():
        if not begin <= float(entry["received_at"]) < now:
            continue
        received[slot(float(entry["received_at"]))] += 1
        for sink, outcome in entry["sinks"].items():
            if outcome["state"] == "applied" and begin <= outcome["at"] < now:
                applied.setdefault(sink, [0] * buckets)[slot(outcome["at"])] += 1
    return {"starts": starts, "received": received, "applied": applied, "capped": capped}


# ------------------------------------------------------------------ dead letters

def dead_letters_matching(rt, sink=None, since=None, until=None, reason=None, event_type=None):
    """Dead letters, oldest first, narrowed by sink, time range, reason (substring) and event type: an
    iterator, read a thousand at a time (``DeadLetterStore.scan``)."""
    return (entry for entry in rt.dead_letters.scan(sink=sink, since=since)
            if (until is None or entry["at"] <= until)
            and (not reason or reason.lower() in entry["reason"].lower())
            and (not event_type or entry.get("event_type") == event_type))


def dead_letters_by_id(rt, ids):
    """``(entries, missing ids)`` for the given dead-letter ids."""
    entries = [rt.dead_letters.get(entry_id) for entry_id in ids]
    return [entry for entry in entries if entry], [i for i, entry in zip(ids, entries) if entry is None]


def replay_dead_letters(rt, ids):
    """Hand the dead letters ``ids`` to the workers to replay, however many (each leaves the store once
    applied); return the replay batch's id, for ``replay_results``."""
    return start_batch(rt, ids)


def replay_results(rt, batch, rows=REPLAY_ROWS, counted=REPLAY_COUNTED):
    """``(done, total, totals, results)`` of a replay batch: how many of its dead letters the workers
    went through, of how many; ``{outcome: count}`` over the first ``counted`` of those (reading each
    outcome costs a round trip or two); ``(id, outcome, detail)`` of the first ``rows`` of them."""
    done, total = batch_progress(rt, batch)
    results = [(entry_id, *replay_outcome(rt, entry_id)) for entry_id in batch_ids(rt, batch, min(done, counted))]
    totals = collections.Counter(outcome for _, outcome, _ in results)
    return done, total, dict(totals), results[:rows]


def purge_dead_letters(rt, ids):
    """Delete the dead letters ``ids`` for good; return how many were still there."""
    return rt.dead_letters.remove_many(ids)


def replay_outcome(rt, entry_id):
    """What became of a replayed dead letter: ``(outcome, detail)``, outcome queued, applied or refused again."""
    delivery_id, _, sink = entry_id.rpartition(":")
    ledger_entry = rt.ledger.get(delivery_id)
    if ledger_entry is None:
        return "gone", "the delivery has left the ledger"
    state = ledger_entry["status"] if sink == "enrich" else ledger_entry["sinks"].get(sink, {}).get("state")
    if state in ("applied", "stale"):
        return "applied", "superseded by a newer version" if state == "stale" else ""
    if state == "dead_lettered":
        again = rt.dead_letters.get(entry_id)
        return "refused again", again["reason"] if again else ""
    return "queued", state or ""


# ------------------------------------------------------------------ quarantine

def quarantine_id(raw):
    """A stable id for one quarantined item (its list position shifts as items arrive)."""
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def quarantine_items(rt, limit=100):
    """``[(id, item)]``, newest first."""
    return [(quarantine_id(raw), json.loads(raw)) for raw in rt.redis.lrange(Quarantine.KEY, 0, limit - 1)]


def quarantine_count(rt):
    return rt.redis.llen(Quarantine.KEY)


def quarantined(rt, item_ids):
    """The stored items (raw JSON) of those of ``item_ids`` still quarantined."""
    wanted = set(item_ids)
    return [raw for raw in rt.redis.lrange(Quarantine.KEY, 0, QUARANTINE_SCAN_LIMIT - 1)
            if quarantine_id(raw) in wanted]


def quarantine_item(rt, item_id):
    """One quarantined item by id, or None."""
    found = quarantined(rt, [item_id])
    return json.loads(found[0]) if found else None


def quarantine_counted(rt):
    """``(how many deliveries are quarantined, the id of the newest or None)``: what a purge of all
    that an operator confirmed is bounded by (``purge_quarantine``'s ``newest``)."""
    with rt.redis.pipeline() as pipe:
        pipe.llen(Quarantine.KEY)
        pipe.lindex(Quarantine.KEY, 0)
        count, raw = pipe.execute()
    return count, quarantine_id(raw) if raw else None


# The item ARGV[1] and every older one (after it in the list: the newest are pushed first).
_PURGE_FROM = """
local at = redis.call('LPOS', KEYS[1], ARGV[1])
if not at then return -1 end
local total = redis.call('LLEN', KEYS[1])
if at == 0 then redis.call('DEL', KEYS[1]) else redis.call('LTRIM', KEYS[1], 0, at - 1) end
return total - at
"""


def purge_quarantine(rt, item_ids=None, newest=None):
    """Delete the given items or, with ``item_ids`` None, the item ``newest`` and every older one: those
    a count showed (``quarantine_counted``), not those quarantined after it. Return how many, or None
    when ``newest`` is no longer there (the quarantine changed since the count: count again)."""
    if item_ids is not None:
        return sum(rt.redis.lrem(Quarantine.KEY, 1, raw) for raw in quarantined(rt, item_ids))
    if newest is None:  # nothing was quarantined when counted
        return 0
    raws = quarantined(rt, [newest])
    removed = rt.redis.eval(_PURGE_FROM, 1, Quarantine.KEY, raws[0]) if raws else -1
    return None if removed < 0 else removed


# ------------------------------------------------------------------ deliveries

def search_deliveries(rt, delivery_id=None, stop=None, event_type=None, status=None, since=None, until=None,
                      offset=0, limit=25):
    """Ledger deliveries, newest first: ``(rows, more)``; ``stop`` matches a stopId or a stopRef.

    ``status`` is a ledger status, or "open" for any not yet final.
    """
    if delivery_id:
        candidates = _rows(rt, iter([delivery_id]))
    elif stop:
        index = StopIndex(rt.redis)
        index.refresh()
        candidates = _rows(rt, iter(index.deliveries(str(stop))))
    else:
        candidates = _newest_first(rt, since, until)
    rows, skipped, seen = [], 0, set()
    for scanned, row in enumerate(candidates):
        if scanned >= SEARCH_SCAN_LIMIT:
            break
        if row["delivery_id"] in seen or not _matches(row, event_type, status, since, until):
            continue  # (seen: compacted between the two reads, so found twice)
        seen.add(row["delivery_id"])
        if skipped < offset:
            skipped += 1
            continue
        if len(rows) == limit:
            return rows, True
        rows.append(row)
    return rows, False


def _newest_first(rt, since, until):
    """Rows of the full ledger entries and of the compacted (settled) ones, merged newest first.

    (A dead letter keeps its full entry, so without the merge an old one would come before
    every newer delivery that settled.)
    """
    return heapq.merge(_rows(rt, _full_ids(rt, since, until)), _rows(rt, rt.ledger.compacted_ids(since, until)),
                       key=lambda row: -row["received_at"])


def _full_ids(rt, since, until, page=500):
    high = "+inf" if until is None else until
    low = "-inf" if since is None else since
    offset = 0
    while True:
        ids = rt.redis.zrevrangebyscore(Ledger.ALL, high, low, start=offset, num=page)
        yield from ids
        if len(ids) < page:
            return
        offset += page


def _rows(rt, ids, batch=100):
    while chunk := list(itertools.islice(ids, batch)):
        yield from _fetch(rt, chunk)


def _fetch(rt, ids):
    entries = rt.ledger.get_many(ids)  # full entries and compacted ones (those keep the stop's keys)
    for delivery_id in ids:
        entry = entries.get(delivery_id)
        if entry is None:  # expired from the ledger
            continue
        keys = stop_keys(entry.get("body"))
        yield {"event_type": entry["event_type"], "status": entry["status"], "delivery_id": delivery_id,
               "received_at": float(entry["received_at"]), "stop_id": keys.get("id"), "stop_ref": keys.get("ref")}


def _matches(row, event_type, status, since, until):
    if event_type and row["event_type"] != event_type:
        return False
    if status == "open" and row["status"] in FINAL_STATES:
        return False
    if status and status != "open" and row["status"] != status:
        return False
    return (since is None or row["received_at"] >= since) and (until is None or row["received_at"] <= until)


# ------------------------------------------------------------------ one stop

def stop_events(rt, stop_id):
    """Every delivery in the ledger for one stop id, in ``actionDate`` order, with its per-sink outcomes."""
    index = StopIndex(rt.redis)
    index.refresh()
    events = []
    for delivery_id in index.deliveries(str(stop_id)):
        entry = rt.ledger.get(delivery_id)
        if entry is None:
            continue
        body = json.loads(entry["body"])
        events.append({"delivery_id": delivery_id, "event_type": entry["event_type"], "status": entry["status"],
                       "action_date": body.get("actionDate"), "new_status": body.get("newStatus"),
                       "received_at": float(entry["received_at"]), "sinks": entry["sinks"],
                       "history": rt.ledger.history(delivery_id)})
    return sorted(events, key=lambda event: (_instant(event["action_date"]), event["received_at"]))


def stop_sinks(rt, events):
    """Per sink and key written for these events: the version applied and the live comparison."""
    keys = {}
    for event in events:
        for line in event["history"]:
            if line.get("sink") and line.get("key"):
                keys.setdefault(line["sink"], set()).add(line["key"])
    result = {}
    for sink_name in sorted(keys):
        sink = rt.sinks.get(sink_name)
        for key in sorted(keys[sink_name]):
            version = rt.redis.hget(rt.versions(sink_name).key, key)
            comparison = (live_records.compare(sink, key) if sink is not None
                          else {"error": f"sink {sink_name} is not configured any more", "drift": []})
            result.setdefault(sink_name, []).append({"key": key, "version": _iso(version), **comparison})
    return result


def _instant(text):
    try:
        return exact_instant(text)
    except (TypeError, ValueError):
        return (0, 0)


def _iso(epoch):
    return None if epoch is None else datetime.fromtimestamp(float(epoch), timezone.utc).isoformat()
