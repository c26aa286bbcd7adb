"""Redis-backed stores: the delivery ledger (with dedup) and the quarantine.

Keys all start with ``l2u:``. The ledger keeps the raw delivery (event type,
body, received-at, status) in one hash per delivery; ``record()`` writes it,
the dedup key and the sweeper's index (and, from the receiver, the Celery
message) in one atomic round trip. Once a delivery is settled (applied, stale,
unrouted or quarantined), ``compact()`` moves its outcome and trace, without the
body, into one field of a hash per quarter hour of settling (``l2u:settled:<t>``),
which expires with the history retention and is trimmed oldest first when Redis
runs short of memory. A dead-lettered delivery keeps its full entry until the
ledger's retention, so a replay continues from it.
"""
import base64
import collections
import contextlib
import dataclasses
import enum
import json
import logging
import math
import time
import zlib

import redis

from workers.domain import json_text
from workers.domain.instants import exact_instant
from workers.store import keys
from workers.store.redis_tls import tls_options

log = logging.getLogger(__name__)

LEDGER_RETENTION = 14 * 86400
QUARANTINE_LIMIT = 1000
SETTLED_BUCKET_SECONDS = 900
# A settled delivery is compacted this long after it settled, so the trace lines written just
# after its final outcome are part of it.
SETTLE_GRACE = 15



class Status(str, enum.Enum):
    """A delivery's overall status in the ledger (a ``str``: it compares equal to its value)."""

    RECEIVED = "received"        # recorded and queued, not processed yet
    PROCESSING = "processing"    # a worker holds its processing lease
    RETRYING = "retrying"        # its stop fetch failed; process_delivery is scheduled again
    ROUTED = "routed"            # fanned out: each sink's outcome is under ``sinks``
    APPLIED = "applied"
    STALE = "stale"
    DEAD_LETTERED = "dead_lettered"
    QUARANTINED = "quarantined"
    UNROUTED = "unrouted"


# Final delivery states; anything else is still in progress.
FINAL_STATES = tuple(status.value for status in (Status.APPLIED, Status.STALE, Status.DEAD_LETTERED,
                                                  Status.QUARANTINED, Status.UNROUTED))
# Statuses process_delivery takes up: before the fan-out.
PROCESSABLE = (Status.RECEIVED.value, Status.RETRYING.value, Status.PROCESSING.value)
# Final per-sink outcomes.
FINAL_SINK_STATES = ("applied", "stale", "dead_lettered")


def progress_due(outcome):
    """When a sink with this outcome is due to make progress: its last outcome, or a retry's due time."""
    return outcome["at"] + outcome.get("next_in", 0)


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One delivery's ledger entry as the pipeline and the sweeper read it (``Ledger.entry``)."""

    delivery_id: str
    status: Status
    event_type: str
    body: str | None
    sinks: dict  # sink name -> its outcome: {"state", "at", "attempts", ...}
    attempt: int = 0
    lease: str | None = None
    lease_at: float = 0.0  # when the processing lease was taken or last renewed (epoch seconds)
    replay: bool = False
    replay_sinks: tuple | None = None  # set by a replay: only these sinks are routed again
    resumes: int = 0
    tickets: dict = dataclasses.field(default_factory=dict)  # "" (process_delivery) or sink -> queue ticket
    received_at: float = 0.0

    @classmethod
    def of(cls, fields):
        """The entry of a ``Ledger.get`` dict."""
        replay_sinks = fields.get("replay_sinks")
        return cls(delivery_id=fields["delivery_id"], status=Status(fields["status"]),
                   event_type=fields["event_type"], body=fields.get("body"), sinks=fields["sinks"],
                   attempt=int(fields.get("attempt", 0)), lease=fields.get("lease"),
                   lease_at=float(fields.get("lease_at") or 0),
                   replay=fields.get("replay") == "1",
                   replay_sinks=None if replay_sinks is None else tuple(json.loads(replay_sinks)),
                   resumes=int(fields.get("resumes", 0)), received_at=float(fields.get("received_at") or 0),
                   tickets={name.partition(":")[2]: ticket for name, ticket in fields.items()
                            if name == "queued" or name.startswith("queued:")})

    @property
    def final(self):
        return self.status in FINAL_STATES

    @property
    def processable(self):
        """Not fanned out yet: process_delivery takes it up."""
        return self.status in PROCESSABLE

    def open_sinks(self):
        """Sinks without a final outcome."""
        return [name for name, outcome in self.sinks.items() if outcome["state"] not in FINAL_SINK_STATES]

    def stalled_sinks(self, grace=0.0, now=None):
        """Open sinks that made no progress for ``grace`` seconds (a scheduled retry counts from its due time)."""
        now = time.time() if now is None else now
        return sorted(name for name in self.open_sinks() if progress_due(self.sinks[name]) + grace <= now)

    def next_progress(self):
        """When the earliest open sink is due to make progress (epoch seconds)."""
        return min((progress_due(self.sinks[name]) for name in self.open_sinks()), default=time.time())

    def fan_out_live(self, lease_seconds, now=None):
        """A routed delivery whose fan-out's worker renewed its lease within ``lease_seconds``: the
        fan-out is still writing in that worker (a slow or hung sink), so its pending sinks are not stalled."""
        now = time.time() if now is None else now
        return self.status == Status.ROUTED and self.lease_at + lease_seconds > now

    def resume_backoff(self, grace):
        """The sweeper's patience: ``grace`` doubled for each earlier resume of this fan-out, so one
        that only looks stalled (its deliver waits behind a backlog) never feeds the backlog."""
        return grace * 2 ** self.resumes
