"""The sink interface: one small class per downstream system.

A concrete sink sets ``name``, describes itself (its ``settings``, which of
them enable it and what they then require, its ``default_route`` and whether
it ``needs_stop``), builds itself from Settings in ``from_settings`` and
implements ``upsert`` and ``delete`` (and ``deactivate`` where the system has
an active flag). Configuration, routing, log redaction and app.json are made
from those declarations (see docs/sinks/README.md). The base owns the HTTP
client (session, timeouts, User-Agent, error classification), the key →
remote-id mapping and dispatch by action; the pipeline owns retries,
ordering, breakers and dead letters. Subclasses call the system with
``call`` (errors worded by their ``error_detail``), read and record writes with
``known``/``remember``/``forget`` and build reconcile reports with ``compare_listing``.
"""
import abc
import dataclasses
import json

from workers.domain.locations import Location
from workers.resilience.errors import PermanentError
from workers.store.mappings import MappingStore
from workers.store.redis_client import on_pipeline
from workers.store.versions import VersionStore

ACTIONS = ("upsert", "deactivate", "delete")
ANY_ERROR = range(400, 600)
LOCATION_ATTRIBUTES = frozenset(field.name for field in dataclasses.fields(Location))


def sink_fields(location):
    """The route's rendered ``fields`` naming no Location attribute: the sink's own field names."""
    return {name: value for name, value in location.fields.items() if name not in LOCATION_ATTRIBUTES}


