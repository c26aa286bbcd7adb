"""Celery tasks: thin, idempotent, JSON arguments only.

Anything unexpected (a bug) is dead-lettered with its reason before the task
fails, so nothing accepted is lost even then; a Redis outage puts the message
back for redelivery instead. ``redis_outage`` is the one place that tells them apart.
"""
import contextlib
import json
import logging
import time

import redis
from celery import shared_task
from celery.signals import task_prerun
from celery.exceptions import Reject
from kombu.exceptions import OperationalError
from marshmallow import ValidationError

from workers import pipeline
from workers.celery_config import (DELIVER, DELIVER_QUEUE, INGEST_QUEUE, PROCESS_DELIVERY, RELEASE_DUE_RETRIES,
                                   SWEEP_RECEIVED)
from workers.errors import PermanentError
from workers.events import parse_event
from workers.logs import bind_context
from workers.runtime import runtime

log = logging.getLogger(__name__)
PROCESSABLE = ("received", "retrying")
# Redis (ledger) or broker unavailable for a while: put the message back, never dead-letter it as a bug.
OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, redis.OutOfMemoryError, OperationalError)
# The same conditions as Redis words them from inside a script, where they have no class of their own.
OUTAGE_REPLIES = ("LOADING", "READONLY", "OOM", "MASTERDOWN")
WORK_QUEUES = (INGEST_QUEUE, DELIVER_QUEUE)


@task_prerun.connect
def _bind_log_context(task=None, args=(), **_):
    """Every line logged while a task runs, Celery's own included, carries its delivery's context."""
    if task.name == PROCESS_DELIVERY:
        bind_context(delivery_id=args[0], event_type=args[1])
    elif task.name == DELIVER:
        bind_context(delivery_id=args[0], sink=args[1], event_type=(args[3] or {}).get("event", {}).get("event_type"))
    else:
        bind_context()


@shared_task(name=PROCESS_DELIVERY)
def process_delivery(delivery_id, event_type, attempt=0, replay=False):
    """Validate a recorded delivery and fan it out to its routed sinks."""
    rt = runtime()
    with _redis_outage():
        entry = rt.ledger.get(delivery_id)
        if entry is None:
            log.warning("delivery %s is not in the ledger (expired or released); nothing to do", delivery_id)
            return "missing"
        if entry["status"] not in PROCESSABLE and not pipeline.stalled_sinks(entry):
            return entry["status"]  # a redelivery of work already done
        try:
            event = parse_event(delivery_id, event_type, json.loads(entry["body"]))
        except ValidationError as exc:
            rt.quarantine.add(event_type, entry["body"], "schema validation failed", exc.messages, delivery_id)
            rt.ledger.set_status(delivery_id, "quarantined", reason=json.dumps(exc.messages))
            return "quarantined"
        if entry["status"] not in PROCESSABLE:  # routed before, but a sink's deliver was never queued or got lost
            return _guarded(lambda: pipeline.resume_fan_out(rt, event, entry),
                            lambda exc: pipeline.dead_letter_enrich(rt, event, attempt, exc))
        return _guarded(lambda: pipeline.route_delivery(rt, event, attempt, replay),
                        lambda exc: pipeline.dead_letter_enrich(rt, event, attempt, exc))


@shared_task(name=DELIVER)
def deliver(delivery_id, sink, action, record, attempt=0, replay=False):
    """Apply one delivery to one sink (see ``pipeline.deliver_to_sink``)."""
    rt = runtime()
    with _redis_outage():
        return _guarded(lambda: pipeline.deliver_to_sink(rt, delivery_id, sink, action, record, attempt, replay),
                        lambda exc: pipeline.dead_letter(rt, delivery_id, sink, action, record, attempt + 1, exc))


def redis_outage(exc):
    """True when ``exc`` means Redis or the broker is unavailable for now (down, restarting, loading its
    file, a read-only replica, out of memory): trying later will work.

    Every other error, Redis ones included (``WRONGTYPE``, a script error, a lost lock), is a bug:
    the same call fails the same way again, so it is dead-lettered with the error at the first try.
    """
    return isinstance(exc, OUTAGES) or (isinstance(exc, redis.ResponseError) and _reply_code(exc) in OUTAGE_REPLIES)