TRACE_LIMIT = 200
POOL_WAIT = 5  # seconds a thread waits for a free connection of a bounded pool

_RECORD = """
if redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[2]) == false then return 0 end
redis.call('HSET', KEYS[2], 'delivery_id', ARGV[1], 'event_type', ARGV[3], 'body', ARGV[4],
           'received_at', ARGV[5], 'status', 'received')
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
if KEYS[5] then
  redis.call('LPUSH', KEYS[5], ARGV[7])
  redis.call('HSET', KEYS[2], 'queued', ARGV[8] .. ':' .. redis.call('INCR', KEYS[6]))
end
return 1
"""

# Read the entry and take the processing lease: from "received" or "retrying", or from a holder
# whose lease lapsed (not renewed for ARGV[3] seconds). Returns {taken (1/0), the entry's fields as
# they were before}. KEYS: entry, OPEN. ARGV: id, token, lease seconds, now, attempt.
_CLAIM = """
local fields = redis.call('HGETALL', KEYS[1])
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'processing' then
  local renewed = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if renewed and tonumber(renewed) + tonumber(ARGV[3]) > tonumber(ARGV[4]) then return {0, fields} end
elseif status ~= 'received' and status ~= 'retrying' then
  return {0, fields}
end
redis.call('HSET', KEYS[1], 'status', 'processing', 'lease', ARGV[2], 'lease_at', ARGV[4], 'attempt', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return {1, fields}
"""

# The sweeper takes a due entry: restart its clock only if it is still due, so sweeps that
# overlap never both act on it. KEYS: OPEN. ARGV: id, cutoff, now.
_TAKE_DUE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

# While the lease ARGV[2] is held: push it forward (ARGV[4] = 'renew', kept as ``lease_at``), or end it and
# put the delivery back to "received" ('lapse'). The lease outlives "processing" into the fan-out it
# runs ("routed"): renewing it there says the fan-out's worker is alive, for the sweeper to leave
# it alone; the sweeper's clock is then the sinks' (their outcomes set it), so it is not moved.
# KEYS: entry, OPEN. ARGV: id, token, now, what.
_LEASE = """
local status = redis.call('HGET', KEYS[1], 'status')
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[2] or (status ~= 'processing' and status ~= 'routed') then return 0 end
if ARGV[4] == 'lapse' then
  if status ~= 'processing' then return 0 end
  redis.call('HSET', KEYS[1], 'status', 'received')
else
  redis.call('HSET', KEYS[1], 'lease_at', ARGV[3])
end
if status == 'processing' then redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1]) end
return 1
"""

# Record a sink's outcome only while the delivery's entry exists: a late write (a redelivered
# task after the delivery was compacted or expired) must not leave a fragment behind. Once every
# sink is final, settle the delivery (dead_lettered if any sink is, stale if all are, else applied);
# else the sweeper looks again when the least advanced open sink is due. Returns received_at.
# With ARGV[5] = 'open' it changes a sink still open only, else returns -1 (a resume that read the
# entry before the sink's write landed must not reopen it).
# KEYS: entry, OPEN, FINAL. ARGV: sink field, outcome JSON, now, delivery id, condition.
_SINK_OUTCOME = json_text.LUA_DECODED + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[5] == 'open' then
  local current = redis.call('HGET', KEYS[1], ARGV[1])
  local state = current and decoded(current)['state']
  if state == 'applied' or state == 'stale' or state == 'dead_lettered' then return -1 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local fields = redis.call('HGETALL', KEYS[1])
