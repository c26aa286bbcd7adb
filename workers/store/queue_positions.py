"""Where a queued message stands in the Redis broker, without scanning the broker's list.

Every push onto a work queue's list also bumps a counter (``l2u:queued:<list>``),
and the message's delivery keeps the counter's value as its ticket (a field of
its ledger hash, e.g. ``queued`` = ``ingest:1234``). Kombu's Redis transport
takes messages from the other end of the list, first in first out, so at any
moment ``pushed - length`` messages have left the list (taken by a worker, or
lost), and a ticket above that is still waiting its turn. The sweeper reads two
numbers per queue and knows, for each delivery, whether its message is merely
queued behind a backlog or gone.

Errors lean one way: a push counted after the message is pushed (Celery's
``after_task_publish``), or a message kombu restores to the list uncounted,
makes a message look queued a little longer, never gone too early. A deleted
list (a broker that lost its queue) makes every message in it look gone, which
is true.
"""
from workers.store import keys

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
    """A ``QueueSnapshot`` of the work queues, or an empty one (nothing counts as queued) when the
    broker is not the ledger's Redis."""
    if rt.settings.broker != rt.settings.redis_url:
        return QueueSnapshot({})
    return QueueTickets(rt.redis).snapshot([keys.queue_list(queue) for queue in queues])


class QueueTickets:
    """Records tickets as messages are pushed, and judges them against a snapshot of the queues."""

    def __init__(self, client):
        self.redis = client
        self._ticket = client.register_script(_TICKET)

    def pushed(self, list_key, ledger_key, field):
        """Count one message pushed onto ``list_key``; keep its ticket in ``field`` of ``ledger_key``."""
        return self._ticket(keys=[keys.queued_counter(list_key), ledger_key], args=[field, list_key])

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
