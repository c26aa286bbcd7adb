"""Shared-by-all-workers protections, kept in Redis: retry timing, breakers, rate limits.

- ``retry_delay``: the retry schedule with jitter, never sooner than ``Retry-After``.
- ``RetryScheduler``: due retries wait in a sorted set that beat releases, so
  long delays never sit in the broker past its visibility timeout.
- ``CircuitBreaker``: per sink; opens after N consecutive failures, lets one
  probe through after the cooldown, closes on success.
- ``RateLimiter``: a token bucket per sink shared by every worker.
- ``KeyLock``: the per-key write lock, renewed while its holder works, with a token that fences
  what the holder records once its call returns.
"""
import contextlib
import json
import logging
import random
import threading
import time
import uuid

import redis

from workers.stores import PREFIX

JITTER = 0.1
log = logging.getLogger(__name__)


def retry_delay(schedule, attempt, retry_after=None, rng=random):
    """Seconds before retry number ``attempt`` (1-based), or None when the schedule is spent."""
    if attempt >= len(schedule):
        return None
    base = schedule[attempt]
    delay = base + rng.uniform(0, base * JITTER)
    return max(delay, retry_after or 0.0)


# Due members move to the claimed set in one step, so releasers running at once (a backlog of
# release tasks, several workers) never send the same retry twice. A claim whose releaser died
# before sending goes back to the due set once its lease is over: still at least once.
_CLAIM = """
local now = tonumber(ARGV[1])
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZADD', KEYS[1], now, member)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), member)
end
return due
"""


class RetryScheduler:
    """Tasks due later, held in a Redis sorted set until ``release_due`` sends them."""

    KEY = PREFIX + "retries"
    CLAIMED = PREFIX + "retries:claimed"
    CLAIM_SECONDS = 30

    def __init__(self, client, send_task):
        self.redis = client
        self.send_task = send_task
        self._claim = client.register_script(_CLAIM)

    def schedule(self, task_name, args, delay):
        """Send now when ``delay`` is 0, otherwise hold until it is due."""
        if delay <= 0:
            self.send_task(task_name, args=args)
            return
        member = json.dumps({"task": task_name, "args": args, "id": uuid.uuid4().hex})
        self.redis.zadd(self.KEY, {member: time.time() + delay})

    def release_due(self, now=None, limit=500):
        """Send every task that is due; return how many.

        Each due task is claimed (atomically, so concurrent releasers share the work instead of
        each sending it) and its claim dropped only once sent: at least once, never twice at once.
        """
        now = time.time() if now is None else now
        due = self._claim(keys=[self.KEY, self.CLAIMED], args=[now, limit, self.CLAIM_SECONDS])
        for member in due:
            item = json.loads(member)
            self.send_task(item["task"], args=item["args"])
            self.redis.zrem(self.CLAIMED, member)
        return len(due)

    def pending(self):
        """Scheduled retries as (task, args, due) tuples, soonest first."""
        return [(json.loads(m)["task"], json.loads(m)["args"], due)
                for m, due in self.redis.zrange(self.KEY, 0, -1, withscores=True)]


_ADMIT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'open' then return {'closed', '0'} end
local wait = tonumber(redis.call('HGET', KEYS[1], 'open_until')) - tonumber(ARGV[1])
if wait > 0 then return {'open', tostring(wait)} end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return {'probe', '0'} end
return {'open', '1'}
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
        self.key = f"{PREFIX}breaker:{sink}"
        self.probe_key = self.key + ":probe"
        self.threshold = threshold
        self.cooldown = cooldown
        self._admit = client.register_script(_ADMIT)
        self._failure = client.register_script(_FAILURE)

    def admit(self, now=None):
        """``(verdict, wait)``: "closed" or "probe" may proceed; "open" waits ``wait`` seconds."""
        verdict, wait = self._admit(keys=[self.key, self.probe_key],
                                    args=[time.time() if now is None else now, max(1, int(self.cooldown))])
        return verdict, float(wait)

    def failure(self, now=None):
        """Record a failure; return True if the breaker is (now) open."""
        return bool(self._failure(keys=[self.key, self.probe_key],
                                  args=[self.threshold, time.time() if now is None else now, self.cooldown]))

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


_TAKE = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or burst)
local stamp = tonumber(redis.call('HGET', KEYS[1], 'stamp') or now)
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return tostring(wait)
"""


class RateLimiter:
    """A token bucket per sink in Redis: ``rate`` writes a second, bursts up to ``burst``."""

    def __init__(self, client, sink, rate=50.0, burst=100):
        self.key = f"{PREFIX}bucket:{sink}"
        self.rate = rate
        self.burst = burst
        self._take = client.register_script(_TAKE)

    def take(self, now=None):
        """Take a token; return 0.0, or the seconds to wait when the bucket is empty."""
        return float(self._take(keys=[self.key], args=[self.rate, self.burst, time.time() if now is None else now]))


_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class KeyLock:
    """One writer per (sink, key) at a time: a Redis key holding the holder's random token.

    ``held()`` renews it every third of ``seconds`` while its body runs, so a sink call slower than
    the lock keeps it; a holder that dies stops renewing and the lock lapses within ``seconds``.
    The token is the fence: a store that checks it in the same script as a write (the version
    compare-and-set) knows whether the lock was still this holder's. Losing the lock never raises:
    ``lost`` says so, and the holder decides what that means.
    """

    def __init__(self, client, name, seconds):
        self.redis = client
        self.name = name
        self.millis = int(seconds * 1000)
        self.token = uuid.uuid4().hex
        self.lost = False
        self._renew = client.register_script(_RENEW_LOCK)
        self._release = client.register_script(_RELEASE_LOCK)

    def acquire(self):
        """Take the lock if it is free; True when taken."""
        return bool(self.redis.set(self.name, self.token, nx=True, px=self.millis))

    def renew(self):
        """Extend the lock by its length; False (and ``lost``) once it is not this holder's."""
        if not self._renew(keys=[self.name], args=[self.token, self.millis]):
            self.lost = True
        return not self.lost

    def release(self):
        """Free the lock if it is still this holder's; True if it was."""
        return bool(self._release(keys=[self.name], args=[self.token]))

    @contextlib.contextmanager
    def held(self):
        """Renew the lock in a background thread while the body runs."""
        stop = threading.Event()

        def keep():
            while not stop.wait(self.millis / 3000):
                try:
                    if not self.renew():
                        return
                except redis.RedisError as exc:  # Redis away for a moment; the lock may lapse, the fence tells
                    log.warning("could not renew the lock %s: %s", self.name, exc)

        renewer = threading.Thread(target=keep, name=f"renew-{self.name}", daemon=True)
        renewer.start()
        try:
            yield self
        finally:
            stop.set()
            renewer.join()
