"""Loopback simulator of Locate2u's identity server and Customer Integration API.

One Flask app plays both hosts of the real platform:

- ``id.locate2u.com``: ``GET /connect/authorize`` (the simulated user,
  ``Locate2uState.user``, approves at once; PKCE S256 challenges are kept and
  their verifier is then required) and ``POST /connect/token`` with the
  ``client_credentials``, ``authorization_code`` and ``refresh_token`` grants
  (RFC 6749 errors);
- ``integration.locate2u.com``: ``/v1/Discovery/User`` (the user whose
  consent bought the token), ``/v1/Stops`` and ``/v1/Webhooks``, all behind
  ``Authorization: Bearer <token>``.

``Locate2uState.deliver()`` plays the platform's side of a webhook: it POSTs a
JSON body, with no event-type field and no auth header, to every URL
subscribed to an event type. Faults (429 + ``Retry-After``, 5xx, latency) come
from ``base.install_faults``; ``GET /_sim/state`` shows the state as JSON.

Run standalone with ``python -m workers.ops.simulators.locate2u --port 8081``.
"""
import base64
import copy
import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
from collections import Counter
from datetime import date
from urllib.parse import unquote_plus, urlencode, urlsplit

import requests
from flask import Blueprint, Flask, current_app, g, jsonify, redirect, request
from urllib3.util import parse_url
from werkzeug.exceptions import HTTPException

from workers.ops.simulators.base import FaultPlan, SimulatorServer, install_faults, run_main

# --- reference data -------------------------------------------------------

EVENT_TYPES = (
    "stop.assigned",
    "stop.status-changed",
    "shipment.assigned",
    "shipment.status-changed",
    "trip.status-changed",
    "trip.created",
    "trip.assigned",
    "note.created",
)

API_SCOPE = "integrations-api"
OFFLINE_SCOPE = "offline_access"
KNOWN_SCOPES = {API_SCOPE, "locate2u.api", OFFLINE_SCOPE}
CODE_LIFETIME = 300  # seconds, IdentityServer's default for authorization codes
MAX_IMPORT = 500

USER = {"userId": 12345, "email": "sim.user@example.com", "teamId": 67890, "teamName": "Simulated Team"}

# The stop record of the spec's GET /v1/Stops/{id} example: add_stop() defaults.
EXAMPLE_STOP = {
    "stopId": 164557, "status": "Pending",
    "contact": {"name": "Matthew Robinson", "phone": "0123456789", "email": "matt.robinson@email.com"},
    "name": "Locate2u", "address": "Level 4, Suite 4.11, 55 Miller St, Pyrmont NSW 2009, Australia",
    "location": {"latitude": -33.8706672, "longitude": 151.192487},
    "tripDate": "2021-12-01", "appointmentTime": "12:00", "timeWindowStart": None,
    "timeWindowEnd": None, "durationMinutes": 10, "notes": "Please call before you deliver",
    "lastModifiedDate": "2021-07-16T06:26:04.937Z", "customFields": {}, "type": None,
    "shipmentId": None, "load": {}, "source": None, "sourceReference": None,
    "customerId": None, "arrivalDate": None,
}

# Fields a client may send to POST /v1/Stops, with the JSON types each accepts
# (None = null). Others (stopId, status, dates set by the server) are ignored.
NULL = type(None)
STOP_INPUT_TYPES = {
    "name": (str,), "address": (str,),
    "contact": (dict, NULL), "location": (dict, NULL),
    "tripDate": (str, NULL), "appointmentTime": (str, NULL),
    "timeWindowStart": (str, NULL), "timeWindowEnd": (str, NULL),
    "durationMinutes": (int, NULL), "notes": (str, NULL),
    "customFields": (dict, NULL), "type": (str, NULL), "load": (dict, NULL),
    "source": (str, NULL), "sourceReference": (str, NULL),
    "customerId": (int, str, NULL), "shipmentId": (int, NULL),
}
JSON_TYPE_NAMES = {str: "a string", dict: "an object", int: "an integer", NULL: "null"}


class OAuthError(Exception):
    """An RFC 6749 error answer of the token endpoint."""

    def __init__(self, error, status=400, description=None):
        super().__init__(error)
        self.error, self.status, self.description = error, status, description


