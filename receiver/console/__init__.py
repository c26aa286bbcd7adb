"""The operator console under ``/console``: server-rendered pages over the stores the CLI reads.

Served by the web process only when ``RELAY_CONSOLE_PASSWORD`` or
``RELAY_CONSOLE_OPERATORS`` is set. Every page works without JavaScript.
Access: a login form, then a signed session cookie (``HttpOnly``,
``SameSite=Lax``, ``Secure`` when ``RELAY_PUBLIC_URL`` is https) that expires
after ``RELAY_CONSOLE_SESSION_MINUTES``; every form carries a CSRF token
(Flask-WTF); console pages carry a CSP without inline script and
``frame-ancestors 'none'``.
"""
import hashlib
import hmac
from datetime import timedelta

from receiver.console.blueprint import bp, csrf
from workers.runtime import Runtime

SESSION_KEY_CONTEXT = b"l2u-relay console session key v1"


def session_key(settings):
    """``RELAY_CONSOLE_SECRET_KEY``, else a key derived from the webhook secret for this use only."""
    if settings.console_secret_key:
        return settings.console_secret_key
    return hmac.new(settings.webhook_secret.encode(), SESSION_KEY_CONTEXT, hashlib.sha256).hexdigest()


def init_app(app, settings, send_task):
    """Register the console on ``app`` when a console password or operator is configured."""
    if not settings.console_enabled:
        return
    from receiver.console import auth, views  # noqa: F401  (their routes register on the blueprint)

    app.secret_key = session_key(settings)
    app.config.update(
        SESSION_COOKIE_NAME="l2u_console", SESSION_COOKIE_PATH="/console", SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_SECURE=(settings.public_url or "").startswith("https:"),
        PERMANENT_SESSION_LIFETIME=timedelta(minutes=settings.console_session_minutes),
        WTF_CSRF_CHECK_DEFAULT=False,  # the console checks its own forms; webhooks carry none
        WTF_CSRF_TIME_LIMIT=settings.console_session_minutes * 60)
    csrf.init_app(app)
    app.extensions["l2u.console_runtime"] = Runtime(settings, send_task)
    app.register_blueprint(bp)
