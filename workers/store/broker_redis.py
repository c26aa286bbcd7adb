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
"""
from kombu.transport import redis as kombu_redis

TRANSPORT = "workers.store.broker_redis:Transport"


class Channel(kombu_redis.Channel):
    """A Redis channel whose connection parameters do not depend on the transport staying open."""

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
