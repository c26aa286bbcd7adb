"""Talking to other systems safely: error classes, the HTTP client, circuit breakers, rate limits,
key locks and the retry schedule."""
