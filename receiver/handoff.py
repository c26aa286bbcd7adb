"""Record an accepted delivery in the ledger and queue it for the workers.

When the Celery broker is the ledger's own Redis (the default), the
``process_delivery`` message is pushed onto the ``ingest`` list by the same Lua
script that writes the dedup key and the ledger entry: the delivery is recorded
and queued together or not at all, in one round trip. With another broker
(RabbitMQ) the message is published with ``send_task`` after the ledger write,
and its queue ticket kept after that (``workers.store.queue_positions``); a
failed publish releases the entry, and a crash between the two is healed by
the sweeper.
"""
import logging

import redis
from kombu.exceptions import KombuError, OperationalError

from workers.celery_config import INGEST_QUEUE, PROCESS_DELIVERY, make_celery
from workers.store.ledger import Ledger
from workers.store.quarantine import Quarantine
from workers.store.queue_positions import ticketed
from workers.store.redis_client import connect
from workers.store.redis_messages import RedisTaskMessage, broker_is_ledger_redis

log = logging.getLogger(__name__)
BROKER_ERRORS = (KombuError, OperationalError, ConnectionError, OSError, redis.RedisError)


class Unavailable(Exception):
    """Redis or the broker cannot take the delivery now; the sender should retry."""


class Handoff:
    """The receiver's only link to Redis and the broker."""

    def __init__(self, ledger, quarantine, producer, dedup_window, messages=None):
        self.ledger = ledger
        self.quarantine = quarantine
        self.producer = producer
        self.dedup_window = dedup_window
        self.messages = messages  # set: queue inside the ledger write (broker is the ledger's Redis)
        self.send_task = ticketed(producer.send_task, ledger.redis)  # else: publish, then keep the ticket

    @classmethod
    def from_settings(cls, settings):
        client = connect(settings.redis_url, settings.redis_ca_file, settings.redis_max_connections)
        producer = make_celery(settings, "l2u-receiver")
        messages = RedisTaskMessage(producer, PROCESS_DELIVERY, INGEST_QUEUE) if broker_is_ledger_redis(settings) else None
        return cls(Ledger(client, history=settings.history_days * 86400),
                   Quarantine(client, limit=settings.quarantine_limit), producer, settings.dedup_window, messages)

    def accept(self, delivery_id, event_type, body):
        """Record and queue a delivery; return "accepted" or "duplicate"."""
        args = [delivery_id, event_type]
        enqueue = (self.messages.key, self.messages.build(args)) if self.messages else None
        try:
            if not self.ledger.record(delivery_id, event_type, body, self.dedup_window, enqueue=enqueue):
                return "duplicate"
        except redis.RedisError as exc:
            raise Unavailable(f"ledger unavailable: {type(exc).__name__}") from exc
        if enqueue is None:
            self._publish(delivery_id, args)
        return "accepted"

    def _publish(self, delivery_id, args):
        try:
            self.send_task(PROCESS_DELIVERY, args=args, queue=INGEST_QUEUE, retry=False)
        except BROKER_ERRORS as exc:
            self._release(delivery_id)
            raise Unavailable(f"broker unavailable: {type(exc).__name__}") from exc

    def _release(self, delivery_id):
        try:
            self.ledger.release(delivery_id)
        except redis.RedisError:
            log.warning("could not release delivery %s; the sweeper will queue it", delivery_id)

    def ping_broker(self):
        """Raise unless the broker answers: the ledger's Redis when it is the broker, else a broker connection."""
        if self.messages:
            self.ledger.redis.ping()
            return
        with self.producer.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    def quarantine_delivery(self, event_type, body, reason, errors=None):
        try:
            self.quarantine.add(event_type, body, reason, errors)
        except redis.RedisError as exc:
            raise Unavailable(f"quarantine unavailable: {type(exc).__name__}") from exc
