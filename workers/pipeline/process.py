"""``process_delivery``: take a recorded delivery up, validate it, fan it out (or resume its fan-out)."""
import json
import logging
import time
import uuid

from marshmallow import ValidationError

from workers.domain import json_text
from workers.domain.events import parse_event
from workers.pipeline.failures import bugs_dead_lettered
from workers.pipeline.fan_out import resume_fan_out, route_delivery
from workers.pipeline.outcomes import dead_letter_enrich
from workers.resilience.renewal import renewed

log = logging.getLogger(__name__)


def process(rt, delivery_id, event_type, attempt=0, replay=False, sinks=None):
    """Validate a recorded delivery and fan it out to its routed sinks, under a processing lease;
    a routed delivery whose fan-out stalled is resumed. Returns what became of it."""
    lease = uuid.uuid4().hex
    entry, claimed = rt.ledger.take_up(delivery_id, lease, rt.settings.sweep_after, attempt)
    if entry is None:
        log.warning("delivery %s is not in the ledger (expired or released); nothing to do", delivery_id)
        return "missing"
    if not entry.processable and not entry.stalled_sinks():
        return entry.status.value  # a redelivery of work already done
    if entry.processable and not claimed:
        return "processing"  # a live worker holds it (its lease is renewed)
    try:
        payload = json_text.loads(entry.body)
        if json_text.nested_deeper_than(payload):  # recorded before the receiver refused such bodies
            raise ValidationError({"_schema": [f"nested deeper than {json_text.MAX_DEPTH} levels"]})
        event = parse_event(delivery_id, event_type, payload)
        validated_at = time.time()
    except ValidationError as exc:
        return _quarantine(rt, delivery_id, event_type, entry.body, exc.messages)
    except RecursionError:  # too deep even to read
        return _quarantine(rt, delivery_id, event_type, entry.body, {"_schema": ["nested too deeply to read"]})
    with bugs_dead_lettered(lambda exc: dead_letter_enrich(rt, event, attempt, exc)):
        if not entry.processable:  # routed before, but a sink's deliver was never queued or got lost
            return resume_fan_out(rt, event, entry)
        if entry.replay_sinks is not None:  # a replay the sweeper queued again: its message says neither
            replay, sinks = True, sinks or list(entry.replay_sinks) or None
        with _lease_renewed(rt, delivery_id, lease):
            return route_delivery(rt, event, entry.received_at, attempt, replay, sinks, validated_at=validated_at)


def _quarantine(rt, delivery_id, event_type, body, errors):
    """Quarantine a recorded delivery whose body the schema refused with ``errors`` (marshmallow's shape)."""
    rt.quarantine.add(event_type, body, "schema validation failed", errors, delivery_id)
    rt.ledger.set_status(delivery_id, "quarantined", reason=json.dumps(errors))
    rt.ledger.trace(delivery_id, "quarantined", reason="schema validation failed", errors=errors)
    return "quarantined"


def _lease_renewed(rt, delivery_id, lease):
    """Renew the processing lease every third of its length while the body runs.

    A worker that dies stops renewing, so the sweeper takes the delivery up once the lease has
    lapsed (``RELAY_SWEEP_AFTER``); one that is merely slow (a long stop fetch) keeps it. If Redis
    is away the lease may lapse; a second run is idempotent.
    """
    return renewed(lambda: rt.ledger.renew(delivery_id, lease), rt.settings.sweep_after / 3,
                   "the processing lease")
