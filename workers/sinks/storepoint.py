"""Storepoint store locator: a stop becomes a locator location.

Storepoint has no lookup by external id and no active flag. We keep key →
``loc_…`` id in the mapping store and tag every location ``l2u:<key>``, so
``reconcile`` can find our locations again in ``GET /locations`` after the
mapping is lost. An upsert with no mapping creates without searching first
(a search is a scan of every page), except when an earlier create for the
same key was interrupted before its mapping was saved: then it waits until
that create can no longer land and scans for the key tag first, so a
redelivery never creates a second location. After losing
Redis, run ``l2u-relay reconcile storepoint`` before resuming, which remaps
instead of duplicating (see docs/sinks/storepoint.md).
"""
import logging

from marshmallow import fields

from workers.resilience.errors import BadAnswer, ConfigError, PermanentError, RetriableError
from workers.resilience.http import HttpClient
from workers.settings_fields import HttpUrl, SinkSetting
from workers.sinks.base import Sink, sink_fields
from workers.sinks.create_guard import GuardedCreates

log = logging.getLogger(__name__)

MARKER = "l2u:"
BASE_TAG = "locate2u"
PAGE_LIMIT = 500  # the documented maximum of GET /locations
LISTING_READS = 3  # reads of the whole list before a look gives up for now (it changed during each)
OWNED_FIELDS = ("name", "address", "description", "tags", "contact.phone", "contact.email", "coordinates.lat",
                "coordinates.lng")
DEFAULT_OPTIONS = {
    # A stop without coordinates: PermanentError (true), or leave them out (false):
    # a mapped location keeps its last coordinates, an unmapped one is not created.
    "require_coordinates": True,
    # Extra tags on every location, besides "locate2u", the status and the key marker.
    "tags": (),
}


def flatten(location):
    """A Storepoint location (or request body) as flat comparable fields: ``contact.phone``, sorted tags."""
    flat = {}
    for name, value in location.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{member}": inner for member, inner in value.items()})
        else:
            flat[name] = sorted(value) if isinstance(value, list) else value
    return flat


def owned_fields(location):
    """The flat fields of a listed location that our writes set (``body``), the others left out."""
    return {name: value for name, value in flatten(location).items()
            if name in OWNED_FIELDS or name.startswith("custom_fields.")}


def key_of(location):
    """Our key from a Storepoint location's ``l2u:`` tag, or None when it is not ours."""
    return next((tag[len(MARKER):] for tag in location.get("tags") or () if tag.startswith(MARKER)), None)


