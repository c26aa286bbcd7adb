"""From a validated event to one write per sink: route → enrich → build → fan out → deliver.

``route_delivery`` runs once per delivery (the ``process_delivery`` task) and
queues one ``deliver`` per routed sink, so a failing sink never delays or
repeats the others. ``deliver_to_sink`` runs per (delivery, sink): breaker,
rate limit, per-key lock and ordering check, then the sink's action, then
applied / stale / retry / dead letter.
"""
import json
import logging
import time

from workers.celery_config import DELIVER, PROCESS_DELIVERY
from workers.errors import NotYet, PermanentError, RelayError, RetriableError
from workers.locations import Location, location_from_stop
from workers.queue_positions import work_queues
from workers.resilience import KeyLock, retry_delay
from workers.routes import render
from workers.stores import FINAL_SINK_STATES, WriteOrder

log = logging.getLogger(__name__)
STOP_CACHE_SECONDS = 10
LOCK_SECONDS = 60  # renewed while held: this bounds only how long a dead holder blocks the key
BUSY_RETRY_SECONDS = 1.0
# Dead-letter stages: what a replay has to redo.
ENRICH, ROUTE, DELIVER_STAGE = "enrich", "route", "deliver"


def template_context(event, stop):
    """Names a key or field template may use: the stop record, the payload, the keys."""
    entity_id = event.keys.get(f"{event.entity}Id", event.delivery_id)
    return {**(stop or {}), **event.payload, **event.keys, "event_type": event.event_type,
            "entity": event.entity, "entity_id": entity_id, "status": event.status or ""}


def build_record(route, event, stop, context):
    """The Location (as JSON) one route writes for ``event``."""
    key = render(route.key, context)
    fields = {name: render(template, context) for name, template in route.fields.items()}
    if route.needs_stop and stop is None:
        raise PermanentError(f"{event.event_type} carries no stopId, so {route.sink} has no location to write")
    if stop is None:
        return Location(key=key, version=event.action_date.isoformat(), status=event.status, fields=fields,
                        event=event.to_json()).to_json()
    location = location_from_stop(stop, event.to_json(), key, fields)
    overrides = {name: value for name, value in fields.items() if hasattr(location, name) and name != "fields"}
    record = location.to_json()
    record.update(overrides)
    return record


def fetch_stop(rt, stop_id):
    """The stop record, cached briefly so a burst of events for one stop costs one call."""
    cache_key = f"l2u:stop:{stop_id}"
    cached = rt.redis.get(cache_key)
    if cached:
        return json.loads(cached)
    if rt.locate2u is None:
        raise PermanentError("Locate2u is not configured (LOCATE2U_CLIENT_ID), so stops cannot be fetched")
    stop = rt.locate2u.get_stop(stop_id)
    rt.redis.set(cache_key, json.dumps(stop), ex=STOP_CACHE_SECONDS)
    return stop


def routes_for(rt, event):
    """``[(route, action)]`` of the enabled sinks that take ``event``."""
    return [(route, action) for route in rt.routes.values()
            if route.sink in rt.sinks and (action := route.action_for(event))]


