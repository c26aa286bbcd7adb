"""Celery configuration built from Settings, shared by the worker, beat, Flower and the receiver.

The receiver builds a producer-only app from this (it hands work on by task
name and never imports task code); ``workers.app`` adds the tasks and beat.
A ``rediss://`` broker gets the TLS options of ``workers.store.redis_tls`` (Flower
reads them from here too); there is no result backend (results are ignored).
Each process keeps at most ``RELAY_BROKER_POOL_LIMIT`` pooled broker
connections (README, Scale: the connection budget).
"""
from celery import Celery
from kombu import Exchange, Queue

from workers.store.broker_redis import TRANSPORT
from workers.store import keys
from workers.store.keys import CONTROL_QUEUE, DELIVER_QUEUE, INGEST_QUEUE
from workers.store.redis_tls import tls_options

PROCESS_DELIVERY = "l2u.process_delivery"
DELIVER = "l2u.deliver"
SWEEP_RECEIVED = "l2u.sweep_received"
RELEASE_DUE_RETRIES = "l2u.release_due_retries"
SYNC_SUBSCRIPTIONS = "l2u.sync_subscriptions"
REPLAY_DEAD_LETTERS = "l2u.replay_dead_letters"

TASK_ROUTES = {
    PROCESS_DELIVERY: {"queue": INGEST_QUEUE},
    DELIVER: {"queue": DELIVER_QUEUE},
    SWEEP_RECEIVED: {"queue": CONTROL_QUEUE},
    RELEASE_DUE_RETRIES: {"queue": CONTROL_QUEUE},
    SYNC_SUBSCRIPTIONS: {"queue": CONTROL_QUEUE},
    REPLAY_DEAD_LETTERS: {"queue": CONTROL_QUEUE},
}


def celery_config(settings):
    """The Celery settings dict: JSON only, late acks, prefetch 1, bounded visibility, TLS for rediss://."""
    config = {
        "broker_url": settings.broker,
        # kombu's Redis transport, fixed to survive a Redis restart (workers/store/broker_redis.py)
        **({"broker_transport": TRANSPORT} if settings.broker.startswith(("redis://", "rediss://")) else {}),
        "broker_pool_limit": settings.broker_pool_limit,
        "broker_connection_retry_on_startup": True,
        # Retry a lost broker for as long as it takes: Celery's default (100 retries, ~47 min at kombu's
        # 2-30 s steps) made the worker exit during a long Redis outage, and Heroku then restarts a
        # crashed dyno only after ever longer cool-offs, so work waited after Redis was back.
        "broker_connection_max_retries": None,
        "broker_connection_timeout": 2,
        # Work held by a dead worker comes back after the visibility timeout; the sweep for it
        # runs every restore interval (kombu's default would scan only every 100 s).
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout,
                                     "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
                                     "unacked_restore_throttle": 1,
                                     # a worker killed while restoring holds kombu's restore lock this long
                                     "unacked_mutex_expire": 60,
                                     "socket_timeout": 5, "socket_connect_timeout": 2,
                                     "global_keyprefix": keys.BROKER_KEY_PREFIX},
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_routes": TASK_ROUTES,
        "task_default_queue": INGEST_QUEUE,
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name)
                        for name in (INGEST_QUEUE, DELIVER_QUEUE, CONTROL_QUEUE)],
        "task_publish_retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
        "worker_hijack_root_logger": False,
        # Off by default (connection budget, README Scale): remote control (celery inspect/control,
        # Flower's worker pages) costs each worker 3 Redis connections. Task events, which Flower needs,
        # go out on a Redis broker only while an events watcher is subscribed (workers/task_events.py;
        # remote control on counts as one), always on another broker; worker heartbeats always.
        "worker_enable_remote_control": settings.worker_remote_control,
        "enable_utc": True,
    }
    tls = tls_options(settings.broker, settings.redis_ca_file)
    if tls:
        config["broker_use_ssl"] = tls
    return config


def make_celery(settings, name="l2u-relay"):
    """A configured Celery app (no tasks registered)."""
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app
