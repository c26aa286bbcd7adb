"""One ``DeliverJob`` to one sink: breaker, rate limit, key lock and version check, the sink's
action, then applied / stale / waiting / retrying / dead-lettered (see ``outcomes``)."""
import hashlib
import json
import logging
import time

from workers.domain.locations import Location
from workers.logs import bound_context
from workers.pipeline.failures import bugs_dead_lettered, redis_outage
from workers.pipeline.jobs import DeliverJob
from workers.pipeline.outcomes import dead_letter, record
from workers.resilience.errors import CredentialsRefused, NoAnswer, NotYet, PermanentError, RelayError
from workers.resilience.key_lock import KeyLock
from workers.resilience.retries import retry_delay
from workers.store import keys
from workers.store.versions import WriteOrder

log = logging.getLogger(__name__)
DELIVER_LIST = keys.queue_list(keys.DELIVER_QUEUE)
LOCK_RENEW_SECONDS = 10  # how often a key lock is renewed while its holder's sink call runs
BUSY_RETRY_SECONDS = 1.0
# A write held while its slow sink has as many calls in flight as allowed goes out when a call to the
# sink succeeds (or as its probe); this is only the latest, so a long backlog is not sent round and round.
CROWDED_RETRY_SECONDS = 60.0


def lock_seconds(sink):
    """``(length, renew interval)`` of the key lock for ``sink``: a killed holder's lock lapses no
    sooner than the sink's settle time after its last request, which may still land until then."""
    return sink.settle_seconds + LOCK_RENEW_SECONDS, LOCK_RENEW_SECONDS


def deliver_to_sink(rt, job, received_at=None):
    """Apply one routed write; return the outcome (applied, stale, retrying, dead_lettered, waiting).

    Under the key's lock (renewed while the sink call runs): the lock taken together with the
    fenced version check right before the call, then the version compare-and-set (which frees the
    lock) after it. A write whose lock lapsed during the call (a frozen worker, Redis away longer
    than the lock) may have landed after a newer one, so the newest applied write is sent again
    (``reassert``). A write sent without an answer keeps the key locked for the sink's settle time
    (``KeyLock.settle``), as a killed holder's lock does, except for that same write sent again
    (its retry goes out as soon as the sink answers); on an ordered route only, as the rest of the
    fencing (an unordered route's writes may land in any order). ``received_at``: the delivery's receipt
    time when the caller has it (the fan-out), else it is read from the ledger.
    """
    sink, route = rt.sinks.get(job.sink), rt.routes[job.sink]
    if sink is None:
        return dead_letter(rt, job, job.attempt + 1, PermanentError(f"sink {job.sink} is not configured any more"))
    location = Location.from_json(job.record)
    versions = rt.versions(job.sink)
    lock = KeyLock(rt.redis, keys.key_lock(job.sink, location.key), *lock_seconds(sink), writer=_writer(job),
                   marks=versions.writers_key, key=location.key)
    received_at = _received_at(rt, job.delivery_id) if received_at is None else received_at
    order = WriteOrder.of(location.version, received_at, job.delivery_id)
    try:
        verdict = versions.begin(location.key, order, lock)
        if verdict == "busy":
            return _busy(rt, job, lock)
        with lock.held():
            if route.ordered and verdict == "stale":
                return record(rt, job, "stale", job.attempt, key=location.key)
            # Only a write that is really sent asks the breaker and the rate limit, so a stale one
            # never uses up the breaker's single probe (or a token) without calling the sink.
            breaker = rt.breaker(job.sink)
            held_back, early, release = _hold_back(rt, breaker, job, sink)
            if held_back:
                return _wait(rt, job, *held_back)
            started = time.time()
            try:
                remote_id = sink.apply(job.action, location, route.options)
            except NotYet as exc:  # the sink's own wait, nothing sent: not the sink's health
                if breaker.state() != "closed":  # past an open breaker only with its probe
                    breaker.abandon_probe()
                return _wait(rt, job, exc.retry_after, exc.message)
            except RelayError as exc:
                took = round(time.time() - started, 3)
                if lock.lost or not lock.renew():  # it may have landed after a newer write
                    reassert(rt, job.sink, location.key)
                elif isinstance(exc, NoAnswer) and route.ordered:
                    lock.settle(exc.settles_in)  # it may still land: nothing else goes out before
                if isinstance(exc, PermanentError):
                    breaker.success()
                    return dead_letter(rt, job, job.attempt + 1, exc, took=took)
                if exc.others_answer:  # one endpoint failed while another answers: the sink is not down
                    breaker.success()
                else:
                    breaker.failure()
                return _retry(rt, job, exc, early, took)
            took = round(time.time() - started, 3)
            recorded, held = versions.record(location.key, order, lock, job.action, job.record)
    finally:
        lock.release()
    if release:  # after the lock: a released write for this key need not wait for it
        _recovered(rt, breaker, job.sink, release)
    if route.ordered and (recorded == "older" or not held):
        reassert(rt, job.sink, location.key)
    if route.ordered and recorded == "older":  # a newer write was applied while this one was sent
        return record(rt, job, "stale", job.attempt + 1, key=location.key, took=took)
    return record(rt, job, "applied", job.attempt + 1, kept={"remote_id": remote_id}, received_at=received_at,
                  action=job.action, key=location.key, took=took)


