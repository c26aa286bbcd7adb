"""One JSON object per line on stdout, with the delivery's context and no secrets.

``bound_context(delivery_id=…, sink=…, event_type=…)`` binds fields to every line
logged inside it (a contextvar, so threads and tasks do not mix them up).
``RedactingFilter`` replaces every configured secret, bearer/basic credential,
``Authorization`` value, OAuth token and webhook URL token before a line is
written: in the message, its arguments, the exception and stack text and every
``extra`` field, nested values included (a value under a credential-like key
such as ``access_token`` or ``Authorization`` is replaced whole).
"""
import base64
import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import time

from pythonjsonlogger.json import JsonFormatter

from workers.celery_config import RELEASE_DUE_RETRIES, SWEEP_RECEIVED
from workers.config import secret_settings

_context = contextvars.ContextVar("l2u_log_context", default={})
# Each pattern with the lower-case text one of which any match contains: a pattern runs only on text
# holding one of its cues (ASCII text; any other text goes through every pattern), since most of what is
# logged (ids, sink names, outcomes) holds none, and a ``str`` search costs a tenth of a regex scan.
_PATTERNS = (
    (("/webhooks/locate2u/",), re.compile(r"(/webhooks/locate2u/[\w.-]+/)[\w-]+"), r"\1[redacted]"),
    (("bearer", "basic"), re.compile(r"(?i)\b(bearer|basic)\s+[\w.~+/=-]+"), r"\1 [redacted]"),
    (("code=", "state=", "link=", "_token=", "client_secret=", "password=", "code_verifier="),
     re.compile(r"(?i)([?&](?:code|state|link|access_token|refresh_token|client_secret|password|code_verifier)=)"
                r"[^&\s\"']+"),
     r"\1[redacted]"),
    (("_token", "client_secret", "password", "code_verifier"),
     re.compile(r"(?i)((?:access|refresh)_token|client_secret|password|code_verifier)(['\"]?\s*[=:]\s*['\"]?)"
                r"[^\s'\",&]+"), r"\1\2[redacted]"),
    (("authorization",), re.compile(r"(?i)\b(authorization)(['\"]?\s*[=:]\s*['\"]?)[^'\"\r\n,}]+"),
     r"\1\2[redacted]"),
)
# a value under one of these keys (any case, - or _) is replaced whole, wherever it is nested
_SECRET_KEYS = re.compile(r"(?i)^(authorization|proxy[-_]authorization|cookie|set[-_]cookie|password|secret|"
                          r"client[-_]secret|(access|refresh|id|api|bearer)[-_]?token|token|code[-_]verifier|"
                          r"api[-_]?key|x[-_]api[-_]key)$")
# attributes every LogRecord has: the fields logging itself fills in, not ``extra``
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def bind_context(**fields):
    """Replace the fields bound to this thread's log lines (a task binds its delivery on start)."""
    _context.set({k: v for k, v in fields.items() if v is not None})


@contextlib.contextmanager
def bound_context(**fields):
    """Add ``fields`` to this thread's log lines while the body runs."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record):
        for name, value in _context.get().items():
            setattr(record, name, value)
        return True


class RedactingFilter(logging.Filter):
    """Scrub secrets from every field of a record before any formatter sees it."""

    def __init__(self, secrets=()):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text):
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        lowered = text.lower() if text.isascii() else None
        for cues, pattern, replacement in _PATTERNS:
            if lowered is None or any(cue in lowered for cue in cues):
                text = pattern.sub(replacement, text)
        return text

    def scrub_value(self, value):
        """``value`` with every secret replaced: strings scrubbed, containers walked, other objects as text."""
        if isinstance(value, str):
            return self.scrub(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, dict):
            return {key: "[redacted]" if _SECRET_KEYS.match(str(key)) and value[key] else self.scrub_value(value[key])
                    for key in value}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.scrub_value(item) for item in value]
        if isinstance(value, (bytes, bytearray)):
            return self.scrub(bytes(value).decode("utf-8", "replace"))
        return self.scrub(str(value))

    def filter(self, record):
        record.msg = self.scrub(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        for name in [name for name in vars(record) if name not in _RECORD_FIELDS]:
            value = getattr(record, name)
            setattr(record, name, "[redacted]" if _SECRET_KEYS.match(name) and value else self.scrub_value(value))
        return True


def settings_secrets(settings):
    """Every secret value in ``settings`` (the settings declared secret, a comma list's each), for the
    redacting filter."""
    values = []
    for name in secret_settings():
        value = getattr(settings, name)
        values += list(value) if isinstance(value, tuple) else [value]
    for pair in (settings.flower_basic_auth, settings.metrics_basic_auth):
        if pair:  # the password alone, and the pair as an Authorization: Basic header carries it
            values += [pair.partition(":")[2], base64.b64encode(pair.encode()).decode()]
    return values


def json_handler(secrets=()):
    """A stdout handler writing redacted JSON lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                       rename_fields={"levelname": "level", "asctime": "time"}))
    handler.addFilter(IdleControlTaskFilter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter(secrets))
    return handler


class IdleControlTaskFilter(logging.Filter):
    """Drops, above DEBUG, the lines of control tasks (sweeper, retry release) that did nothing:
    beat's "Sending due task" and the worker's "succeeded" with 0 (or nothing) done."""

    CONTROL_TASKS = (SWEEP_RECEIVED, RELEASE_DUE_RETRIES)

    def filter(self, record):
        if logging.getLogger().level <= logging.DEBUG:
            return True
        if record.name == "celery.app.trace":
            data = getattr(record, "data", None) or {}
            return not (data.get("name") in self.CONTROL_TASKS and str(data.get("return_value")) in ("0", "None"))
        if record.name == "celery.beat" and str(record.msg).startswith("Scheduler: Sending due task"):
            return not any(task in record.getMessage() for task in self.CONTROL_TASKS)
        return True


def configure_logging(settings):
    """Route every logger (Celery's, gunicorn's, Flower's, ours) and Python's warnings to one redacted
    JSON stream on stdout."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(json_handler(settings_secrets(settings)))
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)  # Celery's and the libraries' warnings become JSON lines too
    for noisy in ("urllib3", "kombu", "amqp", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def say_as_json(message, stream=sys.__stderr__):
    """A replacement for Celery's ``safe_say`` (its shutdown notices, written from signal handlers):
    the notice as one JSON line, written with one unbuffered ``os.write`` as Celery's is (no logging
    lock is taken in a signal handler)."""
    line = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "level": "INFO", "name": "celery.apps.worker",
            "message": message}
    try:
        os.write(stream.fileno(), (json.dumps(line) + "\n").encode())
    except (OSError, ValueError):
        pass  # best effort, as Celery's own
