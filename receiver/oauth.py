"""``/oauth/locate2u/start`` and ``/oauth/locate2u/callback``: the authorization-code flow.

The routes exist only with ``LOCATE2U_GRANT=authorization_code``. ``start``
needs the operator's signed, expiring, single-use link (``l2u-relay oauth
url``); without one it answers 403 and writes nothing. It then issues a
single-use ``state`` (kept hashed in Redis for ten minutes, with the PKCE
verifier and the hash of a nonce it sets as an HttpOnly cookie) and
redirects to the identity server with a PKCE S256 challenge. ``callback``
consumes the state, checks the cookie, redeems the code with the verifier,
asks ``whoami`` and stores the tokens unless they act as another Locate2u
account than the one linked (then the operator must accept it from the CLI).
"""
import logging
import secrets

import redis
from flask import Blueprint, current_app, jsonify, redirect, request

from receiver.errors import error_response
from receiver.handoff import BROKER_ERRORS
from workers.celery_config import CONTROL_QUEUE, SYNC_SUBSCRIPTIONS
from workers.config import ConfigError
from workers.resilience.errors import PermanentError, RetriableError
from workers.locate2u.client import Locate2uClient
from workers.locate2u.linking import AccountChanged, link_account
from workers.locate2u.oauth_links import STATE_TTL, OAuthStates, StartLinks, pkce_pair

log = logging.getLogger(__name__)
bp = Blueprint("oauth", __name__, url_prefix="/oauth/locate2u")
RETRY_AFTER_SECONDS = 30
COOKIE = "l2u_oauth_browser"
COOKIE_PATH = "/oauth/locate2u/"
LINK_MESSAGES = {
    "invalid_link": "starting the Locate2u authorisation needs the operator's signed link: "
                    "run l2u-relay oauth url and open the link it prints",
    "expired_link": "the link has expired (it is valid for 10 minutes): run l2u-relay oauth url again",
    "used_link": "the link was already used (it is single-use): run l2u-relay oauth url again",
}


def init_app(app):
    """Build the Locate2u client once (None when not configured); the routes only for the code grant."""
    settings = app.extensions["l2u.settings"]
    redis_client = app.extensions["l2u.handoff"].ledger.redis  # one Redis pool per web process
    app.extensions["l2u.locate2u"] = Locate2uClient.from_settings(settings, redis_client)
    app.extensions["l2u.oauth_states"] = OAuthStates(redis_client)
    app.extensions["l2u.oauth_links"] = StartLinks(redis_client, settings)
    if app.extensions["l2u.locate2u"] is not None and settings.locate2u_grant == "authorization_code":
        app.register_blueprint(bp)


def auth_status():
    """The Locate2u line of ``/readyz``: "ok", "not configured" or "reauthorization required: ..."."""
    client = current_app.extensions["l2u.locate2u"]
    return "not configured" if client is None else client.tokens.status()


def key_warning():
    """The ``/readyz`` warning while stored tokens use the key derived from the webhook secret, else None."""
    client = current_app.extensions["l2u.locate2u"]
    return None if client is None else client.tokens.store.key_warning


@bp.errorhandler(ConfigError)
def _misconfigured(exc):
    return error_response(409, "code_flow_unavailable", str(exc))


@bp.errorhandler(redis.RedisError)
def _redis_down(exc):
    log.warning("OAuth route without Redis: %s", type(exc).__name__)
    return error_response(503, "unavailable", "Redis is unavailable; retry later", retry_after=RETRY_AFTER_SECONDS)


@bp.get("/start")
def start():
    tokens = current_app.extensions["l2u.locate2u"].tokens
    tokens.check_code_flow()  # a missing RELAY_PUBLIC_URL is 409 before anything is spent or stored
    problem = current_app.extensions["l2u.oauth_links"].check(request.args.get("link"))
    if problem:
        return error_response(403, problem, LINK_MESSAGES[problem])
    verifier, challenge = pkce_pair()
    nonce = secrets.token_urlsafe(32)
    state = current_app.extensions["l2u.oauth_states"].issue(verifier, browser_nonce=nonce)
    response = redirect(tokens.authorize_url(state, challenge), code=302)
    response.set_cookie(COOKIE, nonce, max_age=STATE_TTL, path=COOKIE_PATH, httponly=True, samesite="Lax",
                        secure=_served_over_https())
    return response


@bp.get("/callback")
def callback():
    response = _callback(request.args)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="Lax", secure=_served_over_https())
    return response


def _callback(args):
    record = current_app.extensions["l2u.oauth_states"].consume(args.get("state", ""))
    if record is None:
        return error_response(400, "invalid_state", "the state is unknown, expired or already used; "
                                                    "start again with l2u-relay oauth url")
    if not OAuthStates.same_browser(record, request.cookies.get(COOKIE)):
        return error_response(400, "foreign_browser", "this browser did not start the authorisation "
                                                      "(state cookie missing or different); start again")
    if args.get("error"):
        return error_response(400, "authorization_denied",
                              f"Locate2u answered {args['error']}: {args.get('error_description', '')}".strip(": "))
    if not args.get("code"):
        return error_response(400, "missing_code", "the callback carries no code")
    try:
        user = link_account(current_app.extensions["l2u.locate2u"], args["code"], record["verifier"])
    except RetriableError as exc:
        return error_response(502, "identity_server_unavailable", exc.message, retry_after=RETRY_AFTER_SECONDS)
    except AccountChanged as exc:
        return error_response(409, "account_changed", exc.message)
    except PermanentError as exc:
        return error_response(400, "code_rejected", exc.message)
    log.info("Locate2u authorised through the OAuth callback (team %s); tokens stored", user.get("teamId"))
    _request_sync()
    return jsonify({"status": "authorized",
                    "message": "Locate2u access granted and stored; the workers will sync the webhook subscriptions"})


def _served_over_https():
    public_url = current_app.extensions["l2u.settings"].public_url or ""
    return request.is_secure or public_url.startswith("https://")


def _request_sync():
    try:
        current_app.extensions["l2u.handoff"].producer.send_task(SYNC_SUBSCRIPTIONS, queue=CONTROL_QUEUE,
                                                                 retry=False)
    except BROKER_ERRORS as exc:
        log.warning("could not queue a subscriptions sync (%s); the scheduled one will do it", type(exc).__name__)
