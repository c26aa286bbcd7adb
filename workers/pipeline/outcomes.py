"""Every outcome of a delivery, recorded by one call: ledger, trace, metrics, log, dead letters."""
import logging
import time

from workers.resilience.admission import SlowCalls
from workers.resilience.errors import RelayError
from workers.store.ledger import FINAL_SINK_STATES

log = logging.getLogger(__name__)
# Dead-letter stages: what a replay has to redo.
ENRICH, ROUTE, DELIVER_STAGE = "enrich", "route", "deliver"
# state -> (trace line, log level, log message from the outcome's details)
_SHOWN = {
    "applied": ("applied", logging.INFO, lambda d: f"applied {d['action']} {d['key']}"),
    "stale": ("stale", logging.INFO, lambda d: f"stale: a newer version of {d['key']} is already applied"),
    "retrying": ("retry", logging.WARNING, lambda d: f"retry {d['attempts']} in {d['delay']:.1f}s: {d['error']}"),
    "dead_lettered": ("dead-lettered", logging.ERROR, lambda d: f"dead-lettered: {d['reason']}"),
}


def record(rt, job, state, attempts, *, kept=None, received_at=None, **shown):
    """Record ``job``'s outcome ``state`` at its sink, in one Redis round trip: its call to the sink
    over (``SlowCalls``), in the ledger (with ``kept`` fields; the delivery settles when it was its
    last open sink) and, except for a wait, as a trace line with ``shown`` and in the metrics
    (applied with its receipt-to-applied latency, from ``received_at``); then in the log. A write
    held for later (waiting, retrying: ``kept`` says ``next_in``) that is a resend of its key's
    newest write pushes the key's reassert mark past it, so the sweeper does not take the held
    resend for lost. A state that is not final never reopens a sink whose outcome is (a second copy
    of a write that landed: its retry still goes out)."""
    shown_as = _SHOWN.get(state)
    with rt.redis.pipeline(transaction=False) as pipe:
        rt.calls(job.sink).ended(SlowCalls.call(job).member, pipe)
        rt.ledger.sink_outcome(job.delivery_id, job.sink, state, pipe, only_open=state not in FINAL_SINK_STATES,
                               attempts=attempts, **(kept or {}))
        if shown_as:
            rt.ledger.trace(job.delivery_id, shown_as[0], pipe, sink=job.sink, **shown)
        if state in ("waiting", "retrying") and job.record:  # held for later: a resend in it is not lost
            rt.versions(job.sink).reassert_held(job.record["key"], job.delivery_id,
                                                time.time() + kept["next_in"] + rt.settings.sweep_after, pipe)
        if state == "retrying":
            rt.metrics.incr("l2u_worker_retries", pipe, sink=job.sink)
        elif shown_as:
            latency = time.time() - received_at if state == "applied" and received_at else None
            rt.metrics.delivery(job.sink, state, latency, pipe)
        pipe.execute()
    if not shown_as:
        return state
    log.log(shown_as[1], shown_as[2]({**shown, "attempts": attempts}))
    if job.replay and state in ("applied", "stale"):  # final: the dead letter was fixed or superseded
        rt.dead_letters.remove(rt.dead_letters.entry_id(job.delivery_id, job.sink))
    return state


def dead_letter(rt, job, attempts, exc, exhausted=False, stage=DELIVER_STAGE, event_type=None, took=None):
    """Keep ``job`` in the dead-letter store with ``exc`` as its reason (and what a replay needs);
    ``took``: how long the sink call that ended so took, for the trace."""
    reason = f"retries exhausted: {exc.message}" if exhausted else exc.message
    kept = kept_for_replay(rt, job.delivery_id)
    kept["event_type"] = event_type or job.event_type or kept.get("event_type")
    key = (job.record or {}).get("key")
    rt.dead_letters.add(job.delivery_id, job.sink, reason, **kept, stage=stage, action=job.action, record=job.record,
                        key=key, attempts=attempts, error=exc.to_json() if isinstance(exc, RelayError) else None)
    if key:
        rt.versions(job.sink).reassert_dead_lettered(key, job.delivery_id)
    timing = {} if took is None else {"took": took}
    return record(rt, job, "dead_lettered", attempts, kept={"reason": reason}, reason=reason, **timing)


def dead_letter_enrich(rt, event, attempt, exc, steps=()):
    """Dead-letter a delivery before its fan-out (its stop could not be read, or a bug); ``steps``:
    trace lines of what came before (``Ledger.trace_lines``)."""
    kept = {**kept_for_replay(rt, event.delivery_id), "event_type": event.event_type}
    rt.dead_letters.add(event.delivery_id, ENRICH, exc.message, **kept, stage=ENRICH, attempts=attempt + 1,
                        error=exc.to_json())
    rt.ledger.set_status(event.delivery_id, "dead_lettered", reason=exc.message)
    rt.ledger.trace_lines(event.delivery_id, [*steps, (time.time(), "dead-lettered",
                                                       {"stage": ENRICH, "reason": exc.message})])
    log.error("dead-lettered before fan-out: %s", exc.message)
    return "dead_lettered"


def kept_for_replay(rt, delivery_id):
    """What a replay needs once the ledger entry has expired: the body, its type and receipt time."""
    body, event_type, received_at = rt.redis.hmget(rt.ledger.key(delivery_id), "body", "event_type", "received_at")
    kept = {"body": body, "event_type": event_type, "received_at": float(received_at) if received_at else None}
    return {name: value for name, value in kept.items() if value is not None}
