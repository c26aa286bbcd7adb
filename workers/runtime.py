"""Per-process collaborators of the tasks, built once from Settings after fork."""
import functools

from workers.config import Settings
from workers.stores import Ledger, Quarantine, connect


class Runtime:
    """Settings plus the Redis-backed stores the tasks use."""

    def __init__(self, settings):
        self.settings = settings
        self.redis = connect(settings.redis_url)
        self.ledger = Ledger(self.redis)
        self.quarantine = Quarantine(self.redis)


@functools.cache
def runtime():
    """The process-wide Runtime, read from the environment on first use."""
    return Runtime(Settings.from_env())
