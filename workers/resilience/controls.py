"""Shared-by-all-workers protections, kept in Redis: retry timing, breakers, rate limits.

- ``retry_delay``: the retry schedule with jitter, never sooner than ``Retry-After`` (up to a day).
- ``RetryScheduler``: due retries wait in a sorted set that beat releases, so
  long delays never sit in the broker past its visibility timeout; retries held
  only by a sink's health go out early once it answers again.
- ``CircuitBreaker``: per sink; opens after N consecutive failures, lets one
  probe through after the cooldown, closes on success.
- ``RateLimiter``: a token bucket per sink shared by every worker.
- ``SlowCalls``: per sink and worker, the calls in flight, so a sink seen to be slow ties up at
  most half of a worker's pool.
- ``KeyLock``: the per-key write lock, renewed while its holder works, with a token that fences
  what the holder records once its call returns.
"""
import contextlib
import json
import logging
import math
import os
import random
import socket
import time
import typing
import uuid

from workers.celery_config import DELIVER
from workers.domain import json_text
from workers.store import keys
from workers.resilience.renewal import renewed

JITTER = 0.1
MAX_RETRY_AFTER = 86400  # the longest Retry-After honoured (see retry_delay)
log = logging.getLogger(__name__)


def longest_wait(schedule):
    """The longest one retry of ``schedule`` may wait: ``MAX_RETRY_AFTER`` for a Retry-After, or the
    schedule's longest step if longer."""
    return max(MAX_RETRY_AFTER, *schedule)


def retry_delay(schedule, attempt, retry_after=None, rng=random):
    """Seconds before retry number ``attempt`` (1-based), or None when the schedule is spent.
    Never sooner than ``retry_after``, up to ``longest_wait``: a remote asking for more (a clock off
    by a year, a month's ban) would have the delivery wait past the ledger's retention, forgotten
    while it waits."""
    if attempt >= len(schedule):
        return None
    base = schedule[attempt]
    delay = base + rng.uniform(0, base * JITTER)
    longest = longest_wait(schedule)
    if retry_after and retry_after > longest:
        log.warning("asked to wait %s s (Retry-After), longer than the relay waits: waiting %s s",
                    f"{retry_after:,.0f}", f"{longest:,.0f}")
        retry_after = longest
    return max(delay, retry_after or 0.0)


# A deliver retry that its sink's recovery may release early is also "held": in the sink's index
# (score: when it is due by the schedule). Taking a member out of the due set is the one gate, so
# releasers running at once (beat's release, a probe, a success releasing the sink's held work)
# never send the same retry twice. A member released before its due time leaves an "early" mark
# (sink|delivery|attempt, score: its due time), so a failure sends it back to its place without
# spending an attempt. Claimed members go to the claimed set; a claim whose releaser died before
# sending goes back to the due set once its lease is over: still at least once.
_CLAIM_ONE = json_text.LUA_DECODED + """
local function claim(member, now, out)
  local item = decoded(member)
  if item.task == ARGV[4] then
    local held = ARGV[5] .. item.args[2]
    local due = redis.call('ZSCORE', held, member)
    if due then
      redis.call('ZREM', held, member)
      if tonumber(due) > now then
        redis.call('ZADD', KEYS[3], due, item.args[2] .. '|' .. item.args[1] .. '|' .. item.args[5])
      end
    end
  end
  if redis.call('ZREM', KEYS[1], member) == 1 then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), member)
    table.insert(out, member)
  end
end
"""

# KEYS: due, claimed, early, probes. ARGV: now, limit, lease, deliver task, held prefix, probe every.
# A sink with held retries has its oldest one released as a probe every ``probe every`` seconds.
_CLAIM = _CLAIM_ONE + """
local now = tonumber(ARGV[1])
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZADD', KEYS[1], now, member)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local out = {}
for _, sink in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)) do
  local oldest = redis.call('ZRANGE', ARGV[5] .. sink, 0, 0)
  if #oldest == 0 then
    redis.call('ZREM', KEYS[4], sink)
  else
    claim(oldest[1], now, out)
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), sink)
  end
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  claim(member, now, out)
end
return out
"""

