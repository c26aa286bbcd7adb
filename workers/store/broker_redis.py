"""Kombu's Redis transport, made to outlive a broker connection loss (Redis killed and restarted).

On a lost broker connection Celery's consumer closes the kombu ``Connection``, which sets the
transport's ``client`` to None, and only then closes the channels: a channel closing restores its
unacknowledged messages through a new connection pool, whose parameters kombu reads from that
``client`` (``Channel._connparams``: ``conninfo.hostname``). The worker died with
``AttributeError: 'NoneType' object has no attribute 'hostname'`` ("Unrecoverable error"), and acks
of tasks still running then failed the same way. Here each channel works its connection parameters
out once, while the transport still has its client, so restoring and acking keep working (or fail
with a Redis connection error, which Celery handles) and the consumer reconnects and goes on.

Each channel also keeps one synchronous client on its pool: kombu built a new ``redis.Redis``
for every message taken and every ack, and building one (its response callbacks) was about a
sixth of the worker's consumer CPU per message (py-spy, 2026-11-28).

And taking messages, the bookkeeping of unacknowledged ones (``QoS``) and declaring the queues
outlive a Redis that refuses writes (full under ``noeviction``, a read-only replica): kombu raised
out of the worker's event loop, which Celery took for an unrecoverable error, so the worker exited
(and one started meanwhile too).
"""
import contextlib
import logging
import time
from queue import Empty

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from workers.pipeline.failures import redis_outage

TRANSPORT = "workers.store.broker_redis:Transport"
log = logging.getLogger(__name__)


@contextlib.contextmanager
def _unless_write_refused(left_as_is):
    """Run the body; when Redis refuses its write for now (``OOM``, ``READONLY``…: an outage reply, not
    a lost connection, which Celery handles), log that ``left_as_is`` instead of raising."""
    try:
        yield
    except redis.ResponseError as exc:
        if not redis_outage(exc):
            raise
        log.warning("broker: Redis refused a write (%s); %s", exc, left_as_is)


class QoS(kombu_redis.QoS):
    """Unacknowledged messages, kept in Redis by kombu; a step Redis refuses leaves things as they
    are, and nothing is lost: a message the broker no longer holds is still in the ledger, whose
    sweeper queues it again."""

    def append(self, message, delivery_tag):
        with _unless_write_refused("the message is not kept for redelivery by the broker (the sweeper has "
                                   "it) and goes to its task, which meets the same refusal"):
            return super().append(message, delivery_tag)
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag):
        with _unless_write_refused("the message stays unacknowledged and comes back after the visibility "
                                   "timeout, to a task that finds its work done"):
            return super().ack(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def restore_by_tag(self, tag, client=None, leftmost=False):
        with _unless_write_refused("the message stays unacknowledged and comes back after the visibility "
                                   "timeout"):
            super().restore_by_tag(tag, client, leftmost)

    def restore_visible(self, *args, **kwargs):
        with _unless_write_refused("messages held by dead workers are restored on a later turn"):
            super().restore_visible(*args, **kwargs)


class Channel(kombu_redis.Channel):
    """A Redis channel whose connection parameters do not depend on the transport staying open."""

    QoS = QoS

    def _size(self, queue):
        """A queue's length; 0 while Redis refuses the transaction that reads it (a full Redis refuses
        every command inside ``MULTI``), so declaring the queues at start-up goes on."""
        with _unless_write_refused("a queue's length reads as 0"):
            return super()._size(queue)
        return 0

    def _queue_bind(self, *args, **kwargs):
        with _unless_write_refused("a queue's binding is not written now (an earlier start wrote it)"):
            super()._queue_bind(*args, **kwargs)

    def _brpop_read(self, **options):
        """Take a message; a refused ``BRPOP`` (a read-only replica) takes none, after a second's pause:
        Redis refuses the next one at once too."""
        with _unless_write_refused("no message is taken for a second"):
            return super()._brpop_read(**options)
        time.sleep(1)
        raise Empty()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._connparams(asynchronous=False)  # the pool for acks and restores is made lazily, maybe too late

    def _connparams(self, asynchronous=False):
        cache = self.__dict__.setdefault("_connparams_cache", {})
        if asynchronous not in cache:
            cache[asynchronous] = super()._connparams(asynchronous=asynchronous)
        return dict(cache[asynchronous])

    def _create_client(self, asynchronous=False):
        """The channel's one synchronous client while its pool lasts (a client is only a handle on the
        pool, so sharing it is safe; a pool made again after a lost connection gets a new one)."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self.__dict__.get("_sync_client")
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    """``redis://`` and ``rediss://`` brokers (``broker_transport``), with the channel above."""

    Channel = Channel
