"""Per (sink, key) the newest write applied, compared and stored atomically (``VersionStore``), and
the order of two writes (``WriteOrder``)."""
import collections
import json
import logging
import math
import time

from workers.domain import json_text
from workers.domain.instants import exact_instant
from workers.store import keys
from workers.store.redis_client import on_pipeline

log = logging.getLogger(__name__)

MAX_CLOCK_AHEAD = 60  # seconds an actionDate may be after its delivery's receipt: clocks a little apart


class WriteOrder(collections.namedtuple("WriteOrder", "instant received_at delivery_id")):
    """Which of two writes for one key is newer: the later ``actionDate`` instant (to the nanosecond,
    as ``"<epoch seconds>.<nine digits>"``); for equal instants the later received (the ledger's
    ``received_at``), then the greater delivery id. Total, so any processing order ends in the same state.

    An ``actionDate`` more than ``MAX_CLOCK_AHEAD`` seconds after the delivery's receipt came from a
    clock ahead; it counts as the receipt time, or one wrong clock would make every real change stale
    until the time it named came."""

    @classmethod
    def of(cls, version, received_at, delivery_id):
        seconds, nanos = exact_instant(version)
        received_at = float(received_at)
        if received_at and seconds - received_at > MAX_CLOCK_AHEAD:
            log.warning("delivery %s: actionDate %s is %.0f s after its receipt (a clock ahead): ordered as "
                        "received", delivery_id, version, seconds - received_at)
            seconds = math.floor(received_at)
            nanos = min(int((received_at - seconds) * 1e9), 999_999_999)
        return cls(f"{seconds}.{nanos:09d}", received_at, delivery_id)


# The stored order of a key's newest write, and how another compares with it: both scripts
# below use this. KEYS: versions, writes, lock. ARGV: key, instant, received_at, delivery id, token.
_ORDER = json_text.LUA_DECODED + """
-- an instant "<seconds>.<fraction>" as two numbers, seconds and nanoseconds: one double cannot hold
-- both (a float's "<seconds>.<microseconds>", as recorded before nanoseconds were kept, reads the same)
local function instant(text)
  local seconds, fraction = string.match(text, '^(%-?%d+)%.?(%d*)')
  return tonumber(seconds), tonumber(string.sub(fraction .. '000000000', 1, 9))
end
local function stored(key)
  local at = redis.call('HGET', KEYS[1], key)
  if not at then return nil end
  local seconds, nanos = instant(at)
  local last = redis.call('HGET', KEYS[2], key)
  if not last then return {seconds, nanos, -1, ''} end  -- recorded before ties were broken
  last = decoded(last)
  return {seconds, nanos, tonumber(last.received_at), last.delivery_id}
end
local function compare(a, b)
  for i = 1, 4 do
    if a[i] < b[i] then return -1 elseif a[i] > b[i] then return 1 end
  end
  return 0
end
local seconds, nanos = instant(ARGV[2])
local mine = {seconds, nanos, tonumber(ARGV[3]), ARGV[4]}
local current = stored(ARGV[1])
local held = redis.call('GET', KEYS[3]) == ARGV[5]
"""

# Before the write, in one step: take the lock (ARGV[6]: its length in ms), also when it is this
# very write's own settle time (ARGV[7]: its settling value; it went out before without an
# answer), and mark its writer (KEYS[6], member ARGV[9]: the lock's mark, scored ARGV[8]: when
# the lock would lapse), then is the write not older than the newest applied? Returns the verdict and the
# ms of settle time the lock was taken over with.
_BEGIN_WRITE = """
local left = 0
if not redis.call('SET', KEYS[3], ARGV[5], 'NX', 'PX', ARGV[6]) then
  if redis.call('GET', KEYS[3]) ~= ARGV[7] then return {'busy', 0} end
  left = redis.call('PTTL', KEYS[3])
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
end
redis.call('ZADD', KEYS[6], ARGV[8], ARGV[9])
""" + _ORDER + """
if current and compare(mine, current) < 0 then return {'stale', left} end
return {'ok', left}
"""

# After the write: store it only if newer (ARGV[6]: the write as JSON); say whether the lock was
# still ours, and free it if so (or leave it settling, ARGV[8], for the ARGV[7] ms left of a
# settle time it was taken over with) with its writer mark (KEYS[6], ARGV[9]), then drop the
# key's reassert mark and its queue ticket (KEYS[4], KEYS[5]).
_RECORD_WRITE = _ORDER + """
local verdict = 'newer'
if current then
  local order = compare(mine, current)
  if order == 0 then verdict = 'same' elseif order < 0 then verdict = 'older' end
end
if verdict == 'newer' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[6])
end
if held then
  if tonumber(ARGV[7]) > 0 then redis.call('SET', KEYS[3], ARGV[8], 'PX', ARGV[7]) else redis.call('DEL', KEYS[3]) end
  redis.call('ZREM', KEYS[6], ARGV[9])
  -- the newest write (or a newer one) landed last under its lock: nothing is out of order any more
  if verdict ~= 'older' then
    redis.call('ZREM', KEYS[4], ARGV[1])
    redis.call('HDEL', KEYS[5], ARGV[1])
  end
end
return {verdict, held and 1 or 0}
"""

