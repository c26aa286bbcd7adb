"""The suite's shared fixtures live in tests/fixtures.py (Redis, settings, processes, simulators, stores)."""
import os

from workers.ops import devstack

pytest_plugins = ("tests.fixtures",)


def pytest_configure(config):
    """Parallel workers (pytest-xdist) hand out ports from ranges of their own: a port one picked for a
    server that has not bound it yet is never picked by another."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker:  # "gw0", "gw1", ...
        size = len(devstack.PORT_RANGE) // count
        start = devstack.PORT_RANGE.start + int(worker.removeprefix("gw")) * size
        devstack.PORT_RANGE = range(start, start + size)
