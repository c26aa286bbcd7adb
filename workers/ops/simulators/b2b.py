"""Loopback simulator of the B2B (B2Market) Location API.

Enforces the documented rules (seed: b2b-location-api.txt, spec:
downstream-facts.md): ``POST /login`` issuing JWTs next to a static token,
``POST /Location/create`` taking a JSON array (all-or-nothing, 409 on a
duplicate ``idRemote``), partial ``PUT /Location/update/{id}`` by B2B id or
``idRemote`` that may not touch the business partner, ``DELETE`` refused for
a location tied to a business partner, paginated listings, and the
``{"code": N, "error": "..."}`` error shape.

Choices where the vendor publishes nothing:

- B2B ids are strings of digits from a counter starting at 1001; ``{id}`` in
  a path is looked up as a B2B id first, then as an ``idRemote``;
- unknown body keys and wrongly typed values are 400s
  (``Unknown parameter X`` / ``Parameter X must be a string|boolean``); an
  empty string for a mandatory parameter counts as missing, on update too;
- sending ``businessPartnerId`` to update is refused even when unchanged;
- unknown partner / country: 400 ``Parameter businessPartnerId is invalid: no
  BusinessPartner with id X`` (``countryId``: ``... no Country with id X``);
- create answers 201 ``{"data": [created items]}``; delete answers 200
  ``{"code": 200, "message": "Location deleted successfully."}``;
- ``stateId`` is free text and is echoed as ``{"id", "description", "iso"}``;
- ``nextPageUrl`` is absolute (built from the request's host) or ``null``;
- timestamps are UTC ISO 8601 with offset, taken from ``state.clock()``.

Run standalone with ``python -m workers.ops.simulators.b2b --port 8082``.
"""
import base64
import copy
import hashlib
import hmac
import itertools
import json
import math
import secrets
import threading
from datetime import datetime, timezone
from urllib.parse import urlencode

from flask import Blueprint, current_app, jsonify, request

from .base import method_path_body, run_main, simulator_app

DEFAULT_PAGE_SIZE = 10
FIRST_ID = 1001
COUNTRY_NAMES = {"AU": "Australia", "ES": "Spain", "US": "United States", "GB": "United Kingdom",
                 "NZ": "New Zealand", "FR": "France", "DE": "Germany", "PT": "Portugal"}

# Mandatory create parameters, in the order they are checked (first missing wins).
REQUIRED = (
    ("idRemote", str), ("businessPartnerId", str), ("countryId", str), ("name", str),
    ("address", str), ("city", str), ("shippingAddress", bool), ("billingAddress", bool),
    ("active", bool), ("default", bool),
)
OPTIONAL = (("stateId", str), ("postalCode", str))
FIELD_TYPES = dict(REQUIRED + OPTIONAL)
REQUIRED_NAMES = {name for name, _ in REQUIRED}
NOT_UPDATABLE = {"businessPartnerId": "Parameter businessPartnerId cannot be updated from this endpoint; "
                                      "use the Business Partner update endpoint"}
TYPE_NAMES = {str: "string", bool: "boolean"}
# Referenced ids: parameter -> (state attribute holding known ids, entity name).
REFERENCES = {"businessPartnerId": ("partners", "BusinessPartner"), "countryId": ("countries", "Country")}
# Plain copies from a request body onto a stored location.
COPIED = ("idRemote", "name", "address", "city", "postalCode",
          "default", "active", "shippingAddress", "billingAddress")

# Documented error bodies, usable for injected faults (see ``documented_fault``).
ERROR_BODIES = {
    400: {"code": 400, "error": "Parameter $parameter is required"},
    401: {"code": 401, "error": "Unauthorized."},
    409: {"code": 409, "error": "Duplicate entry"},
    429: {"code": 429, "error": "Too Many Requests"},
    500: {"code": 500, "error": "Database connection failed."},
}
DELETE_REFUSED = "A Location that has a Business Partner associated with it cannot be deleted"