def _reply_code(exc):
    """The code of a Redis error reply, also when a script relays it (``Error running script … -OOM …``)."""
    text = str(exc)
    if text.startswith("Error running script"):
        text = text.rpartition(": -")[2]
    return text.split(" ", 1)[0]


@contextlib.contextmanager
def _redis_outage():
    """A Redis or broker outage puts the message back for redelivery instead of failing the task."""
    try:
        yield
    except Exception as exc:
        if redis_outage(exc):
            raise Reject(f"redis unavailable: {exc}", requeue=True) from exc
        raise


def _guarded(work, dead_letter):
    """Run ``work``; a bug is dead-lettered with its reason, then raised so Flower shows it."""
    try:
        return work()
    except Exception as exc:
        if redis_outage(exc):
            raise
        log.exception("unexpected error; dead-lettering")
        dead_letter(PermanentError(f"internal error: {type(exc).__name__}: {exc}"))
        raise


@shared_task(name=SWEEP_RECEIVED)
def sweep_received():
    """Re-queue deliveries recorded but never picked up (a crash between record and queue),
    and routed ones whose fan-out stalled (see ``pipeline.resume_fan_out``)."""
    rt = runtime()
    rt.ledger.prune()
    return _sweep_received(rt) + _sweep_stalled(rt)


def _sweep_received(rt):
    """``process_delivery`` again for deliveries still "received" after ``sweep_after``, only while
    the work queues are empty: during a backlog they are waiting their turn, and re-queueing
    them would double the backlog every sweep."""
    if not _queues_empty(rt):
        return 0
    stuck = rt.ledger.stuck(rt.settings.sweep_after)
    for delivery_id in stuck:
        entry = rt.ledger.get(delivery_id)
        if entry is None or entry["status"] != "received":
            rt.ledger.redis.zrem(rt.ledger.RECEIVED, delivery_id)
            continue
        process_delivery.apply_async(args=[delivery_id, entry["event_type"]], queue=INGEST_QUEUE)
        rt.ledger.touch_received(delivery_id)
    if stuck:
        log.info("sweeper re-queued %d deliveries", len(stuck))
    return len(stuck)


def _sweep_stalled(rt):
    """``process_delivery`` again for routed deliveries a sink made no progress on for ``sweep_after``.

    Only while the work queues are empty: then every deliver message sent so far has been
    taken, so one without progress is lost or held by a dead worker. During a backlog it may
    simply be waiting its turn, and resuming it would only feed the backlog.
    """
    base, requeued = rt.settings.sweep_after, 0
    if not _queues_empty(rt):
        return 0
    for delivery_id in rt.ledger.stalled(base):
        entry = rt.ledger.get(delivery_id)
        if entry is None or not pipeline.open_sinks(entry):
            rt.ledger.close_open(delivery_id)
            continue
        grace = pipeline.resume_backoff(entry, base)
        if pipeline.stalled_sinks(entry, grace):
            rt.scheduler.schedule(PROCESS_DELIVERY, [delivery_id, entry["event_type"]], 0)
            rt.ledger.check_open_at(delivery_id, time.time())
            requeued += 1
        else:  # look again when it would count as stalled
            rt.ledger.check_open_at(delivery_id, pipeline.next_progress(entry) + grace - base)
    if requeued:
        log.warning("sweeper resumed %d stalled fan-outs", requeued)
    return requeued


def _queues_empty(rt):
    """True when no ingest or deliver message waits in the broker.

    Only knowable here when the broker is the ledger's Redis (the default); with another
    broker this answers True, so no progress for the grace period alone counts as stalled.
    """
    return rt.settings.broker != rt.settings.redis_url or not any(rt.redis.llen(q) for q in WORK_QUEUES)


@shared_task(name=RELEASE_DUE_RETRIES)
def release_due_retries():
    """Send the retries whose time has come (beat, every second)."""
    return runtime().scheduler.release_due()
