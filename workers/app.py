"""The Celery app (``celery -A workers.app worker|beat|flower|inspect``).

Run by hand in a checkout where ``l2u-relay run`` is running (no RELAY_WEBHOOK_SECRET
set), it takes that stack's settings; a configuration problem ends it with one
message naming the setting and exit 2, never a traceback.
"""
import logging
import os
import sys

import celery.apps.worker
from celery.apps.beat import Beat
from celery.signals import celeryd_after_setup, celeryd_init, setup_logging

from workers import warm_shutdown
from workers.celery_config import RELEASE_DUE_RETRIES, SWEEP_RECEIVED, SYNC_SUBSCRIPTIONS, make_celery
from workers.config import ConfigError, Settings
from workers.logs import configure_logging, say_as_json
from workers.pipeline.routes import load_routes
from workers.resilience.admission import SlowCalls
from workers.resilience.beat_schedules import RetriesDue
from workers.task_events import TaskEventsWhileWatched

MAX_SWEEP_INTERVAL = 30.0
RELEASE_INTERVAL = 1.0


def create_worker_app(settings=None):
    """The worker/beat Celery app: tasks from ``workers.tasks`` and the beat schedule."""
    settings = settings or Settings.from_env()
    load_routes(settings.routes_file)  # a bad routes file stops start-up, not a task
    app = make_celery(settings)
    app.conf.update(
        include=["workers.tasks", "workers.locate2u.tasks"],
        beat_schedule={
            "sweep-received": {"task": SWEEP_RECEIVED,
                               "schedule": min(MAX_SWEEP_INTERVAL, max(1.0, settings.sweep_after / 2))},
            # sent only when a retry is due (beat checks Redis every RELEASE_INTERVAL), so nothing is logged idle
            "release-due-retries": {"task": RELEASE_DUE_RETRIES,
                                    "schedule": RetriesDue(settings.redis_url, RELEASE_INTERVAL, settings.redis_ca_file)
                                    if settings.redis_url else RELEASE_INTERVAL},
            **({"sync-subscriptions": {"task": SYNC_SUBSCRIPTIONS, "schedule": settings.subscription_sync_interval}}
               if settings.locate2u_client_id else {}),
        },
        beat_schedule_filename=os.path.join(settings.data_dir, "celerybeat-schedule"),
        worker_send_task_events=True,  # the dispatcher's task group, toggled by TaskEventsWhileWatched
        task_send_sent_event=True,
        # Measured (README, Performance): tasks mostly wait on Redis and HTTP but still cost ~25 ms CPU per
        # event, so prefork (every core) beats the threads pool (one core per process); 4 children overlap
        # the waits better than the default of one per core. Fixed, not per core: a dyno may report the
        # host's cores. ``--concurrency`` overrides it.
        worker_pool="prefork",
        worker_concurrency=4,
    )
    setup_logging.connect(lambda **kwargs: configure_logging(settings), weak=False)
    celeryd_init.connect(lambda instance=None, **kwargs: _quiet_worker(instance, settings), weak=False)
    app.Beat = app.subclass_with_self(QuietBeat)
    app.steps["consumer"].add(TaskEventsWhileWatched)  # Redis broker: task events only while watched
    warm_shutdown.install()  # stops within a dyno's 30 s also when only the main process gets SIGTERM
    os.makedirs(settings.data_dir, exist_ok=True)
    return app


class QuietBeat(Beat):
    """``celery beat`` without its banner, which is not a JSON line (beat logs its start itself)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "quiet": True})


def _quiet_worker(worker, settings):
    """JSON logging from the worker's first line (its root-user warning comes before Celery's logging
    set-up); no banner, which is not a JSON line: ``_log_worker_start`` logs the same facts instead."""
    configure_logging(settings)
    worker.quiet = True
    celery.apps.worker.safe_say = say_as_json  # its shutdown notices, as JSON lines


@celeryd_after_setup.connect
def _log_worker_start(sender=None, instance=None, **_):
    logging.getLogger("celery.apps.worker").info("%s starting:\n%s", sender, instance.startup_info(artlines=False))


@celeryd_after_setup.connect
def _size_slow_call_limit(instance=None, **_):
    """A slow sink may take half of this worker's pool (``SlowCalls``); the pool processes fork after this."""
    SlowCalls.worker, SlowCalls.processes = SlowCalls.name_worker(os.getpid()), instance.concurrency


def _load():
    if not os.environ.get("RELAY_WEBHOOK_SECRET"):  # a command typed by hand: use the local stack's settings
        from workers.ops.devstack import stack_environment

        for name, value in stack_environment(os.environ).items():
            os.environ.setdefault(name, value)
    try:
        return create_worker_app()
    except ConfigError as exc:
        print(f"error: {exc}\n  (celery -A workers.app reads the relay's settings from the environment, "
              "or from a running `l2u-relay run` in this checkout)", file=sys.stderr)
        raise SystemExit(2) from None


app = _load()
