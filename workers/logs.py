"""One JSON object per line on stdout, with the delivery's context and no secrets.

``log_context(delivery_id=…, sink=…, event_type=…)`` binds fields to every line
logged inside it (a contextvar, so threads and tasks do not mix them up).
``RedactingFilter`` replaces every configured secret, bearer/basic credential
and webhook URL token before a line is written.
"""
import contextlib
import contextvars
import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

_context = contextvars.ContextVar("l2u_log_context", default={})
_PATTERNS = (
    (re.compile(r"(/webhooks/locate2u/[\w.-]+/)[\w-]+"), r"\1[redacted]"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[\w.~+/=-]+"), r"\1 [redacted]"),
    (re.compile(r"(?i)([?&](?:code|state|access_token|refresh_token|client_secret|password)=)[^&\s\"']+"),
     r"\1[redacted]"),
    (re.compile(r"(?i)((?:access|refresh)_token|client_secret|password)(['\"]?\s*[=:]\s*['\"]?)[^\s'\",&]+"),
     r"\1\2[redacted]"),
)


@contextlib.contextmanager
def log_context(**fields):
    """Bind ``fields`` to every log line written inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind_context(**fields):
    """Replace the fields bound to this thread's log lines (a task binds its delivery on start)."""
    _context.set({k: v for k, v in fields.items() if v is not None})


class ContextFilter(logging.Filter):
    def filter(self, record):
        for name, value in _context.get().items():
            setattr(record, name, value)
        return True


class RedactingFilter(logging.Filter):
    """Scrub secrets from the message and its arguments before formatting."""

    def __init__(self, secrets=()):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text):
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record):
        record.msg = self.scrub(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def settings_secrets(settings):
    """Every secret value in ``settings``, for the redacting filter."""
    names = ("webhook_secret", "webhook_secret_previous", "locate2u_client_secret", "storepoint_api_token",
             "b2b_api_token", "b2b_password", "locate_api_token", "deliverycom_access_token", "flower_basic_auth",
             "console_password", "console_secret_key")
    values = [getattr(settings, name) for name in names] + list(settings.forward_secret)
    if settings.flower_basic_auth:
        values.append(settings.flower_basic_auth.partition(":")[2])
    return values


def json_handler(secrets=()):
    """A stdout handler writing redacted JSON lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                       rename_fields={"levelname": "level", "asctime": "time"}))
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter(secrets))
    return handler


def configure_logging(settings):
    """Route every logger (Celery's, gunicorn's, ours) to one redacted JSON stream on stdout."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(json_handler(settings_secrets(settings)))
    root.setLevel(settings.log_level)
    for noisy in ("urllib3", "kombu", "amqp", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