def route_delivery(rt, event, attempt=0, replay=False, sinks=None):
    """Enrich ``event`` and queue one deliver task per routed sink (only ``sinks``, when given: a
    route-stage replay redoes the sink that refused, not the ones that took it)."""
    routed = [(route, action) for route, action in routes_for(rt, event) if sinks is None or route.sink in sinks]
    if sinks and not routed:
        for sink in sinks:
            dead_letter(rt, event.delivery_id, sink, None, None, 1,
                        PermanentError(f"{sink} no longer takes {event.event_type}"), stage=ROUTE,
                        event_type=event.event_type)
        return "dead_lettered"
    if not routed:
        rt.ledger.set_status(event.delivery_id, "unrouted", entity=event.entity)
        rt.ledger.trace(event.delivery_id, "unrouted", reason="no enabled sink takes this event")
        return "unrouted"
    try:
        stop = None
        if event.stop_id is not None and any(route.needs_stop for route, _ in routed):
            stop = fetch_stop(rt, event.stop_id)
    except RetriableError as exc:
        return _retry_enrich(rt, event, attempt, exc, replay, sinks)
    except PermanentError as exc:
        return dead_letter_enrich(rt, event, attempt, exc)
    context = template_context(event, stop)
    jobs, refused = [], []
    for route, action in routed:
        try:
            jobs.append((route.sink, action, build_record(route, event, stop, context)))
        except PermanentError as exc:
            refused.append((route.sink, action, exc))
    rt.ledger.start_fan_out(event.delivery_id, [sink for sink, _, _ in jobs + refused], entity=event.entity)
    if replay:  # what is redone supersedes the earlier dead letters of this delivery
        for name in [ENRICH] + [sink for sink, _, _ in jobs + refused]:
            rt.dead_letters.remove(rt.dead_letters.entry_id(event.delivery_id, name))
    for sink, action, exc in refused:
        dead_letter(rt, event.delivery_id, sink, action, None, 1, exc, stage=ROUTE, event_type=event.event_type)
    for sink, action, record in jobs:
        rt.scheduler.schedule(DELIVER, [event.delivery_id, sink, action, record, 0, False], 0)
    rt.ledger.trace(event.delivery_id, "routed", sinks=[sink for sink, _, _ in jobs])
    return "routed"


def _retry_enrich(rt, event, attempt, exc, replay, sinks=None):
    """Schedule ``process_delivery`` again; the ledger keeps the attempt and when it is due, so the
    sweeper re-queues it if the retry message is lost."""
    delay = retry_delay(rt.settings.retry_schedule, attempt + 1, exc.retry_after)
    if delay is None:
        return dead_letter_enrich(rt, event, attempt, exc)
    rt.ledger.trace(event.delivery_id, "enrich retry", error=exc.message, delay=round(delay, 1))
    rt.ledger.set_status(event.delivery_id, "retrying", due=time.time() + delay, attempt=attempt + 1,
                         replay=int(bool(replay)))
    rt.scheduler.schedule(PROCESS_DELIVERY, [event.delivery_id, event.event_type, attempt + 1, replay, sinks], delay)
    return "retrying"


def stalled_sinks(entry, grace=0.0, now=None):
    """Sinks of a routed ledger entry with no final outcome and no progress for ``grace`` seconds.

    Progress is the sink's last outcome; a scheduled retry counts from its due time.
    """
    now = time.time() if now is None else now
    return sorted(name for name in open_sinks(entry)
                  if entry["sinks"][name]["at"] + entry["sinks"][name].get("next_in", 0) + grace <= now)


def open_sinks(entry):
    """Sinks of a ledger entry without a final outcome."""
    return [name for name, sink in entry["sinks"].items() if sink["state"] not in FINAL_SINK_STATES]


def next_progress(entry):
    """When the earliest open sink of ``entry`` is due to make progress (epoch seconds)."""
    return min((entry["sinks"][name]["at"] + entry["sinks"][name].get("next_in", 0) for name in open_sinks(entry)),
               default=time.time())


def resume_backoff(entry, grace):
    """The sweeper's patience for ``entry``: ``grace`` doubled for each earlier resume.

    A fan-out that only looks stalled (its deliver waits behind a backlog longer than
    ``grace``) is resumed a few times at most, so the sweeper never feeds the backlog.
    """
    return grace * 2 ** int(entry.get("resumes", 0))


