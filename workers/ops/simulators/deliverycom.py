"""Loopback simulator of the Delivery.com customer location API.

Enforces the rules of the seed (``deliverycom-customer-location-api.txt``)
and of ``downstream-facts.md``:

- the access token goes in ``Authorization`` (``Bearer <token>`` or the bare
  token), else 401 with a ``bad_token`` message;
- ``POST /customer/location``: street >= 5 chars, city >= 2, state exactly 2,
  zip_code exactly 5, phone 10-12 (all required strings); every failing field
  is listed at once as ``bad_<field>`` (400); a valid address whose zip_code
  is not in ``verifiable_zips`` is ``bad_loc`` (400, the USPS check);
- ``PUT /customer/location/{id}`` is partial with the same checks for the
  fields present; ``DELETE`` removes; an unknown id is ``bad_loc_id`` (400);
- ``GET /customer/location/`` lists all locations, or those within 1e-4
  degrees of ``latitude`` and ``longitude`` when both are given.

Simulator choices (the seed leaves these open or is inconsistent):

- messages are the seed's, verbatim: the street message says "at least 2
  characters" although the rule is >= 5; a phone over 12 characters gets
  "The phone may not be greater than 12 characters."; the ``bad_loc_id``
  dev_msg is "Could not find address for location id N" (the seed's typo fixed);
- ids count up from 1574900 and are never reused after a delete;
- lengths are measured after stripping whitespace; a non-string value for a
  checked field fails that field; stored values are stripped, and street,
  city and state upper-cased;
- coordinates: ``latitude``/``longitude`` sent in the body (both numeric)
  are used as the geocoding result (a test hook, the real API ignores them);
  otherwise ``geocode(street, zip_code)`` derives them deterministically
  (the zip's centroid plus a small street-dependent offset). They are served
  as strings with 16 decimals. A PUT changing street or zip_code re-geocodes;
- as in the seed, create returns ``location_id`` as a number, update and list
  as a string; list shows absent optional fields as "" (create/update: null);
- an unparseable ``latitude``/``longitude`` filter is a 400
  ``bad_latitude``/``bad_longitude``;
- ``requests_log`` holds every request except ``/_sim/``, including faulted
  and rejected ones, as ``(method, path, query, json_body, headers_subset)``.
"""
import hashlib
import math
import threading
from decimal import Decimal

from flask import jsonify, request

from workers.ops.simulators.base import method_path_query_body_headers, run_main, simulator_app

FIRST_LOCATION_ID = 1574900
MATCH_TOLERANCE = 1e-4
OPTIONAL_FIELDS = ("unit_number", "company", "cross_streets")
UPPER_CASED = ("street", "city", "state")
LOGGED_HEADERS = ("Accept", "Content-Type")

# field -> length rule and the seed's message (``too_long`` when it differs).
FIELD_RULES = {
    "street": {"min": 5, "message": "The street must be at least 2 characters."},
    "city": {"min": 2, "message": "The city must be at least 2 characters."},
    "state": {"min": 2, "max": 2, "message": "The state must be 2 characters."},
    "zip_code": {"min": 5, "max": 5, "message": "The zip code field must be 5 characters."},
    "phone": {"min": 10, "max": 12, "message": "The phone must be at least 10 characters.",
              "too_long": "The phone may not be greater than 12 characters."},
}

BAD_LOC = {
    "code": "bad_loc",
    "user_msg": "We could not find the address that you submitted. Please double check all the fields and try again.",
    "dev_msg": "Address was not verified.",
}
LOC_UPDATE_SUCCESS = {
    "code": "loc_update_success",
    "user_msg": "Address was successfully updated.",
    "dev_msg": "Address was successfully updated.",
}
BAD_TOKEN = {
    "code": "bad_token",
    "user_msg": "Your session has expired. Please log in again.",
    "dev_msg": "The access token is missing, invalid or expired.",
}

