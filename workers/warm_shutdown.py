"""A worker's warm shutdown ends within a dyno's grace period (SIGTERM, then SIGKILL 30 s later).

Heroku sends SIGTERM to every process of a dyno: the pool children die at once and
their messages go back to the queue (``task_acks_late`` with
``task_reject_on_worker_lost``), so the worker stops promptly. A host that signals
only the main process gets Celery's warm shutdown instead, which waits for running
tasks however long their sink calls take (a LOCATE call may take 60 s). ``install``
bounds that wait: children still running ``grace`` seconds after the shutdown
began get the same SIGTERM, and their messages are redelivered the same way.
Sink writes are idempotent, so a call cut short is applied once when retried.
"""
import logging
import os
import signal
import threading

from celery.signals import worker_ready, worker_shutting_down

log = logging.getLogger(__name__)
GRACE_SECONDS = 20.0  # leaves time to hand the messages back and exit before SIGKILL at 30 s


def install(grace=GRACE_SECONDS):
    """Connect the Celery signal handlers that end a warm shutdown's wait after ``grace`` seconds."""
    pools = []

    def remember_pool(sender=None, **_):
        pools.append(sender.pool)

    def bound_wait(how=None, **_):
        if how == "Warm" and pools:
            timer = threading.Timer(grace, stop_children, [pools[-1], grace])
            timer.daemon = True  # never keeps a finished worker alive
            timer.start()

    worker_ready.connect(remember_pool, weak=False, dispatch_uid="l2u-warm-shutdown-pool")
    worker_shutting_down.connect(bound_wait, weak=False, dispatch_uid="l2u-warm-shutdown-bound")


def stop_children(pool, grace):
    """SIGTERM every pool child still alive: their running tasks' messages go back to the queue."""
    stopped = 0
    for pid in pool.info.get("processes", ()):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped += 1
        except ProcessLookupError:
            pass
    if stopped:
        log.warning("warm shutdown still waiting after %ss: stopped %d pool processes; their running tasks "
                    "are redelivered", grace, stopped)
