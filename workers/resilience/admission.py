"""A sink's admission, shared by all workers and kept in Redis: may a write go to it now?

- ``CircuitBreaker``: per sink; opens after N consecutive failures, lets one
  probe through after the cooldown, closes on success.
- ``RateLimiter``: a token bucket per sink shared by every worker.
- ``SlowCalls``: per sink and worker, the calls in flight, so a sink seen to be slow ties up at
  most half of a worker's pool.

``CircuitBreaker.admit_and_take`` asks all three in one script.
"""
import math
import os
import socket
import time
import typing

from workers.store import keys
from workers.store.redis_client import on_pipeline


_ADMIT_FN = """
local function admit(breaker, probe, now, cooldown)
  if redis.call('HGET', breaker, 'state') ~= 'open' then return 'closed', 0 end
  local wait = tonumber(redis.call('HGET', breaker, 'open_until')) - now
  if wait > 0 then return 'open', wait end
  if redis.call('SET', probe, '1', 'NX', 'EX', cooldown) then return 'probe', 0 end
  return 'open', 1
end
"""

# KEYS: breaker, probe, calls in flight (``SlowCalls.key``). ARGV: now, probe seconds, then the call's
# (``SlowCalls.admission``): member, slow since, calls allowed at once, lapsed before, the calls'
# expiry; then busy since. The breaker's verdict; unless it is open, "slow" while a call has been in
# flight since before "slow since", "crowded" while as many calls as allowed have been since before
# "busy since" (any calls while failures are counted) (a probe taken is given back), else the call
# counted in flight.
_ADMIT = _ADMIT_FN + """
local now = tonumber(ARGV[1])
local verdict, wait = admit(KEYS[1], KEYS[2], now, ARGV[2])
if verdict == 'open' then return {verdict, tostring(wait)} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
local failing = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') > 0
local held = nil
if #redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[4], 'LIMIT', 0, 1) > 0 then held = 'slow'
elseif redis.call('ZCOUNT', KEYS[3], '-inf', failing and '+inf' or ARGV[8]) >= tonumber(ARGV[5]) then
  held = 'crowded'
end
if held then
  if verdict == 'probe' then redis.call('DEL', KEYS[2]) end
  return {held, '0'}
end
redis.call('ZADD', KEYS[3], now, ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[7])
return {verdict, tostring(wait)}
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

    def __init__(self, client, sink, threshold=5, cooldown=30.0, probe_seconds=None):
        self.redis = client
        self.key = keys.breaker(sink)
        self.probe_key = self.key + ":probe"
        self.threshold = threshold
        self.cooldown = cooldown
        # How long the one probe holds its slot (no other goes out meanwhile): as long as its call may
        # take, so a probe into a hang is not joined by others; by default the cooldown.
        self.probe_seconds = max(1, int(probe_seconds or cooldown))
        self._admit_and_take = client.register_script(_ADMIT_AND_TAKE)
        self._failure = client.register_script(_FAILURE)
        self._admit = client.register_script(_ADMIT)

    def admit_and_take(self, limiter, held_key, calls, call, now=None):
        """The breaker's verdict for one write ("closed" or "probe" may go, "open" waits), then, unless
        it is open, "crowded" when the sink is slow and ``calls`` (``SlowCalls``) has as many in
        flight as it allows, else a token from ``limiter`` and ``call`` (a ``SlowCalls.Call``)
        counted in flight once it has one, in one step (an ``Admission``; ``held_key``: the sink's
        retries held for its health)."""
        now = time.time() if now is None else now
        verdict, wait, throttled, failing, slow = self._admit_and_take(
            keys=[self.key, self.probe_key, limiter.key, held_key, calls.key, calls.slow_key],
            args=[now, self.probe_seconds, limiter.rate, limiter.burst, *calls.admission(call, now)])
        return Admission(verdict, float(wait), float(throttled), bool(failing), bool(slow))

    def admit(self, calls, call, busy_after, now=None):
        """``(verdict, wait)`` for one call, ``call`` (a ``SlowCalls.Call``) counted in ``calls`` (a
        ``SlowCalls``) once it may go: "closed" goes, "probe" goes as the one probe after the cooldown,
        "open" waits ``wait`` seconds (another probe is out: 1); "slow" while a call counted there has
        been in flight over ``SlowCalls.SLOW_AFTER`` seconds, and "crowded" while ``calls.limit`` have
        been over ``busy_after`` (or in flight at all while failures are counted: a burst into a URL
        that just failed), wait for them (``SlowCalls.ended``)."""
        now = time.time() if now is None else now
        verdict, wait = self._admit(keys=[self.key, self.probe_key, calls.key],
                                    args=[now, self.probe_seconds, *calls.admission(call, now), now - busy_after])
        return verdict, float(wait)

    def failure(self, now=None):
        """Record a failure; return True if the breaker is (now) open."""
        return bool(self._failure(keys=[self.key, self.probe_key],
                                  args=[self.threshold, time.time() if now is None else now, self.cooldown]))

    def claim_probe(self):
        """Take the probe slot now, cooldown or not (a held retry released as the recovery probe);
        True when no other probe is in flight."""
        return bool(self.redis.set(self.probe_key, "1", nx=True, ex=self.probe_seconds))

    def abandon_probe(self):
        """Give back the probe this caller was admitted with but did not use."""
        self.redis.delete(self.probe_key)

    def success(self, pipe=None):
        """Close the breaker (with ``pipe``, queued on it)."""
        with on_pipeline(self.redis, pipe, transaction=True) as queue:
            queue.hset(self.key, mapping={"state": "closed", "failures": 0})
            queue.delete(self.probe_key)

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

    def __init__(self, sink, bulkhead=True):
        self.key = keys.sink_calls(sink, self.worker or self.name_worker(os.getpid()))
        self.slow_key = self.key + ":slow"
        self.bulkhead = bulkhead  # False: the sink bounds its slow calls itself (``Sink.bulkhead``)

    @staticmethod
    def name_worker(pid):
        """A worker's name in the keys: its host and main process."""
        return f"{socket.gethostname()}:{pid}"

    @property
    def limit(self):
        """Calls in flight at once while the sink is slow: half of the worker's pool (at least one);
        the whole pool without a bulkhead."""
        return max(1, self.processes // 2) if self.bulkhead else self.processes

    @staticmethod
    def call(job, lapse=0.0):
        """The ``Call`` of ``job`` (a ``DeliverJob``)."""
        return SlowCalls.Call(f"{job.delivery_id}|{job.attempt}", lapse)

    def admission(self, call, now):
        """The admitting script's arguments for ``call`` at ``now``."""
        return [call.member, now - self.SLOW_AFTER, self.limit, now - call.lapse, math.ceil(call.lapse)]

    def ended(self, member, pipe, now=None):
        """On ``pipe`` (or a client, at once): the call ``member`` is over (nothing when it was never
        counted)."""
        pipe.eval(_CALL_ENDED, 2, self.key, self.slow_key, member, repr(time.time() if now is None else now),
                  self.SLOW_AFTER)
