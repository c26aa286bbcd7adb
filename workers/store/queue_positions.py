"""Where a queued message stands in the broker, without scanning the broker's queue.

Every message sent onto a work queue also bumps a counter in the ledger's Redis
(``l2u:queued:<queue>``), and the message's delivery keeps the counter's value as
its ticket (a field of its ledger hash, e.g. ``queued`` = ``ingest:1234``). The
broker hands messages out first in first out, so at any moment ``pushed -
length`` messages have left the queue (taken by a worker, or lost), and a ticket
above that is still waiting its turn. The sweeper reads two numbers per queue
and knows, for each delivery, whether its message is merely queued behind a
backlog or gone.

With the ledger's Redis as broker both numbers are read together (``LLEN`` of
kombu's list). With another broker (RabbitMQ) the length is the messages ready
in the queue, from a passive declare, read after the counters. Errors lean to
"still queued": a send counted after it happened, a message read as ready before
its send was counted, or a message kombu restores uncounted makes a message look
queued a little longer. The exception is RabbitMQ putting messages back (a
worker gone with messages it had taken): they wait at the head of the queue
again, so as many messages as it put back may look gone while they wait, and a
sweep may queue one of them again (a redundant copy, idempotent, as with no
tickets at all). A deleted queue (a broker that lost it) makes every message in
it look gone, which is true.
"""
import logging

import redis

from workers.celery_config import DELIVER, PROCESS_DELIVERY, TASK_ROUTES
from workers.store import keys
from workers.store.redis_messages import broker_is_ledger_redis

log = logging.getLogger(__name__)

# KEYS: counter, ledger hash. ARGV: ticket field, list key. The ticket is kept only on an
# existing entry (never a half entry without its TTL).
_TICKET = """
local ticket = redis.call('INCR', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. ticket)
end
return ticket
"""


def work_queues(rt, queues=keys.WORK_QUEUES):
    """A ``QueueSnapshot`` of the work queues; an empty one (nothing counts as queued) when another
    broker cannot be read."""
    tickets, lists = QueueTickets(rt.redis), {queue: keys.queue_list(queue) for queue in queues}
    if broker_is_ledger_redis(rt.settings):
        return tickets.snapshot(list(lists.values()))
    pushed = tickets.counts(list(lists.values()))  # first: see the module's text
    lengths = broker_lengths(rt.broker, queues)
    if lengths is None:
        return QueueSnapshot({})
    return QueueSnapshot({key: (pushed[key], lengths[queue]) for queue, key in lists.items()})


def broker_lengths(app, queues):
    """``{queue: messages ready in it}`` from the broker of Celery ``app`` (passive declares; 0 for a
    queue not declared yet), or None when the broker cannot be read."""
    with app.connection_for_read() as connection:
        try:
            return {queue: _ready(connection, queue) for queue in queues}
        except (*connection.connection_errors, *connection.channel_errors) as exc:
            log.warning("cannot read the broker's queue lengths (%s); every message counts as gone", exc)
            return None


def _ready(connection, queue):
    with connection.channel() as channel:
        try:
            return channel.queue_declare(queue=queue, passive=True).message_count
        except connection.channel_errors:  # not declared yet (its first message declares it): none waits
            return 0


def ticketed(send_task, client):
    """``send_task`` that also keeps the queue ticket of each ``process_delivery`` or ``deliver`` it
    sends onto a work queue, in ``client`` (the ledger's Redis), once the message is sent."""
    tickets = QueueTickets(client)

    def send(name, args=(), **options):
        send_task(name, args=args, **options)
        queue = options.get("queue") or TASK_ROUTES[name]["queue"]
        if name not in (PROCESS_DELIVERY, DELIVER) or queue not in keys.WORK_QUEUES:
            return
        field = "queued" if name == PROCESS_DELIVERY else f"queued:{args[1]}"
        try:
            tickets.pushed(keys.queue_list(queue), keys.delivery(args[0]), field)
        except redis.RedisError as exc:  # sent all the same: without its ticket it may be queued once more
            log.warning("sent %s for %s but could not keep its queue ticket: %s", name, args[0], exc)

    return send


class QueueTickets:
    """Records tickets as messages are pushed, and judges them against a snapshot of the queues."""

    def __init__(self, client):
        self.redis = client
        self._ticket = client.register_script(_TICKET)

    def pushed(self, list_key, ledger_key, field):
        """Count one message pushed onto ``list_key``; keep its ticket in ``field`` of ``ledger_key``."""
        return self._ticket(keys=[keys.queued_counter(list_key), ledger_key], args=[field, list_key])

    def counts(self, list_keys):
        """``{list key: messages ever pushed onto it}``."""
        return {key: int(value or 0) for key, value in
                zip(list_keys, self.redis.mget([keys.queued_counter(key) for key in list_keys]))}

    def snapshot(self, list_keys):
        """``QueueSnapshot`` of ``list_keys``: pushed count and length of each, read atomically."""
        with self.redis.pipeline() as pipe:
            for key in list_keys:
                pipe.get(keys.queued_counter(key))
                pipe.llen(key)
            values = pipe.execute()
        return QueueSnapshot({key: (int(values[2 * i] or 0), values[2 * i + 1]) for i, key in enumerate(list_keys)})


class QueueSnapshot:
    """The work queues at one moment: ``{list key: (pushed, length)}``."""

    def __init__(self, queues):
        self.queues = queues

    def waiting(self, ticket_text):
        """True if the message with ``ticket_text`` may still be in its list, waiting its turn.

        No ticket: no message for it was ever pushed (a worker died between marking a sink
        pending and queueing its write), so none is waiting.
        """
        key, _, number = (ticket_text or "").rpartition(":")
        if key not in self.queues:
            return False
        pushed, length = self.queues[key]
        return int(number) > pushed - length