def _writer(job):
    """Which write a settling key waits for: this delivery's ``action`` with exactly this record."""
    digest = hashlib.blake2b(json.dumps([job.action, job.record], sort_keys=True).encode(), digest_size=8)
    return f"{job.delivery_id}:{digest.hexdigest()}"


def _busy(rt, job, lock):
    """Another write holds the key (or one without an answer may still land): wait for it."""
    settling = lock.busy_for()
    if settling is not None:
        return _wait(rt, job, max(settling, BUSY_RETRY_SECONDS), "an earlier write for this key got no "
                     "answer and may still land")
    return _wait(rt, job, BUSY_RETRY_SECONDS, "another write for this key is in progress")


def _received_at(rt, delivery_id):
    """The delivery's receipt time, the tie-break between equal ``actionDate``s (0 once it left the ledger)."""
    received_at = rt.redis.hget(rt.ledger.key(delivery_id), "received_at")
    if received_at is None:
        entry = rt.ledger.get(delivery_id)
        received_at = entry and entry.get("received_at")
    return float(received_at or 0)


def reassert(rt, sink_name, key):
    """Send the newest applied write for ``key`` again, under a fresh lock: a write whose lock lapsed
    (or that a newer one overtook) may have landed last, and sink writes are idempotent. The key is
    marked first; the sweeper sends it once more every ``sweep_after`` until a write lands under
    its lock (the message may be lost, and the delivery has settled, so nothing else resends it),
    unless its queue ticket says it still waits behind a backlog. True when sent: a key with no write
    recorded (none landed yet, or its location was forgotten) has nothing to send."""
    versions = rt.versions(sink_name)
    newest = versions.newest(key)
    if newest is None:
        return False
    versions.reasserting(key, time.time() + rt.settings.sweep_after)
    DeliverJob(newest["delivery_id"], sink_name, newest["action"], newest["record"]).send(rt)
    pushed = rt.redis.get(keys.queued_counter(DELIVER_LIST))  # None only if no ticket could be kept
    if pushed is not None:  # at least this message's ticket: the sweeper tells queued from lost
        versions.reassert_queued(key, f"{DELIVER_LIST}:{pushed}")
    rt.ledger.trace(newest["delivery_id"], "reasserted", sink=sink_name, key=key)
    log.warning("a write for %s may have landed out of order; sending the newest again", key)
    return True


