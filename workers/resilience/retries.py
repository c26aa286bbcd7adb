"""Retry timing, shared by all workers and kept in Redis.

- ``retry_delay``: the retry schedule with jitter, never sooner than ``Retry-After`` (up to a day).
- ``RetryScheduler``: due retries wait in a sorted set that beat releases, so
  long delays never sit in the broker past its visibility timeout; retries held
  only by a sink's health go out early once it answers again.

The sink's admission (breaker, rate limit, slow calls) is ``workers.resilience.admission``; the
per-key write lock ``workers.resilience.key_lock``.
"""
import json
import logging
import random
import time
import uuid

from workers.celery_config import DELIVER
from workers.domain import json_text
from workers.store import keys

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
