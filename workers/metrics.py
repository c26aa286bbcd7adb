"""Worker metrics, kept in Redis so every worker on every host adds to one set of series.

Worker dynos cannot be scraped on a Heroku-style host, and prefork children
do not share memory, so workers count into Redis hashes and the web process's
``/metrics`` reads them through ``RedisMetricsCollector`` together with live
gauges (queue depth, dead letters, breaker state).
"""
import json

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from workers.store import keys
from workers.store.dead_letters import DeadLetterStore
from workers.store.quarantine import Quarantine
from workers.store.redis_client import on_pipeline

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
COUNTERS = keys.METRICS_COUNTERS
LATENCY = keys.METRICS_LATENCY
_BUCKET = "in:"  # + a bucket's bound: observations whose smallest bucket it is
QUEUES = (keys.INGEST_QUEUE, keys.DELIVER_QUEUE, keys.CONTROL_QUEUE)

# counter name -> (help, label names)
COUNTER_HELP = {
    "l2u_worker_deliveries": ("Deliveries to sinks by outcome", ("sink", "outcome")),
    "l2u_worker_retries": ("Retries scheduled after a retriable error", ("sink",)),
    "l2u_worker_token_refreshes": ("Locate2u access tokens obtained from the identity server", ("grant",)),
}


class WorkerMetrics:
    """Counters and a latency histogram per sink, incremented in Redis."""

    def __init__(self, client):
        self.redis = client

    def incr(self, name, pipe=None, **labels):
        """Count one ``name`` event (with ``pipe``: queued on that pipeline)."""
        (pipe or self.redis).hincrby(COUNTERS, _field(name, labels), 1)

    def delivery(self, sink, outcome, latency=None, pipe=None):
        """Count one outcome; ``latency`` is receipt-to-applied seconds when it was applied (with
        ``pipe``: queued on that pipeline)."""
        with on_pipeline(self.redis, pipe) as queue:
            queue.hincrby(COUNTERS, _field("l2u_worker_deliveries", {"sink": sink, "outcome": outcome}), 1)
            if latency is not None:
                key = LATENCY + sink
                bound = next((bound for bound in LATENCY_BUCKETS if latency <= bound), None)
                if bound is not None:  # one field: the smallest bucket it fits, cumulated when collected
                    queue.hincrby(key, _BUCKET + repr(bound), 1)
                queue.hincrby(key, "count", 1)
                queue.hincrbyfloat(key, "sum", latency)


def _cumulative_buckets(data):
    """``[(le, count)]`` of a latency hash: the fields ``_BUCKET`` + bound count the observations whose
    smallest bucket it is; a bare bound's field holds a cumulative count an earlier version kept."""
    buckets, fitted = [], 0
    for bound in LATENCY_BUCKETS:
        fitted += int(data.get(_BUCKET + repr(bound), 0))
        buckets.append((repr(bound), fitted + int(data.get(repr(bound), 0))))
    return buckets + [("+Inf", int(data["count"]))]


def _field(name, labels):
    return json.dumps([name, sorted(labels.items())])


class RedisMetricsCollector:
    """Prometheus collector over the Redis-held worker metrics and live state."""

    def __init__(self, client, sinks):
        self.redis = client
        self.sinks = sinks

    def collect(self):
        yield from self._counters()
        yield from self._latency()
        depth = GaugeMetricFamily("l2u_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        for queue in QUEUES:
            depth.add_metric([queue], self.redis.llen(keys.queue_list(queue)))
        yield depth
        retries = GaugeMetricFamily("l2u_scheduled_retries", "Deliveries waiting for their retry time")
        retries.add_metric([], self.redis.zcard(keys.RETRIES))
        yield retries
        quarantined = GaugeMetricFamily("l2u_quarantined", "Deliveries kept in the quarantine (failed validation)")
        quarantined.add_metric([], self.redis.llen(Quarantine.KEY))
        yield quarantined
        dead = GaugeMetricFamily("l2u_dead_letters", "Dead letters waiting per sink", labels=["sink"])
        counts = DeadLetterStore(self.redis).counts()
        for sink in sorted(set(self.sinks) | set(counts)):
            dead.add_metric([sink], counts.get(sink, 0))
        yield dead
        breaker = GaugeMetricFamily("l2u_breaker_open", "1 while a sink's circuit breaker is open", labels=["sink"])
        for sink in self.sinks:
            breaker.add_metric([sink], 1 if self.redis.hget(keys.breaker(sink), "state") == "open" else 0)
        yield breaker

    def _counters(self):
        families = {name: CounterMetricFamily(name, help_, labels=labels)
                    for name, (help_, labels) in COUNTER_HELP.items()}
        for field, value in self.redis.hgetall(COUNTERS).items():
            name, labels = json.loads(field)
            family = families[name]
            family.add_metric([dict(labels)[label] for label in COUNTER_HELP[name][1]], int(value))
        yield from families.values()

    def _latency(self):
        family = HistogramMetricFamily("l2u_worker_receipt_to_applied_seconds",
                                       "Seconds from receipt at the webhook to applied at the sink", labels=["sink"])
        for sink in self.sinks:
            data = self.redis.hgetall(LATENCY + sink)
            if not data:
                continue
            family.add_metric([sink], _cumulative_buckets(data), float(data["sum"]))
        yield family