class B2BError(Exception):
    """An error answered as ``{"code": status, "error": message}``."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def utcnow():
    return datetime.now(timezone.utc).replace(microsecond=0)


def _partner_record(entry):
    if isinstance(entry, dict):
        return {"id": str(entry["id"]), "idRemote": entry.get("idRemote", str(entry["id"])),
                "contactName": entry.get("contactName", ""), "commercialName": entry.get("commercialName", "")}
    return {"id": entry, "idRemote": entry, "contactName": f"Contact {entry}",
            "commercialName": f"Partner {entry}"}


class B2BState:
    """In-memory, thread-safe store of one B2B account."""

    def __init__(self, token="b2b-static-token", username="b2b-user", password="b2b-pass",
                 business_partners=("BP-1",), countries=("AU", "ES", "US"), jwt_lifetime=3600):
        self.lock = threading.RLock()
        self.token, self.username, self.password = token, username, password
        self.jwt_lifetime = jwt_lifetime
        self.partners = {p["id"]: p for p in map(_partner_record, business_partners)}
        self.countries = {iso: {"id": iso, "description": COUNTRY_NAMES.get(iso, iso), "iso": iso}
                          for iso in countries}
        self.locations = {}        # B2B id (digits) -> location as the API returns it
        self.deleted = []          # deleted locations, with "deletedAt"
        self.login_count = 0       # successful logins
        self.login_failures = 0
        self.requests_log = []     # (method, path incl. query string, json body or None)
        self.bp_locked = set()     # ids / idRemotes whose delete is refused even if allow_delete
        self.allow_delete = False  # docs: a location with a business partner cannot be deleted
        self.clock = utcnow        # returns an aware UTC datetime
        self._ids = itertools.count(FIRST_ID)
        self._jwts = {}            # jwt -> expiry (epoch seconds)
        self._secret = secrets.token_bytes(16)

    # ---- auth
    def issue_jwt(self):
        """A new signed JWT-like token valid for ``jwt_lifetime`` seconds."""
        now = int(self.clock().timestamp())
        claims = {"iat": now, "exp": now + self.jwt_lifetime, "username": self.username,
                  "jti": secrets.token_hex(8)}
        signing_input = _b64(json.dumps({"typ": "JWT", "alg": "HS256"})) + "." + _b64(json.dumps(claims))
        signature = hmac.new(self._secret, signing_input.encode(), hashlib.sha256).digest()
        token = signing_input + "." + _b64(signature)
        with self.lock:
            self._jwts[token] = claims["exp"]
        return token

    def expire_jwts(self):
        """Make every JWT issued so far invalid (the static token stays valid)."""
        with self.lock:
            self._jwts = dict.fromkeys(self._jwts, 0)

    def token_valid(self, token):
        if token and token == self.token:
            return True
        with self.lock:
            expiry = self._jwts.get(token)
        return expiry is not None and self.clock().timestamp() < expiry

    # ---- locations
    def lookup(self, key):
        """The stored location whose B2B id, else whose idRemote, is ``key``."""
        with self.lock:
            if key in self.locations:
                return self.locations[key]
            return next((loc for loc in self.locations.values() if loc["idRemote"] == key), None)

    def lookup_remote_exists(self, id_remote):
        with self.lock:
            return any(loc["idRemote"] == id_remote for loc in self.locations.values())

    def by_remote(self, id_remote):
        """A copy of the location with this idRemote, or None."""
        with self.lock:
            found = next((loc for loc in self.locations.values() if loc["idRemote"] == id_remote), None)
            return copy.deepcopy(found)

    def add(self, idRemote, businessPartnerId=None, countryId=None, **fields):
        """Store a location directly (test seeding, no validation); return a copy."""
        item = {"idRemote": idRemote, "businessPartnerId": businessPartnerId or next(iter(self.partners)),
                "countryId": countryId or next(iter(self.countries)), "name": idRemote,
                "address": "1 Seed St", "city": "Seedville", "shippingAddress": True,
                "billingAddress": False, "active": True, "default": False, **fields}
        with self.lock:
            location = self.create_location(item)
            return copy.deepcopy(location)

    def create_location(self, item):
        """Store a validated create item as a new location; return it (caller holds the lock)."""
        now = self.clock().isoformat()
        location = {"id": str(next(self._ids)), "idRemote": None,
                    "businessPartner": copy.deepcopy(self.partners[item["businessPartnerId"]]),
                    "name": None, "address": None, "city": None, "state": None, "postalCode": None,
                    "default": False, "active": True, "shippingAddress": False, "billingAddress": False,
                    "country": None, "createdAt": now, "updatedAt": now}
        self.apply(location, item)
        self.locations[location["id"]] = location
        return location

    def apply(self, location, body):
        """Write a validated body onto a stored location."""
        for name in COPIED:
            if name in body:
                location[name] = body[name]
        if "countryId" in body:
            location["country"] = copy.deepcopy(self.countries[body["countryId"]])
        if "stateId" in body:
            state_id = body["stateId"]
            location["state"] = {"id": state_id, "description": state_id, "iso": state_id} if state_id else None

    def delete_refused(self, location):
        if not self.allow_delete:
            return True
        return location["id"] in self.bp_locked or location["idRemote"] in self.bp_locked


def _b64(data):
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def documented_fault(faults, status, times=1, retry_after=None, path_prefix=""):
    """Inject ``status`` into ``faults`` with the vendor's documented error body."""
    body = ERROR_BODIES.get(status, {"code": status, "error": "Error"})
    faults.inject(status, times, retry_after, body, path_prefix)