local received, due, final, dead, all_stale = '0', nil, true, false, true
for i = 1, #fields, 2 do
  local name = fields[i]
  if name == 'received_at' then
    received = fields[i + 1]
  elseif string.sub(name, 1, 5) == 'sink:' then
    local outcome = decoded(fields[i + 1])
    local state = outcome['state']
    if state == 'applied' or state == 'stale' or state == 'dead_lettered' then
      dead = dead or state == 'dead_lettered'
      all_stale = all_stale and state == 'stale'
    else
      final = false
      local next_in = outcome['next_in']
      local at = outcome['at'] + (type(next_in) == 'number' and next_in or 0)
      if due == nil or at < due then due = at end
    end
  end
end
if final then
  local status = dead and 'dead_lettered' or (all_stale and 'stale' or 'applied')
  redis.call('HSET', KEYS[1], 'status', status)
  redis.call('ZREM', KEYS[2], ARGV[4])
  if not dead then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4]) end
else
  redis.call('ZADD', KEYS[2], string.format('%.3f', due), ARGV[4])
end
return received
"""

# Move one settled delivery into its quarter-hour bucket, unless it changed since it was read.
# KEYS: entry, trace, bucket, ALL, FINAL, OPEN, RECEIVED; ARGV: id, packed, fields, lines, expire-at, status,
# bucket field.
_COMPACT = """
if redis.call('HLEN', KEYS[1]) ~= tonumber(ARGV[3]) or redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[4])
   or redis.call('HGET', KEYS[1], 'status') ~= ARGV[6] then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[7], ARGV[2])
