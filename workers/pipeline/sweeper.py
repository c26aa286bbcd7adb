"""The one sweeper: finds deliveries that stopped moving and queues them again.

Every delivery not final sits in the ledger's open index, scored by when it is next due to
progress. A pass reads that index oldest first; a delivery without progress for
``RELAY_SWEEP_AFTER`` is lost or held by a dead worker unless its last message is still in the
broker's list behind a backlog (its queue ticket says so without scanning the list); then its
clock restarts. Received, retrying and processing deliveries whose lease lapsed get
``process_delivery`` again; routed ones whose sink stalled are resumed. A key's newest write
sent again after a lock lapse (``deliver.reassert``) that has not landed is sent once more, and so
is the task of a console replay batch that stopped moving (``replay.resend_stalled``).
"""
import contextlib
import logging
import time

import redis

from workers.celery_config import PROCESS_DELIVERY
from workers.pipeline import deliver, replay
from workers.store import housekeeping, keys
from workers.store.ledger import Status
from workers.store.queue_positions import work_queues

log = logging.getLogger(__name__)
SWEEP_BATCH = 500
SWEEP_BUDGET_SECONDS = 10.0  # one sweep stops after this long; the next one goes on


def sweep(rt, budget=SWEEP_BUDGET_SECONDS):
    """Housekeeping, then one pass over the open index, the unconfirmed reasserts and the stalled
    replay batches; return how many deliveries, writes and replay batches were queued again."""
    housekeeping.run(rt)
    lock = rt.redis.lock(keys.SWEEP_LOCK, timeout=budget * 3, blocking=False)
    if not lock.acquire():
        return 0  # another sweep is still going (a backlog of sweep tasks, or a long one)
    try:
        return sweep_open(rt, time.monotonic() + budget) + reassert_again(rt) + replay.resend_stalled(rt)
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()


def reassert_again(rt, now=None):
    """Send once more each newest write sent again after a lock lapse that has not landed since,
    unless its message still waits in the broker's list (its clock then restarts); and send the
    newest write of each key whose writer vanished (its lock lapsed ``sweep_after`` ago and it never
    let go: it may have died after its request left, which may have landed after a newer write)."""
    now = time.time() if now is None else now
    queues, sent = work_queues(rt), 0
    for sink in rt.sinks:
        versions = rt.versions(sink)
        for key, ticket in versions.reasserts_due(now).items():
            if queues.waiting(ticket):
                versions.reasserting(key, now + rt.settings.sweep_after)
                continue
            sent += deliver.reassert(rt, sink, key)
        for mark, key in versions.writers_vanished(now - rt.settings.sweep_after).items():
            sent += deliver.reassert(rt, sink, key)  # marked first, so forgetting the writer loses nothing
            versions.forget_writer(mark)
    if sent:
        log.warning("sweeper sent %d writes again whose earlier resend did not land or whose writer vanished", sent)
    return sent


def sweep_open(rt, deadline):
    """Sweep the open index until nothing is due or ``deadline`` (monotonic) passes."""
    rt.ledger.fold_legacy_index()
    grace = rt.settings.sweep_after
    requeued = resumed = 0
    due = True
    while due and time.monotonic() < deadline:
        queues = work_queues(rt)
        due = rt.ledger.stalled(grace, limit=SWEEP_BATCH)
        for delivery_id in due:
            if time.monotonic() >= deadline:
                break
            entry = rt.ledger.entry(delivery_id)
            if entry is None or entry.final:
                rt.ledger.close_open(delivery_id)
            elif not rt.ledger.take_due(delivery_id, grace):
                continue  # it progressed meanwhile
            elif entry.status == Status.ROUTED:
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
    if entry.status == Status.PROCESSING:
        if not rt.ledger.lapse(entry.delivery_id, entry.lease):
            return 0  # it moved on meanwhile
    elif queues.waiting(entry.tickets.get("")):
        return 0
    rt.scheduler.schedule(PROCESS_DELIVERY, [entry.delivery_id, entry.event_type, entry.attempt, entry.replay], 0)
    rt.ledger.trace(entry.delivery_id, "swept", status=entry.status.value)
    return 1


def _resume_if_stalled(rt, entry, queues, base):
    """``process_delivery`` again for a routed delivery a sink made no progress on, unless that
    sink's deliver message is queued or the fan-out's worker still renews its lease. Each resume
    of one fan-out doubles the patience for the next (a deliver held by a slow live worker is not
    lost)."""
    if not entry.open_sinks():
        rt.ledger.close_open(entry.delivery_id)
        return 0
    if entry.fan_out_live(base):  # its worker is still in a (slow) write: look again once its lease would lapse
        rt.ledger.check_open_at(entry.delivery_id, entry.lease_at)
        return 0
    grace = entry.resume_backoff(base)
    stalled = entry.stalled_sinks(grace)
    if not stalled:  # look again when it would count as stalled
        rt.ledger.check_open_at(entry.delivery_id, entry.next_progress() + grace - base)
        return 0
    if queues.waiting(entry.tickets.get("")) or any(queues.waiting(entry.tickets.get(sink)) for sink in stalled):
        return 0  # a resume, or that sink's write, is still queued
    rt.scheduler.schedule(PROCESS_DELIVERY, [entry.delivery_id, entry.event_type], 0)
    rt.ledger.trace(entry.delivery_id, "swept", status="routed", sinks=stalled)
    return 1