# ---------------------------------------------------------------- validation

def _blank(value):
    return value is None or (isinstance(value, str) and not value.strip())


def check_item(item, state, creating):
    """Raise B2BError(400) for the first problem in one location body."""
    if not isinstance(item, dict):
        raise B2BError(400, "Parameter body is required")
    for name in item:
        if name not in FIELD_TYPES:
            raise B2BError(400, f"Unknown parameter {name}")
        if not creating and name in NOT_UPDATABLE:
            raise B2BError(400, NOT_UPDATABLE[name])
    if creating:
        for name, _ in REQUIRED:
            if _blank(item.get(name)):
                raise B2BError(400, f"Parameter {name} is required")
    for name, value in item.items():
        if name in REQUIRED_NAMES and _blank(value):
            raise B2BError(400, f"Parameter {name} is required")
        expected = FIELD_TYPES[name]
        if value is not None and type(value) is not expected:
            raise B2BError(400, f"Parameter {name} must be a {TYPE_NAMES[expected]}")
    for name, (attribute, entity) in REFERENCES.items():
        if name in item and item[name] not in getattr(state, attribute):
            raise B2BError(400, f"Parameter {name} is invalid: no {entity} with id {item[name]}")


def _json_body():
    body = request.get_json(silent=True)
    if body is None:
        raise B2BError(400, "Parameter body is required")
    return body


def _int_param(name, default):
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise B2BError(400, f"Parameter {name} must be a positive integer") from None
    if value < 1:
        raise B2BError(400, f"Parameter {name} must be a positive integer")
    return value


DATE_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S")