def resume_fan_out(rt, event, entry, grace=0.0):
    """Queue ``deliver`` again for the stalled sinks of a routed delivery.

    A fan-out stalls when the worker dies between marking the sinks pending and
    queueing the last deliver task (the redelivered ``process_delivery`` finds it
    "routed"), or when the broker loses a message. A sink whose deliver message is
    still queued is left to it. Deliver is idempotent, so queueing one that was
    merely slow costs a redundant write, never a wrong one.
    """
    queued = work_queues(rt)
    stalled = [sink for sink in stalled_sinks(entry, grace) if not queued.waiting(entry.get(f"queued:{sink}"))]
    if not stalled:
        return entry["status"]
    routed = {route.sink: (route, action) for route, action in routes_for(rt, event) if route.sink in stalled}
    stop, failure = None, None
    try:
        if event.stop_id is not None and any(route.needs_stop for route, _ in routed.values()):
            stop = fetch_stop(rt, event.stop_id)
    except RetriableError as exc:  # the sweeper comes back to it
        rt.ledger.trace(event.delivery_id, "resume postponed", error=exc.message)
        return "routed"
    except PermanentError as exc:
        failure = exc
    context = template_context(event, stop)
    for sink in stalled:
        attempts = entry["sinks"][sink]["attempts"]
        route, action = routed.get(sink, (None, None))
        try:
            if route is None:
                raise PermanentError(f"{sink} no longer takes {event.event_type}")
            if failure:
                raise failure
            record = build_record(route, event, stop, context)
        except PermanentError as exc:
            dead_letter(rt, event.delivery_id, sink, action, None, attempts + 1, exc, stage=ROUTE,
                        event_type=event.event_type)
            continue
        rt.ledger.sink_outcome(event.delivery_id, sink, "pending", attempts=attempts, reason="resumed")
        rt.scheduler.schedule(DELIVER, [event.delivery_id, sink, action, record, attempts, False], 0)
    rt.ledger.count_resume(event.delivery_id)
    rt.ledger.trace(event.delivery_id, "resumed", sinks=stalled)
    log.warning("resumed a stalled fan-out to %s", ", ".join(stalled))
    return "resumed"


def dead_letter_enrich(rt, event, attempt, exc):
    kept = {**_kept_for_replay(rt, event.delivery_id), "event_type": event.event_type}
    rt.dead_letters.add(event.delivery_id, ENRICH, exc.message, **kept, stage=ENRICH, attempts=attempt + 1,
                        error=exc.to_json())
    rt.ledger.set_status(event.delivery_id, "dead_lettered", reason=exc.message)
    rt.ledger.trace(event.delivery_id, "dead-lettered", stage=ENRICH, reason=exc.message)
    log.error("dead-lettered before fan-out: %s", exc.message)
    return "dead_lettered"


