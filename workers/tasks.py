"""Celery tasks: thin, idempotent, JSON arguments only."""
import json
import logging

from celery import shared_task
from marshmallow import ValidationError

from workers.celery_config import INGEST_QUEUE, PROCESS_DELIVERY, SWEEP_RECEIVED
from workers.events import parse_event
from workers.runtime import runtime

log = logging.getLogger(__name__)


@shared_task(name=PROCESS_DELIVERY)
def process_delivery(delivery_id, event_type):
    """Validate a recorded delivery and fan it out to its routed sinks."""
    rt = runtime()
    entry = rt.ledger.get(delivery_id)
    if entry is None:
        log.warning("delivery %s is not in the ledger (expired or released); nothing to do", delivery_id)
        return "missing"
    if entry["status"] != "received":
        return entry["status"]  # a redelivery of work already done
    try:
        event = parse_event(delivery_id, event_type, json.loads(entry["body"]))
    except ValidationError as exc:
        rt.quarantine.add(event_type, entry["body"], "schema validation failed", exc.messages, delivery_id)
        rt.ledger.set_status(delivery_id, "quarantined", reason=str(exc.messages))
        return "quarantined"
    rt.ledger.set_status(delivery_id, "unrouted", entity=event.entity)
    return "unrouted"


@shared_task(name=SWEEP_RECEIVED)
def sweep_received():
    """Re-queue deliveries recorded but never picked up (a crash between record and queue)."""
    rt = runtime()
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