def parse_date(raw):
    """Parse the ``date`` query parameter (naive values are UTC)."""
    for fmt in DATE_FORMATS:
        try:
            return datetime.strptime(raw, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise B2BError(400, "Parameter date must be YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS")


def paginate(items, extra_params=None):
    """The documented ``{"data", "pagination"}`` envelope for this request."""
    page = _int_param("page", 1)
    size = _int_param("pageSize", DEFAULT_PAGE_SIZE)
    total = len(items)
    total_pages = math.ceil(total / size)
    next_url = None
    if page < total_pages:
        query = urlencode({**(extra_params or {}), "page": page + 1, "pageSize": size})
        next_url = f"{request.host_url.rstrip('/')}{request.path}?{query}"
    return jsonify({
        "data": copy.deepcopy(items[(page - 1) * size: page * size]),
        "pagination": {"totalItems": total, "itemsPerPage": size, "currentPage": page,
                       "totalPages": total_pages, "nextPageUrl": next_url},
    })


def _state():
    return current_app.config["STATE"]


def _require(location, key):
    if location is None:
        raise B2BError(404, f"No entity found for Location with {key}.")
    return location


# ----------------------------------------------------------------------- routes

api = Blueprint("b2b", __name__)


@api.before_request
def _authenticate():
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not _state().token_valid(token.strip()):
        raise B2BError(401, "Unauthorized.")


@api.post("/Location/create")
def create_locations():
    """Create every location of the JSON array, or none of them."""
    items = _json_body()
    if not isinstance(items, list) or not items:
        raise B2BError(400, "Parameter body is required")
    state = _state()
    with state.lock:
        seen = set()
        for item in items:
            check_item(item, state, creating=True)
            if item["idRemote"] in seen or state.lookup_remote_exists(item["idRemote"]):
                raise B2BError(409, "Duplicate entry")
            seen.add(item["idRemote"])
        created = [copy.deepcopy(state.create_location(item)) for item in items]
    response = jsonify({"data": created})
    response.status_code = 201
    return response


@api.put("/Location/update/<key>")
def update_location(key):
    """Partial update by B2B id or idRemote."""
    state = _state()
    with state.lock:
        location = _require(state.lookup(key), key)
        body = _json_body()
        if not isinstance(body, dict) or not body:
            raise B2BError(400, "Parameter body is required")
        check_item(body, state, creating=False)
        new_remote = body.get("idRemote", location["idRemote"])
        if new_remote != location["idRemote"] and state.lookup_remote_exists(new_remote):
            raise B2BError(409, "Duplicate entry")
        state.apply(location, body)
        location["updatedAt"] = state.clock().isoformat()
        return jsonify({"data": [copy.deepcopy(location)]})


@api.delete("/Location/delete/<key>")
def delete_location(key):
    state = _state()
    with state.lock:
        location = _require(state.lookup(key), key)
        if state.delete_refused(location):
            raise B2BError(400, DELETE_REFUSED)
        del state.locations[location["id"]]
        state.deleted.append({**location, "deletedAt": state.clock().isoformat()})
    return jsonify({"code": 200, "message": "Location deleted successfully."})


@api.get("/Location/getLocation")
def list_locations():
    state = _state()
    with state.lock:
        wanted = request.args.get("id")
        if wanted:
            items = [_require(state.locations.get(wanted), wanted)]
        else:
            items = sorted(state.locations.values(), key=lambda loc: int(loc["id"]))
        return paginate(items, {"id": wanted} if wanted else None)


@api.get("/Location/updatedFrom")
def list_updated_from():
    raw = request.args.get("date", "")
    if not raw.strip():
        raise B2BError(400, "Parameter date is required")
    since = parse_date(raw.strip())
    state = _state()
    with state.lock:
        items = [loc for loc in state.locations.values()
                 if datetime.fromisoformat(loc["updatedAt"]) >= since]
        items.sort(key=lambda loc: (datetime.fromisoformat(loc["updatedAt"]), int(loc["id"])))
        return paginate(items, {"date": raw.strip()})


@api.get("/BusinessPartner/getBPartner")
def list_partners():
    state = _state()
    wanted = request.args.get("id")
    if wanted:
        if wanted not in state.partners:
            raise B2BError(404, f"No entity found for BusinessPartner with {wanted}.")
        return paginate([state.partners[wanted]], {"id": wanted})
    return paginate(list(state.partners.values()))


def login():
    """Exchange ``_username``/``_password`` for a JWT."""
    state = _state()
    body = request.get_json(silent=True)
    good = (isinstance(body, dict) and body.get("_username") == state.username
            and body.get("_password") == state.password)
    with state.lock:
        if not good:
            state.login_failures += 1
            raise B2BError(401, "Unauthorized.")
        state.login_count += 1
    return jsonify({"token": state.issue_jwt()})


# -------------------------------------------------------------------------- app

def _error_response(status, message):
    response = jsonify({"code": status, "error": message})
    response.status_code = status
    return response


def create_app(state=None):
    """Build the simulator app around ``state`` (a fresh one by default)."""
    app = simulator_app(__name__, state or B2BState(), method_path_body)
    app.add_url_rule("/login", view_func=login, methods=["POST"])
    app.register_blueprint(api)

    app.register_error_handler(B2BError, lambda exc: _error_response(exc.status, exc.message))
    app.register_error_handler(404, lambda exc: _error_response(404, "Not Found"))
    app.register_error_handler(405, lambda exc: _error_response(405, "Method Not Allowed"))
    return app


if __name__ == "__main__":
    run_main(create_app, "B2B simulator")
