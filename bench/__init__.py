"""Benchmarks of the relay: ``python -m bench.run`` (see README, Performance)."""
