"""The sink interface: one small class per downstream system.

A concrete sink sets ``name``, builds itself from Settings in
``from_settings`` and implements ``upsert`` and ``delete`` (and
``deactivate`` where the system has an active flag). The base owns the HTTP
client (session, timeouts, User-Agent, error classification), the key →
remote-id mapping and dispatch by action; the pipeline owns retries,
ordering, breakers and dead letters.
"""
import abc
import dataclasses

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

    def reconcile(self, since=None):
        """Compare the remote listing with our mappings, rebuild lost ones; return a ReconcileReport."""
        raise NotImplementedError(f"{self.name} does not support reconcile")

    def apply(self, action, location, options=None):
        """Run ``action`` for ``location`` with the route's ``options``. Not for overriding."""
        if action not in ACTIONS:
            raise PermanentError(f"unknown action {action!r} for sink {self.name}")
        merged = {**self.options, **(options or {})}
        return getattr(self, action)(location, merged)


@dataclasses.dataclass
class ReconcileReport:
    """What ``l2u-relay reconcile SINK`` found comparing our mappings with the remote listing.

    ``rebuilt``: mappings restored from the remote listing (key → remote id);
    ``missing_remote``: keys we map whose record is gone there;
    ``changed_remote``: keys whose remote record differs from what we wrote (key → fields);
    ``unknown_remote``: remote ids carrying our marker that we did not know about, or
    records without our marker (reported, never touched).
    """

    sink: str
    rebuilt: dict = dataclasses.field(default_factory=dict)
    missing_remote: list = dataclasses.field(default_factory=list)
    changed_remote: dict = dataclasses.field(default_factory=dict)
    unknown_remote: list = dataclasses.field(default_factory=list)
    scanned: int = 0

    def to_json(self):
        return dataclasses.asdict(self)
