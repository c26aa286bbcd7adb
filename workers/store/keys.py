"""Every Redis key and broker queue the relay uses, named in one place.

The relay's own keys start with ``PREFIX``; the broker's lists (kombu's Redis transport) start
with ``BROKER_KEY_PREFIX``, which the Celery configuration passes to kombu as its
``global_keyprefix``, so a queue's length is read from the list kombu really writes.
"""
PREFIX = "l2u:"
BROKER_KEY_PREFIX = ""

# Celery queues, and the Redis lists kombu keeps them in.
INGEST_QUEUE = "ingest"      # process_delivery: one message per accepted delivery
DELIVER_QUEUE = "deliver"    # deliver: a retried, resumed, replayed or repaired write to one sink
CONTROL_QUEUE = "control"    # the sweeper, the retry release (beat), subscription syncs, console replays
WORK_QUEUES = (INGEST_QUEUE, DELIVER_QUEUE)
KOMBU_UNACKED = BROKER_KEY_PREFIX + "unacked"  # kombu's hash of delivered, unacknowledged messages


def queue_list(queue):
    """The Redis list a Celery queue's messages wait in."""
    return BROKER_KEY_PREFIX + queue


def queued_counter(list_key):
    """How many messages were ever pushed onto ``list_key`` (``workers.store.queue_positions``)."""
    return f"{PREFIX}queued:{list_key}"


# The ledger (``workers.store.ledger.Ledger``).
def delivery(delivery_id):
    """The delivery's hash: body, status, per-sink outcomes."""
    return f"{PREFIX}delivery:{delivery_id}"


def dedup(delivery_id):
    return f"{PREFIX}dedup:{delivery_id}"


def trace(delivery_id):
    return f"{PREFIX}trace:{delivery_id}"


LEDGER_OPEN = PREFIX + "ledger:open"          # not final, scored by when next due to progress
LEDGER_RECEIVED = PREFIX + "ledger:received"  # older versions' index of received ones
LEDGER_ALL = PREFIX + "ledger:all"            # full entries, scored by receipt
LEDGER_FINAL = PREFIX + "ledger:final"        # settled, waiting to be compacted
SETTLED = PREFIX + "settled:"                 # + bucket start: compacted deliveries
QUARANTINE = PREFIX + "quarantine"
DEAD_LETTERS = PREFIX + "dlq"
DEAD_LETTER_COUNTS = PREFIX + "dlq:counts"
STOP_INDEX = PREFIX + "stopidx:"              # + kind:value (the console's stop search)
STOP_INDEX_WATERMARK = PREFIX + "stopidx:watermark"


# Per sink.
def mappings(sink, kind=""):
    """Location key → remote id (``kind`` "": the mapping; "applied", "written", "intent": its companions)."""
    return f"{PREFIX}map:{sink}" + (f":{kind}" if kind else "")


def versions(sink, kind=""):
    """Location key → newest applied version (``kind`` "writes": when each was last written)."""
    return f"{PREFIX}version:{sink}" + (f":{kind}" if kind else "")


def breaker(sink):
    return f"{PREFIX}breaker:{sink}"


def rate_bucket(sink):
    return f"{PREFIX}bucket:{sink}"


def sink_calls(sink, worker):
    """The calls to ``sink`` in flight from ``worker``'s processes (scored by when each started)."""
    return f"{PREFIX}calls:{sink}:{worker}"


def key_lock(sink, location_key):
    """Held while one write for this location is sent to this sink."""
    return f"{PREFIX}lock:{sink}:{location_key}"


def forward_sent(sink, webhook_id):
    """Which forward targets already took this event."""
    return f"{PREFIX}{sink}:sent:{webhook_id}"


def housekeeping_cursor(sink):
    return f"{PREFIX}housekeeping:locations:{sink}"


# Retries (``workers.resilience.retries.RetryScheduler``).
RETRIES = PREFIX + "retries"
RETRIES_CLAIMED = PREFIX + "retries:claimed"
RETRIES_HELD = PREFIX + "retries:held:"  # + sink
RETRIES_EARLY = PREFIX + "retries:early"
RETRIES_PROBES = PREFIX + "retries:probes"

# The worker.
SWEEP_LOCK = PREFIX + "sweep:running"
METRICS_COUNTERS = PREFIX + "metrics:counters"
METRICS_LATENCY = PREFIX + "metrics:latency:"  # + sink


def stop_cache(stop_id):
    """A stop record read from Locate2u, cached for a few seconds."""
    return f"{PREFIX}stop:{stop_id}"


# Locate2u (tokens, subscriptions).
LOCATE2U_TOKENS = PREFIX + "locate2u:tokens"
LOCATE2U_ACCOUNT = PREFIX + "locate2u:account"
LOCATE2U_PENDING_LINK = PREFIX + "locate2u:pending-link"
LOCATE2U_REAUTH = PREFIX + "locate2u:reauth"
LOCATE2U_TOKEN_LOCK = PREFIX + "locate2u:token-lock"
LOCATE2U_OAUTH_STATE = PREFIX + "locate2u:oauth-state:"  # + digest
LOCATE2U_OAUTH_LINK = PREFIX + "locate2u:oauth-link:"    # + digest
LOCATE2U_SYNC_LOCK = PREFIX + "locate2u:sync-lock"


# The operator console.
def console_login(remote_addr):
    return f"{PREFIX}console:login:{remote_addr}"


def console_session(session_id):
    """A console login's record (the operator's name), expiring with the login: logout deletes it."""
    return f"{PREFIX}console:session:{session_id}"


REPLAY_BATCHES = PREFIX + "console:replays"  # unfinished replay batches, scored by when they count as stalled


def replay_batch(batch):
    """A replay of many dead letters handed to the workers: the list of their ids."""
    return f"{PREFIX}console:replay:{batch}"


def replay_batch_progress(batch):
    """How far a replay batch has come: a hash of ``total`` and ``done``."""
    return f"{PREFIX}console:replay:{batch}:progress"
