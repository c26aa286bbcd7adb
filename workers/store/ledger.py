"""The delivery ledger (with dedup): what was received, where each delivery stands, its history.

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
import dataclasses
import enum
import json
import time
import zlib

from workers.domain import json_text
from workers.store import keys
from workers.store.redis_client import on_pipeline

LEDGER_RETENTION = 14 * 86400
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
