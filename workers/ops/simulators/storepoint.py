"""Loopback simulator of the Storepoint Location Management API.

Enforces the documented rules (seed: storepoint-location-management-api.txt,
spec: downstream-facts.md): Bearer token on every route, ``limit`` max 500,
active locations only in listings, ``loc_`` ids, partial update by
``POST /locations/{id}``, delete by ``POST /locations/{id}/delete``, and the
``{"error", "message", "details"}`` error shape.

Routes are served at the app root (clients use base URL = server url) and,
so that the documented ``pagination.next`` links resolve, also under
``/admin/v1``.

Choices where the vendor publishes nothing:

- status codes: 400 validation_error, 401 bad token, 404 not_found;
- unknown body keys (top level, ``coordinates``, ``contact``, ``hours`` days)
  are validation errors, as is a body that is not a JSON object;
- ``description``, ``image_url`` and ``contact`` entries accept ``null`` or
  ``""`` (clear); hours accept ``H:MM`` or ``HH:MM`` as in the docs' examples;
- on update, ``coordinates``, ``contact``, ``hours`` and ``custom_fields`` are
  merged key by key; ``tags`` is replaced;
- a created location gets every documented key: absent optional ones are
  ``None`` (description, image_url) or empty (tags, contact, hours,
  custom_fields).

Run standalone with ``python -m workers.ops.simulators.storepoint --port 8081``.
"""
import copy
import math
import random
import re
import string
import threading
from urllib.parse import urlsplit

from flask import Blueprint, current_app, jsonify, request

from .base import method_path_body, run_main, simulator_app

MAX_LIMIT = 500
DEFAULT_LIMIT = 10
ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 10
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
REQUIRED_ON_CREATE = ("name", "address", "coordinates")
REQUIRED_COORDINATES = ("lat", "lng")
NEXT_LINK = "/admin/v1/locations?page={page}"


