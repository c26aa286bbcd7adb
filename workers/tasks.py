"""Celery tasks: thin, idempotent, JSON arguments only.

Anything unexpected (a bug) is dead-lettered with its reason before the task
fails, so nothing accepted is lost even then; a Redis outage puts the message
back for redelivery instead. ``redis_outage`` is the one place that tells them apart.
"""
import contextlib
import functools
import json
import logging
import threading
import time
import uuid
from urllib.parse import urlsplit

import redis
from celery import current_app, shared_task
from celery.signals import after_task_publish, task_prerun
from celery.exceptions import Reject
from kombu.exceptions import OperationalError
from marshmallow import ValidationError

from workers import housekeeping, pipeline
from workers.celery_config import (DELIVER, DELIVER_QUEUE, INGEST_QUEUE, PROCESS_DELIVERY, RELEASE_DUE_RETRIES,
                                   SWEEP_RECEIVED)
from workers.errors import PermanentError
from workers.events import parse_event
from workers.logs import bind_context
from workers.queue_positions import QueueTickets, work_queues
from workers.runtime import runtime
from workers.stores import FINAL_STATES, Ledger, connect

log = logging.getLogger(__name__)
PROCESSABLE = ("received", "retrying", "processing")
# Redis (ledger) or broker unavailable for a while: put the message back, never dead-letter it as a bug.
OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, redis.OutOfMemoryError, OperationalError)
# The same conditions as Redis words them from inside a script, where they have no class of their own.
OUTAGE_REPLIES = ("LOADING", "READONLY", "OOM", "MASTERDOWN", "BUSY")
WORK_QUEUES = (INGEST_QUEUE, DELIVER_QUEUE)
SWEEP_BATCH = 500
SWEEP_BUDGET_SECONDS = 10.0  # one sweep stops after this long; the next one goes on
SWEEP_LOCK = "l2u:sweep:running"


@task_prerun.connect
def _bind_log_context(task=None, args=(), **_):
    """Every line logged while a task runs, Celery's own included, carries its delivery's context."""
    if task.name == PROCESS_DELIVERY:
        bind_context(delivery_id=args[0], event_type=args[1])
    elif task.name == DELIVER:
        bind_context(delivery_id=args[0], sink=args[1], event_type=(args[3] or {}).get("event", {}).get("event_type"))
    else:
        bind_context()


@after_task_publish.connect
def _keep_queue_ticket(sender=None, body=None, routing_key=None, redis_client=None, **_):
    """Each process_delivery or deliver message pushed onto a Redis broker's work queue bumps that
    queue's counter and leaves its ticket in its delivery's ledger entry (when the ledger is in the
    same Redis), so the sweeper can tell a queued message from a lost one. A worker process's
    ``RedisTaskSender`` passes the client it pushed with, so no second connection is opened."""
    if sender not in (PROCESS_DELIVERY, DELIVER) or routing_key not in WORK_QUEUES:
        return
    client = redis_client or _redis_broker(current_app.conf.broker_url,
                                           (current_app.conf.broker_use_ssl or {}).get("ssl_ca_certs"))
    if client is None:
        return
    args = body[0]
    field = "queued" if sender == PROCESS_DELIVERY else f"queued:{args[1]}"
    QueueTickets(client).pushed(routing_key, Ledger.key(args[0]), field)


@functools.cache
def _redis_broker(url, ca_file):
    """A client of the broker when it is a Redis (verified against ``ca_file`` when set), else None."""
    return connect(url, ca_file, max_connections=1) if urlsplit(url or "").scheme in ("redis", "rediss") else None


@shared_task(name=PROCESS_DELIVERY)
def process_delivery(delivery_id, event_type, attempt=0, replay=False, sinks=None):
    """Validate a recorded delivery and fan it out to its routed sinks, under a processing lease."""
    rt = runtime()
    with _redis_outage():
        entry = rt.ledger.get(delivery_id)
        if entry is None:
            log.warning("delivery %s is not in the ledger (expired or released); nothing to do", delivery_id)
            return "missing"
        if entry["status"] not in PROCESSABLE and not pipeline.stalled_sinks(entry):
            return entry["status"]  # a redelivery of work already done
        lease = uuid.uuid4().hex
        if entry["status"] in PROCESSABLE and not rt.ledger.claim(delivery_id, lease, rt.settings.sweep_after,
                                                                   attempt):
            return "processing"  # a live worker holds it (its lease is renewed) or it moved on meanwhile
        try:
            event = parse_event(delivery_id, event_type, json.loads(entry["body"]))
        except ValidationError as exc:
            rt.quarantine.add(event_type, entry["body"], "schema validation failed", exc.messages, delivery_id)
            rt.ledger.set_status(delivery_id, "quarantined", reason=json.dumps(exc.messages))
            return "quarantined"
        if entry["status"] not in PROCESSABLE:  # routed before, but a sink's deliver was never queued or got lost
            return _guarded(lambda: pipeline.resume_fan_out(rt, event, entry),
                            lambda exc: pipeline.dead_letter_enrich(rt, event, attempt, exc))
        replay, sinks = pipeline.replay_scope(entry, replay, sinks)
        with _lease_renewed(rt, delivery_id, lease):
            return _guarded(lambda: pipeline.route_delivery(rt, event, attempt, replay, sinks),
                            lambda exc: pipeline.dead_letter_enrich(rt, event, attempt, exc))


