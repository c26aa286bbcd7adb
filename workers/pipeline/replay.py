"""Replaying a dead letter, and what became of it."""
import json

from workers.celery_config import PROCESS_DELIVERY
from workers.pipeline.jobs import DeliverJob
from workers.pipeline.outcomes import DELIVER_STAGE, ENRICH


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
        DeliverJob(delivery_id, sink, entry["action"], entry["record"], replay=True).send(rt)
    else:
        only = [] if stage == ENRICH else [sink]  # kept in the entry too: the sweeper re-queues from it alone
        rt.ledger.set_status(delivery_id, "received", replay="1", replay_sinks=json.dumps(only))
        rt.scheduler.schedule(PROCESS_DELIVERY, [delivery_id, entry["event_type"], 0, True, only or None], 0)
    rt.ledger.trace(delivery_id, "replayed", sink=sink)
    return "queued"


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
