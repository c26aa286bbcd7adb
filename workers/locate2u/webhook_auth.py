"""Capability tokens in the webhook URLs registered with Locate2u.

Locate2u signs nothing, so each event type gets its own URL whose last path
segment is an HMAC of the event type under ``RELAY_WEBHOOK_SECRET``. Rotating
the secret changes every URL; the previous secret stays accepted meanwhile.
"""
import base64
import hashlib
import hmac
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def url_token(secret, event_type):
    """The URL token for ``event_type`` under ``secret`` (43 URL-safe characters)."""
    digest = hmac.new(secret.encode(), event_type.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def token_matches(token, event_type, secrets):
    """True if ``token`` is valid for ``event_type`` under any of ``secrets``.

    Every secret is compared, each in constant time, so timing reveals neither
    the token nor which secret matched.
    """
    matched = False
    for secret in secrets:
        if secret:
            matched |= hmac.compare_digest(token.encode(), url_token(secret, event_type).encode())
    return matched


def canonical_url(url):
    """``url`` with scheme and host in lower case and without its scheme's default port: how a server
    that parses URLs (a .NET ``Uri``) gives one back, so ours is known however ``RELAY_PUBLIC_URL`` is spelled."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return url
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = "".join((f"{userinfo}@" if userinfo else "", f"[{host}]" if ":" in host else host,
                      "" if port in (None, DEFAULT_PORTS.get(scheme)) else f":{port}"))
    return urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))


def webhook_url(public_url, secret, event_type):
    """The full URL to register with Locate2u for ``event_type`` (in canonical form)."""
    return f"{canonical_url(public_url).rstrip('/')}/webhooks/locate2u/{event_type}/{url_token(secret, event_type)}"