# KEYS: due, claimed, early, probes, breaker, breaker probe. ARGV: now, limit, lease, deliver task,
# held prefix, sink. The sink answered: close its breaker and claim its held retries, oldest first.
_RECOVERED = _CLAIM_ONE + """
local now = tonumber(ARGV[1])
redis.call('HSET', KEYS[5], 'state', 'closed', 'failures', 0)
redis.call('DEL', KEYS[6])
local held = ARGV[5] .. ARGV[6]
local out = {}
for _, member in ipairs(redis.call('ZRANGE', held, 0, tonumber(ARGV[2]) - 1)) do
  claim(member, now, out)
end
if redis.call('EXISTS', held) == 0 then redis.call('ZREM', KEYS[4], ARGV[6]) end
return out
"""

# KEYS: due, held, probes. ARGV: member, due, sink, first probe at.
_HOLD = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], 'NX', ARGV[4], ARGV[3])
"""

_TAKE_EARLY = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if due then redis.call('ZREM', KEYS[1], ARGV[1]) end
return due
"""


# Every member due after ARGV[1] that starts with ARGV[2] (a task's) becomes due at ARGV[1]. KEYS: the
# retries' sorted set. A prefix, not cjson: a member cjson cannot decode must not stop the others.
_BRING_FORWARD = """
local moved = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do
  if string.sub(member, 1, #ARGV[2]) == ARGV[2] then
    redis.call('ZADD', KEYS[1], ARGV[1], member)
    moved = moved + 1
  end
end
return moved
"""


def bring_forward(client, task_name, now=None):
    """Make every retry of ``task_name`` waiting in ``RetryScheduler``'s set due now (beat sends them
    within a second); return how many. For retries that waited on what an operator has just fixed."""
    now = time.time() if now is None else now
    prefix = RetryScheduler.member_prefix(task_name)
    return client.register_script(_BRING_FORWARD)(keys=[keys.RETRIES], args=[repr(now), prefix])