def _now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _split_scope(scope):
    return (scope or "").split()


def s256(verifier):
    """The PKCE S256 code challenge of ``verifier`` (RFC 7636 section 4.2)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


# --- state ----------------------------------------------------------------

class Locate2uState:
    """Everything the simulated platform knows; all methods take the lock."""

    def __init__(self, client_id="test-client", client_secret="test-secret", token_lifetime=3600):
        self.client_id, self.client_secret, self.token_lifetime = client_id, client_secret, token_lifetime
        self.user = dict(USER)  # who approves the next consent (and whom client credentials act as)
        self.event_types = EVENT_TYPES  # what GET /v1/Webhooks/event-types offers
        self.parses_urls = False  # True: a subscription's URL is kept as a parsed URI gives it back (.NET's Uri)
        self.token_requests = []
        self.stops = {}
        self.webhooks = {}
        self.requests_log = []
        self._lock = threading.RLock()
        self._codes = {}    # code -> {client_id, redirect_uri, scope, state, challenge, user, expires_at, used, issued}
        self._access = {}   # access token -> {client_id, scope, user, expires_at}
        self._refresh = {}  # refresh token -> {client_id, scope, user, code}
        self._stop_ids = itertools.count(100001)
        self._webhook_ids = itertools.count(1)

    # identity server ------------------------------------------------------

    def check_client(self, client_id, client_secret):
        """True when the pair is the registered client (constant-time compare)."""
        return (hmac.compare_digest(str(client_id or ""), self.client_id)
                and hmac.compare_digest(str(client_secret or ""), self.client_secret))

    def issue_code(self, redirect_uri, scope, state, challenge=None):
        """Issue a single-use authorization code, as /connect/authorize does; return the code.

        ``challenge`` is a PKCE S256 code challenge: redeeming then needs its verifier.
        """
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = {"client_id": self.client_id, "redirect_uri": redirect_uri,
                                 "scope": scope, "state": state, "challenge": challenge, "user": dict(self.user),
                                 "used": False, "issued": [], "expires_at": time.monotonic() + CODE_LIFETIME}
        return code

    def redeem_code(self, code, client_id, redirect_uri, verifier=None):
        """Consume ``code`` and return ``(scope, user)``; a reused code revokes its tokens."""
        with self._lock:
            record = self._codes.get(code)
            if record is None or record["client_id"] != client_id:
                raise OAuthError("invalid_grant", description="unknown authorization code")
            if record["used"]:
                self._revoke(record["issued"])  # RFC 6749 section 4.1.2
                raise OAuthError("invalid_grant", description="authorization code already used")
            record["used"] = True
            if time.monotonic() > record["expires_at"]:
                raise OAuthError("invalid_grant", description="authorization code expired")
            if redirect_uri != record["redirect_uri"]:
                raise OAuthError("invalid_grant", description="redirect_uri does not match")
            if record["challenge"] is not None and not hmac.compare_digest(s256(verifier or ""),
                                                                             record["challenge"]):
                raise OAuthError("invalid_grant", description="code_verifier missing or wrong (PKCE)")
            return record["scope"], record["user"]

    def redeem_refresh(self, refresh_token, client_id, requested_scope=None):
        """Consume a refresh token (rotation) and return ``(scope, user)`` to grant."""
        with self._lock:
            record = self._refresh.get(refresh_token)
            if record is None or record["client_id"] != client_id:
                raise OAuthError("invalid_grant", description="unknown or used refresh token")
            if requested_scope and not set(_split_scope(requested_scope)) <= set(_split_scope(record["scope"])):
                raise OAuthError("invalid_scope", description="scope exceeds the original grant")
            del self._refresh[refresh_token]
            return requested_scope or record["scope"], record["user"]

    def issue_tokens(self, client_id, scope, refresh=False, code=None, user=None):
        """Mint an access token (and a refresh token) acting as ``user``; return the token response."""
        access = secrets.token_urlsafe(32)
        with self._lock:
            lifetime = self.token_lifetime
            user = dict(user or self.user)
            self._access[access] = {"client_id": client_id, "scope": scope, "user": user,
                                    "expires_at": time.monotonic() + lifetime}
            body = {"access_token": access, "expires_in": lifetime, "token_type": "Bearer", "scope": scope}
            issued = [access]
            if refresh:
                body["refresh_token"] = secrets.token_urlsafe(32)
                self._refresh[body["refresh_token"]] = {"client_id": client_id, "scope": scope, "user": user,
                                                        "code": code}
                issued.append(body["refresh_token"])
            if code in self._codes:
                self._codes[code]["issued"].extend(issued)
        return body

    def token_info(self, token):
        """The record of a valid, unexpired access token, or None."""
        with self._lock:
            record = self._access.get(token)
            if record is None or time.monotonic() >= record["expires_at"]:
                return None
            return dict(record)

    def revoke_refresh_tokens(self):
        """Forget every refresh token, as when a user withdraws the relay's access."""
        with self._lock:
            self._refresh.clear()

    def revoke_access_tokens(self):
        """Forget every access token: the next API call with one answers 401."""
        with self._lock:
            self._access.clear()

    def _revoke(self, tokens):
        for token in tokens:
            self._access.pop(token, None)
            self._refresh.pop(token, None)

    # stops ----------------------------------------------------------------

    def add_stop(self, **fields):
        """Store a stop built from the spec example, overridden by ``fields``; return it."""
        with self._lock:
            stop = copy.deepcopy(EXAMPLE_STOP)
            stop.update(copy.deepcopy(fields))
            if "stopId" in fields:
                self._stop_ids = itertools.count(max(next(self._stop_ids), int(fields["stopId"]) + 1))
            else:
                stop["stopId"] = next(self._stop_ids)
            self.stops[stop["stopId"]] = stop
            return copy.deepcopy(stop)

    def create_stop(self, fields):
        """Store a stop sent to the API (validated ``fields``): status Created, not geocoded."""
        stop = {key: None for key in EXAMPLE_STOP}
        stop.update(customFields={}, load={}, status="Created", lastModifiedDate=_now_iso())
        stop.update({k: copy.deepcopy(v) for k, v in fields.items() if k in STOP_INPUT_TYPES})
        with self._lock:
            stop["stopId"] = next(self._stop_ids)
            self.stops[stop["stopId"]] = stop
            return copy.deepcopy(stop)

    def get_stop(self, stop_id):
        with self._lock:
            return copy.deepcopy(self.stops.get(stop_id))

    # webhooks -------------------------------------------------------------

    def _kept(self, url):
        """``url`` as stored: given, or (``parses_urls``) with scheme and host in lower case and no default port."""
        if not self.parses_urls:
            return url
        parsed = parse_url(url)
        port = None if parsed.port == {"http": 80, "https": 443}.get(parsed.scheme) else parsed.port
        return parsed._replace(port=port).url

    def add_webhook(self, event_type, url):
        with self._lock:
            hook = {"id": next(self._webhook_ids), "eventType": event_type, "url": self._kept(url)}
            self.webhooks[hook["id"]] = hook
            return dict(hook)

    def update_webhook(self, hook_id, **changes):
        with self._lock:
            if hook_id not in self.webhooks:
                return None
            if "url" in changes:
                changes["url"] = self._kept(changes["url"])
            self.webhooks[hook_id].update(changes)
            return dict(self.webhooks[hook_id])

    def delete_webhook(self, hook_id):
        with self._lock:
            return self.webhooks.pop(hook_id, None) is not None

    def list_webhooks(self):
        with self._lock:
            return [dict(hook) for _, hook in sorted(self.webhooks.items())]

    def deliver(self, event_type, payload, session=None):
        """POST ``payload`` to every URL subscribed to ``event_type``, as the platform does.

        ``payload`` is a JSON-able object, or ``str``/``bytes`` sent as the raw
        body. Headers: ``Content-Type: application/json`` only (no auth, no
        event type). Returns the responses in subscription order.
        """
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {event_type!r}")
        body = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
        if isinstance(body, str):
            body = body.encode("utf-8")
        urls = [hook["url"] for hook in self.list_webhooks() if hook["eventType"] == event_type]
        own_session = session is None
        if own_session:
            session = requests.Session()
            session.trust_env = False  # loopback: never through a proxy from the environment
        try:
            return [session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
                    for url in urls]
        finally:
            if own_session:
                session.close()

    # logs -----------------------------------------------------------------

    def log_request(self, method, path):
        with self._lock:
            self.requests_log.append((method, path))

    def log_token_request(self, form):
        with self._lock:
            self.token_requests.append({k: v for k, v in form.items() if k != "client_secret"})

    def snapshot(self):
        """JSON-able view for ``GET /_sim/state``."""
        with self._lock:
            return {
                "stops": [copy.deepcopy(stop) for _, stop in sorted(self.stops.items())],
                "webhooks": self.list_webhooks(),
                "token_requests": dict(Counter(r.get("grant_type", "") for r in self.token_requests)),
                "api_requests": len(self.requests_log),
            }


