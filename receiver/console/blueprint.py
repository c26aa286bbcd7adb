"""The console blueprint, its CSRF protection, its security headers and its action log."""
import logging
from datetime import datetime, timezone

import redis
from flask import Blueprint, current_app, render_template, session
from flask_wtf.csrf import CSRFProtect
from prometheus_client import Counter

log = logging.getLogger("receiver.console")
bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates",
               static_folder="static")
csrf = CSRFProtect()  # bound to the app by init_app; auth checks every console request with it

ACTIONS = Counter("l2u_console_actions", "Operator console actions by kind", ["action"])
ACTION_ITEMS = Counter("l2u_console_action_items", "Items affected by operator console actions", ["action"])
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@bp.errorhandler(redis.RedisError)
def _redis_down(exc):
    log.warning("console page without Redis: %s", type(exc).__name__)
    return render_template("console/error.html", title="Redis unavailable",
                           message=f"Redis cannot be reached ({type(exc).__name__}); try again shortly."), 503


@bp.after_request
def _security_headers(response):
    response.headers.update(SECURITY_HEADERS)
    return response


def runtime():
    """The console's Runtime: the same stores, sinks and clients the CLI builds."""
    return current_app.extensions["l2u.console_runtime"]


def record_action(action, count=1, **details):
    """Log who did what to how many, and count it."""
    who = session.get("operator", "-")
    ACTIONS.labels(action).inc()
    ACTION_ITEMS.labels(action).inc(count)
    extra = " ".join(f"{key}={value}" for key, value in details.items() if value not in (None, ""))
    log.info("console %s by %s: %d item(s)%s", action, who, count, f" ({extra})" if extra else "",
             extra={"operator": who, "console_action": action, "count": count})


@bp.app_template_filter("when")
def when(epoch):
    """Epoch seconds as ``2026-11-27 15:04:05 UTC``."""
    if epoch in (None, ""):
        return "-"
    return datetime.fromtimestamp(float(epoch), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
