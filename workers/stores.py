"""Redis-backed stores: the delivery ledger (with dedup) and the quarantine.

Keys all start with ``l2u:``. The ledger keeps the raw delivery (event type,
body, received-at, status) in one hash per delivery; ``record()`` writes it,
the dedup key and the sweeper's index in one atomic round trip.
"""
import json
import time

import redis

PREFIX = "l2u:"
LEDGER_RETENTION = 14 * 86400
QUARANTINE_LIMIT = 10000

# Final delivery states; anything else is still in progress.
FINAL_STATES = ("applied", "stale", "dead_lettered", "quarantined", "unrouted")

_RECORD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) == false then return 0 end
redis.call('HSET', KEYS[2], 'delivery_id', ARGV[1], 'event_type', ARGV[3], 'body', ARGV[4],
           'received_at', ARGV[5], 'status', 'received')
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
return 1
"""


def connect(url, **options):
    """A Redis client for ``url`` with short timeouts, so an outage fails fast."""
    options.setdefault("socket_timeout", 5)
    options.setdefault("socket_connect_timeout", 2)
    options.setdefault("retry_on_timeout", False)
    return redis.Redis.from_url(url, decode_responses=True, **options)


class Ledger:
    """Every accepted delivery, its status and per-sink outcomes."""

    RECEIVED = PREFIX + "ledger:received"  # sweeper index: still "received"
    ALL = PREFIX + "ledger:all"

    def __init__(self, client):
        self.redis = client
        self._record = client.register_script(_RECORD)

    @staticmethod
    def key(delivery_id):
        return f"{PREFIX}delivery:{delivery_id}"

    @staticmethod
    def dedup_key(delivery_id):
        return f"{PREFIX}dedup:{delivery_id}"

    def record(self, delivery_id, event_type, body, dedup_window, received_at=None):
        """Record a new delivery; return False if it is a duplicate within the window."""
        received_at = time.time() if received_at is None else received_at
        keys = [self.dedup_key(delivery_id), self.key(delivery_id), self.RECEIVED, self.ALL]
        args = [delivery_id, dedup_window, event_type, body, repr(received_at), LEDGER_RETENTION]
        return bool(self._record(keys=keys, args=args))

    def release(self, delivery_id):
        """Undo ``record()`` (the hand-off failed), so the sender's retry is accepted."""
        with self.redis.pipeline() as pipe:
            pipe.delete(self.dedup_key(delivery_id), self.key(delivery_id))
            pipe.zrem(self.RECEIVED, delivery_id)
            pipe.zrem(self.ALL, delivery_id)
            pipe.execute()

    def get(self, delivery_id):
        """The ledger entry as a dict (sink outcomes under ``sinks``), or None."""
        entry = self.redis.hgetall(self.key(delivery_id))
        if not entry:
            return None
        sinks = {name[5:]: json.loads(value) for name, value in entry.items() if name.startswith("sink:")}
        entry = {name: value for name, value in entry.items() if not name.startswith("sink:")}
        entry["sinks"] = sinks
        return entry

    def set_status(self, delivery_id, status, **fields):
        """Set the overall status (and extra fields); leave the sweeper index once picked up."""
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(delivery_id), mapping={"status": status, **fields})
            pipe.zrem(self.RECEIVED, delivery_id)
            pipe.execute()

    def stuck(self, older_than, now=None, limit=500):
        """Delivery ids still "received" after ``older_than`` seconds."""
        cutoff = (time.time() if now is None else now) - older_than
        return self.redis.zrangebyscore(self.RECEIVED, "-inf", cutoff, start=0, num=limit)

    def touch_received(self, delivery_id, now=None):
        """Restart the sweeper's clock for a delivery it has just re-queued."""
        self.redis.zadd(self.RECEIVED, {delivery_id: time.time() if now is None else now}, xx=True)

    def ids(self, since=0):
        """Every delivery id in the ledger, oldest first."""
        return self.redis.zrangebyscore(self.ALL, since, "+inf")


class Quarantine:
    """Deliveries that passed authentication but not validation, kept for inspection."""

    KEY = PREFIX + "quarantine"

    def __init__(self, client):
        self.redis = client

    def add(self, event_type, body, reason, errors=None, delivery_id=None):
        item = {"event_type": event_type, "body": body, "reason": reason, "errors": errors,
                "delivery_id": delivery_id, "received_at": time.time()}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(self.KEY, json.dumps(item))
            pipe.ltrim(self.KEY, 0, QUARANTINE_LIMIT - 1)
            pipe.execute()

    def items(self, limit=100):
        """The newest quarantined deliveries first."""
        return [json.loads(raw) for raw in self.redis.lrange(self.KEY, 0, limit - 1)]


class MappingStore:
    """One sink's map of our location key → the remote system's id."""

    def __init__(self, client, sink):
        self.redis = client
        self.key = f"{PREFIX}map:{sink}"

    def get(self, key):
        return self.redis.hget(self.key, key)

    def set(self, key, remote_id):
        self.redis.hset(self.key, key, remote_id)

    def delete(self, key):
        self.redis.hdel(self.key, key)

    def all(self):
        return self.redis.hgetall(self.key)