# Approximate centroids of the default verifiable zips.
ZIP_CENTROIDS = {
    "10003": (40.7318, -73.9893), "10038": (40.7093, -74.0027), "10001": (40.7506, -73.9972),
    "11201": (40.6937, -73.9898), "94103": (37.7725, -122.4147), "60601": (41.8858, -87.6181),
    "02108": (42.3576, -71.0646), "73301": (30.2672, -97.7431),
}


def bad_loc_id(location_id):
    """The seed's answer for an unknown location id."""
    return {"code": "bad_loc_id",
            "user_msg": "Sorry, but we weren't able to delete this address from your account.",
            "dev_msg": f"Could not find address for location id {location_id}"}


def field_error(field, value):
    """The ``bad_<field>`` message when ``value`` breaks the field's rule, else None."""
    rule = FIELD_RULES[field]
    length = len(value.strip()) if isinstance(value, str) else -1
    if length < rule["min"]:
        message = rule["message"]
    elif length > rule.get("max", math.inf):
        message = rule.get("too_long", rule["message"])
    else:
        return None
    return {"code": f"bad_{field}", "field": field, "user_msg": message, "dev_msg": message}


def validate(body, partial=False):
    """All field errors, in the seed's order; ``partial`` checks present fields only."""
    checked = [field for field in FIELD_RULES if field in body or not partial]
    return [error for error in (field_error(field, body.get(field)) for field in checked) if error]


def _fraction(digest, start):
    return int.from_bytes(digest[start:start + 4], "big") / 2 ** 32


def geocode(street, zip_code):
    """Deterministic ``(latitude, longitude)``: zip centroid + street offset (< 0.01 deg)."""
    zip_digest = hashlib.sha256(zip_code.encode()).digest()
    base = ZIP_CENTROIDS.get(zip_code) or (25 + 24 * _fraction(zip_digest, 0), -124 + 57 * _fraction(zip_digest, 4))
    digest = hashlib.sha256(f"{street.strip().upper()}|{zip_code}".encode()).digest()
    return base[0] + (_fraction(digest, 0) - 0.5) * 0.02, base[1] + (_fraction(digest, 4) - 0.5) * 0.02