class StorepointState:
    """In-memory, thread-safe store of one Storepoint locator."""

    def __init__(self, token="sp-test-token", custom_fields=(("cf_l2u_key", "Locate2u key", "text"),)):
        self.lock = threading.RLock()
        self.token = token
        self.custom_fields = [{"id": fid, "name": name, "type": ftype} for fid, name, ftype in custom_fields]
        self.locations = {}      # id -> location as the API returns it (active ones)
        self.deleted = {}        # id -> location as it was when deleted
        self.requests_log = []   # (method, path incl. query string, json body or None)
        self.deletes_while_listing = 0  # so many pages served next are each followed by a delete of the first location
        self.ignores_page = False  # True: every listing request gets page 1 (a pager that does not move)
        self._random = random.Random()

    def custom_field_ids(self):
        return {field["id"] for field in self.custom_fields}

    def new_id(self):
        """A fresh ``loc_`` + 10 lowercase alphanumerics id."""
        with self.lock:
            while True:
                new = "loc_" + "".join(self._random.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
                if new not in self.locations and new not in self.deleted:
                    return new

    def add(self, name="Seeded", address="1 Seed St", lat=0.0, lng=0.0, **fields):
        """Store a location directly (test seeding, no validation); return it."""
        with self.lock:
            location = blank_location(self.new_id())
            location.update(name=name, address=address, coordinates={"lat": lat, "lng": lng}, **fields)
            self.locations[location["id"]] = location
            return copy.deepcopy(location)

    def find(self, predicate):
        """Active locations matching ``predicate(location)`` (copies)."""
        with self.lock:
            return [copy.deepcopy(loc) for loc in self.locations.values() if predicate(loc)]


def blank_location(location_id):
    """A location with every documented key and empty optional values."""
    return {
        "id": location_id,
        "name": None,
        "address": None,
        "coordinates": {"lat": None, "lng": None},
        "description": None,
        "tags": [],
        "contact": {},
        "hours": {},
        "custom_fields": {},
        "image_url": None,
    }


# ---------------------------------------------------------------- validation
# Each validator takes (value, state) and returns a list of (field, message).

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")
HOURS_RE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_url(value):
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and " " not in value


def _blank(value):
    return value is None or value == ""


def _check_nonempty_str(field):
    def check(value, state):
        if not isinstance(value, str) or not value.strip():
            return [(field, f"The {field} field is required and must be a non-empty string.")]
        return []
    return check


def _check_optional_str(field):
    def check(value, state):
        if not _blank(value) and not isinstance(value, str):
            return [(field, f"The {field} must be a string.")]
        return []
    return check


def _check_optional_url(field):
    def check(value, state):
        if _blank(value):
            return []
        if not isinstance(value, str) or not _is_url(value):
            return [(field, f"The {field} must be a valid URL.")]
        return []
    return check


def _check_email(field):
    def check(value, state):
        if _blank(value):
            return []
        if not isinstance(value, str) or not EMAIL_RE.match(value):
            return [(field, f"The {field} must be a valid email address.")]
        return []
    return check


def _check_range(field, low, high):
    def check(value, state):
        if not _is_number(value):
            return [(field, f"The {field} must be a number.")]
        if not low <= value <= high:
            return [(field, f"The {field} must be between {low} and {high}.")]
        return []
    return check


def _check_tags(value, state):
    if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
        return [("tags", "The tags must be an array of strings.")]
    return []


def _valid_hours(value):
    if value == "closed":
        return True
    match = HOURS_RE.match(value) if isinstance(value, str) else None
    if not match:
        return False
    h1, m1, h2, m2 = (int(group) for group in match.groups())
    return all(h <= 23 and m <= 59 for h, m in ((h1, m1), (h2, m2)))


def _check_hours(value, state):
    if not isinstance(value, dict):
        return [("hours", "The hours must be an object keyed by weekday.")]
    errors = []
    for day, hours in value.items():
        if day not in DAYS:
            errors.append((f"hours.{day}", "Unknown day; expected monday..sunday."))
        elif not _valid_hours(hours):
            errors.append((f"hours.{day}", 'The value must be "HH:MM-HH:MM" or "closed".'))
    return errors


def _check_custom_fields(value, state):
    if not isinstance(value, dict):
        return [("custom_fields", "The custom_fields must be an object of field id -> value.")]
    known = state.custom_field_ids()
    errors = []
    for key, field_value in value.items():
        if key not in known:
            errors.append((f"custom_fields.{key}", "Unknown custom field id."))
        elif not isinstance(field_value, str):
            errors.append((f"custom_fields.{key}", "The value must be a string."))
    return errors


def _check_object(field, members):
    """Validate a nested object against a {member: validator} table."""
    def check(value, state):
        if not isinstance(value, dict):
            return [(field, f"The {field} must be an object.")]
        errors = []
        for key, member_value in value.items():
            validator = members.get(key)
            if validator is None:
                errors.append((f"{field}.{key}", "Unknown field."))
            else:
                errors.extend(validator(member_value, state))
        return errors
    return check


COORDINATE_FIELDS = {
    "lat": _check_range("coordinates.lat", -90, 90),
    "lng": _check_range("coordinates.lng", -180, 180),
}
CONTACT_FIELDS = {
    "phone": _check_optional_str("contact.phone"),
    "email": _check_email("contact.email"),
    "website": _check_optional_url("contact.website"),
}
FIELDS = {
    "name": _check_nonempty_str("name"),
    "address": _check_nonempty_str("address"),
    "coordinates": _check_object("coordinates", COORDINATE_FIELDS),
    "description": _check_optional_str("description"),
    "tags": _check_tags,
    "contact": _check_object("contact", CONTACT_FIELDS),
    "hours": _check_hours,
    "custom_fields": _check_custom_fields,
    "image_url": _check_optional_url("image_url"),
}
MERGED_FIELDS = ("coordinates", "contact", "hours", "custom_fields")


def validate(body, state, creating):
    """Return ``details`` ({field: [messages]}) for ``body``; empty if valid."""
    if not isinstance(body, dict):
        return {"body": ["The request body must be a JSON object."]}
    errors = []
    if creating:
        errors += [(f, f"The {f} field is required.") for f in REQUIRED_ON_CREATE if f not in body]
        coordinates = body.get("coordinates")
        if isinstance(coordinates, dict):
            errors += [(f"coordinates.{f}", f"The coordinates.{f} field is required.")
                       for f in REQUIRED_COORDINATES if f not in coordinates]
    for key, value in body.items():
        validator = FIELDS.get(key)
        if validator is None:
            errors.append((key, "Unknown field."))
        else:
            errors.extend(validator(value, state))
    details = {}
    for field, message in errors:
        details.setdefault(field, []).append(message)
    return details


def apply_fields(location, body):
    """Write validated ``body`` into ``location`` (nested objects merged)."""
    for key, value in body.items():
        if key in MERGED_FIELDS:
            location[key] = {**location.get(key, {}), **copy.deepcopy(value)}
        else:
            location[key] = copy.deepcopy(value)


# -------------------------------------------------------------------- responses

def error(status, kind, message, details=None):
    body = {"error": kind, "message": message}
    if details is not None:
        body["details"] = details
    response = jsonify(body)
    response.status_code = status
    return response


def validation_error(details):
    return error(400, "validation_error", "Invalid input data", details)


def not_found():
    return error(404, "not_found", "Location not found")


def _state():
    return current_app.config["STATE"]


def _int_param(name, default, low, high=None):
    """Parse a query integer; return (value, details-or-None)."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default, None
    try:
        value = int(raw)
    except ValueError:
        return None, {name: [f"The {name} must be an integer."]}
    if value < low:
        return None, {name: [f"The {name} must be at least {low}."]}
    if high is not None and value > high:
        return None, {name: [f"The {name} may not be greater than {high}."]}
    return value, None


def _json_body():
    """The request's JSON body, or a sentinel string when it is not JSON."""
    body = request.get_json(silent=True)
    return "<not json>" if body is None else body


# ----------------------------------------------------------------------- routes

api = Blueprint("storepoint", __name__)


@api.before_request
def _authenticate():
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or token.strip() != _state().token:
        return error(401, "error", "Invalid API token")
    return None


@api.get("/locations")
def list_locations():
    """Active locations, paginated with the documented envelope."""
    limit, problem = _int_param("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    if problem:
        return validation_error(problem)
    page, problem = _int_param("page", 1, 1)
    if problem:
        return validation_error(problem)
    state = _state()
    page = 1 if state.ignores_page else page
    with state.lock:
        active = list(state.locations.values())
        total = len(active)
        chunk = copy.deepcopy(active[(page - 1) * limit: page * limit])
        if state.deletes_while_listing and active:  # another client of the locator at work
            state.deletes_while_listing -= 1
            state.deleted[active[0]["id"]] = state.locations.pop(active[0]["id"])
    total_pages = math.ceil(total / limit)
    return jsonify({
        "success": True,
        "locations": chunk,
        "pagination": {
            "page": page,
            "limit": limit,
            "total": total,
            "total_pages": total_pages,
            "next": NEXT_LINK.format(page=page + 1) if page < total_pages else None,
            "previous": NEXT_LINK.format(page=page - 1) if page > 1 else None,
        },
    })


@api.get("/locations/<location_id>")
def get_location(location_id):
    state = _state()
    with state.lock:
        location = state.locations.get(location_id)
        if location is None:
            return not_found()
        return jsonify({"success": True, "location": copy.deepcopy(location)})


@api.post("/locations")
def create_location():
    state = _state()
    body = _json_body()
    details = validate(body, state, creating=True)
    if details:
        return validation_error(details)
    with state.lock:
        location = blank_location(state.new_id())
        apply_fields(location, body)
        state.locations[location["id"]] = location
        return jsonify({"success": True, "location": copy.deepcopy(location)})


@api.post("/locations/<location_id>")
def update_location(location_id):
    state = _state()
    with state.lock:
        if location_id not in state.locations:
            return not_found()
    body = _json_body()
    details = validate(body, state, creating=False)
    if details:
        return validation_error(details)
    with state.lock:
        location = state.locations.get(location_id)
        if location is None:  # deleted meanwhile
            return not_found()
        apply_fields(location, body)
        return jsonify({"success": True, "location": copy.deepcopy(location)})


@api.post("/locations/<location_id>/delete")
def delete_location(location_id):
    state = _state()
    with state.lock:
        location = state.locations.pop(location_id, None)
        if location is None:
            return not_found()
        state.deleted[location_id] = location
    return jsonify({"success": True, "message": "Location deleted successfully"})


@api.get("/custom_fields")
def list_custom_fields():
    return jsonify({"success": True, "custom_fields": copy.deepcopy(_state().custom_fields)})


# -------------------------------------------------------------------------- app

def create_app(state=None):
    """Build the simulator app around ``state`` (a fresh one by default)."""
    app = simulator_app(__name__, state or StorepointState(), method_path_body)
    app.register_blueprint(api)
    app.register_blueprint(api, url_prefix="/admin/v1", name="storepoint_admin_v1")

    @app.errorhandler(404)
    def _unknown_route(exc):
        return error(404, "error", "Not Found")

    @app.errorhandler(405)
    def _bad_method(exc):
        return error(405, "error", "Method Not Allowed")

    return app


if __name__ == "__main__":
    run_main(create_app, "Storepoint simulator")