def _state():
    return current_app.config["STATE"]


# --- identity server: /connect ---------------------------------------------

identity = Blueprint("identity", __name__, url_prefix="/connect")


def _oauth_error(error, status=400, description=None):
    body = {"error": error}
    if description:
        body["error_description"] = description
    response = jsonify(body)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="id.locate2u.com"'
    return response


def _authorize_error(args, state):
    """The error code for an authorize request, or None when it is acceptable."""
    scopes = _split_scope(args.get("scope"))
    redirect_uri = urlsplit(args.get("redirect_uri", ""))
    if args.get("response_type") != "code" or redirect_uri.scheme not in ("http", "https") or not redirect_uri.netloc:
        return "invalid_request"
    if args.get("client_id") != state.client_id:
        return "unauthorized_client"
    if API_SCOPE not in scopes or not set(scopes) <= KNOWN_SCOPES:
        return "invalid_scope"
    if args.get("code_challenge") is not None and args.get("code_challenge_method") != "S256":
        return "invalid_request"  # only S256 is offered, as Locate2u's IdentityServer is configured
    return None


@identity.get("/authorize")
def authorize():
    """Validate, then approve at once: 302 to ``redirect_uri?code=...&state=...``."""
    state, args = _state(), request.args
    error = _authorize_error(args, state)
    if error:
        return _oauth_error(error)
    code = state.issue_code(args["redirect_uri"], " ".join(_split_scope(args["scope"])), args.get("state"),
                            args.get("code_challenge"))
    query = {"code": code}
    if args.get("state") is not None:
        query["state"] = args["state"]
    separator = "&" if urlsplit(args["redirect_uri"]).query else "?"
    return redirect(args["redirect_uri"] + separator + urlencode(query), code=302)


