"""Redis clients for the relay's stores: a connection with short timeouts (TLS for ``rediss://``),
and commands queued on a caller's pipeline or on one of their own."""
import contextlib

import redis

from workers.store.redis_tls import tls_options

POOL_WAIT = 5  # seconds a thread waits for a free connection of a bounded pool


def connect(url, ca_file=None, max_connections=None, **options):
    """A Redis client for ``url`` with short timeouts, so an outage fails fast.

    ``rediss://`` gets the TLS options of ``workers.store.redis_tls`` (``ca_file``: verify against that CA).
    ``max_connections`` bounds the pool: a thread wanting one more waits for a free connection (up to
    ``POOL_WAIT`` seconds, then ``redis.ConnectionError``) instead of opening it.
    """
    options.setdefault("socket_timeout", 5)
    options.setdefault("socket_connect_timeout", 2)
    options.setdefault("retry_on_timeout", False)
    options.update(tls_options(url, ca_file))
    if max_connections is None:
        return redis.Redis.from_url(url, decode_responses=True, **options)
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=POOL_WAIT,
                                                 decode_responses=True, **options)
    return redis.Redis(connection_pool=pool)


@contextlib.contextmanager
def on_pipeline(client, pipe=None, transaction=False):
    """Queue commands on ``pipe`` (the caller executes it), or on a pipeline of ``client`` executed here
    (a MULTI/EXEC transaction with ``transaction``)."""
    if pipe is not None:
        yield pipe
        return
    with client.pipeline(transaction=transaction) as own:
        yield own
        own.execute()