def deliver_to_sink(rt, delivery_id, sink_name, action, record, attempt=0, replay=False):
    """Apply one routed write; return the outcome (applied, stale, retrying, dead_lettered, waiting).

    Under the key's lock (renewed while the sink call runs): the fenced check right before the
    call, then the version compare-and-set after it. A write whose lock lapsed during the call (a
    frozen worker, Redis away longer than the lock) may have landed after a newer one, so the
    newest applied write is sent again (``_reassert``).
    """
    args = [delivery_id, sink_name, action, record, attempt, replay]
    sink, route = rt.sinks.get(sink_name), rt.routes[sink_name]
    if sink is None:
        return dead_letter(rt, delivery_id, sink_name, action, record, attempt + 1,
                            PermanentError(f"sink {sink_name} is not configured any more"))
    location = Location.from_json(record)
    # A lock left by a killed worker lapses no later than its message is redelivered.
    lock = KeyLock(rt.redis, f"l2u:lock:{sink_name}:{location.key}",
                   min(LOCK_SECONDS, rt.settings.visibility_timeout))
    if not lock.acquire():
        return _wait(rt, args, BUSY_RETRY_SECONDS, "another write for this key is in progress")
    versions = rt.versions(sink_name)
    order = WriteOrder.of(location.version, _received_at(rt, delivery_id), delivery_id)
    try:
        with lock.held():
            verdict = versions.check(location.key, order, lock)
            if verdict == "lost":
                return _wait(rt, args, BUSY_RETRY_SECONDS, "the key's lock lapsed before the write")
            if route.ordered and verdict == "stale":
                return _stale(rt, delivery_id, sink_name, location.key, attempt, replay)
            # Only a write that is really sent asks the breaker and the rate limit, so a stale one
            # never uses up the breaker's single probe (or a token) without calling the sink.
            breaker = rt.breaker(sink_name)
            held_back, early = _hold_back(rt, breaker, args)
            if held_back:
                return _wait(rt, args, *held_back)
            try:
                remote_id = sink.apply(action, location, route.options)
            except NotYet as exc:  # the sink's own wait, nothing sent: not the sink's health
                if breaker.state() != "closed":  # past an open breaker only with its probe
                    breaker.abandon_probe()
                return _wait(rt, args, exc.retry_after, exc.message)
            except RelayError as exc:
                if lock.lost or not lock.renew():  # it may have landed after a newer write
                    _reassert(rt, sink_name, location.key)
                if isinstance(exc, PermanentError):
                    breaker.success()
                    return dead_letter(rt, delivery_id, sink_name, action, record, attempt + 1, exc)
                breaker.failure()
                return _retry(rt, args, exc, early)
            recorded, held = versions.record(location.key, order, lock, action, record)
    finally:
        lock.release()
    _recovered(rt, breaker, sink_name)  # after the lock: a released write for this key need not wait for it
    if route.ordered and (recorded == "older" or not held):
        _reassert(rt, sink_name, location.key)
    if route.ordered and recorded == "older":  # a newer write was applied while this one was sent
        return _stale(rt, delivery_id, sink_name, location.key, attempt + 1, replay)
    received_at = rt.ledger.sink_outcome(delivery_id, sink_name, "applied", attempts=attempt + 1,
                                         remote_id=remote_id)
    rt.ledger.trace(delivery_id, "applied", sink=sink_name, action=action, key=location.key)
    rt.metrics.delivery(sink_name, "applied", time.time() - received_at if received_at else None)
    log.info("applied %s %s", action, location.key)
    if replay:
        rt.dead_letters.remove(rt.dead_letters.entry_id(delivery_id, sink_name))
    return "applied"


def _received_at(rt, delivery_id):
    """The delivery's receipt time, the tie-break between equal ``actionDate``s (0 once it left the ledger)."""
    received_at = rt.redis.hget(rt.ledger.key(delivery_id), "received_at")
    if received_at is None:
        entry = rt.ledger.get(delivery_id)
        received_at = entry and entry.get("received_at")
    return float(received_at or 0)


def _reassert(rt, sink_name, key):
    """Send the newest applied write for ``key`` again, under a fresh lock: a write whose lock lapsed
    (or that a newer one overtook) may have landed last, and sink writes are idempotent."""
    newest = rt.versions(sink_name).newest(key)
    if newest is None:
        return
    rt.scheduler.schedule(DELIVER, [newest["delivery_id"], sink_name, newest["action"], newest["record"], 0, False],
                          0)
    rt.ledger.trace(newest["delivery_id"], "reasserted", sink=sink_name, key=key)
    log.warning("a write for %s may have landed out of order; sending the newest again", key)


def _hold_back(rt, breaker, args):
    """``(held_back, early)``: ``held_back`` is ``(seconds, why, for_health)`` when the breaker or the
    rate limit holds the write back, else None. With the breaker open, a retry released before its
    time (a recovery probe) takes the breaker's probe slot, cooldown or not; ``early`` is then when
    the schedule had it due (see ``RetryScheduler``)."""
    delivery_id, sink_name, attempt = args[0], args[1], args[4]
    verdict, wait = breaker.admit()
    early = None
    if verdict == "open":
        early = rt.scheduler.take_early(sink_name, delivery_id, attempt)
        if early is None:
            return (wait, "paused: circuit breaker open", True), None
        if not breaker.claim_probe():  # another probe is in flight: back to its place
            return (max(0.0, early - time.time()), "paused: circuit breaker open", True), None
        verdict = "probe"
    wait = rt.limiter(sink_name).take()
    if wait:
        if verdict == "probe":  # another write may probe now instead of after the next cooldown
            breaker.abandon_probe()
        return (wait, "rate limited", False), None
    return None, early