def _client_credentials_from_request():
    """(client_id, client_secret) from HTTP Basic (form-urlencoded parts) or the form body."""
    auth = request.authorization
    if auth is not None and auth.type == "basic":
        return unquote_plus(auth.username or ""), unquote_plus(auth.password or "")
    return request.form.get("client_id"), request.form.get("client_secret")


def _grant_client_credentials(state, client_id, form):
    scope = form.get("scope") or API_SCOPE
    scopes = _split_scope(scope)
    if not set(scopes) <= KNOWN_SCOPES or OFFLINE_SCOPE in scopes:
        raise OAuthError("invalid_scope")
    return state.issue_tokens(client_id, " ".join(scopes))


def _grant_authorization_code(state, client_id, form):
    if not form.get("code") or not form.get("redirect_uri"):
        raise OAuthError("invalid_request", description="code and redirect_uri are required")
    scope, user = state.redeem_code(form["code"], client_id, form["redirect_uri"], form.get("code_verifier"))
    return state.issue_tokens(client_id, scope, refresh=OFFLINE_SCOPE in _split_scope(scope), code=form["code"],
                              user=user)


def _grant_refresh_token(state, client_id, form):
    if not form.get("refresh_token"):
        raise OAuthError("invalid_request", description="refresh_token is required")
    scope, user = state.redeem_refresh(form["refresh_token"], client_id, form.get("scope"))
    return state.issue_tokens(client_id, scope, refresh=True, user=user)


GRANTS = {
    "client_credentials": _grant_client_credentials,
    "authorization_code": _grant_authorization_code,
    "refresh_token": _grant_refresh_token,
}


