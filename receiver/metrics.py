"""``GET /metrics``: receiver series (per gunicorn worker, merged) plus the workers' series from Redis.

While Redis cannot be read the scrape still answers, with the receiver's series (its 503s show the
outage) and ``l2u_redis_up 0`` instead of the workers' series.

Optionally protected: with ``RELAY_METRICS_TOKEN`` a scrape must send
``Authorization: Bearer <token>`` (Prometheus ``authorization``), with
``RELAY_METRICS_BASIC_AUTH`` (``user:password``) HTTP basic auth (Prometheus
``basic_auth``); either is accepted when both are set, compared in constant time.
"""
import glob
import hmac
import logging
import os
import time

import redis
from flask import Blueprint, Response, current_app, g, request
from prometheus_client import (REGISTRY, CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client import multiprocess

from receiver.errors import error_response
from workers.metrics import RedisMetricsCollector
from workers.sinks import configured_sink_names

bp = Blueprint("metrics", __name__)
log = logging.getLogger(__name__)

REQUESTS = Counter("l2u_receiver_requests", "Receiver requests by route and status", ["route", "status"])
ACK_SECONDS = Histogram("l2u_receiver_ack_seconds", "Seconds to answer a webhook delivery",
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
DUPLICATES = Counter("l2u_receiver_duplicates", "Deliveries recognised as duplicates")
REJECTIONS = Counter("l2u_receiver_rejections", "Deliveries rejected, by reason", ["reason"])


def init_app(app, redis_client, settings):
    app.extensions["l2u.metrics_collector"] = RedisMetricsCollector(redis_client, configured_sink_names(settings))
    app.before_request(_start_timer)
    app.after_request(_observe)
    app.register_blueprint(bp)


def _start_timer():
    g.l2u_started = time.perf_counter()


def _observe(response):
    route = request.url_rule.rule if request.url_rule else "unmatched"
    REQUESTS.labels(route, str(response.status_code)).inc()
    if request.endpoint == "webhooks.receive":
        ACK_SECONDS.observe(time.perf_counter() - g.l2u_started)
        if response.status_code >= 400:  # the error code the answer carries (``error_response``)
            REJECTIONS.labels(g.get("l2u_error", str(response.status_code))).inc()
        elif g.get("l2u_status") == "duplicate":
            DUPLICATES.inc()
    return response


@bp.get("/metrics")
def metrics():
    if not _authorized(current_app.extensions["l2u.settings"]):
        return error_response(401, "unauthorized", "this /metrics needs the credentials of RELAY_METRICS_TOKEN "
                                                   "(Authorization: Bearer) or RELAY_METRICS_BASIC_AUTH (basic auth)",
                              headers={"WWW-Authenticate": 'Bearer realm="metrics", Basic realm="metrics"'})
    text = generate_latest(_receiver_registry()) + _worker_series()
    # content_type, not mimetype: Flask would append a second "charset=utf-8" to the exposition format's own
    return Response(text, content_type=CONTENT_TYPE_LATEST)


def _worker_series():
    """The workers' series read from Redis, then ``l2u_redis_up`` saying whether they could be."""
    workers = CollectorRegistry()
    workers.register(current_app.extensions["l2u.metrics_collector"])
    try:
        text, up = generate_latest(workers), 1
    except redis.RedisError as exc:
        log.warning("/metrics without the workers' series: Redis failed (%s: %s)", type(exc).__name__, exc)
        text, up = b"", 0
    state = CollectorRegistry()
    Gauge("l2u_redis_up", "1 when this scrape could read the workers' series from Redis", registry=state).set(up)
    return text + generate_latest(state)


def _authorized(settings):
    """True when /metrics is open, or the request carries one of the configured credentials."""
    if not (settings.metrics_token or settings.metrics_basic_auth):
        return True
    auth = request.authorization
    if auth is None:
        return False
    if auth.type == "bearer" and settings.metrics_token:
        return hmac.compare_digest((auth.token or "").encode(), settings.metrics_token.encode())
    if auth.type == "basic" and settings.metrics_basic_auth:
        given = f"{auth.username or ''}:{auth.password or ''}".encode()
        return hmac.compare_digest(given, settings.metrics_basic_auth.encode())
    return False


def _receiver_registry():
    """Under gunicorn (multiprocess mode) the series of every worker process, merged."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    WrittenFilesCollector(registry)
    return registry


class WrittenFilesCollector(multiprocess.MultiProcessCollector):
    """The library's collector, without the files still empty: a worker process creates its file
    empty and sizes it a moment later, so a scrape in between, or any scrape after a worker killed
    in between, failed as a whole (prometheus/client_python#1199). An empty file holds no series."""

    def collect(self):
        return self.merge([path for path in glob.glob(os.path.join(self._path, "*.db")) if _written(path)],
                          accumulate=True)


def _written(path):
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:  # a dead process's live gauge file, removed since the listing
        return False