# The resend of the key's newest write (KEYS[2]: the writes; ARGV[2]: a delivery) changed course:
# held for later, its reassert mark (KEYS[1]) is due only at ARGV[3]; dead-lettered (ARGV[3]
# empty), the mark goes. Either way its queue ticket (KEYS[3]) is gone with its message. Nothing
# happens for a delivery that is not the newest write's.
_NEWEST_RESEND = json_text.LUA_DECODED + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local newest = redis.call('HGET', KEYS[2], ARGV[1])
if not newest or decoded(newest).delivery_id ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1]) else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""


class VersionStore:
    """Per (sink, key): the newest write applied, compared and stored atomically (never regressed).

    ``key`` (a hash) keeps its ``actionDate`` instant (``WriteOrder``); ``writes_key`` keeps its receipt
    time, delivery id, action and record, for the tie-break and to send it again when a write
    whose lock lapsed may have landed after it. ``reasserts_key`` (a sorted set) holds the keys
    whose newest write was sent again and has not landed since, scored by when to send it once
    more (the message may be lost). ``writers_key`` (a sorted set) holds the writer mark of each
    key lock taken (``KeyLock``), scored by when that lock would lapse; one left after it lapsed
    is a writer that vanished (``writers_vanished``).
    """

    def __init__(self, client, sink):
        self.redis = client
        self.key = keys.versions(sink)
        self.writes_key = self.key + ":writes"
        self.reasserts_key = keys.versions(sink, "reassert")  # housekeeping prunes these two with the key
        self.reassert_tickets_key = keys.versions(sink, "reassert:queued")  # key -> the resend's queue ticket
        self.writers_key = keys.versions(sink, "writing")
        self._begin = client.register_script(_BEGIN_WRITE)
        self._record = client.register_script(_RECORD_WRITE)

    def _call(self, script, key, order, lock, *extra):
        return script(keys=[self.key, self.writes_key, lock.name, self.reasserts_key, self.reassert_tickets_key,
                            lock.marks], args=[key, order.instant, repr(order.received_at), order.delivery_id,
                                               lock.token, *extra])

    def begin(self, key, order, lock):
        """Right before a write, in one step: take ``lock`` (also from this write's own settle time,
        see ``KeyLock``), then "busy" when another holder has it, "stale" (the lock taken) when a
        newer write is already applied, else "ok" (the lock taken)."""
        verdict, settle_millis = self._call(self._begin, key, order, lock, lock.millis, lock.settling,
                                            repr(time.time() + lock.millis / 1000), lock.mark)
        lock.released = verdict == "busy"  # another holder's: nothing for this one to release
        lock.took_over(settle_millis)
        return verdict

    def record(self, key, order, lock, action, record):
        """After a write: store it if newer than the newest (compare-and-set) and release ``lock``.
        Returns ``(verdict, held)``: verdict "newer", "same" (this delivery's write again) or "older"
        (a newer one was applied meanwhile); held is False when ``lock`` lapsed during the write."""
        write = json.dumps({"delivery_id": order.delivery_id, "received_at": order.received_at, "action": action,
                            "record": record})
        verdict, held = self._call(self._record, key, order, lock, write, lock.settle_millis_left(), lock.settling,
                                   lock.mark)
        lock.released = True
        return verdict, bool(held)

    def newest(self, key):
        """The newest write applied for ``key`` (delivery_id, received_at, action, record), or None."""
        raw = self.redis.hget(self.writes_key, key)
        return json.loads(raw) if raw else None

    def reasserting(self, key, again_at):
        """``key``'s newest write is being sent again: send it once more at ``again_at`` (epoch)
        unless a write recorded under its lock (``record``) or its dead letter drops the mark."""
        self.redis.zadd(self.reasserts_key, {key: again_at})

    def reassert_queued(self, key, ticket):
        """Keep the queue ticket (``workers.store.queue_positions``) of ``key``'s resend."""
        self.redis.hset(self.reassert_tickets_key, key, ticket)

    def reassert_held(self, key, delivery_id, again_at, pipe):
        """On ``pipe``: ``delivery_id``'s write for ``key`` is held for later; if it is the resend of
        the newest write, send that once more only at ``again_at`` (epoch), should it not land."""
        self._newest_resend(key, delivery_id, repr(again_at), pipe)

    def _newest_resend(self, key, delivery_id, again_at, pipe=None):
        script_keys = [self.reasserts_key, self.writes_key, self.reassert_tickets_key]
        with on_pipeline(self.redis, pipe) as queue:  # EVAL: a script object on a pipeline costs a round trip
            queue.eval(_NEWEST_RESEND, len(script_keys), *script_keys, key, delivery_id, again_at)

    def reasserts_due(self, now):
        """``{key: its resend's queue ticket or None}`` of the resends that have not landed by ``now``."""
        due = self.redis.zrangebyscore(self.reasserts_key, "-inf", now)
        return dict(zip(due, self.redis.hmget(self.reassert_tickets_key, due))) if due else {}

    def writers_vanished(self, lapsed_by):
        """``{writer mark: location key}`` of the key locks that lapsed by ``lapsed_by`` (epoch) and
        whose holder never let go under them: it died, or froze and may still send its write."""
        return {mark: mark.partition(":")[2] for mark in self.redis.zrangebyscore(self.writers_key, "-inf", lapsed_by)}

    def forget_writer(self, mark):
        """The vanished writer ``mark`` was dealt with (its key's newest write sent again)."""
        self.redis.zrem(self.writers_key, mark)

    def reassert_dead_lettered(self, key, delivery_id):
        """``delivery_id``'s write for ``key`` was dead-lettered: if it is the newest, stop sending it
        again (the dead letter is where it is kept now)."""
        self._newest_resend(key, delivery_id, "")
