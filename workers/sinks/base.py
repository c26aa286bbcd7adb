"""The sink interface: one small class per downstream system.

A concrete sink sets ``name``, builds itself from Settings in
``from_settings`` and implements ``upsert`` and ``delete`` (and
``deactivate`` where the system has an active flag). The base owns the HTTP
client (session, timeouts, User-Agent, error classification), the key →
remote-id mapping and dispatch by action; the pipeline owns retries,
ordering, breakers and dead letters.
"""
import abc

from workers.errors import PermanentError

ACTIONS = ("upsert", "deactivate", "delete")


class Sink(abc.ABC):
    """A downstream system that locations (or events) are written to."""

    name = None
    #: The settings attribute whose presence enables this sink.
    credential = None
    supports_deactivate = False

    def __init__(self, client, mappings, options=None):
        self.client = client
        self.mappings = mappings
        self.options = dict(options or {})

    @classmethod
    def enabled(cls, settings):
        return bool(getattr(settings, cls.credential))

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, settings, mappings):
        """Build the sink from Settings and its MappingStore."""

    @abc.abstractmethod
    def upsert(self, location, options):
        """Create or update ``location``; idempotent; return the remote id."""

    @abc.abstractmethod
    def delete(self, location, options):
        """Remove ``location``; deleting what is already gone succeeds."""

    def deactivate(self, location, options):
        """Mark ``location`` inactive; only for systems with an active flag."""
        raise PermanentError(f"{self.name} has no active flag; route cancellations to 'delete' instead")

    def apply(self, action, location, options=None):
        """Run ``action`` for ``location`` with the route's ``options``. Not for overriding."""
        if action not in ACTIONS:
            raise PermanentError(f"unknown action {action!r} for sink {self.name}")
        merged = {**self.options, **(options or {})}
        return getattr(self, action)(location, merged)
