"""Celery tasks: thin, idempotent, JSON arguments only; the work is in ``workers.pipeline``.

Anything unexpected (a bug) is dead-lettered with its reason before the task
fails, so nothing accepted is lost even then; a Redis outage puts the message
back for redelivery instead (``pipeline.failures`` tells them apart).
"""
import contextlib
import logging

from celery import shared_task
from celery.signals import task_prerun
from celery.exceptions import Reject

from workers.celery_config import DELIVER, PROCESS_DELIVERY, RELEASE_DUE_RETRIES, REPLAY_DEAD_LETTERS, SWEEP_RECEIVED
from workers.logs import bind_context
from workers.pipeline import deliver as deliver_job, process, replay, sweeper
from workers.pipeline.failures import OutagePause, redis_outage
from workers.pipeline.jobs import DeliverJob
from workers.runtime import runtime

log = logging.getLogger(__name__)


@task_prerun.connect
def _bind_log_context(task=None, args=(), **_):
    """Every line logged while a task runs, Celery's own included, carries its delivery's context."""
    if task.name == PROCESS_DELIVERY:
        bind_context(delivery_id=args[0], event_type=args[1])
    elif task.name == DELIVER:
        job = DeliverJob(*args)
        bind_context(delivery_id=job.delivery_id, sink=job.sink, event_type=job.event_type)
    else:
        bind_context()


@shared_task(name=PROCESS_DELIVERY)
def process_delivery(delivery_id, event_type, attempt=0, replay=False, sinks=None):
    """Validate a recorded delivery and fan it out to its routed sinks (``pipeline.process``)."""
    with _redis_outage():
        return process.process(runtime(), delivery_id, event_type, attempt, replay, sinks)


@shared_task(name=DELIVER)
def deliver(delivery_id, sink, action, record, attempt=0, replay=False):
    """Apply one delivery to one sink (``pipeline.deliver``); the arguments are a ``DeliverJob``."""
    with _redis_outage():
        return deliver_job.deliver(runtime(), DeliverJob(delivery_id, sink, action, record, attempt, replay))


_OUTAGE_PAUSE = OutagePause()  # this process's


@contextlib.contextmanager
def _redis_outage():
    """A Redis or broker outage puts the message back for redelivery instead of failing the task,
    after a pause (``OutagePause``: a broker still up hands it straight back)."""
    try:
        yield
    except Exception as exc:
        if redis_outage(exc):
            _OUTAGE_PAUSE.wait()
            raise Reject(f"redis unavailable: {exc}", requeue=True) from exc
        _OUTAGE_PAUSE.reset()
        raise
    _OUTAGE_PAUSE.reset()


@shared_task(name=SWEEP_RECEIVED)
def sweep_received():
    """The one sweeper (``pipeline.sweeper``): housekeeping, then re-queue every delivery not final
    that made no progress for ``RELAY_SWEEP_AFTER`` and whose message is not waiting in the broker."""
    return sweeper.sweep(runtime())


@shared_task(name=REPLAY_DEAD_LETTERS)
def replay_dead_letters(batch):
    """Replay the dead letters an operator chose in the console (``pipeline.replay.replay_batch``)."""
    with _redis_outage():
        return replay.replay_batch(runtime(), batch)


@shared_task(name=RELEASE_DUE_RETRIES)
def release_due_retries():
    """Send the retries whose time has come, and the recovery probe of each sink with retries held
    for its health (beat sends it only when one is due, see ``RetriesDue``)."""
    return runtime().scheduler.release_due()
