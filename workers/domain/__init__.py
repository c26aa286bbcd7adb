"""What the relay carries: Locate2u events (schemas, key fields) and the canonical location."""
