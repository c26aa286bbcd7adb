"""Record an accepted delivery in the ledger and queue it for the workers.

When the Celery broker is the ledger's own Redis (the default), the
``process_delivery`` message is pushed onto the ``ingest`` list by the same Lua
script that writes the dedup key and the ledger entry: the delivery is recorded
and queued together or not at all, in one round trip. With another broker
(RabbitMQ) the message is published with ``send_task`` after the ledger write;
a failed publish releases the entry, and a crash between the two is healed by
the sweeper.
"""
import base64
import json
import logging
import os
from urllib.parse import urlsplit

import redis
from kombu.entity import maybe_delivery_mode
from kombu.exceptions import KombuError, OperationalError
from kombu.serialization import dumps
from kombu.utils.uuid import uuid

from workers.celery_config import INGEST_QUEUE, PROCESS_DELIVERY, make_celery
from workers.stores import Ledger, Quarantine, connect

log = logging.getLogger(__name__)
BROKER_ERRORS = (KombuError, OperationalError, ConnectionError, OSError, redis.RedisError)
REDIS_SCHEMES = ("redis", "rediss")


class Unavailable(Exception):
    """Redis or the broker cannot take the delivery now; the sender should retry."""


class RedisTaskMessage:
    """One task's messages exactly as kombu's Redis transport stores them, for a Lua script to push.

    The template comes from Celery's own ``as_task_v2`` (protocol 2) and kombu's
    serializer, in the envelope kombu's virtual channel writes for the anonymous
    exchange Celery uses with a direct queue (body in base64, a delivery tag,
    priority 0, kept in the list named after the queue). ``build`` fills in only
    what differs per message: the ids, the arguments and their repr (the same as
    Celery's ``saferepr`` for a short list of short strings). Made once per
    process, since ``origin`` names it; building with Celery per request cost a
    tenth of the request (see README, Performance).
    """

    def __init__(self, app, task_name, queue):
        self.app = app
        self.task_name = task_name
        self.queue = queue
        self.key = (app.conf.broker_transport_options or {}).get("global_keyprefix", "") + queue
        self._pid = None

    def _make_template(self):
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            "", self.task_name, args=[], kwargs={}, reply_to=self.app.thread_oid, ignore_result=None)
        content_type, content_encoding, _ = dumps(body, serializer=self.app.conf.task_serializer)
        properties.update(delivery_mode=maybe_delivery_mode(self.app.conf.task_default_delivery_mode),
                          delivery_info={"exchange": "", "routing_key": self.queue},
                          priority=0, body_encoding="base64")
        self._envelope = {"content-encoding": content_encoding, "content-type": content_type}
        self._headers, self._properties, self._embed = headers, properties, body[2]
        self._pid = os.getpid()

    def build(self, args):
        """The JSON text to LPUSH onto ``self.key`` for the task with ``args`` (short strings)."""
        if self._pid != os.getpid():
            self._make_template()
        task_id = uuid()
        body = json.dumps([args, {}, self._embed]).encode()
        return json.dumps({
            "body": base64.b64encode(body).decode(), **self._envelope,
            "headers": {**self._headers, "id": task_id, "root_id": task_id, "argsrepr": repr(args)},
            "properties": {**self._properties, "correlation_id": task_id, "delivery_tag": uuid()}})


def broker_is_ledger_redis(settings):
    """True when Celery's broker is the very Redis the ledger is in."""
    return settings.broker == settings.redis_url and urlsplit(settings.broker).scheme in REDIS_SCHEMES


class Handoff:
    """The receiver's only link to Redis and the broker."""

    def __init__(self, ledger, quarantine, producer, dedup_window, messages=None):
        self.ledger = ledger
        self.quarantine = quarantine
        self.producer = producer
        self.dedup_window = dedup_window
        self.messages = messages  # set: queue inside the ledger write (broker is the ledger's Redis)

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
            self.producer.send_task(PROCESS_DELIVERY, args=args, queue=INGEST_QUEUE, retry=False)
        except BROKER_ERRORS as exc:
            self._release(delivery_id)
            raise Unavailable(f"broker unavailable: {type(exc).__name__}") from exc

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