class RetryScheduler:
    """Tasks due later, held in a Redis sorted set until ``release_due`` sends them.

    Deliver retries held for a sink's health (``hold``) go out before their time once the sink
    answers again (``recovered``); while it has any, the oldest is released as a probe every
    ``PROBE_SECONDS``, so a sink that recovers while nothing else is sent to it is noticed.
    """

    KEY = keys.RETRIES
    CLAIMED = keys.RETRIES_CLAIMED
    HELD = keys.RETRIES_HELD  # + sink
    EARLY = keys.RETRIES_EARLY
    PROBES = keys.RETRIES_PROBES
    CLAIM_SECONDS = 30
    PROBE_SECONDS = 3.0

    def __init__(self, client, send_task):
        self.redis = client
        self.send_task = send_task
        self._claim = client.register_script(_CLAIM)
        self._recovered = client.register_script(_RECOVERED)
        self._hold = client.register_script(_HOLD)
        self._take_early = client.register_script(_TAKE_EARLY)

    def schedule(self, task_name, args, delay):
        """Send now when ``delay`` is 0, otherwise hold until it is due."""
        if delay <= 0:
            self.send_task(task_name, args=args)
            return
        self.redis.zadd(self.KEY, {self._member(task_name, args): time.time() + delay})

    def hold(self, args, delay, now=None):
        """Hold a deliver retry (``args`` of the deliver task) that waits only for its sink's health:
        due in ``delay`` seconds, or sooner once the sink answers again (a probe or ``recovered``)."""
        now = time.time() if now is None else now
        sink = args[1]
        self._hold(keys=[self.KEY, self.HELD + sink, self.PROBES],
                   args=[self._member(DELIVER, args), now + delay, sink, now + self.PROBE_SECONDS])

    def release_due(self, now=None, limit=500):
        """Send every task that is due, and each failing sink's probe when its time has come; return how many.

        Each task is claimed (atomically, so concurrent releasers share the work instead of
        each sending it) and its claim dropped only once sent: at least once, never twice at once.
        """
        now = time.time() if now is None else now
        return self._send(self._claim(keys=[self.KEY, self.CLAIMED, self.EARLY, self.PROBES],
                                      args=[now, limit, self.CLAIM_SECONDS, DELIVER, self.HELD,
                                            self.PROBE_SECONDS]))

    def recovered(self, sink, breaker, limit=100, now=None):
        """``sink`` answered: close its ``breaker`` and send its held retries now, oldest first, at most
        ``limit`` (each success releases the next ones); return how many were sent."""
        now = time.time() if now is None else now
        return self._send(self._recovered(
            keys=[self.KEY, self.CLAIMED, self.EARLY, self.PROBES, breaker.key, breaker.probe_key],
            args=[now, limit, self.CLAIM_SECONDS, DELIVER, self.HELD, sink]))

    def take_early(self, sink, delivery_id, attempt):
        """When a deliver released early was due by the schedule (epoch seconds), or None; the mark goes."""
        due = self._take_early(keys=[self.EARLY], args=[f"{sink}|{delivery_id}|{attempt}"])
        return None if due is None else float(due)

    def held(self, sink):
        """The deliver args held for ``sink``'s health with their schedule time, oldest first."""
        return [(json.loads(m)["args"], due) for m, due in self.redis.zrange(self.HELD + sink, 0, -1, withscores=True)]

    def pending(self):
        """Scheduled retries as (task, args, due) tuples, soonest first."""
        return [(json.loads(m)["task"], json.loads(m)["args"], due)
                for m, due in self.redis.zrange(self.KEY, 0, -1, withscores=True)]

    def _send(self, claimed):
        for member in claimed:
            item = json.loads(member)
            self.send_task(item["task"], args=item["args"])
            self.redis.zrem(self.CLAIMED, member)
        return len(claimed)

    @staticmethod
    def _member(task_name, args):
        return json.dumps({"task": task_name, "args": args, "id": uuid.uuid4().hex})

    @staticmethod
    def member_prefix(task_name):
        """How every member ``_member`` makes for ``task_name`` starts."""
        return json.dumps({"task": task_name})[:-1] + ", "  # the key ``_member`` writes first


_ADMIT_FN = """
local function admit(breaker, probe, now, cooldown)
  if redis.call('HGET', breaker, 'state') ~= 'open' then return 'closed', 0 end
  local wait = tonumber(redis.call('HGET', breaker, 'open_until')) - now
  if wait > 0 then return 'open', wait end
  if redis.call('SET', probe, '1', 'NX', 'EX', cooldown) then return 'probe', 0 end
  return 'open', 1
end
"""

