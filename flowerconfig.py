"""Flower reads this file from the working directory (``celery -A workers.app flower`` in the Procfile).

The settings ship in the package, so an installed relay has them without this checkout:
``workers/dyno/flower_config.py``.
"""
from workers.dyno.flower_config import *  # noqa: F401,F403
