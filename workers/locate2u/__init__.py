"""Locate2u Customer Integration API: client, OAuth tokens, webhook subscriptions, stop import.

``client.Locate2uClient.from_settings(settings, redis_client)`` is the entry
point (None when ``LOCATE2U_CLIENT_ID`` is unset); ``docs/locate2u.md`` tells
the whole story.
"""
