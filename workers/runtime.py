"""Per-process collaborators of the tasks, built once from Settings after fork."""
import functools

from workers.celery_config import make_celery
from workers.config import Settings
from workers.metrics import WorkerMetrics
from workers.pipeline.routes import load_routes
from workers.resilience.admission import CircuitBreaker, RateLimiter, SlowCalls
from workers.resilience.retries import RetryScheduler
from workers.sinks import enabled_sinks
from workers.store.dead_letters import DeadLetterStore
from workers.store.ledger import Ledger
from workers.store.quarantine import Quarantine
from workers.store.queue_positions import ticketed
from workers.store.redis_client import connect
from workers.store.redis_messages import RedisTaskSender, broker_is_ledger_redis
from workers.store.versions import VersionStore


class Runtime:
    """Settings plus the stores, routes, sinks and clients the tasks use. Tasks go out through
    ``send_task``, each work message's queue ticket kept (``workers.store.queue_positions``)."""

    def __init__(self, settings, send_task):
        self.settings = settings
        self.redis = connect(settings.redis_url, settings.redis_ca_file, settings.redis_max_connections)
        self.ledger = Ledger(self.redis, history=settings.history_days * 86400)
        self.quarantine = Quarantine(self.redis, limit=settings.quarantine_limit)
        self.dead_letters = DeadLetterStore(self.redis)
        self.scheduler = RetryScheduler(self.redis, ticketed(send_task, self.redis))
        self.routes = load_routes(settings.routes_file)
        self.metrics = WorkerMetrics(self.redis)

    @functools.cached_property
    def broker(self):
        """A Celery app on the broker, to read its queues' lengths when it is not the ledger's Redis."""
        return make_celery(self.settings, "l2u-queue-lengths")

    @functools.cached_property
    def sinks(self):
        return enabled_sinks(self.settings, self.redis)

    @functools.cached_property
    def locate2u(self):
        from workers.locate2u.client import Locate2uClient

        return Locate2uClient.from_settings(self.settings, self.redis)

    @functools.cache
    def breaker(self, sink):
        return CircuitBreaker(self.redis, sink, **self.routes[sink].breaker)

    @functools.cache
    def limiter(self, sink):
        return RateLimiter(self.redis, sink, **self.routes[sink].rate_limit)

    @functools.cache
    def calls(self, sink):
        return SlowCalls(sink, bulkhead=getattr(self.sinks.get(sink), "bulkhead", True))

    @functools.cache
    def versions(self, sink):
        return VersionStore(self.redis, sink)


@functools.cache
def runtime():
    """The process-wide Runtime, read from the environment on first use.

    With the ledger's Redis as broker, tasks are sent by an LPUSH on the runtime's own Redis client
    (``RedisTaskSender``), so a worker child holds no broker connection.
    """
    from workers.app import app

    settings = Settings.from_env()
    send_task = RedisTaskSender(app, lambda: runtime().redis) if broker_is_ledger_redis(settings) else app.send_task
    return Runtime(settings, send_task)
