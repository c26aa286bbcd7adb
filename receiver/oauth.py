"""``/oauth/locate2u/start`` and ``/oauth/locate2u/callback``: the authorization-code flow.

``start`` issues a single-use ``state`` (kept hashed in Redis for ten minutes)
and redirects to the identity server; ``callback`` consumes the state, redeems
the code, stores the tokens and asks the workers to sync the subscriptions.
"""
import logging

import redis
from flask import Blueprint, current_app, jsonify, redirect, request

from receiver.errors import error_response
from receiver.handoff import BROKER_ERRORS
from workers.celery_config import CONTROL_QUEUE, SYNC_SUBSCRIPTIONS
from workers.config import ConfigError
from workers.errors import PermanentError, RetriableError
from workers.locate2u.client import Locate2uClient
from workers.locate2u.tokens import OAuthStates
from workers.stores import connect

log = logging.getLogger(__name__)
bp = Blueprint("oauth", __name__, url_prefix="/oauth/locate2u")
RETRY_AFTER_SECONDS = 30


def init_app(app):
    """Build the Locate2u client once (None when not configured) and register the routes."""
    settings = app.extensions["l2u.settings"]
    redis_client = connect(settings.redis_url)
    app.extensions["l2u.locate2u"] = Locate2uClient.from_settings(settings, redis_client)
    app.extensions["l2u.oauth_states"] = OAuthStates(redis_client)
    app.register_blueprint(bp)


def auth_status():
    """The Locate2u line of ``/readyz``: "ok", "not configured" or "reauthorization required: ..."."""
    client = current_app.extensions["l2u.locate2u"]
    return "not configured" if client is None else client.tokens.status()


@bp.before_request
def _configured():
    if current_app.extensions["l2u.locate2u"] is None:
        return error_response(404, "not_configured", "Locate2u is not configured (LOCATE2U_CLIENT_ID is unset)")
    return None


@bp.errorhandler(ConfigError)
def _misconfigured(exc):
    return error_response(409, "code_flow_unavailable", str(exc))


@bp.errorhandler(redis.RedisError)
def _redis_down(exc):
    log.warning("OAuth route without Redis: %s", type(exc).__name__)
    return error_response(503, "unavailable", "Redis is unavailable; retry later", retry_after=RETRY_AFTER_SECONDS)


@bp.get("/start")
def start():
    state = current_app.extensions["l2u.oauth_states"].issue()
    return redirect(current_app.extensions["l2u.locate2u"].tokens.authorize_url(state), code=302)


@bp.get("/callback")
def callback():
    args = request.args
    if not current_app.extensions["l2u.oauth_states"].consume(args.get("state", "")):
        return error_response(400, "invalid_state", "the state is unknown, expired or already used; "
                                                    "start again at /oauth/locate2u/start")
    if args.get("error"):
        return error_response(400, "authorization_denied",
                              f"Locate2u answered {args['error']}: {args.get('error_description', '')}".strip(": "))
    if not args.get("code"):
        return error_response(400, "missing_code", "the callback carries no code")
    try:
        current_app.extensions["l2u.locate2u"].tokens.exchange_code(args["code"])
    except RetriableError as exc:
        return error_response(502, "identity_server_unavailable", exc.message, retry_after=RETRY_AFTER_SECONDS)
    except PermanentError as exc:
        return error_response(400, "code_rejected", exc.message)
    log.info("Locate2u authorised through the OAuth callback; tokens stored")
    _request_sync()
    return jsonify({"status": "authorized",
                    "message": "Locate2u access granted and stored; the workers will sync the webhook subscriptions"})


def _request_sync():
    try:
        current_app.extensions["l2u.handoff"].producer.send_task(SYNC_SUBSCRIPTIONS, queue=CONTROL_QUEUE,
                                                                 retry=False)
    except BROKER_ERRORS as exc:
        log.warning("could not queue a subscriptions sync (%s); the scheduled one will do it", type(exc).__name__)