@contextlib.contextmanager
def _lease_renewed(rt, delivery_id, lease):
    """Renew the processing lease every third of its length while the body runs.

    A worker that dies stops renewing, so the sweeper takes the delivery up once the lease has
    lapsed (``RELAY_SWEEP_AFTER``); one that is merely slow (a long stop fetch) keeps it.
    """
    stop = threading.Event()

    def renew():
        while not stop.wait(rt.settings.sweep_after / 3):
            try:
                if not rt.ledger.renew(delivery_id, lease):
                    return
            except redis.RedisError as exc:  # the lease may lapse; a second run is idempotent
                log.warning("could not renew the processing lease: %s", exc)

    renewer = threading.Thread(target=renew, name=f"lease-{delivery_id}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


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
    """The one sweeper: re-queue every delivery not final that made no progress for
    ``RELAY_SWEEP_AFTER`` and whose message is not waiting in the broker (see ``_sweep``)."""
    rt = runtime()
    housekeeping.run(rt)
    return _sweep(rt)


def _sweep(rt, budget=SWEEP_BUDGET_SECONDS):
    """One pass over the ledger's open index, oldest progress first; return how many were re-queued.

    A delivery without progress for ``sweep_after`` is lost or held by a dead worker unless its
    last message is still in the broker's list behind a backlog (its queue ticket says so without
    scanning the list); then its clock restarts. Received, retrying and processing deliveries
    whose lease lapsed get ``process_delivery`` again; routed ones whose sink stalled are resumed.
    """
    lock = rt.redis.lock(SWEEP_LOCK, timeout=budget * 3, blocking=False)
    if not lock.acquire():
        return 0  # another sweep is still going (a backlog of sweep tasks, or a long one)
    try:
        return _sweep_open(rt, time.monotonic() + budget)
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()


def _sweep_open(rt, deadline):
    rt.ledger.fold_legacy_index()
    grace = rt.settings.sweep_after
    requeued = resumed = 0
    due = True
    while due and time.monotonic() < deadline:
        queues = work_queues(rt, WORK_QUEUES)
        due = rt.ledger.stalled(grace, limit=SWEEP_BATCH)
        for delivery_id in due:
            if time.monotonic() >= deadline:
                break
            entry = rt.ledger.get(delivery_id)
            if entry is None or entry["status"] in FINAL_STATES:
                rt.ledger.close_open(delivery_id)
            elif not rt.ledger.take_due(delivery_id, grace):
                continue  # it progressed meanwhile
            elif entry["status"] == "routed":
                resumed += _resume_if_stalled(rt, entry, queues, grace)
            else:
                requeued += _requeue_if_lost(rt, entry, queues)
    if requeued:
        log.warning("sweeper re-queued %d deliveries", requeued)
    if resumed:
        log.warning("sweeper resumed %d stalled fan-outs", resumed)
    return requeued + resumed


def _requeue_if_lost(rt, entry, queues):
    """``process_delivery`` again for a delivery before its fan-out whose message is not queued,
    or whose processing lease its holder stopped renewing (dead)."""
    delivery_id = entry["delivery_id"]
    if entry["status"] == "processing":
        if not rt.ledger.lapse(delivery_id, entry.get("lease")):
            return 0  # it moved on meanwhile
    elif queues.waiting(entry.get("queued")):
        return 0
    rt.scheduler.schedule(PROCESS_DELIVERY, [delivery_id, entry["event_type"], int(entry.get("attempt", 0)),
                                             entry.get("replay") == "1"], 0)
    rt.ledger.trace(delivery_id, "swept", status=entry["status"])
    return 1


def _resume_if_stalled(rt, entry, queues, base):
    """``process_delivery`` again for a routed delivery a sink made no progress on, unless that
    sink's deliver message is queued. Each resume of one fan-out doubles the patience for the next
    (a deliver held by a slow live worker is not lost)."""
    delivery_id = entry["delivery_id"]
    if not pipeline.open_sinks(entry):
        rt.ledger.close_open(delivery_id)
        return 0
    grace = pipeline.resume_backoff(entry, base)
    stalled = pipeline.stalled_sinks(entry, grace)
    if not stalled:  # look again when it would count as stalled
        rt.ledger.check_open_at(delivery_id, pipeline.next_progress(entry) + grace - base)
        return 0
    if queues.waiting(entry.get("queued")) or any(queues.waiting(entry.get(f"queued:{sink}")) for sink in stalled):
        return 0  # a resume, or that sink's write, is still queued
    rt.scheduler.schedule(PROCESS_DELIVERY, [delivery_id, entry["event_type"]], 0)
    rt.ledger.trace(delivery_id, "swept", status="routed", sinks=stalled)
    return 1


@shared_task(name=RELEASE_DUE_RETRIES)
def release_due_retries():
    """Send the retries whose time has come, and the recovery probe of each sink with retries held
    for its health (beat sends it only when one is due, see ``RetriesDue``)."""
    return runtime().scheduler.release_due()
