"""Outside tools a test needs (Debian packages that `.ci/run` installs as root).

Under ``CI=true`` a missing tool fails the test; elsewhere it skips with the install hint.
"""
import os
import shutil

import pytest


def require_binary(name, package):
    """The path of executable ``name``; fail under CI, else skip, when it is missing."""
    path = shutil.which(name) or next((candidate for candidate in (f"/usr/sbin/{name}", f"/usr/lib/chromium/{name}")
                                       if os.access(candidate, os.X_OK)), None)
    if path:
        return path
    message = f"{name} not found: install Debian's {package} (apt-get install {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