def _float(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and not isinstance(value, bool) else None


def coordinates_in(body):
    """``(latitude, longitude)`` sent in a body (both numeric), else None."""
    latitude, longitude = _float(body.get("latitude")), _float(body.get("longitude"))
    return (latitude, longitude) if latitude is not None and longitude is not None else None


def format_coordinate(value):
    """A coordinate as the API serves it: a string with 16 decimals ("40.7068885740958600")."""
    return f"{Decimal(repr(float(value))):.16f}"


def _clean(field, value):
    if not isinstance(value, str):
        return value
    value = value.strip()
    return value.upper() if field in UPPER_CASED else value


class DeliverycomState:
    """Thread-safe in-memory customer account: ``locations[location_id] = location``."""

    def __init__(self, access_token="dc-test-token",
                 verifiable_zips=("10003", "10038", "10001", "11201", "94103", "60601", "02108", "73301")):
        self.access_token = access_token
        self.verifiable_zips = set(verifiable_zips)
        self.locations = {}
        self.requests_log = []
        self.lock = threading.RLock()
        self._next_id = FIRST_LOCATION_ID

    def add(self, fields):
        """Store a location without validation (also for seeding tests); returns a copy."""
        with self.lock:
            location_id, self._next_id = str(self._next_id), self._next_id + 1  # ids are never reused
            location = {"location_id": location_id, **{field: None for field in (*FIELD_RULES, *OPTIONAL_FIELDS)}}
            self.locations[location_id] = location
            return self._apply(location, fields, regeocode=True)

    def update(self, location_id, fields):
        """Change the given fields of a location; None when the id is unknown."""
        with self.lock:
            location = self.locations.get(str(location_id))
            if location is None:
                return None
            return self._apply(location, fields, regeocode="street" in fields or "zip_code" in fields)

    def delete(self, location_id):
        """Remove a location; False when the id is unknown."""
        with self.lock:
            return self.locations.pop(str(location_id), None) is not None

    def find(self, latitude=None, longitude=None):
        """Copies of all locations, or of those within 1e-4 deg of the coordinates."""
        with self.lock:
            locations = [dict(location) for location in self.locations.values()]
        if latitude is None or longitude is None:
            return locations
        return [location for location in locations
                if abs(float(location["latitude"]) - latitude) <= MATCH_TOLERANCE
                and abs(float(location["longitude"]) - longitude) <= MATCH_TOLERANCE]

    @staticmethod
    def _apply(location, fields, regeocode):
        for field in (*FIELD_RULES, *OPTIONAL_FIELDS):
            if field in fields:
                location[field] = _clean(field, fields[field])
        coordinates = coordinates_in(fields)
        if coordinates is None and regeocode:
            coordinates = geocode(location["street"] or "", location["zip_code"] or "")
        if coordinates is not None:
            location["latitude"], location["longitude"] = (format_coordinate(value) for value in coordinates)
        return dict(location)


# ----------------------------------------------------------------------- app

def _error(messages, status=400):
    return jsonify({"message": messages}), status


def _body():
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


def _token():
    header = request.headers.get("Authorization", "").strip()
    return header[len("bearer "):].strip() if header.lower().startswith("bearer ") else header


def _listed(location):
    """A location as the list endpoint shows it (absent optional fields as "")."""
    return {field: ("" if value is None and field in OPTIONAL_FIELDS else value)
            for field, value in location.items()}


def create_app(state=None):
    """Build the Delivery.com simulator app around ``state`` (a fresh DeliverycomState by default)."""
    state = state or DeliverycomState()
    app = simulator_app(__name__, state, method_path_query_body_headers(*LOGGED_HEADERS))
    app.json.sort_keys = False

    @app.before_request
    def _authenticate():
        if request.path.startswith("/_sim/") or (state.access_token and _token() == state.access_token):
            return None
        return _error([BAD_TOKEN], 401)

    @app.errorhandler(404)
    def _not_found(_error):
        return _error([{"code": "not_found", "user_msg": "Not found.", "dev_msg": f"No route {request.path}"}], 404)

    @app.errorhandler(405)
    def _not_allowed(_error):
        return _error([{"code": "method_not_allowed", "user_msg": "Method not allowed.",
                        "dev_msg": f"{request.method} is not allowed on {request.path}"}], 405)

    def unverifiable(body):
        return "zip_code" in body and body["zip_code"].strip() not in state.verifiable_zips

    @app.post("/customer/location")
    @app.post("/customer/location/")
    def create_location():
        body = _body()
        errors = validate(body)
        if errors:
            return _error(errors)
        if unverifiable(body):
            return _error([BAD_LOC])
        location = state.add(body)
        return jsonify({"message": [], "location": dict(location, location_id=int(location["location_id"]))})

    @app.put("/customer/location/<location_id>")
    def update_location(location_id):
        if location_id not in state.locations:
            return _error([bad_loc_id(location_id)])
        body = _body()
        errors = validate(body, partial=True)
        if errors:
            return _error(errors)
        if unverifiable(body):
            return _error([BAD_LOC])
        location = state.update(location_id, body)
        if location is None:
            return _error([bad_loc_id(location_id)])
        return jsonify({"message": [LOC_UPDATE_SUCCESS], "location": location})

    @app.delete("/customer/location/<location_id>")
    def delete_location(location_id):
        if not state.delete(location_id):
            return _error([bad_loc_id(location_id)])
        return jsonify({"message": []})

    @app.get("/customer/location")
    @app.get("/customer/location/")
    def list_locations():
        raw = {name: request.args.get(name, "") for name in ("latitude", "longitude")}
        coordinates = {}
        if raw["latitude"] and raw["longitude"]:
            coordinates = {name: _float(value) for name, value in raw.items()}
            bad = [name for name, value in coordinates.items() if value is None]
            if bad:
                return _error([{"code": f"bad_{name}", "field": name, "user_msg": f"The {name} must be a number.",
                                "dev_msg": f"The {name} must be a number."} for name in bad])
        return jsonify({"message": [], "locations": [_listed(location) for location in state.find(**coordinates)]})

    return app


if __name__ == "__main__":
    run_main(create_app, "Delivery.com simulator")
