"""A worker on a Redis broker sends task events only while an events watcher (Flower, ``celery events``) is
subscribed; its heartbeats always go out.

Celery publishes each event on its own topic (kombu's fanout over Redis pub/sub). The test listens to the
exact topics of the task events and of the heartbeat with plain SUBSCRIBE, which no watcher uses and
``PUBSUB NUMPAT`` does not count, then PSUBSCRIBEs to the event pattern as every Celery events receiver does.
"""
import base64
import json
import time

import redis

from workers.celery_config import SWEEP_RECEIVED, make_celery
from workers.task_events import WATCH_SECONDS

EVENTS = "/0.celeryev/"  # kombu's fanout prefix for db 0, then the exchange
# the worker's event loop batches its task events on task.multi; without one each goes to its own topic
TASK_TOPICS = [f"{EVENTS}task.{name}" for name in ("multi", "received", "started", "succeeded")]
HEARTBEAT = f"{EVENTS}worker.heartbeat"
WATCHER_PATTERN = f"{EVENTS}*"  # what Flower's receiver subscribes to (routing key "#" as a Redis pattern)


def next_events(pubsub, timeout):
    """The events of the next message published to ``pubsub``'s subscriptions, as (topic, Celery event)
    pairs; [] if none comes within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message and message["type"] in ("message", "pmessage"):
            envelope = json.loads(message["data"])  # kombu's message: the event is its base64 JSON body
            body = json.loads(base64.b64decode(envelope["body"]))
            return [(message["channel"].decode(), event) for event in (body if isinstance(body, list) else [body])]
    return []


def events_until(pubsub, done, timeout):
    """Every event read until ``done(topic, event)``; fail if that takes more than ``timeout`` s."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        for topic, event in next_events(pubsub, deadline - time.monotonic()):
            seen.append((topic, event))
            if done(topic, event):
                return seen
    raise AssertionError(f"not seen within {timeout}s; events: {[event['type'] for _, event in seen]}")


def task_succeeded(pubsub, task_id, timeout):
    """Read ``pubsub`` until the ``task-succeeded`` event of ``task_id``; fail after ``timeout`` s."""
    events_until(pubsub, lambda topic, event: event["type"] == "task-succeeded" and event["uuid"] == task_id,
                 timeout)


def test_task_events_only_while_someone_watches(settings, redis_server, start_process):
    client = redis.Redis.from_url(redis_server.url)
    exact = client.pubsub()
    exact.subscribe(*TASK_TOPICS, HEARTBEAT)
    worker = start_process("worker", settings)
    sender = make_celery(settings, "task-events-test")
    watcher = client.pubsub()
    try:
        assert client.pubsub_numpat() == 0  # nobody watches: not the worker, not this test
        for _ in range(3):
            sender.send_task(SWEEP_RECEIVED)
        # a heartbeat counting 3 tasks done, none active, is published after their task events, were any sent
        seen = events_until(exact, lambda topic, event: topic == HEARTBEAT and event["processed"] >= 3
                            and event["active"] == 0, timeout=30)
        assert [event["type"] for topic, event in seen if topic != HEARTBEAT] == []
        assert "task events off: nobody watches" in worker.output()

        watcher.psubscribe(WATCHER_PATTERN)
        assert client.pubsub_numpat() == 1
        worker.wait_for_output("task events on: an events watcher (Flower) is subscribed",
                               timeout=2 * WATCH_SECONDS)
        task_id = sender.send_task(SWEEP_RECEIVED).id
        task_succeeded(watcher, task_id, timeout=15)
        task_succeeded(exact, task_id, timeout=5)  # the topics listened to while nobody watched
    finally:
        watcher.close()
        exact.close()
        sender.close()
        client.close()


def test_with_remote_control_on_task_events_stay_on(settings, redis_server, start_process):
    """Remote control's mailbox is a pattern subscription too, so a worker with it on counts as watched
    (README, Operations): task events go out with no events watcher at all."""
    client = redis.Redis.from_url(redis_server.url)
    exact = client.pubsub()
    exact.subscribe(*TASK_TOPICS)
    worker = start_process("worker", settings.replace(worker_remote_control=True))
    sender = make_celery(settings, "task-events-test")
    try:
        worker.wait_for_output("task events on: an events watcher (Flower) is subscribed", timeout=2 * WATCH_SECONDS)
        assert client.pubsub_numpat() >= 1  # the worker's own mailbox; this test holds plain subscriptions only
        task_succeeded(exact, sender.send_task(SWEEP_RECEIVED).id, timeout=15)
    finally:
        exact.close()
        sender.close()
        client.close()