redis.call('EXPIREAT', KEYS[3], ARGV[5])
redis.call('DEL', KEYS[1], KEYS[2])
for i = 4, 7 do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"""


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


class Ledger:
    """Every accepted delivery, its status and per-sink outcomes.

    Every delivery not final (received, processing, retrying, routed) is in ``OPEN``, scored by
    its last progress (received, lease renewed, sink outcome) or when its next step is due (a
    retry); the one sweeper reads only that index.
    """

    OPEN = keys.LEDGER_OPEN
    RECEIVED = keys.LEDGER_RECEIVED  # older versions' index of "received" ones; folded into OPEN
    ALL = keys.LEDGER_ALL  # every delivery with a full entry (not yet compacted), scored by receipt
    FINAL = keys.LEDGER_FINAL  # settled, waiting to be compacted; scored by when it settled
    SETTLED = keys.SETTLED  # + bucket start: compacted deliveries settled in that quarter hour
    COMPACTED = ("applied", "stale", "unrouted", "quarantined")  # final states that drop the body
    # Entry fields a compacted delivery keeps (besides status, event type, received-at, outcomes,
    # trace); the rest was working state of its processing (leases, queue tickets).
    KEPT_FIELDS = ("entity", "reason", "resumes")
    # Body fields a compacted delivery keeps, so it can still be found and ordered by stop.
    KEPT_BODY_FIELDS = ("stopId", "stopRef", "shipmentId", "tripId", "actionDate", "newStatus")

    def __init__(self, client, history=LEDGER_RETENTION):
        self.redis = client
        self.history_seconds = history  # how long a compacted delivery is kept
        self._record = client.register_script(_RECORD)
        self._claim = client.register_script(_CLAIM)
        self._lease = client.register_script(_LEASE)
        self._take_due = client.register_script(_TAKE_DUE)
        self._sink_outcome = client.register_script(_SINK_OUTCOME)
        self._compact = client.register_script(_COMPACT)

    @staticmethod
    def key(delivery_id):
        return keys.delivery(delivery_id)

    @staticmethod
    def dedup_key(delivery_id):
        return keys.dedup(delivery_id)

    def record(self, delivery_id, event_type, body, dedup_window, received_at=None, enqueue=None):
        """Record a new delivery; return False if it is a duplicate within the window.

        ``enqueue`` is an optional ``(list key, message)``: the message is LPUSHed (and its queue
        ticket kept, see ``workers.store.queue_positions``) by the same atomic script, so the delivery is
        recorded and queued together or not at all.
        """
        received_at = time.time() if received_at is None else received_at
        script_keys = [self.dedup_key(delivery_id), self.key(delivery_id), self.OPEN, self.ALL]
        args = [delivery_id, dedup_window, event_type, body, repr(received_at), LEDGER_RETENTION]
        if enqueue is not None:
            script_keys += [enqueue[0], keys.queued_counter(enqueue[0])]
            args += [enqueue[1], enqueue[0]]
        return bool(self._record(keys=script_keys, args=args))

    def release(self, delivery_id):
        """Undo ``record()`` (the hand-off failed), so the sender's retry is accepted."""
        with self.redis.pipeline() as pipe:
            pipe.delete(self.dedup_key(delivery_id), self.key(delivery_id))
            pipe.zrem(self.OPEN, delivery_id)
            pipe.zrem(self.ALL, delivery_id)
            pipe.execute()

    def get(self, delivery_id):
        """The ledger entry as a dict (sink outcomes under ``sinks``), or None.

        A compacted entry carries ``compacted: True``, and as ``body`` only the JSON of the body's
        ``KEPT_BODY_FIELDS``.
        """
        return self._found(delivery_id, self.redis.hgetall(self.key(delivery_id)))

    def _found(self, delivery_id, fields):
        """``get``'s answer from the entry's hash ``fields``: when they are empty, its settled record
        (compacted), or None."""
        if not fields:
            packed = self._settled_record(delivery_id)
            return _unpack(delivery_id, packed)[0] if packed else None
        return _entry(fields)

    def entry(self, delivery_id):
        """The entry as a ``LedgerEntry`` (a compacted one without its body), or None."""
        return _ledger_entry(delivery_id, self.get(delivery_id))

    def get_many(self, delivery_ids):
        """``{delivery id: entry}`` (as ``get`` gives them) for those of ``delivery_ids`` in the ledger,
        in a few round trips."""
        with self.redis.pipeline(transaction=False) as pipe:
            for delivery_id in delivery_ids:
                pipe.hgetall(self.key(delivery_id))
            found = {delivery_id: _entry(entry) for delivery_id, entry in zip(delivery_ids, pipe.execute()) if entry}
        missing = [delivery_id for delivery_id in delivery_ids if delivery_id not in found]
        for key in self.settled_buckets() if missing else ():
            for delivery_id, packed in zip(missing, self.redis.hmget(key, [_field(one) for one in missing])):
                if packed:
                    found[delivery_id] = _unpack(delivery_id, packed)[0]
        return found

    def set_status(self, delivery_id, status, due=None, **fields):
        """Set the overall status (and extra fields).

        A final status leaves the sweeper's index; any other stays in it, scored ``due`` (when
        its next step is due, e.g. a retry) or now.
        """
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(delivery_id), mapping={"status": status, **fields})
            if status in FINAL_STATES:
                pipe.zrem(self.OPEN, delivery_id)
            else:
                pipe.zadd(self.OPEN, {delivery_id: time.time() if due is None else due})
            if status in self.COMPACTED:
                pipe.zadd(self.FINAL, {delivery_id: time.time()})
            pipe.execute()

    def take_up(self, delivery_id, token, lease_seconds, attempt=0):
        """``(entry, claimed)`` in one round trip: the ``LedgerEntry`` as it was (None when it is
        not in the ledger), and whether the processing lease (status "processing") was taken; it is
        not when the delivery does not wait for processing, or a live holder renewed its lease
        within ``lease_seconds``."""
        claimed, fields = self._claim(keys=[self.key(delivery_id), self.OPEN],
                                      args=[delivery_id, token, lease_seconds, repr(time.time()), attempt])
        found = self._found(delivery_id, dict(zip(fields[::2], fields[1::2])))
        return _ledger_entry(delivery_id, found), bool(claimed)

    def renew(self, delivery_id, token):
        """Push the lease forward (its holder is alive and working); False once it is not held."""
        return bool(self._lease(keys=[self.key(delivery_id), self.OPEN],
                                args=[delivery_id, token, repr(time.time()), "renew"]))

    def lapse(self, delivery_id, token):
        """End a lease its holder stopped renewing: the delivery is "received" again, for the
        sweeper to queue; False if it moved on meanwhile."""
        return bool(self._lease(keys=[self.key(delivery_id), self.OPEN],
                                args=[delivery_id, token, repr(time.time()), "lapse"]))

    def start_fan_out(self, delivery_id, sinks, routed_to=None, steps=(), pipe=None, **fields):
        """Mark the delivery routed, every sink pending, before any of them is written to; with
        ``routed_to`` (the sinks that take it), its "routed" trace line goes in the same round trip,
        after the ``steps`` that led to it (``(at, what, details)`` lines: validated, enriched).
        With ``pipe`` (a transaction), queued on it."""
        now = time.time()
        pending = json.dumps({"state": "pending", "attempts": 0, "at": now})
        with on_pipeline(self.redis, pipe, transaction=True) as queue:
            queue.hset(self.key(delivery_id), mapping={"status": "routed", **fields,
                                                       **{f"sink:{sink}": pending for sink in sinks}})
            queue.zadd(self.OPEN, {delivery_id: now})
            if routed_to is not None:
                self.trace_lines(delivery_id, [*steps, (now, "routed", {"sinks": routed_to})], queue)

    def sink_outcome(self, delivery_id, sink, state, pipe=None, only_open=False, **details):
        """Record one sink's outcome; once every sink is final, the delivery settles (one script).

        Returns the delivery's received-at time (epoch seconds; 0.0 once it left the ledger), for
        latency metrics; with ``pipe``, the call is queued on that pipeline, whose reply it is.
        ``only_open``: leave a sink whose outcome is final as it is, and return -1.0.
        """
        outcome = json.dumps({"state": state, "at": time.time(), **details})
        script_keys = [self.key(delivery_id), self.OPEN, self.FINAL]
        args = [f"sink:{sink}", outcome, repr(time.time()), delivery_id, "open" if only_open else ""]
        if pipe is not None:  # EVAL: a script object on a pipeline costs a SCRIPT EXISTS round trip first
            pipe.eval(_SINK_OUTCOME, len(script_keys), *script_keys, *args)
            return None
        return float(self._sink_outcome(keys=script_keys, args=args) or 0)

    def trace(self, delivery_id, what, pipe=None, **details):
        """Append a line to the delivery's history (``l2u-relay deliveries show``, the console); with
        ``pipe``, queued on that pipeline."""
        self.trace_lines(delivery_id, [(time.time(), what, details)], pipe)

    def trace_lines(self, delivery_id, lines, pipe=None):
        """Append ``(at, what, details)`` lines to the delivery's history, as ``trace`` does one."""
        if not lines:
            return
        key = keys.trace(delivery_id)
        with on_pipeline(self.redis, pipe) as queue:
            queue.rpush(key, *(json.dumps({"at": at, "what": what, **details}) for at, what, details in lines))
            queue.ltrim(key, -TRACE_LIMIT, -1)
            queue.expire(key, LEDGER_RETENTION)

    def history(self, delivery_id):
        """The delivery's trace, oldest first (a compacted one's, then any line written after it)."""
        lines = [json.loads(line) for line in self.redis.lrange(keys.trace(delivery_id), 0, -1)]
        if self.redis.exists(self.key(delivery_id)):
            return lines
        packed = self._settled_record(delivery_id)
        return (_unpack(delivery_id, packed)[1] if packed else []) + lines

    def fold_legacy_index(self):
        """Move the ids an older version kept in ``RECEIVED`` into ``OPEN`` (upgrade, once)."""
        if self.redis.exists(self.RECEIVED):
            with self.redis.pipeline() as pipe:
                pipe.zunionstore(self.OPEN, [self.OPEN, self.RECEIVED], aggregate="MIN")
                pipe.delete(self.RECEIVED)
                pipe.execute()

    def stalled(self, older_than, now=None, limit=500):
        """Ids of deliveries not final that have made no progress for ``older_than`` seconds."""
        cutoff = (time.time() if now is None else now) - older_than
        return self.redis.zrangebyscore(self.OPEN, "-inf", cutoff, start=0, num=limit)

    def take_due(self, delivery_id, older_than):
        """For the sweeper: True (and the delivery's clock restarted) if it has still made no
        progress for ``older_than`` seconds; False if it moved on or another sweep took it."""
        now = time.time()
        return bool(self._take_due(keys=[self.OPEN], args=[delivery_id, repr(now - older_than), repr(now)]))

    def check_open_at(self, delivery_id, when):
        """Restart the sweeper's clock for a delivery: it counts as progressing at ``when``."""
        self.redis.zadd(self.OPEN, {delivery_id: when}, xx=True)

    def count_resume(self, delivery_id):
        """Count one resume of a stalled fan-out (the sweeper backs off by it)."""
        return self.redis.hincrby(self.key(delivery_id), "resumes", 1)

    def close_open(self, delivery_id):
        """Drop a delivery from the sweeper's index (settled, or gone from the ledger)."""
        self.redis.zrem(self.OPEN, delivery_id)

    def prune(self, now=None):
        """Forget ids older than the ledger's retention (their hashes have expired); return how many.

        The sweepers' own indexes drop such ids when they meet them.
        """
        cutoff = (time.time() if now is None else now) - LEDGER_RETENTION
        return self.redis.zremrangebyscore(self.ALL, "-inf", cutoff)

    def compact(self, now=None, grace=SETTLE_GRACE, limit=2000):
        """Move deliveries settled ``grace`` seconds ago into the settled buckets; return how many.

        What is kept (``_pack``): status, event type, received-at, ``KEPT_FIELDS``, every sink's
        outcome, the trace and the body's ``KEPT_BODY_FIELDS``. The rest of the body, the
        per-delivery keys and the index members go. An entry that changed since it was read
        waits for the next call.
        """
        now = time.time() if now is None else now
        settled_at = self.redis.zrangebyscore(self.FINAL, "-inf", now - grace, start=0, num=limit, withscores=True)
        if not settled_at:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for delivery_id, _ in settled_at:
                pipe.hgetall(self.key(delivery_id))
                pipe.lrange(keys.trace(delivery_id), 0, -1)
            replies = pipe.execute()
        settled = [entry.get("status") in self.COMPACTED for entry in replies[::2]]
        with self.redis.pipeline(transaction=False) as pipe:
            for (delivery_id, at), entry, lines, compacting in zip(settled_at, replies[::2], replies[1::2], settled):
                if not compacting:  # expired, or reopened since
                    pipe.zrem(self.FINAL, delivery_id)
                    continue
                # the bucket of when it settled: never one later than the clock that lists the buckets
                bucket = int(at // SETTLED_BUCKET_SECONDS) * SETTLED_BUCKET_SECONDS
                expire_at = bucket + SETTLED_BUCKET_SECONDS + self.history_seconds
                script_keys = [self.key(delivery_id), keys.trace(delivery_id), f"{self.SETTLED}{bucket}",
                               self.ALL, self.FINAL, self.OPEN, self.RECEIVED]
                self._compact(keys=script_keys, args=[delivery_id, _pack(entry, lines), len(entry), len(lines), expire_at,
                                                  entry["status"], _field(delivery_id)],
                              client=pipe)
            return sum(result for result, compacting in zip(pipe.execute(), settled) if compacting)

    def settled_buckets(self, now=None):
        """The settled buckets that exist, oldest first."""
        now = time.time() if now is None else now
        newest = int(now // SETTLED_BUCKET_SECONDS) * SETTLED_BUCKET_SECONDS
        oldest = newest - self.history_seconds - SETTLED_BUCKET_SECONDS
        buckets = [f"{self.SETTLED}{start}" for start in range(oldest, newest + 1, SETTLED_BUCKET_SECONDS)]
        with self.redis.pipeline(transaction=False) as pipe:
            for key in buckets:
                pipe.exists(key)
            return [key for key, exists in zip(buckets, pipe.execute()) if exists]

    def trim_history(self, enough):
        """Delete the oldest settled buckets until ``enough()`` is true; return how many deliveries went.

        Only compacted (settled) deliveries are ever trimmed; pending work is not touched.
        """
        dropped = 0
        for key in self.settled_buckets():
            if enough():
                break
            with self.redis.pipeline(transaction=False) as pipe:  # a full Redis refuses MULTI; not DEL
                pipe.hlen(key)
                pipe.delete(key)
                dropped += pipe.execute()[0]
        return dropped

    def _settled_record(self, delivery_id):
        buckets = self.settled_buckets()
        if not buckets:
            return None
        with self.redis.pipeline(transaction=False) as pipe:
            for key in buckets:
                pipe.hget(key, _field(delivery_id))
            return next((packed for packed in reversed(pipe.execute()) if packed), None)

    def compacted_ids(self, since=None, until=None):
        """Ids of compacted deliveries received between ``since`` and ``until``, newest first (a bucket at a time)."""
        for key in reversed(self.settled_buckets()):
            received = {_delivery_id(field): float(_unpack(field, packed)[0]["received_at"])
                        for field, packed in self.redis.hgetall(key).items()}
            yield from sorted((delivery_id for delivery_id, at in received.items()
                               if (since is None or at >= since) and (until is None or at <= until)),
                              key=received.get, reverse=True)

    def count(self):
        """How many deliveries the ledger holds, full entries and compacted ones."""
        buckets = self.settled_buckets()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.ALL)
            for key in buckets:
                pipe.hlen(key)
            return sum(pipe.execute())

    def ids(self, since=0):
        """Every delivery id in the ledger: compacted ones (by settling time), then full entries oldest first."""
        settled = [_delivery_id(field) for key in self.settled_buckets()
                   for field, packed in self.redis.hgetall(key).items()
                   if float(_unpack(field, packed)[0]["received_at"]) >= since]
        return settled + self.redis.zrangebyscore(self.ALL, since, "+inf")


# Words a settled entry is made of, for raw deflate to refer back to, by format letter: a 420-byte
# entry packs into under 100 characters. Never change one: packed entries in Redis are read with the
# dictionary of their letter. A new dictionary gets a new letter; ``_pack`` writes with ``_PACK_FORMAT``.
_WORDS = (
    b'"enrich retry","retry","resumed","replayed","restored","dead_lettered","quarantined","unrouted",'
    b'"reason":"retries exhausted: ","error":"status":,"delay":"next_in":"resumes":"waiting","pending",'
    b'"locate","deliverycom","forward","note.created","trip.created","trip.assigned","trip.status-changed",'
    b'"shipment.assigned","shipment.status-changed","stop.assigned","stop.status-changed",'
    b'{"entity":"trip"},{"entity":"shipment"},{"entity":"stop"},"shipmentId":"tripId":"Completed","Enroute",'
    b'{"storepoint":{"state":"stale","at":0.0,"attempts":1,"remote_id":"1"},'
    b'"b2b":{"state":"applied","at":0.0,"attempts":1,"remote_id":"1"}},')
_KEPT_BODY = b'{"stopId":1,"stopRef":"","actionDate":"2022-04-27T00:00:00.0000000+00:00","newStatus":"Arrived"}]'
_PACK_DICTIONARIES = {
    "z": _WORDS + (
        b'[[0.0,"routed",{"sinks":["storepoint","b2b"]}],[0.0,"applied",{"sink":"storepoint","action":"upsert",'
        b'"key":"l2u-stop-1"}],[0.0,"applied",{"sink":"b2b","action":"upsert","key":"l2u-stop-1"}]],') + _KEPT_BODY,
    # since the trace has the validated and enriched steps and each sink call's time
    "y": _WORDS + (
        b'"errors":"schema validation failed","released early, failed again",[0.0,"stale",'
        b'[[0.0,"validated"],[0.0,"enriched",{"from":"cache","took":0.0}],[0.0,"enriched",{"from":"locate2u",'
        b'"took":0.0}],[0.0,"routed",{"sinks":["storepoint","b2b"]}],[0.0,"applied",{"sink":"storepoint",'
        b'"action":"upsert","key":"l2u-stop-1","took":0.0}],[0.0,"applied",{"sink":"b2b","action":"upsert",'
        b'"key":"l2u-stop-1","took":0.0}]],') + _KEPT_BODY,
}
_PACK_FORMAT = "y"


def _deflater():
    return zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=_PACK_DICTIONARIES[_PACK_FORMAT])


