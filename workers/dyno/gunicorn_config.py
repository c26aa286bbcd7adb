"""gunicorn settings for ``gunicorn receiver.wsgi:app``: loaded by the root ``gunicorn.conf.py`` on a
dyno, and by ``l2u-relay run`` through ``--config python:workers.dyno.gunicorn_config``.

Binds ``0.0.0.0:$PORT`` (gunicorn's own default when PORT is set), runs
``WEB_CONCURRENCY`` sync workers (default 2), logs JSON lines to stdout,
turns on Prometheus multiprocess mode so ``/metrics`` merges every worker, and
keeps each worker's loaded app out of the garbage collector's walks (``post_worker_init``) and, on a
dyno, passes on the client address behind Heroku's router (``pre_request``). A bad configuration stops
it with one message and exit 2 before any worker boots (``on_starting``).
"""
import gc
import os
import shutil
import sys
import tempfile

_OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # made here, so removed on exit
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="l2u-metrics-")

from prometheus_client import multiprocess  # noqa: E402  (needs the directory set first)

from workers.config import ConfigError, Settings  # noqa: E402
from workers.dyno.router import behind_router, console_request, pass_router_client  # noqa: E402
from workers.pipeline.routes import load_routes  # noqa: E402

_BEHIND_ROUTER = behind_router()
RECEIVER_APP = "receiver.wsgi:app"

workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
timeout = 30
graceful_timeout = 10
keepalive = 5
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "pythonjsonlogger.json.JsonFormatter",
                            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    # Access lines carry request paths: webhook URL tokens and OAuth codes are redacted.
    "filters": {"redact": {"()": "workers.logs.RedactingFilter"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout",
                            "filters": ["redact"]}},
    "root": {"level": "INFO", "handlers": ["stdout"]},
    "loggers": {"gunicorn.error": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
                "gunicorn.access": {"handlers": ["stdout"], "level": "INFO", "propagate": False}},
}


def on_starting(server):
    """Check the configuration once in the master: each worker would otherwise log the ConfigError
    inside a traceback, and gunicorn exit 3 ("Worker failed to boot"). Only for the receiver's app."""
    if getattr(server.app, "app_uri", None) != RECEIVER_APP:
        return
    try:
        load_routes(Settings.from_env().routes_file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        on_exit(server)
        sys.exit(2)


def post_worker_init(worker):
    """Move everything the worker loaded (the app, its modules, their tables) to the collector's
    permanent generation, so a full collection stops walking it again and again: ~7 % of a webhook
    request's CPU under load (README, Performance). A Celery pool process gained nothing measurable."""
    gc.freeze()


def pre_request(worker, req):
    """Pass the client behind Heroku's router on to a console request, never a client's own claim of
    it (``workers.dyno.router``: the console's login limit counts per client)."""
    if console_request(req.path):
        req.headers = pass_router_client(req.headers, _BEHIND_ROUTER)


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics folder this start made (``l2u-metrics-*`` in the temp dir would pile up)."""
    if _OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
