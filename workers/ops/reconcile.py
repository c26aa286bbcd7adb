"""``l2u-relay reconcile SINK [--repair]``: compare a sink with what we wrote, and put our records back.

The sink's ``reconcile`` lists the system and compares it with our mappings
(rebuilding lost ones). ``repair`` then re-applies our last applied record
(``Sink.last_applied``) for every key the system lost, changed or we had lost
track of, as a ``deliver`` task of the delivery that wrote it: the normal
delivery path, so the per-key lock, the ordering check, retries and dead
letters all hold, and a location still there is updated, never duplicated.
"""
from datetime import datetime, timezone

from workers.pipeline.jobs import DeliverJob
from workers.sinks import SINK_NAMES, sink_class
from workers.sinks.base import Sink

# Sinks whose connector can list the system and compare it with our mappings.
RECONCILABLE = tuple(name for name in SINK_NAMES if sink_class(name).reconcile is not Sink.reconcile)


def reconcile(rt, sink_name, since=None):
    """The sink's ReconcileReport; ``since`` (epoch seconds) narrows the listing where the system can."""
    moment = None if since is None else datetime.fromtimestamp(since, timezone.utc)
    return rt.sinks[sink_name].reconcile(since=moment)


def repair(rt, sink_name, report):
    """Queue our last applied record again for every drifted key; return ``{key: what was done}``."""
    sink, done = rt.sinks[sink_name], {}
    for key in sorted({*report.missing_remote, *report.changed_remote, *report.rebuilt}):
        applied = sink.last_applied(key)
        if applied is None:
            done[key] = "no record of ours kept: replay the delivery that wrote it (l2u-relay deliveries show)"
            continue
        action, record = applied
        delivery_id = record["event"]["delivery_id"]
        rt.ledger.sink_outcome(delivery_id, sink_name, "pending", attempts=0, reason="reconcile repair")
        rt.ledger.trace(delivery_id, "repair queued", sink=sink_name, key=key)
        DeliverJob(delivery_id, sink_name, action, record).send(rt)
        done[key] = f"queued {action} of delivery {delivery_id}"
    return done