def _hold_back(rt, breaker, job, sink):
    """``(held_back, early, release)``: ``held_back`` is ``(seconds, why, for_health)`` when the
    breaker, the sink's slow calls (``SlowCalls``) or the rate limit hold the write back, else None.
    With the breaker open, a retry released before its time (a recovery probe) takes the breaker's
    probe slot, cooldown or not; ``early`` is then when the schedule had it due (see
    ``RetryScheduler``). ``release``: how many retries held for the sink's health a write that goes
    may send once it succeeds: none unless the sink was failing (breaker not closed, failures
    counted or retries held); a burst of its rate limit, or only as many as may be in flight while
    it is slow."""
    limiter, calls = rt.limiter(job.sink), rt.calls(job.sink)
    admission = breaker.admit_and_take(limiter, rt.scheduler.HELD + job.sink, calls,
                                       calls.call(job, sink.settle_seconds))
    burst = int(limiter.burst)
    if admission.verdict == "crowded":  # held for its health: released when it answers again
        return (CROWDED_RETRY_SECONDS, f"{job.sink} is slow: {calls.limit} calls to it are in flight from this "
                "worker", True), None, 0
    if admission.verdict != "open":
        held_back = (admission.throttled, "rate limited", False) if admission.throttled else None
        return held_back, None, admission.failing and (calls.limit if admission.slow else burst)
    early = rt.scheduler.take_early(job.sink, job.delivery_id, job.attempt)
    if early is None:
        return (admission.wait, "paused: circuit breaker open", True), None, 0
    if not breaker.claim_probe():  # another probe is in flight: back to its place
        return (max(0.0, early - time.time()), "paused: circuit breaker open", True), None, 0
    wait = limiter.take()
    if wait:  # another write may probe now instead of after the next cooldown
        breaker.abandon_probe()
        return (wait, "rate limited", False), None, 0
    return None, early, burst


def _recovered(rt, breaker, sink_name, limit):
    """The sink took a write: close its breaker and send at most ``limit`` of the retries held for its
    health (each of their successes releases the next ones)."""
    released = rt.scheduler.recovered(sink_name, breaker, limit=limit)
    if released:
        log.info("%s answers again: released %d held retries", sink_name, released)


def _wait(rt, job, delay, why, for_health=False):
    """Put the same attempt back for later without spending it (``for_health``: held for the sink's
    health, so it goes out early once the sink answers again)."""
    job.send(rt, delay, for_health)
    return record(rt, job, "waiting", job.attempt, kept={"reason": why, "next_in": round(delay, 1)})


def _retry(rt, job, exc, early=None, took=None):
    """Schedule the next attempt after a sink call that failed (``took`` seconds). A failure of the
    sink itself (5xx, timeout, credentials refused; no Retry-After) is held for the sink's health; a
    retry released early that failed so goes back to its place, its attempt not spent. A refusal of
    this delivery (429, Retry-After) keeps its schedule."""
    for_health = exc.retry_after is None and (exc.status is None or exc.status >= 500
                                              or isinstance(exc, CredentialsRefused))
    if for_health:
        early = early or rt.scheduler.take_early(job.sink, job.delivery_id, job.attempt)
        if early and early > time.time():
            rt.ledger.trace(job.delivery_id, "released early, failed again", sink=job.sink, error=exc.message,
                            status=exc.status, took=took)
            return _wait(rt, job, early - time.time(), f"released early, failed again: {exc.message}", True)
    delay = retry_delay(rt.settings.retry_schedule, job.attempt + 1, exc.retry_after)
    if delay is None:
        return dead_letter(rt, job, job.attempt + 1, exc, exhausted=True, took=took)
    job.next_attempt().send(rt, delay, for_health)
    return record(rt, job, "retrying", job.attempt + 1, kept={"reason": exc.message, "next_in": round(delay, 1)},
                  error=exc.message, status=exc.status, delay=round(delay, 1), took=took)


def deliver(rt, job, received_at=None):
    """The ``deliver`` task's work: ``deliver_to_sink``, with a bug dead-lettered for the job."""
    with bound_context(sink=job.sink), bugs_dead_lettered(lambda exc: dead_letter(rt, job, job.attempt + 1, exc)):
        return deliver_to_sink(rt, job, received_at)


def deliver_now(rt, job, received_at):
    """Deliver ``job`` in this process, as part of its fan-out (whose entry says when it was
    received): as the ``deliver`` task would, except that a bug, once dead-lettered for this job,
    lets the fan-out go on with the other sinks."""
    try:
        return deliver(rt, job, received_at)
    except Exception as exc:  # noqa: BLE001 - dead-lettered and logged with its traceback by ``deliver``
        if redis_outage(exc):
            raise
        return "dead_lettered"