def _recovered(rt, breaker, sink_name):
    """The sink took a write: close its breaker and send the retries held for its health, at most a
    burst of its rate limit (each of their successes releases the next ones)."""
    released = rt.scheduler.recovered(sink_name, breaker, limit=int(rt.limiter(sink_name).burst))
    if released:
        log.info("%s answers again: released %d held retries", sink_name, released)


def _stale(rt, delivery_id, sink_name, key, attempt, replay):
    rt.ledger.sink_outcome(delivery_id, sink_name, "stale", attempts=attempt)
    rt.ledger.trace(delivery_id, "stale", sink=sink_name, key=key)
    rt.metrics.delivery(sink_name, "stale")
    log.info("stale: a newer version of %s is already applied", key)
    if replay:  # final: a newer version superseded the dead letter
        rt.dead_letters.remove(rt.dead_letters.entry_id(delivery_id, sink_name))
    return "stale"


def _wait(rt, args, delay, why, for_health=False):
    """Put the same attempt back for later without spending it (``for_health``: held for the sink's
    health, so it goes out early once the sink answers again)."""
    if for_health:
        rt.scheduler.hold(args, delay)
    else:
        rt.scheduler.schedule(DELIVER, args, delay)
    rt.ledger.sink_outcome(args[0], args[1], "waiting", attempts=args[4], reason=why, next_in=round(delay, 1))
    return "waiting"


def _retry(rt, args, exc, early=None):
    """Schedule the next attempt. A failure of the sink itself (5xx, timeout, no Retry-After) is held
    for the sink's health; a retry released early that failed so goes back to its place, its attempt
    not spent. A refusal of this delivery (429, Retry-After) keeps its schedule."""
    delivery_id, sink_name, action, record, attempt, replay = args
    for_health = exc.retry_after is None and (exc.status is None or exc.status >= 500)
    if for_health:
        early = early or rt.scheduler.take_early(sink_name, delivery_id, attempt)
        if early and early > time.time():
            rt.ledger.trace(delivery_id, "released early, failed again", sink=sink_name, error=exc.message,
                            status=exc.status)
            return _wait(rt, args, early - time.time(), f"released early, failed again: {exc.message}", True)
    delay = retry_delay(rt.settings.retry_schedule, attempt + 1, exc.retry_after)
    if delay is None:
        return dead_letter(rt, delivery_id, sink_name, action, record, attempt + 1, exc, exhausted=True)
    again = [delivery_id, sink_name, action, record, attempt + 1, replay]
    if for_health:
        rt.scheduler.hold(again, delay)
    else:
        rt.scheduler.schedule(DELIVER, again, delay)
    rt.ledger.sink_outcome(delivery_id, sink_name, "retrying", attempts=attempt + 1, reason=exc.message,
                           next_in=round(delay, 1))
    rt.ledger.trace(delivery_id, "retry", sink=sink_name, error=exc.message, status=exc.status,
                    delay=round(delay, 1))
    rt.metrics.incr("l2u_worker_retries", sink=sink_name)
    log.warning("retry %d in %.1fs: %s", attempt + 1, delay, exc.message)
    return "retrying"


def _kept_for_replay(rt, delivery_id):
    """What a replay needs once the ledger entry has expired: the body, its type and receipt time."""
    body, event_type, received_at = rt.redis.hmget(rt.ledger.key(delivery_id), "body", "event_type", "received_at")
    kept = {"body": body, "event_type": event_type, "received_at": float(received_at) if received_at else None}
    return {name: value for name, value in kept.items() if value is not None}


