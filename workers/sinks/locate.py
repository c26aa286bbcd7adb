"""LOCATE inventory: each location is a record of a configurable resource.

The resource (default ``customeraddress``) and the field mapping come from the
route options, since LOCATE does not publish which resource holds customer
addresses. Our key is written to ``key_field`` (default ``remote_key``) and
upserts find the record by a simple filter on it, soft-deleted ones included
(``withTrashed=1``), so a soft-deleted record is restored rather than
duplicated. A write LOCATE moves to background processing (202, whatever its body) is
read back with backoff until it shows; only then does the call return. A create
that did not show in time, or got no answer, may still land: its key keeps an
intent mark (``CreateGuard``), and the next create or delete of that key waits
until the create could have landed, then looks for what it left before writing.
"""
import base64
import json
import math
import time
from datetime import datetime, timezone

from marshmallow import fields

from workers.resilience.errors import BadAnswer, ConfigError, PermanentError, RetriableError
from workers.resilience.http import DEFAULT_TIMEOUT, HttpClient
from workers.settings_fields import HttpUrl, SinkSetting
from workers.sinks.base import LOCATION_ATTRIBUTES, Sink, sink_fields
from workers.sinks.create_guard import GuardedCreates

JSON = "application/json"
READ_TIMEOUT = 60  # LOCATE ends every request after 60 s
PER_PAGE = 100  # LOCATE's maximum
BACKOFF_FIRST, BACKOFF_MOST = 0.05, 2.0

DEFAULT_OPTIONS = {
    "resource": "customeraddress",
    "key_field": "remote_key",
    # Location attribute -> LOCATE field.
    "field_map": {"name": "name", "address": "address1", "latitude": "latitude", "longitude": "longitude",
                  "contact_phone": "phone", "contact_email": "email", "notes": "notes"},
    # Constant fields written on every create and update (e.g. {"customer_id": 7}).
    "static_fields": {},
    # X-Background-Processing: "always", "never", or None to let LOCATE choose.
    "background_processing": None,
    # Seconds to wait for a backgrounded write to show before a RetriableError.
    "background_timeout": 30,
    # Restore a soft-deleted record holding our key; false: report it (PermanentError).
    "restore_trashed": True,
}


def is_number(value):
    """True for numbers and numeric strings, never for booleans."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def same_value(remote, written):
    """Whether LOCATE's ``remote`` value is the one we wrote (numbers numerically, text case-insensitively)."""
    if is_number(remote) and is_number(written):
        return math.isclose(float(remote), float(written), rel_tol=1e-9, abs_tol=1e-9)
    return plain(remote) == plain(written)


def plain(value):
    return "" if value is None else str(value).strip().lower()


def shows(record, body):
    """Whether ``record`` (as read back) shows every field of ``body``."""
    return all(same_value(record.get(field), value) for field, value in body.items())


