"""The process formation, shipped in the package so an installed relay runs without the checkout.

``PROCESSES`` is the root ``Procfile`` as a table (Heroku reads the file, ``l2u-relay run`` the
table; a test keeps them equal). ``gunicorn_config`` and ``flower_config`` are the web and Flower
settings: the root ``gunicorn.conf.py`` and ``flowerconfig.py`` only load them, and
``config_environment`` points gunicorn and Flower at them from any working directory.
"""
from pathlib import Path

PROCESSES = {
    "web": "gunicorn receiver.wsgi:app",
    "worker": "celery -A workers.app worker --without-gossip --without-mingle",
    "beat": "celery -A workers.app beat",
    "flower": "celery -A workers.app flower",
    "release": "l2u-relay subscriptions sync",
}
GUNICORN_CONFIG = "python:workers.dyno.gunicorn_config"
FLOWER_CONFIG = Path(__file__).with_name("flower_config.py")


def config_environment(environ):
    """Variables that make gunicorn and Flower use the packaged settings (an explicit choice in ``environ`` wins)."""
    return {"GUNICORN_CMD_ARGS": f"--config {GUNICORN_CONFIG} {environ.get('GUNICORN_CMD_ARGS', '')}".strip(),
            "FLOWER_CONF": environ.get("FLOWER_CONF") or str(FLOWER_CONFIG)}
