"""The dead-letter store: what could not be applied, with everything needed to explain and replay it."""
import json
import time

from workers.store import keys

# Dead letters: an entry, its place in the index and its sink's count change together. The id is
# "<delivery id>:<sink>" and a delivery id has no ":", so the sink is what follows the first ":".
# It is stamped with Redis's clock, one for every worker, so a letter recorded after another never
# looks older (a purge of "all" is bounded by the newest letter shown). ARGV[3]: the entry's JSON
# without its closing brace, to which "at" is added.
_DLQ_ADD = """
local now = redis.call('TIME')
local at = now[1] .. '.' .. string.format('%06d', now[2])
if redis.call('ZADD', KEYS[1], at, ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
redis.call('SET', KEYS[3], ARGV[3] .. ', "at": ' .. at .. '}')
return at
"""
_DLQ_DROP = """
-- DEL first: once a script has written, a full Redis (noeviction) lets it finish, so trimming frees memory
local removed = 0
for _, id in ipairs(ARGV) do
  removed = removed + redis.call('DEL', KEYS[1] .. ':' .. id)
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('HINCRBY', KEYS[2], string.sub(id, string.find(id, ':', 1, true) + 1), -1)
  end
end
return removed
"""
_DLQ_RECOUNT = """
local counts = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local sink = string.sub(id, string.find(id, ':', 1, true) + 1)
  counts[sink] = (counts[sink] or 0) + 1
end
local flat = {}
for sink, count in pairs(counts) do
  redis.call('HSET', KEYS[2], sink, count)
  table.insert(flat, sink)
  table.insert(flat, count)
end
return flat
"""


class DeadLetterStore:
    """What could not be applied, with everything needed to explain and replay it.

    One entry per (delivery, sink) — or (delivery, "enrich") when the event could
    not be turned into a location — so replaying twice cannot double it.
    """

    INDEX = keys.DEAD_LETTERS
    COUNTS = keys.DEAD_LETTER_COUNTS  # sink -> entries, kept as entries come and go (metrics read only this)

    def __init__(self, client):
        self.redis = client
        self._add = client.register_script(_DLQ_ADD)
        self._drop = client.register_script(_DLQ_DROP)
        self._recount = client.register_script(_DLQ_RECOUNT)

    @staticmethod
    def entry_id(delivery_id, sink):
        return f"{delivery_id}:{sink}"

    def add(self, delivery_id, sink, reason, **details):
        """Record (or replace) the dead letter of ``delivery_id`` at ``sink``; return its entry, with
        ``at``: when Redis recorded it."""
        entry_id = self.entry_id(delivery_id, sink)
        entry = {"id": entry_id, "delivery_id": delivery_id, "sink": sink, "reason": reason, **details}
        entry["at"] = float(self._add(keys=[self.INDEX, self.COUNTS, f"{self.INDEX}:{entry_id}"],
                                      args=[entry_id, sink, json.dumps(entry)[:-1]]))
        return entry

    def get(self, entry_id):
        raw = self.redis.get(f"{self.INDEX}:{entry_id}")
        return json.loads(raw) if raw else None

    def scan(self, sink=None, since=None, chunk=1000):
        """Entries oldest first, optionally for one sink and since an epoch time, read ``chunk`` at a
        time: what a caller does not keep is not held in memory (there may be a million)."""
        ids = self.redis.zrangebyscore(self.INDEX, since or "-inf", "+inf")
        for start in range(0, len(ids), chunk):
            raws = self.redis.mget([f"{self.INDEX}:{entry_id}" for entry_id in ids[start:start + chunk]])
            for raw in raws:
                entry = json.loads(raw) if raw else None  # None: removed since the index was read
                if entry is not None and (sink is None or entry["sink"] == sink):
                    yield entry

    def list(self, sink=None, since=None):
        """``scan``'s entries, as a list."""
        return list(self.scan(sink, since))

    def remove(self, entry_id):
        """Drop an entry (applied after replay, or purged); return True if it existed."""
        return bool(self.remove_many([entry_id]))

    def remove_many(self, entry_ids, chunk=500):
        """Drop entries, ``chunk`` per script call; return how many existed."""
        return sum(self._drop(keys=[self.INDEX, self.COUNTS], args=entry_ids[start:start + chunk])
                   for start in range(0, len(entry_ids), chunk))

    def trim(self, limit, max_age, now=None):
        """Drop entries older than ``max_age`` seconds, then the oldest beyond ``limit``; return how many."""
        cutoff = (time.time() if now is None else now) - max_age
        old = self.redis.zrangebyscore(self.INDEX, "-inf", cutoff)
        excess = max(0, self.redis.zcard(self.INDEX) - len(old) - limit)
        old += self.redis.zrange(self.INDEX, len(old), len(old) + excess - 1) if excess else []
        self.remove_many(old)
        return len(old)

    def counts(self):
        """Dead letters per sink, from the counts kept as entries come and go (O(sinks), not O(entries))."""
        counts = self.redis.hgetall(self.COUNTS)
        if not counts and self.redis.zcard(self.INDEX):  # entries from before the counts were kept
            counts = dict(zip(*[iter(self._recount(keys=[self.INDEX, self.COUNTS]))] * 2))
        return {sink: int(count) for sink, count in counts.items() if int(count) > 0}
