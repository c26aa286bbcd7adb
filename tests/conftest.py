"""The suite's shared fixtures live in tests/fixtures.py (Redis, settings, processes, simulators, stores)."""
pytest_plugins = ("tests.fixtures",)
