"""``POST /webhooks/locate2u/<event_type>/<token>``: authenticate, check, record, enqueue."""
import hashlib
import json

from flask import Blueprint, current_app, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from receiver.errors import error_response
from receiver.handoff import Unavailable
from workers.domain import json_text
from workers.domain.events import EVENT_TYPES, missing_key_field
from workers.locate2u.webhook_auth import token_matches

bp = Blueprint("webhooks", __name__)
RETRY_AFTER_SECONDS = 5


def delivery_id_for(event_type, body):
    """SHA-256 of event type and raw body: the same delivery twice has the same id."""
    return hashlib.sha256(event_type.encode() + b"\n" + body).hexdigest()


def _parse(body):
    """``(text, payload, problem)``: the body as UTF-8 text (a leading BOM dropped) and its JSON object.

    The text is what the ledger keeps, so a worker parses exactly what was checked here.
    """
    try:
        text = body.decode("utf-8-sig")
        payload = json.loads(text, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, None, f"body is not valid JSON: {exc}"
    except RecursionError:
        return None, None, "body is not valid JSON: nested too deeply"
    if not isinstance(payload, dict):
        return None, None, f"body must be a JSON object, not {type(payload).__name__}"
    if json_text.nested_deeper_than(payload):
        return None, None, f"body is nested deeper than {json_text.MAX_DEPTH} levels"
    return text, payload, None


def _not_json(token):
    """``json.loads`` reads ``NaN`` and ``Infinity``; JSON has no such numbers (a forward endpoint's
    parser refuses them), so a body holding one is not valid JSON."""
    raise ValueError(f"{token} is not a JSON number")


def _read_body():
    """The body, or 413 when it is over the limit, also when it is streamed without a Content-Length
    (Werkzeug then stops reading at the limit without saying so; one more byte tells)."""
    body = request.get_data(cache=False)
    if (request.content_length is None and len(body) >= current_app.config["MAX_CONTENT_LENGTH"]
            and request.environ["wsgi.input"].read(1)):
        raise RequestEntityTooLarge()
    return body


@bp.post("/webhooks/locate2u/<event_type>/<token>")
def receive(event_type, token):
    if event_type not in EVENT_TYPES:
        return error_response(404, "unknown_event_type", f"unknown event type {event_type!r}",
                              known=sorted(EVENT_TYPES))
    settings = current_app.extensions["l2u.settings"]
    if not token_matches(token, event_type, (settings.webhook_secret, settings.webhook_secret_previous)):
        return error_response(401, "invalid_token", "the URL token is not valid for this event type")
    body = _read_body()
    if not body.strip():
        return error_response(400, "empty_body", "the request body is empty; a JSON object is required")
    text, payload, problem = _parse(body)
    if problem:
        return error_response(400, "invalid_body", problem)
    handoff = current_app.extensions["l2u.handoff"]
    try:
        missing = missing_key_field(event_type, payload)
        if missing:
            message = f"field {missing!r} is required for {event_type}"
            handoff.quarantine_delivery(event_type, text, message, {missing: ["Missing data."]})
            return error_response(422, "missing_field", message, field=missing)
        delivery_id = delivery_id_for(event_type, body)
        status = g.l2u_status = handoff.accept(delivery_id, event_type, text)
    except Unavailable as exc:
        current_app.logger.warning("delivery refused for now: %s", exc)
        return error_response(503, "unavailable", "temporarily unable to accept deliveries; retry later",
                              retry_after=RETRY_AFTER_SECONDS)
    return jsonify({"status": status, "delivery_id": delivery_id})
