"""Flower settings for ``celery -A workers.app flower`` (read from the working directory).

Flower refuses to start without authentication unless it only listens on
loopback: set ``FLOWER_BASIC_AUTH=user:password`` (or Flower's own
``FLOWER_AUTH`` OAuth settings). It listens on ``$PORT`` when set (a
Heroku-style web dyno), else 5555.
"""
import os
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")

port = int(os.environ.get("FLOWER_PORT") or os.environ.get("PORT") or 5555)
address = os.environ.get("FLOWER_ADDRESS") or ("0.0.0.0" if os.environ.get("PORT") else "127.0.0.1")
if os.environ.get("FLOWER_BASIC_AUTH"):
    basic_auth = [os.environ["FLOWER_BASIC_AUTH"]]
elif not os.environ.get("FLOWER_AUTH") and address not in LOOPBACK:
    sys.exit(f"flower: refusing to listen on {address} without authentication; "
             "set FLOWER_BASIC_AUTH=user:password (or FLOWER_AUTH), or FLOWER_ADDRESS=127.0.0.1")