def _field(delivery_id):
    """A delivery id as its field in a settled bucket: a SHA-256 id (64 hex digits, as the receiver
    makes them) as "~" and its 43 base64url characters, which Redis stores in 32 bytes less; any
    other id as it is."""
    if len(delivery_id) == 64 and set(delivery_id) <= set("0123456789abcdef"):
        return "~" + base64.urlsafe_b64encode(bytes.fromhex(delivery_id)).decode().rstrip("=")
    return delivery_id


def _delivery_id(field):
    """The delivery id of a settled bucket's field (``_field`` undone)."""
    return base64.urlsafe_b64decode(field[1:] + "=").hex() if field.startswith("~") else field


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


def _ledger_entry(delivery_id, found):
    """``found`` (as ``Ledger.get`` gives it) as a ``LedgerEntry``, or None."""
    return LedgerEntry.of({**found, "delivery_id": delivery_id}) if found else None


def _entry(fields):
    """A ledger hash as ``Ledger.get`` gives it: sink outcomes decoded under ``sinks``."""
    entry = {name: value for name, value in fields.items() if not name.startswith("sink:")}
    entry["sinks"] = {name[5:]: json.loads(value) for name, value in fields.items() if name.startswith("sink:")}
    return entry


def _pack(entry, lines):
    """A settled entry (``Ledger.KEPT_FIELDS`` of its fields, ``KEPT_BODY_FIELDS`` of its body) and its
    trace as a short string: JSON with times relative to receipt, raw-deflated against
    the dictionary of ``_PACK_FORMAT``, in base85 after that format letter."""
    received = float(entry["received_at"])
    fields = {name: entry[name] for name in Ledger.KEPT_FIELDS if name in entry}
    body = json.loads(entry.get("body") or "{}")
    kept = {name: body[name] for name in Ledger.KEPT_BODY_FIELDS
            if isinstance(body, dict) and body.get(name) is not None}
    sinks = {}
    for name, raw in entry.items():
        if name.startswith("sink:"):
            outcome = json.loads(raw)
            sinks[name[5:]] = {**outcome, "at": round(outcome["at"] - received, 3)}
    trace = []
    for raw in lines:
        line = json.loads(raw)
        trace.append([round(line.pop("at") - received, 3), line.pop("what")] + ([line] if line else []))
    text = json.dumps([entry["status"], entry["event_type"], round(received, 3), fields, sinks, trace, kept],
                      separators=(",", ":"))
    deflater = _deflater()
    return _PACK_FORMAT + base64.b85encode(deflater.compress(text.encode()) + deflater.flush()).decode()


