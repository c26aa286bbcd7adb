"""``/healthz`` (process up) and ``/readyz`` (Redis and broker reachable)."""
from flask import Blueprint, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    handoff = current_app.extensions["l2u.handoff"]
    checks = {"redis": _check(handoff.ledger.redis.ping), "broker": _check(_broker_ping(handoff.producer))}
    ready = all(value == "ok" for value in checks.values())
    response = jsonify({"status": "ready" if ready else "not_ready", "checks": checks})
    response.status_code = 200 if ready else 503
    return response


def _broker_ping(producer):
    def ping():
        with producer.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    return ping


def _check(probe):
    try:
        probe()
    except Exception as exc:  # a readiness probe reports any failure as its reason
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"
