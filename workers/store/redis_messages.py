"""Celery task messages written straight into the broker's Redis lists, without a kombu connection.

When the broker is the ledger's own Redis (the default), the receiver queues
``process_delivery`` inside its ledger script, and worker processes send their
follow-up tasks (fan-out, retries) with one LPUSH on the Redis client they
already hold: a prefork child then needs one Redis connection instead of three
(its ledger client plus kombu's two per broker channel; README, Scale).
"""
import base64
import json
import os
import re
from urllib.parse import urlsplit

from kombu.entity import maybe_delivery_mode
from kombu.serialization import dumps
from kombu.utils.uuid import uuid

from workers.store import keys
from workers.celery_config import TASK_ROUTES

REDIS_SCHEMES = ("redis", "rediss")
ARGSREPR_LIMIT = 1024  # Celery cuts argsrepr about as short (amqp.argsrepr_maxsize)
_SLOT = "@@l2u-slot:{}@@"  # a value build() fills in; json.dumps writes it as "\"@@l2u-slot:id@@\""
_SLOT_PATTERN = re.compile(r'"@@l2u-slot:(\w+)@@"')


class RedisTaskMessage:
    """One task's messages exactly as kombu's Redis transport stores them, to push onto its list.

    The template comes from Celery's own ``as_task_v2`` (protocol 2) and kombu's
    serializer, in the envelope kombu's virtual channel writes for the anonymous
    exchange Celery uses with a direct queue (body in base64, a delivery tag,
    priority 0, kept in the list named after the queue). ``build`` fills in only
    what differs per message: the ids, the arguments and their repr (the same as
    Celery's ``saferepr`` for a short list of short strings, cut at Celery's length). Made once per
    process, since ``origin`` names it; building with Celery per request cost a
    tenth of the request (see README, Performance).
    """

    def __init__(self, app, task_name, queue):
        self.app = app
        self.task_name = task_name
        self.queue = queue
        self.key = keys.queue_list(queue)
        self._pid = None

    def _make_template(self):
        """The message's JSON text, rendered once, cut at the slots ``build`` fills in."""
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            "", self.task_name, args=[], kwargs={}, reply_to=self.app.thread_oid, ignore_result=None)
        content_type, content_encoding, _ = dumps(body, serializer=self.app.conf.task_serializer)
        properties.update(delivery_mode=maybe_delivery_mode(self.app.conf.task_default_delivery_mode),
                          delivery_info={"exchange": "", "routing_key": self.queue},
                          priority=0, body_encoding="base64")
        slot = {name: _SLOT.format(name) for name in ("body", "id", "argsrepr", "delivery_tag")}
        text = json.dumps({
            "body": slot["body"], "content-encoding": content_encoding, "content-type": content_type,
            "headers": {**headers, "id": slot["id"], "root_id": slot["id"], "argsrepr": slot["argsrepr"]},
            "properties": {**properties, "correlation_id": slot["id"], "delivery_tag": slot["delivery_tag"]}})
        parts = _SLOT_PATTERN.split(text)  # text, slot name, text, slot name, ..., text
        self._pieces, self._end = list(zip(parts[0::2], parts[1::2])), parts[-1]
        self._body_tail = ", {}, " + json.dumps(body[2]) + "]"  # json.dumps([args, {}, embed]) after the args
        self._pid = os.getpid()

    def build(self, args):
        """The JSON text to LPUSH onto ``self.key`` for the task with ``args`` (JSON values)."""
        if self._pid != os.getpid():
            self._make_template()
        body = base64.b64encode(("[" + json.dumps(args) + self._body_tail).encode()).decode()
        values = {"body": f'"{body}"', "id": f'"{uuid()}"', "argsrepr": json.dumps(repr(args)[:ARGSREPR_LIMIT]),
                  "delivery_tag": f'"{uuid()}"'}  # a uuid needs no JSON escaping
        return "".join([text + values[name] for text, name in self._pieces]) + self._end


def broker_is_ledger_redis(settings):
    """True when Celery's broker is the very Redis the ledger is in."""
    return settings.broker == settings.redis_url and urlsplit(settings.broker).scheme in REDIS_SCHEMES


class RedisTaskSender:
    """``send_task(name, args=...)`` for worker processes: LPUSH of the message onto its queue's list.

    ``client`` is a callable returning the process's Redis client (the ledger's).
    """

    def __init__(self, app, client):
        self.app = app
        self.client = client
        self._messages = {}

    def __call__(self, name, args=(), **options):
        queue = options.get("queue") or TASK_ROUTES[name]["queue"]
        message = self._messages.get((name, queue))
        if message is None:
            message = self._messages[(name, queue)] = RedisTaskMessage(self.app, name, queue)
        self.client().lpush(message.key, message.build(list(args)))
