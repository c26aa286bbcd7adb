"""Celery tasks: thin, idempotent, JSON arguments only; the work is in ``workers.pipeline``.

Anything unexpected (a bug) is dead-lettered with its reason before the task
fails, so nothing accepted is lost even then; a Redis outage puts the message
back for redelivery instead (``pipeline.failures`` tells them apart).
"""
import contextlib
import functools
import logging
from urllib.parse import urlsplit

from celery import current_app, shared_task
from celery.signals import after_task_publish, task_prerun
from celery.exceptions import Reject

from workers.store import keys
from workers.celery_config import DELIVER, PROCESS_DELIVERY, RELEASE_DUE_RETRIES, SWEEP_RECEIVED
from workers.logs import bind_context
from workers.pipeline import deliver as deliver_job, process, sweeper
from workers.pipeline.failures import OutagePause, redis_outage
from workers.pipeline.jobs import DeliverJob
from workers.store.queue_positions import QueueTickets
from workers.store.redis_messages import REDIS_SCHEMES
from workers.runtime import runtime
from workers.store.stores import Ledger, connect

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


@after_task_publish.connect
def _keep_queue_ticket(sender=None, body=None, routing_key=None, redis_client=None, **_):
    """Each process_delivery or deliver message pushed onto a Redis broker's work queue bumps that
    queue's counter and leaves its ticket in its delivery's ledger entry (when the ledger is in the
    same Redis), so the sweeper can tell a queued message from a lost one. A worker process's
    ``RedisTaskSender`` passes the client it pushed with, so no second connection is opened."""
    if sender not in (PROCESS_DELIVERY, DELIVER) or routing_key not in keys.WORK_QUEUES:
        return
    client = redis_client or _redis_broker(current_app.conf.broker_url,
                                           (current_app.conf.broker_use_ssl or {}).get("ssl_ca_certs"))
    if client is None:
        return
    args = body[0]
    field = "queued" if sender == PROCESS_DELIVERY else f"queued:{args[1]}"
    QueueTickets(client).pushed(keys.queue_list(routing_key), Ledger.key(args[0]), field)


@functools.cache
def _redis_broker(url, ca_file):
    """A client of the broker when it is a Redis (verified against ``ca_file`` when set), else None."""
    return connect(url, ca_file, max_connections=1) if urlsplit(url or "").scheme in REDIS_SCHEMES else None


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


@shared_task(name=RELEASE_DUE_RETRIES)
def release_due_retries():
    """Send the retries whose time has come, and the recovery probe of each sink with retries held
    for its health (beat sends it only when one is due, see ``RetriesDue``)."""
    return runtime().scheduler.release_due()
