"""gunicorn reads this file from the working directory (``gunicorn receiver.wsgi:app`` in the Procfile).

The settings ship in the package, so an installed relay has them without this checkout:
``workers/dyno/gunicorn_config.py``.
"""
from workers.dyno.gunicorn_config import *  # noqa: F401,F403
