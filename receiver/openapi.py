"""``GET /openapi.json``: the receiver's OpenAPI 3 document, generated with apispec.

Each event type is one operation whose request body is that type's marshmallow
schema from ``workers.domain.events``; every rejection is the one ``Error`` shape of
``receiver.errors``. The URL token is a path parameter described by its shape
only: the document is public and names no secret.
"""
import functools
from importlib import metadata

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, jsonify
from marshmallow import Schema, fields, validate

from workers.domain.events import ANY_ENTITY_KEYS, EVENT_TYPES, SCHEMAS

bp = Blueprint("openapi", __name__)


class ErrorSchema(Schema):
    """The body of every 4xx/5xx answer (``receiver.errors.error_response``)."""

    error = fields.String(required=True, metadata={"description": "stable machine-readable code, e.g. invalid_token "
                                                                  "(each answer below names its codes)"})
    message = fields.String(required=True, metadata={"description": "what is wrong, for a person"})
    field = fields.String(metadata={"description": "422: the key field the delivery lacks"})
    known = fields.List(fields.String(), metadata={"description": "404: the event types this relay knows"})


class AcceptedSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["accepted", "duplicate"]))
    delivery_id = fields.String(required=True, validate=validate.Regexp("^[0-9a-f]{64}$"),
                                metadata={"description": "SHA-256 of event type and raw body"})


class HealthSchema(Schema):
    status = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.Raw(), metadata={
        "description": "per check \"ok\" or \"error: ...\" (redis, broker), the Locate2u auth state, "
                       "token_key (a warning while RELAY_TOKEN_KEYS is unset) and redis_health (an object)"})


# status -> description, for the answers documented on each operation
WEBHOOK_ERRORS = {
    400: "empty_body: the body is empty; invalid_body: not UTF-8 JSON, not a JSON object or nested deeper than 32 "
         "levels",
    401: "invalid_token: the URL token is not valid for this event type (current or previous secret)",
    404: "unknown_event_type, or not_found: unknown route",
    413: "request_entity_too_large: the body is larger than RELAY_MAX_BODY_BYTES",
    422: "missing_field: a key field is missing; the body is kept in the quarantine",
    503: "unavailable: Redis or the broker is down; retry after Retry-After seconds (nothing was stored)",
}
OAUTH_ERRORS = {
    404: "not_found: the code flow is off (LOCATE2U_GRANT is not authorization_code, or LOCATE2U_CLIENT_ID is "
         "unset), so the route does not exist",
    409: "code_flow_unavailable: RELAY_PUBLIC_URL is unset",
    503: "unavailable: Redis is unavailable",
}


def _errors(answers):
    return {str(status): {"description": text, "content": {"application/json": {"schema": "Error"}}}
            for status, text in answers.items()}


def _json(schema, description):
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _add_webhooks(spec):
    token = {"name": "token", "in": "path", "required": True,
             "description": "HMAC-SHA256 of the event type under RELAY_WEBHOOK_SECRET, URL-safe base64",
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$"}}
    for event_type, schema in SCHEMAS.items():
        name = schema.__name__
        if name not in spec.components.schemas:  # trip.created and trip.assigned share TripEvent
            spec.components.schema(name, schema=schema)
        body = {"$ref": f"#/components/schemas/{name}"}
        if not EVENT_TYPES[event_type].key_fields:  # note.created: any one entity key
            body = {"allOf": [body, {"anyOf": [{"required": [key], "properties": {key: {"type": "integer"}}}
                                               for key in ANY_ENTITY_KEYS]}]}
        spec.path(path=f"/webhooks/locate2u/{event_type}/{{token}}", operations={"post": {
            "operationId": f"deliver_{event_type.replace('.', '_').replace('-', '_')}",
            "summary": f"Receive a Locate2u {event_type} delivery",
            "description": "Recorded and queued after the token and key-field checks; the workers validate "
                           "the rest and quarantine what does not fit the schema.",
            "parameters": [token],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"200": _json("Accepted", "recorded and queued, or a duplicate of one that was"),
                          **_errors(WEBHOOK_ERRORS)}}})


def _add_operations(spec):
    spec.path(path="/healthz", operations={"get": {
        "operationId": "healthz", "responses": {"200": _json("Health", "the process is up")}}})
    spec.path(path="/readyz", operations={"get": {"operationId": "readyz", "responses": {
        "200": _json("Health", "Redis and the broker are reachable"),
        "503": _json("Health", "Redis or the broker is unreachable")}}})
    spec.path(path="/metrics", operations={"get": {"operationId": "metrics", "responses": {
        "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **_errors({401: "unauthorized: RELAY_METRICS_TOKEN or RELAY_METRICS_BASIC_AUTH is set and the request "
                        "does not carry it"})}}})
    spec.path(path="/openapi.json", operations={"get": {"operationId": "openapi", "responses": {
        "200": _json({"type": "object"}, "this document")}}})
    link = {"name": "link", "in": "query", "required": False, "schema": {"type": "string"},
            "description": "the operator's signed, single-use link token printed by l2u-relay oauth url"}
    spec.path(path="/oauth/locate2u/start", operations={"get": {
        "operationId": "oauth_start", "parameters": [link], "responses": {
            "302": {"description": "to the identity server's authorize URL, with a single-use state, a PKCE "
                                   "challenge and the state cookie"},
            **_errors({403: "invalid_link, expired_link or used_link: not started by the operator's link "
                            "(nothing is stored)", **OAUTH_ERRORS})}}})
    query = [{"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
             for name in ("state", "code", "error", "error_description")]
    spec.path(path="/oauth/locate2u/callback", operations={"get": {
        "operationId": "oauth_callback", "parameters": query, "responses": {
            "200": _json({"type": "object"}, "authorised; tokens stored"),
            **_errors({400: "invalid_state (unknown, expired or used), foreign_browser (another browser "
                            "started it), authorization_denied, missing_code or code_rejected",
                       409: "account_changed: another Locate2u account approved; its tokens wait for "
                            "l2u-relay oauth accept-account, or code_flow_unavailable: RELAY_PUBLIC_URL is unset",
                       502: "identity_server_unavailable: the identity server could not be reached",
                       **{status: text for status, text in OAUTH_ERRORS.items() if status != 409}})}}})


@functools.cache
def build_document():
    """The OpenAPI document as a dict (the same for every app: it names no setting)."""
    spec = APISpec(title="locate2u-relay receiver", version=metadata.version("locate2u-relay"),
                   openapi_version="3.0.3", plugins=[MarshmallowPlugin()])
    for name, schema in (("Error", ErrorSchema), ("Accepted", AcceptedSchema), ("Health", HealthSchema)):
        spec.components.schema(name, schema=schema)
    _add_webhooks(spec)
    _add_operations(spec)
    return spec.to_dict()


@bp.get("/openapi.json")
def openapi_document():
    return jsonify(build_document())