_FAILURE = """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local state = redis.call('HGET', KEYS[1], 'state')
if failures >= tonumber(ARGV[1]) or state == 'open' then
  redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', tonumber(ARGV[2]) + tonumber(ARGV[3]))
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""


class CircuitBreaker:
    """One sink's breaker: closed → open (after ``threshold`` failures) → one probe → closed."""

    def __init__(self, client, sink, threshold=5, cooldown=30.0):
        self.redis = client
        self.key = keys.breaker(sink)
        self.probe_key = self.key + ":probe"
        self.threshold = threshold
        self.cooldown = cooldown
        self._admit_and_take = client.register_script(_ADMIT_AND_TAKE)
        self._failure = client.register_script(_FAILURE)

    def admit_and_take(self, limiter, held_key, calls, call, now=None):
        """The breaker's verdict for one write ("closed" or "probe" may go, "open" waits), then, unless
        it is open, "crowded" when the sink is slow and ``calls`` (``SlowCalls``) has as many in
        flight as it allows, else a token from ``limiter`` and ``call`` (a ``SlowCalls.Call``)
        counted in flight once it has one, in one step (an ``Admission``; ``held_key``: the sink's
        retries held for its health)."""
        now = time.time() if now is None else now
        verdict, wait, throttled, failing, slow = self._admit_and_take(
            keys=[self.key, self.probe_key, limiter.key, held_key, calls.key, calls.slow_key],
            args=[now, max(1, int(self.cooldown)), limiter.rate, limiter.burst, *calls.admission(call, now)])
        return Admission(verdict, float(wait), float(throttled), bool(failing), bool(slow))

    def failure(self, now=None):
        """Record a failure; return True if the breaker is (now) open."""
        return bool(self._failure(keys=[self.key, self.probe_key],
                                  args=[self.threshold, time.time() if now is None else now, self.cooldown]))

    def claim_probe(self):
        """Take the probe slot now, cooldown or not (a held retry released as the recovery probe);
        True when no other probe is in flight."""
        return bool(self.redis.set(self.probe_key, "1", nx=True, ex=max(1, int(self.cooldown))))

    def abandon_probe(self):
        """Give back the probe this caller was admitted with but did not use."""
        self.redis.delete(self.probe_key)

    def success(self):
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key, mapping={"state": "closed", "failures": 0})
            pipe.delete(self.probe_key)
            pipe.execute()

    def state(self):
        return self.redis.hget(self.key, "state") or "closed"


_TAKE_FN = """
local function take(bucket, rate, burst, now)
  local tokens = tonumber(redis.call('HGET', bucket, 'tokens') or burst)
  local stamp = tonumber(redis.call('HGET', bucket, 'stamp') or now)
  tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
  local wait = 0
  if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'stamp', tostring(now))
  redis.call('EXPIRE', bucket, math.ceil(burst / rate) + 60)
  return wait
end
"""
_TAKE = _TAKE_FN + """
return tostring(take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])))
"""

# KEYS: breaker, probe, bucket, held retries, calls in flight, slow mark. ARGV: now, cooldown, rate,
# burst, then the call's (``SlowCalls.admission``): member, slow since, calls allowed while slow,
# lapsed before, the marks' expiry. The breaker's verdict; unless open, "crowded" while the sink is
# slow (marked so, or a call in flight since before "slow since", which marks it) and as many calls
# as allowed are in flight; else a token, and the call counted in flight once it has one. A probe
# that may not go now is given back. "failing": the breaker is not closed, or the sink has failures
# counted or retries held for its health, so its next success has something to close or release;
# "slow": the sink is slow (not asked with the breaker open).
_ADMIT_AND_TAKE = _ADMIT_FN + _TAKE_FN + """
local now = tonumber(ARGV[1])
local verdict, wait = admit(KEYS[1], KEYS[2], now, ARGV[2])
local throttled, slow = 0, false
if verdict ~= 'open' then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[8])
  slow = redis.call('EXISTS', KEYS[6]) == 1
  if not slow and #redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', ARGV[6], 'LIMIT', 0, 1) > 0 then
    redis.call('SET', KEYS[6], '1', 'EX', ARGV[9])
    slow = true
  end
  if slow and redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[7]) then
    if verdict == 'probe' then redis.call('DEL', KEYS[2]) end
    verdict = 'crowded'
  else
    throttled = take(KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[4]), now)
    if throttled > 0 and verdict == 'probe' then redis.call('DEL', KEYS[2]) end
    if throttled == 0 then
      redis.call('ZADD', KEYS[5], now, ARGV[5])
      redis.call('EXPIRE', KEYS[5], ARGV[9])
    end
  end
end
local failing = verdict ~= 'closed' or tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') > 0
  or redis.call('EXISTS', KEYS[4]) == 1
return {verdict, tostring(wait), tostring(throttled), failing and 1 or 0, slow and 1 or 0}
"""


