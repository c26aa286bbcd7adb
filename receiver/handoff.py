"""Record an accepted delivery in the ledger and queue it for the workers."""
import logging

import redis
from kombu.exceptions import KombuError, OperationalError

from workers.celery_config import INGEST_QUEUE, PROCESS_DELIVERY, make_celery
from workers.stores import Ledger, Quarantine, connect

log = logging.getLogger(__name__)
BROKER_ERRORS = (KombuError, OperationalError, ConnectionError, OSError, redis.RedisError)


class Unavailable(Exception):
    """Redis or the broker cannot take the delivery now; the sender should retry."""


class Handoff:
    """The receiver's only link to Redis and the broker."""

    def __init__(self, ledger, quarantine, producer, dedup_window):
        self.ledger = ledger
        self.quarantine = quarantine
        self.producer = producer
        self.dedup_window = dedup_window

    @classmethod
    def from_settings(cls, settings):
        client = connect(settings.redis_url)
        return cls(Ledger(client), Quarantine(client), make_celery(settings, "l2u-receiver"),
                   settings.dedup_window)

    def accept(self, delivery_id, event_type, body):
        """Record and queue a delivery; return "accepted" or "duplicate"."""
        try:
            if not self.ledger.record(delivery_id, event_type, body, self.dedup_window):
                return "duplicate"
        except redis.RedisError as exc:
            raise Unavailable(f"ledger unavailable: {type(exc).__name__}") from exc
        try:
            self.producer.send_task(PROCESS_DELIVERY, args=[delivery_id, event_type], queue=INGEST_QUEUE,
                                    retry=False)
        except BROKER_ERRORS as exc:
            self._release(delivery_id)
            raise Unavailable(f"broker unavailable: {type(exc).__name__}") from exc
        return "accepted"

    def _release(self, delivery_id):
        try:
            self.ledger.release(delivery_id)
        except redis.RedisError:
            log.warning("could not release delivery %s; the sweeper will queue it", delivery_id)

    def quarantine_delivery(self, event_type, body, reason, errors=None):
        try:
            self.quarantine.add(event_type, body, reason, errors)
        except redis.RedisError as exc:
            raise Unavailable(f"quarantine unavailable: {type(exc).__name__}") from exc
