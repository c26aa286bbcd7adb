"""Celery task events only while someone watches them (Redis broker).

Every receiver of Celery events (Flower, ``celery events``) listens with a Redis pattern subscription
(kombu's fanout is PUBLISH/PSUBSCRIBE), and with remote control and gossip off the relay's own
processes hold none, so ``PUBSUB NUMPAT`` > 0 means someone watches (or remote control is on, whose
mailbox is also a pattern subscription: then task events stay on). The worker's main process asks
every ``WATCH_SECONDS`` and sends task events (received, started, succeeded...) only then; worker
events (heartbeats) always go out. With another broker task events are always on.
"""
import logging
from urllib.parse import urlsplit

from celery import bootsteps
from redis.exceptions import RedisError

from workers.store.redis_messages import REDIS_SCHEMES

log = logging.getLogger(__name__)

WATCH_SECONDS = 5


class TaskEventsWhileWatched(bootsteps.StartStopStep):
    """Consumer step switching the event dispatcher's ``task`` group on and off by ``PUBSUB NUMPAT``.

    The check runs on the consumer's timer (the main process's event loop) over the dispatcher's own
    broker channel, whose pool gives back the connection events are published on: no new connection.
    """

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.enabled = urlsplit(c.app.conf.broker_url or "").scheme in REDIS_SCHEMES
        self.timer = None

    def start(self, c):
        # Celery's groups=None (task events on) sends every group: name the one always sent
        c.event_dispatcher.groups = {"worker"}
        self.watched = None  # off, and not yet logged
        self.check(c)
        self.timer = c.timer.call_repeatedly(WATCH_SECONDS, self.check, (c,))

    def stop(self, c):
        if self.timer:
            self.timer.cancel()
            self.timer = None

    shutdown = stop

    def check(self, c):
        """Ask the broker whether anyone holds a pattern subscription; switch task events to match."""
        dispatcher = c.event_dispatcher
        try:
            with dispatcher.producer.channel.conn_or_acquire() as client:
                watched = client.pubsub_numpat() > 0
        except RedisError as exc:
            log.warning("task events: could not ask the broker whether anyone watches, left %s: %s",
                        "on" if self.watched else "off", exc)
            return
        if watched:
            dispatcher.groups.add("task")
        else:
            dispatcher.groups.discard("task")
        if watched != self.watched:
            self.watched = watched
            log.info("task events on: an events watcher (Flower) is subscribed" if watched
                     else "task events off: nobody watches")