class Admission(typing.NamedTuple):
    """What ``CircuitBreaker.admit_and_take`` decided for one write."""

    verdict: str  # "closed" or "probe": may go (unless throttled); "open": wait ``wait`` seconds;
    # "crowded": wait for one of the sink's slow calls to end (``SlowCalls``)
    wait: float
    throttled: float  # seconds the rate limit holds it back (0: a token was taken)
    failing: bool  # breaker not closed, failures counted or retries held: a success has work to do
    slow: bool  # the sink is slow (``SlowCalls``): a success may release only as many as may be in flight


class RateLimiter:
    """A token bucket per sink in Redis: ``rate`` writes a second, bursts up to ``burst``."""

    def __init__(self, client, sink, rate=50.0, burst=100):
        self.key = keys.rate_bucket(sink)
        self.rate = rate
        self.burst = burst
        self._take = client.register_script(_TAKE)

    def take(self, now=None):
        """Take a token; return 0.0, or the seconds to wait when the bucket is empty."""
        return float(self._take(keys=[self.key], args=[self.rate, self.burst, time.time() if now is None else now]))


# KEYS: calls in flight, slow mark. ARGV: the call's member, now, slow after. A call that ended
# quicker than "slow after" says the sink is not slow (any more).
_CALL_ENDED = """
local started = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not started then return end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) - tonumber(started) < tonumber(ARGV[3]) then redis.call('DEL', KEYS[2]) end
"""


