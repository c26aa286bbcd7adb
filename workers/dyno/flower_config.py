"""Flower settings for ``celery -A workers.app flower``: loaded by the root ``flowerconfig.py`` on a
dyno, and by ``l2u-relay run`` through ``FLOWER_CONF`` (Flower executes this file).

Flower refuses to start without authentication unless it only listens on
loopback: set ``FLOWER_BASIC_AUTH=user:password`` (or Flower's own
``FLOWER_AUTH`` OAuth settings). It listens on ``$PORT`` when set (a
Heroku-style web dyno), else 5555; on every interface on a dyno (``$PORT`` or
``$DYNO`` set: Heroku routes the internet only to web dynos, so a ``flower``
dyno is opened with ``heroku ps:forward 5555 --dyno flower.1``, whose tunnel
connects to the dyno's own IP), else on loopback. ``FLOWER_ADDRESS`` and
``FLOWER_PORT`` override both.
"""
import os
import sys

from celery import current_app
from flower.inspector import Inspector

from workers.config import Settings as _Settings
from workers.logs import configure_logging as _configure_logging
from workers.ops.devstack import port_in_use, port_number

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _port():
    """FLOWER_PORT, else PORT, else 5555; exit with why when it is out of range (Flower would listen on
    4464 for 70000)."""
    name = "FLOWER_PORT" if os.environ.get("FLOWER_PORT") else "PORT"
    try:
        return port_number(os.environ.get(name) or "5555")
    except ValueError as exc:
        sys.exit(f"flower: {name} {exc}")


port = _port()
address = os.environ.get("FLOWER_ADDRESS") or ("0.0.0.0" if os.environ.get("PORT") or os.environ.get("DYNO")
                                                else "127.0.0.1")
try:  # said now: tornado's bind would end Flower in a traceback
    if port_in_use(address, port):
        sys.exit(f"flower: port {port} is already in use on {address}; set FLOWER_PORT to another")
except OSError as exc:
    sys.exit(f"flower: cannot listen on {address}:{port}: {exc.strerror}")
if os.environ.get("FLOWER_BASIC_AUTH"):
    basic_auth = [os.environ["FLOWER_BASIC_AUTH"]]
elif not os.environ.get("FLOWER_AUTH") and address not in LOOPBACK:
    sys.exit(f"flower: refusing to listen on {address} without authentication; "
             "set FLOWER_BASIC_AUTH=user:password (or FLOWER_AUTH), or FLOWER_ADDRESS=127.0.0.1")

# Connection budget (README, Scale): workers send events by configuration, so Flower need not broadcast
# enable_events every few seconds; it inspects workers one command at a time, on a broker connection
# opened for that command and closed after it (no pool: Celery's broker_pool_limit None), so between
# inspections it holds only its events receiver.
enable_events = False
Inspector.max_concurrency = 1
current_app.conf.broker_pool_limit = None

# Every line JSON: tornado's console handler off ("logging" is Flower's tornado option), ours on the root.
logging = "none"
_configure_logging(_Settings.from_env())
# The task list shows each task's arguments; the control tasks are sent only when they have work
# (workers/resilience/beat_schedules.py), so they do not bury the deliveries.
tasks_columns = "name,uuid,state,args,kwargs,received,started,runtime,worker"
