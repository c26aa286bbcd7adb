"""Each sink's map of our location key to the remote system's id."""
from workers.store import keys

class MappingStore:
    """One sink's map of our location key → the remote system's id."""

    def __init__(self, client, sink):
        self.redis = client
        self.key = keys.mappings(sink)

    def get(self, key):
        return self.redis.hget(self.key, key)

    def set(self, key, remote_id):
        self.redis.hset(self.key, key, remote_id)

    def set_unless_held(self, key, value):
        """Set ``key`` to ``value`` unless it has a value already; return that value (None: set now).
        One transaction, so the value read is the one ``HSETNX`` found."""
        with self.redis.pipeline() as pipe:
            set_now, held = pipe.hsetnx(self.key, key, value).hget(self.key, key).execute()
        return None if set_now else held

    def delete(self, key):
        self.redis.hdel(self.key, key)

    def all(self):
        return self.redis.hgetall(self.key)
