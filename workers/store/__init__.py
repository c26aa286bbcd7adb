"""Redis state and its plumbing: key names, the ledger and the other stores, queue positions,
housekeeping, connections (TLS), the broker transport and Redis health."""