def _unpack(delivery_id, packed):
    """``(entry, trace)`` as ``Ledger.get`` and ``Ledger.history`` give them, from ``_pack``'s text."""
    inflater = zlib.decompressobj(-15, zdict=_PACK_DICTIONARIES[packed[0]])
    text = inflater.decompress(base64.b85decode(packed[1:])) + inflater.flush()
    status, event_type, received, fields, sinks, trace, kept = json.loads(text)
    entry = {"delivery_id": delivery_id, "event_type": event_type, "received_at": repr(received), "status": status,
             **fields, "compacted": True, "body": json.dumps(kept),
             "sinks": {name: {**outcome, "at": received + outcome["at"]} for name, outcome in sinks.items()}}
    history = [{"at": received + line[0], "what": line[1], **(line[2] if len(line) > 2 else {})} for line in trace]
    return entry, history


class Quarantine:
    """Deliveries that passed authentication but not validation, kept for inspection."""

    KEY = keys.QUARANTINE

    def __init__(self, client, limit=QUARANTINE_LIMIT):
        self.redis = client
        self.limit = limit  # the newest this many are kept

    def add(self, event_type, body, reason, errors=None, delivery_id=None):
        item = {"event_type": event_type, "body": body, "reason": reason, "errors": errors,
                "delivery_id": delivery_id, "received_at": time.time()}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(self.KEY, json.dumps(item))
            pipe.ltrim(self.KEY, 0, self.limit - 1)
            pipe.execute()

    def items(self, limit=100):
        """The newest quarantined deliveries first."""
        return [json.loads(raw) for raw in self.redis.lrange(self.KEY, 0, limit - 1)]


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


# Dead letters: an entry, its place in the index and its sink's count change together. The id is
# "<delivery id>:<sink>" and a delivery id has no ":", so the sink is what follows the first ":".
_DLQ_ADD = """
if redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[2], ARGV[3], 1) end
redis.call('SET', KEYS[3], ARGV[4])
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
        entry_id = self.entry_id(delivery_id, sink)
        entry = {"id": entry_id, "delivery_id": delivery_id, "sink": sink, "reason": reason,
                 "at": time.time(), **details}
        self._add(keys=[self.INDEX, self.COUNTS, f"{self.INDEX}:{entry_id}"],
                  args=[entry_id, entry["at"], sink, json.dumps(entry)])
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
