"""TLS for Redis: the one place that says how a ``rediss://`` connection checks the server's certificate.

Heroku Key-Value Store speaks only TLS and presents a self-signed certificate, so by default the
connection is encrypted but the certificate is not verified (Heroku's own advice). With
``RELAY_REDIS_CA_FILE`` the certificate must be signed by that CA and name the host. The same options
serve redis-py clients (ledger and stores, web, workers, CLI) and kombu/Celery (``broker_use_ssl``, which
Flower reads too); a plain ``redis://`` URL gets none.
"""
import ssl
from urllib.parse import urlsplit

TLS_SCHEME = "rediss"


def uses_tls(url):
    """True for a ``rediss://`` URL."""
    return bool(url) and urlsplit(url).scheme == TLS_SCHEME


def tls_options(url, ca_file=None):
    """The ``ssl_*`` connection options for the Redis at ``url``: none unless it is ``rediss://``."""
    if not uses_tls(url):
        return {}
    if ca_file:
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca_file}
    return {"ssl_cert_reqs": ssl.CERT_NONE}