class SlowCalls:
    """A bulkhead per sink and worker, so a sink that hangs or crawls cannot take every process of a
    worker's pool. ``l2u:calls:<sink>:<worker>`` holds the calls to the sink in flight from the
    worker's processes, scored by when each started. A call in flight for over ``SLOW_AFTER``
    seconds marks the sink slow (``...:slow``) until one ends sooner; while it is, at most ``limit``
    calls go at once and the sink's next writes wait for its health instead. A call counts from its
    admission (``CircuitBreaker.admit_and_take``) to its outcome (``workers.pipeline.outcomes``); a
    killed caller's lapses after ``Call.lapse`` seconds, and so does the mark without calls."""

    SLOW_AFTER = 2.0
    # The worker this process belongs to and its pool's size: set at the worker's start-up
    # (``workers.app``), before its pool processes fork; a process of no worker counts as its own.
    worker = None
    processes = 4

    class Call(typing.NamedTuple):
        member: str  # the delivery and attempt making the call
        lapse: float  # seconds after which the call cannot still be running (its sink's settle time)

    def __init__(self, sink):
        self.key = keys.sink_calls(sink, self.worker or self.name_worker(os.getpid()))
        self.slow_key = self.key + ":slow"

    @staticmethod
    def name_worker(pid):
        """A worker's name in the keys: its host and main process."""
        return f"{socket.gethostname()}:{pid}"

    @property
    def limit(self):
        """Calls in flight at once while the sink is slow: half of the worker's pool (at least one)."""
        return max(1, self.processes // 2)

    @staticmethod
    def call(job, lapse=0.0):
        """The ``Call`` of ``job`` (a ``DeliverJob``)."""
        return SlowCalls.Call(f"{job.delivery_id}|{job.attempt}", lapse)

    def admission(self, call, now):
        """The admitting script's arguments for ``call`` at ``now``."""
        return [call.member, now - self.SLOW_AFTER, self.limit, now - call.lapse, math.ceil(call.lapse)]

    def ended(self, job, pipe, now=None):
        """On ``pipe``: ``job``'s call is over (nothing when it was never counted)."""
        pipe.eval(_CALL_ENDED, 2, self.key, self.slow_key, self.call(job).member,
                  repr(time.time() if now is None else now), self.SLOW_AFTER)


_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# The holder's last write went out without an answer: keep the key fenced until it cannot land.
# Either way the holder let go itself, so its writer mark (KEYS[2], member ARGV[4]) goes too.
_SETTLE_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[4])
return 1
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
return redis.call('DEL', KEYS[1])
"""


class KeyLock:
    """One writer per (sink, key) at a time: a Redis key holding the holder's random token, taken
    by ``VersionStore.begin`` in the same script as the version check.

    ``held()`` renews it every ``renew_every`` seconds while its body runs, so a sink call slower
    than the lock keeps it; a holder that dies stops renewing and the lock lapses between
    ``seconds - renew_every`` and ``seconds`` after its last request.
    The token is the fence: a store that checks it in the same script as a write (the version
    compare-and-set) knows whether the lock was still this holder's. Losing the lock never raises:
    ``lost`` says so, and the holder decides what that means.

    A write sent without an answer keeps the key ``settling`` (``settle``) under its ``writer``
    identity: that very write may take the key again and go out once more (it cannot reorder
    anything), any other waits. A holder that took the key so leaves it settling, for what is
    left of that time, when it lets go (``settles_until``).

    ``marks`` (a sorted set) holds the lock's writer mark, ``mark`` ("<token>:<location key>"),
    while it is taken (``VersionStore.begin`` adds it): letting go under the lock (``release``,
    ``settle``, the version record) drops it, so a mark left once the lock lapsed is a holder that
    vanished, perhaps after its request left (see ``sweeper.reassert_again``).
    """

    SETTLING = "settling"  # the value of a lock kept by ``settle``: "settling:<writer>"

    def __init__(self, client, name, seconds, renew_every, writer, marks, key):
        self.redis = client
        self.name = name
        self.millis = int(seconds * 1000)
        self.renew_every = renew_every
        self.token = uuid.uuid4().hex
        self.marks, self.mark = marks, f"{self.token}:{key}"
        self.settling = f"{self.SETTLING}:{writer}"
        self.settles_until = None  # epoch seconds: taken over from this write's own settle time
        self.lost = False
        self.released = False  # set by a store that released it in the same step as its write
        self._renew = client.register_script(_RENEW_LOCK)
        self._settle = client.register_script(_SETTLE_LOCK)
        self._release = client.register_script(_RELEASE_LOCK)

    def renew(self):
        """Extend the lock by its length; False (and ``lost``) once it is not this holder's."""
        if not self._renew(keys=[self.name], args=[self.token, self.millis]):
            self.lost = True
        return not self.lost

    def took_over(self, settle_millis):
        """The lock was taken from this writer's own settling key, ``settle_millis`` before it lapsed."""
        self.settles_until = time.time() + settle_millis / 1000 if settle_millis > 0 else None

    def settle_millis_left(self):
        """Milliseconds the key must stay settling after this holder lets go (0: none)."""
        return max(0, int((self.settles_until - time.time()) * 1000)) if self.settles_until else 0

    def release(self):
        """Free the lock if it is still this holder's (and not released already), or leave it settling
        for what is left of the time it was taken over with; True if it was this holder's."""
        if self.released:
            return False
        self.released = True
        left = self.settle_millis_left()
        if left:
            return bool(self._settle(keys=[self.name, self.marks], args=[self.token, left, self.settling, self.mark]))
        return bool(self._release(keys=[self.name, self.marks], args=[self.token, self.mark]))

    def settle(self, seconds):
        """Keep the key locked ``seconds`` more (at least what was left of a settle time it was taken
        over with) with no holder (``release`` then leaves it): a write sent without an answer may
        still land, and no other write may go out before it can't."""
        millis = max(int(seconds * 1000), self.settle_millis_left())
        return bool(self._settle(keys=[self.name, self.marks], args=[self.token, millis, self.settling, self.mark]))

    def busy_for(self):
        """Seconds until a lock kept by ``settle`` lapses; None when a live holder has it (or nobody)."""
        with self.redis.pipeline(transaction=False) as pipe:
            value, millis = pipe.get(self.name).pttl(self.name).execute()
        settling = value is not None and value.partition(":")[0] == self.SETTLING
        return max(0.0, millis / 1000) if settling else None

    @contextlib.contextmanager
    def held(self):
        """Renew the lock on the process's renewal thread while the body runs (a Redis error on the way: the
        lock may lapse, and the fence tells)."""
        with renewed(self.renew, self.renew_every, f"the lock {self.name}"):
            yield self
