"""Replaying a dead letter, and what became of it; replaying many in the workers (a replay batch)."""
import json
import logging
import secrets
import time

from workers.celery_config import PROCESS_DELIVERY, REPLAY_DEAD_LETTERS
from workers.pipeline.jobs import DeliverJob
from workers.pipeline.outcomes import DELIVER_STAGE, ENRICH
from workers.store import keys

log = logging.getLogger(__name__)
BATCH_SECONDS = 86400  # how long a replay batch's ids and progress are kept
BATCH_CHUNK = 500  # dead letters replayed between two records of a batch's progress


def replay_dead_letter(rt, entry):
    """Queue a dead letter again; it leaves the store once applied (or superseded by a newer write).

    A delivery gone from the ledger is first recorded again, whole, from the body and receipt time
    the dead letter kept. Enrich stage: processed again; route stage: routed again to its sink
    only; deliver stage: its kept record is sent again to its sink. Returns "queued", or why it
    cannot be replayed.
    """
    delivery_id, stage, sink = entry["delivery_id"], entry["stage"], entry["sink"]
    if not rt.redis.exists(rt.ledger.key(delivery_id)):
        if not entry.get("body"):
            return "not replayable: its delivery has left the ledger and this dead letter keeps no body"
        if not rt.ledger.record(delivery_id, entry["event_type"], entry["body"], 1, received_at=entry["received_at"]):
            return "not replayable: the ledger refused it again (its id is still within the dedup window)"
        rt.ledger.trace(delivery_id, "restored", reason="replayed from its dead letter")
    if stage == DELIVER_STAGE:
        rt.ledger.start_fan_out(delivery_id, [sink])
        rt.ledger.sink_outcome(delivery_id, sink, "pending", attempts=0, reason="replayed")
        DeliverJob(delivery_id, sink, entry["action"], entry["record"], replay=True).send(rt)
    else:
        only = [] if stage == ENRICH else [sink]  # kept in the entry too: the sweeper re-queues from it alone
        rt.ledger.set_status(delivery_id, "received", replay="1", replay_sinks=json.dumps(only))
        rt.scheduler.schedule(PROCESS_DELIVERY, [delivery_id, entry["event_type"], 0, True, only or None], 0)
    rt.ledger.trace(delivery_id, "replayed", sink=sink)
    return "queued"


def replay_outcome(rt, entry, since):
    """What became of ``entry`` (a dead letter as it was) replayed at ``since``: ``(outcome, detail)``,
    outcome "applied", "stale", "unrouted", "refused again" or, with no final outcome yet, "queued"."""
    again = rt.dead_letters.get(entry["id"])
    if again and again["at"] >= since:
        return "refused again", again["reason"]
    delivery = rt.ledger.get(entry["delivery_id"])
    if delivery is None:
        return "queued", "its delivery is not in the ledger"
    if entry["stage"] == ENRICH:
        refusals = [f"{name}: {outcome.get('reason', '')}" for name, outcome in sorted(delivery["sinks"].items())
                    if outcome["state"] == "dead_lettered" and outcome["at"] >= since]
        if refusals:
            return "refused again", "; ".join(refusals)
        status = delivery["status"]
        return (status, "") if status in ("applied", "stale", "unrouted") else ("queued", status)
    outcome = delivery["sinks"].get(entry["sink"], {})
    if outcome.get("state") in ("applied", "stale") and outcome["at"] >= since:
        return outcome["state"], ""
    return "queued", outcome.get("state", "")


def start_batch(rt, ids):
    """Keep the dead-letter ``ids`` as a replay batch and queue its replay for the workers (the
    ``replay_dead_letters`` task: a request never replays thousands itself); return the batch's id."""
    batch = secrets.token_urlsafe(12)
    with rt.redis.pipeline() as pipe:
        if ids:
            pipe.rpush(keys.replay_batch(batch), *ids)
            _watch(rt, pipe, batch)
        pipe.hset(keys.replay_batch_progress(batch), mapping={"total": len(ids), "done": 0})
        for key in (keys.replay_batch(batch), keys.replay_batch_progress(batch)):
            pipe.expire(key, BATCH_SECONDS)
        pipe.execute()
    if ids:
        rt.scheduler.schedule(REPLAY_DEAD_LETTERS, [batch], 0)
    return batch


def _watch(rt, client, batch, now=None):
    """(Re)start the sweeper's clock for ``batch`` (through ``client``, a pipeline or not): without
    progress for the visibility timeout (after which a dead worker's task comes back) plus
    ``sweep_after`` (a task waiting in the queue is not lost), its task counts as lost."""
    now = time.time() if now is None else now
    client.zadd(keys.REPLAY_BATCHES, {batch: now + rt.settings.visibility_timeout + rt.settings.sweep_after})


def resend_stalled(rt, now=None):
    """The sweeper's part: queue again the task of each unfinished replay batch whose clock
    (``_watch``) ran out (the broker lost it), and forget finished or expired batches; return how
    many were sent."""
    now = time.time() if now is None else now
    sent = 0
    for batch in rt.redis.zrangebyscore(keys.REPLAY_BATCHES, "-inf", now):
        done, total = batch_progress(rt, batch)
        if done >= total:  # finished, or expired with its progress
            rt.redis.zrem(keys.REPLAY_BATCHES, batch)
            continue
        _watch(rt, rt.redis, batch, now)
        rt.scheduler.schedule(REPLAY_DEAD_LETTERS, [batch], 0)
        log.warning("replay batch %s made no progress (%d of %d): its task is sent again", batch, done, total)
        sent += 1
    return sent


def replay_batch(rt, batch, chunk=BATCH_CHUNK, budget=None):
    """Replay a batch's dead letters (those still in the store) from where it stands, recording its
    progress after every ``chunk``: run again (its task redelivered after its worker died), it goes
    on from there, replaying at most that chunk twice, which the versions make harmless. After
    ``budget`` seconds (default: a quarter of the broker's visibility timeout, past which the broker
    would hand the running task to a second worker) it queues a task for the rest and returns.
    Returns how many this run replayed."""
    budget = rt.settings.visibility_timeout / 4 if budget is None else budget
    started, replayed = time.monotonic(), 0
    done, total = batch_progress(rt, batch)
    while ids := rt.redis.lrange(keys.replay_batch(batch), done, done + chunk - 1):
        for entry_id in ids:
            entry = rt.dead_letters.get(entry_id)
            if entry is not None:  # else applied or purged since the operator chose it
                replay_dead_letter(rt, entry)
                replayed += 1
        done += len(ids)
        with rt.redis.pipeline() as pipe:
            pipe.hset(keys.replay_batch_progress(batch), "done", done)
            if done < total:
                _watch(rt, pipe, batch)
            else:
                pipe.zrem(keys.REPLAY_BATCHES, batch)
            pipe.execute()
        if time.monotonic() - started >= budget and done < total:
            rt.scheduler.schedule(REPLAY_DEAD_LETTERS, [batch], 0)
            break
    log.info("replay batch %s: %d dead letter(s) replayed, %d of %d gone through", batch, replayed, done, total)
    return replayed


def batch_progress(rt, batch):
    """``(done, total)`` of a replay batch: how many of its dead letters the workers have gone through."""
    progress = rt.redis.hgetall(keys.replay_batch_progress(batch))
    return int(progress.get("done", 0)), int(progress.get("total", 0))


def batch_ids(rt, batch, count):
    """The ids of the first ``count`` dead letters of a replay batch."""
    return rt.redis.lrange(keys.replay_batch(batch), 0, count - 1) if count > 0 else []