@identity.post("/token")
def token():
    """The token endpoint: form-encoded requests only, errors per RFC 6749 section 5.2."""
    state = _state()
    state.log_token_request(request.form)
    if request.mimetype != "application/x-www-form-urlencoded":
        return _oauth_error("invalid_request", description="form-encoded body required")
    grant_type = request.form.get("grant_type")
    if not grant_type:
        return _oauth_error("invalid_request", description="grant_type is required")
    if grant_type not in GRANTS:
        return _oauth_error("unsupported_grant_type")
    client_id, client_secret = _client_credentials_from_request()
    if not state.check_client(client_id, client_secret):
        return _oauth_error("invalid_client", 401)
    try:
        body = GRANTS[grant_type](state, client_id, request.form)
    except OAuthError as exc:
        return _oauth_error(exc.error, exc.status, exc.description)
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


# --- Customer Integration API: /v1 -----------------------------------------

api = Blueprint("api", __name__, url_prefix="/v1")


def _bearer_error(status, error, description=None):
    response = jsonify({"error": error})
    response.status_code = status
    challenge = "Bearer"
    if description:
        challenge += f' error="{error}", error_description="{description}"'
    response.headers["WWW-Authenticate"] = challenge
    return response


@api.before_request
def _require_token():
    """Every API route needs a valid, unexpired bearer token with the API scope."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _bearer_error(401, "invalid_token")
    record = _state().token_info(token.strip())
    if record is None:
        return _bearer_error(401, "invalid_token", "The access token is invalid or expired")
    if API_SCOPE not in _split_scope(record["scope"]):
        return _bearer_error(403, "insufficient_scope", f"The {API_SCOPE} scope is required")
    g.token = record
    return None


def _validation_error(errors, status=400):
    response = jsonify({"title": "One or more validation errors occurred.", "status": status, "errors": errors})
    response.status_code = status
    return response


def _not_found(what):
    response = jsonify({"title": "Not Found", "status": 404, "detail": f"{what} not found"})
    response.status_code = 404
    return response


def _json_body(kind):
    """The parsed JSON body if it is a ``kind`` (dict or list), else an error response."""
    if not request.is_json:
        response = jsonify({"title": "Unsupported Media Type", "status": 415})
        response.status_code = 415
        return None, response
    body = request.get_json(silent=True)
    if not isinstance(body, kind):
        noun = "an object" if kind is dict else "an array"
        return None, _validation_error({"body": [f"The request body must be {noun}."]})
    return body, None


def _type_ok(value, types):
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def validate_stop(data):
    """Validation errors ``{field: [message]}`` for one stop sent to the API."""
    if not isinstance(data, dict):
        return {"stop": ["Each stop must be a JSON object."]}
    errors = {}
    for field in ("name", "address"):
        value = data.get(field)
        if not isinstance(value, str) or not value.strip():
            errors[field] = [f"The {field} field is required and must be a non-empty string."]
    for field, types in STOP_INPUT_TYPES.items():
        if field in data and field not in errors and not _type_ok(data[field], types):
            names = " or ".join(JSON_TYPE_NAMES[t] for t in types)
            errors[field] = [f"The {field} field must be {names}."]
    if isinstance(data.get("tripDate"), str) and "tripDate" not in errors:
        try:
            date.fromisoformat(data["tripDate"])
        except ValueError:
            errors["tripDate"] = ["The tripDate field must be a date (YYYY-MM-DD)."]
    return errors


def validate_webhook(data, partial=False):
    """Validation errors for a webhook subscription (``partial`` for PUT)."""
    errors = {}
    if partial and not ({"eventType", "url"} & set(data)):
        return {"body": ["Give eventType and/or url."]}
    if not partial or "eventType" in data:
        if data.get("eventType") not in EVENT_TYPES:
            errors["eventType"] = [f"The eventType must be one of: {', '.join(EVENT_TYPES)}."]
    if not partial or "url" in data:
        url = data.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            errors["url"] = ["The url must be an absolute http or https URL."]
    return errors


@api.get("/Discovery/User")
def discovery_user():
    return jsonify(g.token["user"])


@api.get("/Stops/<int:stop_id>")
def get_stop(stop_id):
    stop = _state().get_stop(stop_id)
    return jsonify(stop) if stop is not None else _not_found(f"Stop {stop_id}")


@api.post("/Stops")
def create_stop():
    data, error = _json_body(dict)
    if error is not None:
        return error
    errors = validate_stop(data)
    if errors:
        return _validation_error(errors)
    return jsonify(_state().create_stop(data)), 201


@api.post("/Stops/import")
def import_stops():
    """Bulk create: per-item validation, at most MAX_IMPORT items per call."""
    items, error = _json_body(list)
    if error is not None:
        return error
    if len(items) > MAX_IMPORT:
        return _validation_error({"stops": [f"At most {MAX_IMPORT} stops per import ({len(items)} sent)."]})
    created, failed = [], []
    for index, item in enumerate(items):
        errors = validate_stop(item)
        if errors:
            failed.append({"index": index, "errors": errors})
        else:
            created.append(_state().create_stop(item)["stopId"])
    return jsonify({"created": created, "failed": failed})


@api.get("/Webhooks/event-types")
def event_types():
    return jsonify(list(_state().event_types))


@api.get("/Webhooks")
def list_webhooks():
    return jsonify(_state().list_webhooks())


@api.post("/Webhooks")
def create_webhook():
    data, error = _json_body(dict)
    if error is not None:
        return error
    errors = validate_webhook(data)
    if errors:
        return _validation_error(errors)
    return jsonify(_state().add_webhook(data["eventType"], data["url"])), 201


@api.get("/Webhooks/<int:hook_id>")
def get_webhook(hook_id):
    hook = _state().webhooks.get(hook_id)
    return jsonify(dict(hook)) if hook is not None else _not_found(f"Webhook {hook_id}")


@api.put("/Webhooks/<int:hook_id>")
def update_webhook(hook_id):
    if hook_id not in _state().webhooks:
        return _not_found(f"Webhook {hook_id}")
    data, error = _json_body(dict)
    if error is not None:
        return error
    errors = validate_webhook(data, partial=True)
    if errors:
        return _validation_error(errors)
    hook = _state().update_webhook(hook_id, **{k: data[k] for k in ("eventType", "url") if k in data})
    return jsonify(hook) if hook is not None else _not_found(f"Webhook {hook_id}")


@api.delete("/Webhooks/<int:hook_id>")
def delete_webhook(hook_id):
    if not _state().delete_webhook(hook_id):
        return _not_found(f"Webhook {hook_id}")
    return "", 204


# --- app -------------------------------------------------------------------

def _json_http_error(exc):
    """Unknown routes and wrong methods answer JSON, keeping headers such as Allow."""
    response = exc.get_response()
    response.data = json.dumps({"title": exc.name, "status": exc.code})
    response.content_type = "application/json"
    return response


def create_app(state=None):
    """Build the simulator around ``state`` (a fresh ``Locate2uState`` by default)."""
    app = Flask(__name__)
    app.config["STATE"] = state if state is not None else Locate2uState()
    app.config["FAULTS"] = FaultPlan()

    @app.before_request
    def _log_api_call():
        if request.path.startswith("/v1/"):
            app.config["STATE"].log_request(request.method, request.path)

    install_faults(app, app.config["FAULTS"])
    app.register_blueprint(identity)
    app.register_blueprint(api)
    app.register_error_handler(HTTPException, _json_http_error)

    @app.get("/_sim/state")
    def _sim_state():
        return jsonify(app.config["STATE"].snapshot())

    return app


class Locate2uServer(SimulatorServer):
    """The simulator on a loopback port, with its state and fault plan at hand."""

    def __init__(self, state=None, port=0):
        self.state = state if state is not None else Locate2uState()
        app = create_app(self.state)
        self.faults = app.config["FAULTS"]
        super().__init__(app, port)

    def configure(self, settings, **changes):
        """``settings`` pointed at this simulator as both identity server and API."""
        return settings.replace(**{"locate2u_client_id": self.state.client_id,
                                   "locate2u_client_secret": self.state.client_secret,
                                   "locate2u_api_url": self.url, "locate2u_id_url": self.url, **changes})


if __name__ == "__main__":
    run_main(create_app, "Locate2u simulator")
