"""Operator tools shipped with the package: loopback simulators (demo mode and tests use them)."""