def utc_iso(value):
    """A datetime or ISO 8601 string as LOCATE expects dates: UTC ISO 8601 (a naive time is taken as UTC)."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocateSink(GuardedCreates, Sink):
    """Records of one LOCATE resource, keyed by our location key in ``key_field``."""

    name = "locate"
    settings = (
        SinkSetting("LOCATE_API_URL", HttpUrl(load_default=None),
                    "LOCATE inventory company host, https://<company>.locateinv.com."),
        SinkSetting("LOCATE_API_TOKEN", fields.String(load_default=None),
                    "LOCATE API key (enables the LOCATE sink).", secret=True),
    )
    enabled_by = ("LOCATE_API_TOKEN",)
    requires = ("LOCATE_API_URL",)
    default_route = {"on_status": {"Cancelled": "delete"}}

    @classmethod
    def from_settings(cls, settings, mappings):
        token = settings.locate_api_token
        basic = base64.b64encode(f"{token}:{token}".encode()).decode()
        client = HttpClient(settings.locate_api_url, timeout=(DEFAULT_TIMEOUT[0], READ_TIMEOUT),
                            headers={"Accept": JSON, "Content-Type": JSON}, auth=(token, token),
                            redact=(token, basic))
        return cls(client, mappings)

    def upsert(self, location, options):
        """Update the record holding our key (restoring a soft-deleted one), else create it; return its id."""
        options = {**DEFAULT_OPTIONS, **options}
        body = self.payload(location, options)
        record_id = self.mappings.get(location.key)
        creating = False
        if record_id is None or self._update(record_id, body, options) is None:
            record_id = None if self._guard.pending(location.key) else self._find(location.key, options)
            creating = record_id is None
            if creating:
                record_id = self._create(location.key, body, options)
            else:
                self._update_found(location.key, record_id, body, options)
        self.remember(location.key, record_id, body)
        if creating:  # only once the mapping is saved: a worker killed before it leaves the mark to the retry
            self._guard.done(location.key)
        return record_id

    def delete(self, location, options):
        """Soft delete every live record holding our key (once a create of ours that may still land
        could have); none left is a success."""
        options = {**DEFAULT_OPTIONS, **options}
        intent = self._guard.pending(location.key)
        if intent:
            self._guard.left_by(location.key, intent, lambda _key: None)  # NotYet while it may land
        params = {options["key_field"]: location.key, "fields": "id", "sort": "id"}
        for row in list(self._rows(options["resource"], params)):
            path = f"{options['resource']}/{row['id']}"
            self._write("DELETE", path, options, lambda: {} if self._get(path) is None else None, missing_ok=True)
        self.forget(location.key)
        if intent:
            self._guard.done(location.key)

    def reconcile(self, since=None):
        """Page through the records carrying a key (changed since ``since``): rebuild lost mappings, report drift."""
        options = {**DEFAULT_OPTIONS, **self.options}
        key_field = options["key_field"]
        written = (json.loads(snapshot) for snapshot in self._snapshots().all().values())
        compared = sorted(set(options["field_map"].values()).union(*written) - {"id", key_field})
        condition = f"{key_field} IS NOT NULL" + (f' && updated_at>="{utc_iso(since)}"' if since else "")
        params = {"filter": condition, "fields": ",".join(["id", key_field, *compared]), "sort": "id"}
        rows = self._rows(options["resource"], params, every_page=True)
        return self.compare_listing(((row[key_field], str(row["id"]), row) for row in rows), complete=since is None)

    def payload(self, location, options):
        """The record body: mapped location attributes, static fields, route overrides and our key."""
        unknown = sorted(set(options["field_map"]) - LOCATION_ATTRIBUTES)
        if unknown:
            raise ConfigError({"RELAY_ROUTES_FILE": f"locate options.field_map: {', '.join(unknown)}: "
                                                    "no such location attribute"})
        body = {field: getattr(location, attribute) for attribute, field in options["field_map"].items()}
        body.update(options["static_fields"])
        body.update(sink_fields(location))
        body[options["key_field"]] = location.key
        return body

    # ------------------------------------------------------------------ steps

    def _find(self, key, options):
        """The id of the record holding ``key``; a soft-deleted one is restored (or reported)."""
        params = {options["key_field"]: key, "withTrashed": 1, "fields": "id,deleted_at", "sort": "id"}
        rows = list(self._rows(options["resource"], params))
        live = [row for row in rows if not row.get("deleted_at")]
        if live or not rows:
            return str(live[0]["id"]) if live else None
        record_id = str(rows[-1]["id"])
        if not options["restore_trashed"]:
            raise PermanentError(f"LOCATE {options['resource']} {record_id} holding {key} is soft-deleted and "
                                 "restore_trashed is off: restore or purge it in LOCATE")
        path = f"{options['resource']}/{record_id}"
        self._write("POST", f"{path}/restore", options, lambda: self._get(path))
        return record_id

    def _create(self, key, body, options):
        """Create the record, unless an earlier create of ours left it (``CreateGuard``): then update that one."""
        resource, key_field = options["resource"], options["key_field"]

        def shown():
            rows = self._rows(resource, {key_field: key, "fields": ",".join(["id", *body]), "sort": "id"})
            return next((row for row in rows if shows(row, body)), None)

        def send():
            record = self._write("POST", resource, options, shown, json=body)
            if not isinstance(record, dict) or "id" not in record:  # created all the same: the retry finds it
                raise BadAnswer(f"LOCATE created {key} in {resource} but answered without its id", body=str(record))
            return str(record["id"])

        record_id, created = self._guard.create(key, send, lambda _key: self._find(key, options))
        if not created:
            self._update_found(key, record_id, body, options)
        return record_id

    def _update_found(self, key, record_id, body, options):
        """Update the record found holding ``key``; RetriableError when it vanished meanwhile."""
        if self._update(record_id, body, options) is None:
            raise RetriableError(f"LOCATE {options['resource']} {record_id} for {key} vanished while it was "
                                 "being updated")

    def _update(self, record_id, body, options):
        """PUT ``body``; the record as written, or None when there is no live record ``record_id``."""
        path = f"{options['resource']}/{record_id}"

        def shown():
            record = self._get(path, {"fields": ",".join(body)})
            return record if record is not None and shows(record, body) else None

        return self._write("PUT", path, options, shown, missing_ok=True, json=body)

    # ---------------------------------------------------------------- plumbing

    def _write(self, method, path, options, shown, missing_ok=False, **kwargs):
        """Send a write; return its record, or read back with ``shown`` when LOCATE backgrounded it (202)."""
        mode = options["background_processing"]
        headers = {"X-Background-Processing": mode} if mode else {}
        response = self._send(method, path, accept=(404,) if missing_ok else (), headers=headers, **kwargs)
        if response.status_code == 404:
            return None
        if response.status_code == 202:  # backgrounded, not done: whatever its body says
            return self._await(shown, options, f"{method} {path}")
        return self.client.answer(response) if response.content else {}

    def _await(self, shown, options, what):
        """Poll ``shown()`` with exponential backoff until it returns a value; RetriableError past the timeout."""
        timeout = float(options["background_timeout"])
        deadline, delay = time.monotonic() + timeout, BACKOFF_FIRST
        while (result := shown()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RetriableError(f"LOCATE moved {what} to background processing (202) and it had not "
                                     f"happened after {timeout:g} s")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, BACKOFF_MOST)
        return result

    def _get(self, path, params=None):
        """One record, or None when LOCATE has no live record there."""
        response = self._send("GET", path, accept=(404,), params=params)
        return None if response.status_code == 404 else self.client.answer(response)

    def _rows(self, resource, params, every_page=False):
        """The ``data`` of a listing (``perPage=100``); all pages when ``every_page``."""
        page, last = 1, 1
        while page <= last:
            envelope = self.client.answer(self._send("GET", resource,
                                                     params={**params, "perPage": PER_PAGE, "page": page}))
            if not isinstance(envelope, dict) or not isinstance(envelope.get("data"), list):
                raise PermanentError(f"LOCATE listed {resource} without a data array", body=str(envelope)[:300])
            yield from envelope["data"]
            page, last = page + 1, int(envelope.get("last_page") or 1) if every_page else 1

    def _send(self, method, path, accept=(), **kwargs):
        """A request (errors worded by ``error_detail``); a redirect to the login page is a PermanentError."""
        response = self.call(method, path, accept=accept, allow_redirects=False, **kwargs)
        if response.is_redirect:
            raise self.client.error_for(response, f"LOCATE redirected {method} {path} to "
                                                  f"{response.headers.get('Location')} (its login page)")
        return response

    def error_detail(self, body):
        """``The given data was invalid. (address1: The address1 field is required.)``: 422s name the fields."""
        errors = body.get("errors") if isinstance(body.get("errors"), dict) else {}
        fields = "; ".join(f"{field}: {' '.join(map(str, messages if isinstance(messages, list) else [messages]))}"
                           for field, messages in errors.items())
        return f"{body.get('message', '')} ({fields})" if fields else body.get("message")