def dead_letter(rt, delivery_id, sink_name, action, record, attempts, exc, exhausted=False, stage=DELIVER_STAGE,
                 event_type=None):
    reason = f"retries exhausted: {exc.message}" if exhausted else exc.message
    kept = _kept_for_replay(rt, delivery_id)
    kept["event_type"] = event_type or (record or {}).get("event", {}).get("event_type") or kept.get("event_type")
    rt.dead_letters.add(delivery_id, sink_name, reason, **kept, stage=stage, action=action, record=record,
                        key=(record or {}).get("key"), attempts=attempts,
                        error=exc.to_json() if isinstance(exc, RelayError) else None)
    rt.ledger.sink_outcome(delivery_id, sink_name, "dead_lettered", attempts=attempts, reason=reason)
    rt.ledger.trace(delivery_id, "dead-lettered", sink=sink_name, reason=reason)
    rt.metrics.delivery(sink_name, "dead_lettered")
    log.error("dead-lettered: %s", reason)
    return "dead_lettered"


def replay_dead_letter(rt, entry):
    """Queue a dead letter again; it leaves the store once applied (or superseded by a newer write).

    A delivery gone from the ledger is first recorded again, whole, from the body and receipt time
    the dead letter kept. Enrich stage: processed again; route stage: routed again to its sink
    only; deliver stage: its kept record is sent again to its sink. Returns "queued", or why it
    cannot be replayed.
    """
    delivery_id, stage, sink = entry["delivery_id"], entry["stage"], entry["sink"]
    if not rt.redis.exists(rt.ledger.key(delivery_id)):
        if not entry.get("body"):
            return "not replayable: its delivery has left the ledger and this dead letter keeps no body"
        if not rt.ledger.record(delivery_id, entry["event_type"], entry["body"], 1, received_at=entry["received_at"]):
            return "not replayable: the ledger refused it again (its id is still within the dedup window)"
        rt.ledger.trace(delivery_id, "restored", reason="replayed from its dead letter")
    if stage == DELIVER_STAGE:
        rt.ledger.start_fan_out(delivery_id, [sink])
        rt.ledger.sink_outcome(delivery_id, sink, "pending", attempts=0, reason="replayed")
        rt.scheduler.schedule(DELIVER, [delivery_id, sink, entry["action"], entry["record"], 0, True], 0)
    else:
        only = [] if stage == ENRICH else [sink]  # kept in the entry too: the sweeper re-queues from it alone
        rt.ledger.set_status(delivery_id, "received", replay="1", replay_sinks=json.dumps(only))
        rt.scheduler.schedule(PROCESS_DELIVERY, [delivery_id, entry["event_type"], 0, True, only or None], 0)
    rt.ledger.trace(delivery_id, "replayed", sink=sink)
    return "queued"


def replay_scope(entry, replay, sinks):
    """``(replay, sinks)`` for processing a delivery: as its message says, else as ``replay_dead_letter``
    left them in the ledger entry (a message re-queued by the sweeper carries neither)."""
    if entry.get("replay_sinks") is None:
        return replay, sinks
    return True, sinks or json.loads(entry["replay_sinks"]) or None


def replay_outcome(rt, entry, since):
    """What became of ``entry`` (a dead letter as it was) replayed at ``since``: ``(outcome, detail)``,
    outcome "applied", "stale", "unrouted", "refused again" or, with no final outcome yet, "queued"."""
    again = rt.dead_letters.get(entry["id"])
    if again and again["at"] >= since:
        return "refused again", again["reason"]
    delivery = rt.ledger.get(entry["delivery_id"])
    if delivery is None:
        return "queued", "its delivery is not in the ledger"
    if entry["stage"] == ENRICH:
        refusals = [f"{name}: {outcome.get('reason', '')}" for name, outcome in sorted(delivery["sinks"].items())
                    if outcome["state"] == "dead_lettered" and outcome["at"] >= since]
        if refusals:
            return "refused again", "; ".join(refusals)
        status = delivery["status"]
        return (status, "") if status in ("applied", "stale", "unrouted") else ("queued", status)
    outcome = delivery["sinks"].get(entry["sink"], {})
    if outcome.get("state") in ("applied", "stale") and outcome["at"] >= since:
        return outcome["state"], ""
    return "queued", outcome.get("state", "")
