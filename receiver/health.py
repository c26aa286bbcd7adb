"""``/healthz`` (process up) and ``/readyz`` (Redis and broker reachable; Redis health and Locate2u auth
reported)."""
import redis
from flask import Blueprint, current_app, jsonify

from receiver.oauth import auth_status, key_warning
from workers.store import redis_health

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    handoff = current_app.extensions["l2u.handoff"]
    checks = {"redis": _check(handoff.ledger.redis.ping), "broker": _check(handoff.ping_broker)}
    ready = all(value == "ok" for value in checks.values())
    checks["locate2u"] = _locate2u_status()  # reported, never a reason to be unready
    if key_warning():
        checks["token_key"] = f"warning: {key_warning()}"
    checks["redis_health"] = redis_health.check(handoff.ledger.redis)  # memory, eviction policy, persistence
    response = jsonify({"status": "ready" if ready else "not_ready", "checks": checks})
    response.status_code = 200 if ready else 503
    return response


def _locate2u_status():
    try:
        return auth_status()
    except redis.RedisError as exc:
        return f"error: {type(exc).__name__}"


def _check(probe):
    try:
        probe()
    except Exception as exc:  # a readiness probe reports any failure as its reason
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"