class Sink(abc.ABC):
    """A downstream system that locations (or events) are written to."""

    name = None
    supports_deactivate = False
    #: Deactivates a location by its key alone, so a cancellation whose stop is gone from Locate2u
    #: is still applied (``deactivate`` then gets a Location with the key and status only).
    deactivates_by_key = False
    #: ``SinkSetting``s: the environment variables the sink reads.
    settings = ()
    #: Variables of which any one enables the sink (its credentials) ...
    enabled_by = ()
    #: ... and those then required too.
    requires = ()
    #: Pairs of variables set together or not at all.
    together = ()
    #: ``Route`` keyword arguments of its default route, e.g. ``{"on_status": {"Cancelled": "delete"}}``.
    default_route = {}
    #: Writes a stop's location, so the stop record is fetched from Locate2u (an event sink: False).
    needs_stop = True
    #: While the sink is slow, at most half of a worker's processes call it (``SlowCalls``); False for a
    #: sink that bounds its slow calls itself, per endpoint (the forward).
    bulkhead = True

    def __init__(self, client, mappings, options=None):
        self.client = client
        self.mappings = mappings
        self.options = dict(options or {})

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

    @property
    def settle_seconds(self):
        """How long a write sent without an answer may still land in the system (``HttpClient``)."""
        return self.client.settle_seconds

    def last_applied(self, key):
        """``(action, Location record)`` of the newest write applied for ``key`` (what ``reconcile
        --repair`` applies again when the system lost or changed it), or None; None after a delete."""
        newest = VersionStore(self.mappings.redis, self.name).newest(key)
        if newest is None or newest["action"] == "delete":
            return None
        return newest["action"], newest["record"]

    # Helpers for subclasses: vendor-worded errors, and the mapping plus what was last written.

    def call(self, method, path, accept=(), **kwargs):
        """``client.request``, whose errors say what the vendor's error body says (``error_detail``); a
        2xx whose body says it failed (``failure_status``) is that failure, never a success."""
        response = self.client.request(method, path, accept=ANY_ERROR, **kwargs)
        said = self._failure_said(response) if response.ok else None
        if said is None and (response.ok or response.status_code in accept):
            return response
        error = self.client.error_for(response)  # its body has the secrets scrubbed
        try:
            body = json.loads(error.body or "")
        except ValueError:
            body = None
        detail = self.error_detail(body) if isinstance(body, dict) else None
        message = error.message + (f" saying it failed ({said})" if said else "")
        raise self.client.error_for(response, f"{message}: {detail}" if detail else message, said)

    def _failure_said(self, response):
        """The status a 2xx's JSON body says it failed with (``failure_status``), or None."""
        if type(self).failure_status is Sink.failure_status or not response.content:
            return None
        try:
            body = response.json()
        except ValueError:
            return None
        return self.failure_status(body) if isinstance(body, dict) else None

    def gone(self, response):
        """True for the vendor's own 404 (``not_found_answer``): no such record. Any other 404 (one a
        gateway answered itself) is a BadAnswer, retried: taken for a missing record, an update created
        a second one and a delete was recorded as done with the record still there."""
        if response.status_code != 404:
            return False
        try:
            body = response.json()
        except ValueError:
            body = None
        if not (isinstance(body, dict) and self.not_found_answer(body)):
            raise self.client.bad_answer(response, f"that is not {self.NOT_FOUND} (a gateway's 404?)")
        return True

    NOT_FOUND = "the vendor's not-found answer"  # how ``gone`` names what it did not get

    def not_found_answer(self, body):
        """Whether a 404's JSON ``body`` (a dict) is the vendor's own "no such record" (``gone``)."""
        return True

    def failure_status(self, body):
        """The HTTP status a vendor's 2xx JSON ``body`` (a dict) says the request failed with, or None
        when it does not say so. Some APIs answer an error with 200 and put the failure in the body."""
        return None

    def error_detail(self, body):
        """One line naming what was wrong, from a vendor's JSON error ``body`` (a dict), or None."""
        return None

    def paused_endpoints(self):
        """The sink's endpoints paused on their own (the signed forward's URLs), each as one line for
        ``l2u-relay status``: where, and why."""
        return []

    def needs_only_the_key(self, action):
        """True when ``action`` can be applied without the stop (gone from Locate2u since): a
        delete, or a deactivation on a sink that ``deactivates_by_key``."""
        return action == "delete" or (action == "deactivate" and self.deactivates_by_key)

    def known(self, key):
        """``(remote id or None, the flat fields last written)`` for ``key``, read in one round trip."""
        with self.mappings.redis.pipeline(transaction=False) as pipe:
            remote_id, written = pipe.hget(self.mappings.key, key).hget(self._snapshots().key, key).execute()
        return remote_id, json.loads(written or "{}")

    def remember(self, key, remote_id, written, before=None, pipe=None):
        """Map ``key`` to ``remote_id`` and keep the (flat) fields just ``written`` over those written
        ``before`` (from ``known``; read here when not given), for reconcile's drift check; with
        ``pipe``, queued on it (``before`` then given)."""
        if before is None:
            before = json.loads(self._snapshots().get(key) or "{}")
        with on_pipeline(self.mappings.redis, pipe) as queue:  # one round trip for both
            queue.hset(self.mappings.key, key, remote_id)
            queue.hset(self._snapshots().key, key, json.dumps({**before, **written}))

    def forget(self, key):
        """Drop the mapping of ``key`` and what we wrote for it (one round trip)."""
        with self.mappings.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.mappings.key, key).hdel(self._snapshots().key, key).execute()

    def compare_listing(self, records, complete=True):
        """A ReconcileReport from the remote listing's ``(key or None, remote id, flat fields)`` triples.

        A key found with no mapping, or whose mapped record is not among those found, is remapped
        (``rebuilt``; when what we wrote was lost too, the fields found are kept as what we wrote, so
        later drift shows); further records with the same key are ours but untracked (``untracked``);
        records without our key are ``unknown_remote``; fields differing from what ``remember``
        kept are ``changed_remote``. Mapped keys not found are ``missing_remote`` only when the
        listing is ``complete``.
        """
        report = ReconcileReport(self.name)
        mapped, snapshots, found = self.mappings.all(), self._snapshots(), {}
        for key, remote_id, fields in records:
            report.scanned += 1
            if key is None:
                report.unknown_remote.append(remote_id)
            else:
                found.setdefault(key, []).append((remote_id, fields))
        for key, candidates in found.items():
            ids = [remote_id for remote_id, _ in candidates]
            remote_id, fields = candidates[ids.index(mapped[key]) if mapped.get(key) in ids else 0]
            report.untracked += [other for other in ids if other != remote_id]
            if mapped.get(key) != remote_id:
                self.mappings.set(key, remote_id)
                report.rebuilt[key] = remote_id
                if not snapshots.get(key):
                    snapshots.set(key, json.dumps(fields))
            written = json.loads(snapshots.get(key) or "{}")
            changed = sorted(name for name, value in written.items() if fields.get(name) != value)
            if changed:
                report.changed_remote[key] = changed
        if complete:
            report.missing_remote = sorted(set(mapped) - set(found))
        return report

    def _snapshots(self):
        return MappingStore(self.mappings.redis, f"{self.name}:written")


@dataclasses.dataclass
class ReconcileReport:
    """What ``l2u-relay reconcile SINK`` found comparing our mappings with the remote listing.

    ``rebuilt``: mappings restored from the remote listing (key → remote id);
    ``missing_remote``: keys we map whose record is gone there;
    ``changed_remote``: keys whose remote record differs from what we wrote (key → fields);
    ``untracked``: further remote ids carrying the key of one we map: created by us, then
    lost track of (reported, never touched);
    ``unknown_remote``: records without our marker, not ours (reported, never touched).
    """

    sink: str
    rebuilt: dict = dataclasses.field(default_factory=dict)
    missing_remote: list = dataclasses.field(default_factory=list)
    changed_remote: dict = dataclasses.field(default_factory=dict)
    untracked: list = dataclasses.field(default_factory=list)
    unknown_remote: list = dataclasses.field(default_factory=list)
    scanned: int = 0

    @property
    def drift(self):
        """True when the system differs from what we wrote (foreign records are not drift)."""
        return bool(self.rebuilt or self.missing_remote or self.changed_remote or self.untracked)

    def to_json(self):
        return dataclasses.asdict(self)