class StorepointSink(GuardedCreates, Sink):
    """Locations: create ``POST /locations``, update ``POST /locations/{id}``, delete ``…/delete``."""

    name = "storepoint"
    settings = (
        SinkSetting("STOREPOINT_API_URL", HttpUrl(load_default="https://api.storepoint.co/admin/v1"),
                    "Storepoint Location Management API base URL."),
        SinkSetting("STOREPOINT_API_TOKEN", fields.String(load_default=None),
                    "Storepoint private API token (enables the Storepoint sink).", secret=True),
    )
    enabled_by = ("STOREPOINT_API_TOKEN",)
    default_route = {"on_status": {"Cancelled": "delete"}}

    def __init__(self, client, mappings, options=None):
        super().__init__(client, mappings, options)
        self._custom_field_ids = None  # fetched on first use

    @classmethod
    def from_settings(cls, settings, mappings):
        token = settings.storepoint_api_token
        client = HttpClient(settings.storepoint_api_url, headers={"Authorization": f"Bearer {token}"},
                            redact=(token,))
        return cls(client, mappings)

    def upsert(self, location, options):
        """Update the mapped location (recreating one deleted there), else create it; return its ``loc_`` id."""
        options = {**DEFAULT_OPTIONS, **options}
        if not location.has_coordinates and options["require_coordinates"]:
            raise PermanentError(f"stop {location.key} has no coordinates, which Storepoint requires "
                                 "(route option require_coordinates: false leaves them out)")
        body = self.body(location, options)
        remote_id, before = self.known(location.key)
        if remote_id:
            if not self.gone(self.call("POST", f"locations/{remote_id}", accept=(404,), json=body)):
                self.remember(location.key, remote_id, flatten(body), before)
                return remote_id
            log.info("storepoint: %s (%s) was deleted there; creating it again", location.key, remote_id)
            self.forget(location.key)
            before = {}
        if "coordinates" not in body:
            log.info("storepoint: %s has no coordinates; not created", location.key)
            return None
        return self._create(location.key, body, before)

    def _create(self, key, body, before):
        """Create, unless an earlier attempt left a location (``CreateGuard``): then update that one."""
        remote_id, created = self._guard.create(key, lambda: self._created_id(self.call("POST", "locations", json=body)),
                                                self._find_created)
        if not created:
            log.info("storepoint: %s was created by an interrupted attempt (%s); updating it", key, remote_id)
            self.call("POST", f"locations/{remote_id}", json=body)
        self._remember_created(key, remote_id, flatten(body), before)
        return remote_id

    def _remember_created(self, key, remote_id, written, before):
        """``remember`` a created location and drop its create's intent mark, in one round trip."""
        with self.mappings.redis.pipeline(transaction=False) as pipe:
            self.remember(key, remote_id, written, before, pipe)
            self._guard.done(key, pipe)
            pipe.execute()

    def delete(self, location, options):
        """Delete the mapped location, or the one an interrupted create left; none is a success."""
        remote_id = self.mappings.get(location.key)
        intent = None if remote_id else self._guard.pending(location.key)
        if intent:
            remote_id = self._guard.left_by(location.key, intent, self._find_created)
        if remote_id:
            self.gone(self.call("POST", f"locations/{remote_id}/delete", accept=(404,)))
            self.forget(location.key)
        if intent:  # only once the location it may have left is gone
            self._guard.done(location.key)
        return None

    def _created_id(self, response):
        """The ``loc_`` id a create answered; BadAnswer for anything else (``""`` was mapped, and the next
        change, finding no id, created the location again): the retry looks for it by its tag."""
        remote_id = self.client.answer(response, "location", "id")
        if not isinstance(remote_id, str) or not remote_id.strip():
            raise self.client.bad_answer(response, f"whose location.id {remote_id!r} is not a Storepoint location "
                                                   "id")
        return remote_id

    NOT_FOUND = "Storepoint's not_found"

    def not_found_answer(self, body):
        """Storepoint's own 404 says ``"error": "not_found"``."""
        return body.get("error") == "not_found"

    def _find_created(self, key):
        """The ``loc_`` id of the location tagged with ``key`` in the full listing, or None."""
        return next((item["id"] for item in self._listing() if key_of(item) == key), None)

    def reconcile(self, since=None):
        """Scan every location (Storepoint cannot filter by date, so ``since`` is ignored)."""
        return self.compare_listing((key_of(item), item["id"], owned_fields(item)) for item in self._listing())

    def body(self, location, options):
        """The create/update body: every field we own, coordinates only when both are known."""
        status_tags = [location.status.lower()] if location.status else []
        extra_tags = [options["tags"]] if isinstance(options["tags"], str) else list(options["tags"])
        body = {
            "name": location.name,
            "address": location.address,
            "description": location.notes or "",
            "tags": [BASE_TAG, *status_tags, *extra_tags, MARKER + location.key],
            "contact": {"phone": location.contact_phone or "", "email": location.contact_email or ""},
        }
        if location.has_coordinates:
            body["coordinates"] = {"lat": location.latitude, "lng": location.longitude}
        custom = sink_fields(location)  # route fields naming a custom field id
        if custom:
            self._check_custom_fields(custom)
            body["custom_fields"] = custom
        return body

    def failure_status(self, body):
        """Every Storepoint answer carries ``success``: false is a failure whatever the HTTP status (its
        ``error`` code as the status it stands for; an unknown one counts as a server error)."""
        if body.get("success") is not False:
            return None
        return {"validation_error": 400, "not_found": 404}.get(body.get("error"), 500)

    def error_detail(self, body):
        """``validation_error: Invalid input data (contact.email: must be a valid email)``."""
        details = body.get("details") or {}
        fields = "; ".join(f"{field}: {' '.join(map(str, messages))}" for field, messages in details.items())
        return f"{body.get('error')}: {body.get('message')}" + (f" ({fields})" if fields else "")

    def _check_custom_fields(self, values):
        if self._custom_field_ids is None:
            listed = self.client.answer(self.call("GET", "custom_fields"), "custom_fields")
            self._custom_field_ids = {field["id"] for field in listed}
        unknown = sorted(set(values) - self._custom_field_ids)
        if unknown:
            known = ", ".join(sorted(self._custom_field_ids)) or "none"
            raise ConfigError({"RELAY_ROUTES_FILE": f"storepoint fields: unknown Storepoint custom field id(s) "
                                                    f"{', '.join(unknown)}; the locator has: {known}"})

    def _listing(self):
        """Every location (read when iterated), from a read of every page during which the list did not
        change (the same ``pagination.total`` on each page): a location deleted or added meanwhile moves
        the others across pages, so one could be missed, and a create's look would then create it twice.
        Up to ``LISTING_READS`` reads, then RetriableError (looked for again later)."""
        for _ in range(LISTING_READS):
            locations, totals = [], set()
            for answer in self._pages():
                locations += answer["locations"]
                totals.add(answer["pagination"].get("total"))
            if len(totals) == 1:
                yield from locations
                return
            log.info("storepoint: the location list changed while it was read (totals %s); reading it again",
                     sorted(totals, key=str))
        raise RetriableError(f"Storepoint's location list changed while it was read, {LISTING_READS} times in a "
                             "row; it is read again later rather than risk missing a location")

    def _pages(self):
        """The answer of each page of ``GET /locations``, in order; BadAnswer for a page holding only
        locations of earlier pages (a pager that does not move would be read forever)."""
        page, seen = 1, set()
        while True:
            answer = self.client.answer(self.call("GET", "locations", params={"limit": PAGE_LIMIT, "page": page}),
                                        needs=("locations", "pagination"))
            ids = {location.get("id") for location in answer["locations"]}
            if ids and ids <= seen:
                url = self.client.url("locations")
                raise BadAnswer(f"GET {url} answered page {page} with locations of earlier pages: its paging does "
                                "not move", method="GET", url=url)
            seen |= ids
            yield answer
            if not answer["locations"] or not answer["pagination"].get("next"):
                return
            page += 1
