"""The client behind Heroku's router: who a console login comes from.

On a dyno (``$DYNO`` set) every request comes from a router node, whose address is all the web
process sees. The router adds the client's address to ``X-Forwarded-For``, after whatever the client
sent there. A client may send several such headers, and the router appends to one of them (the
first, in a 2016 report; gunicorn then joins them, so the client's own entries may come last).

gunicorn's ``pre_request`` hook (``pass_router_client``) reads the headers of a console request
as they came and passes on, in ``ROUTER_CLIENT``, the addresses the router may have appended: the
last of the first and the last of the last ``X-Forwarded-For`` header (one address when the client
sent none). The app trusts that header only on a dyno and only for a console request
(``router_clients``); the hook drops any a client sent itself. Webhooks, which never ask who sent
them this way, skip the hook (7 µs a request, timeit, 2026-11-29).
"""
import ipaddress
import os
from urllib.parse import unquote

ROUTER_CLIENT = "X-L2U-Router-Client"
CONSOLE_PATH = "/console/"  # the only requests that ask who sent them (the console's login limit)
_ROUTER_CLIENT_NAME = ROUTER_CLIENT.upper()
_FORWARDED_FOR = "X-FORWARDED-FOR"


def behind_router():
    """True on a Heroku dyno, where only the router connects to the web process."""
    return bool(os.environ.get("DYNO"))


def pass_router_client(headers, behind):
    """gunicorn's header list ``[(NAME, value)]`` without any ``ROUTER_CLIENT`` the client sent (under
    any spelling gunicorn would map to it), and ``behind`` the router with the one this hook sets."""
    kept = [(name, value) for name, value in headers if name.replace("_", "-") != _ROUTER_CLIENT_NAME]
    forwarded = [value for name, value in headers if name == _FORWARDED_FOR]
    if behind and forwarded:
        candidates = [_last_address(value) for value in (forwarded[0], forwarded[-1])]
        addresses = list(dict.fromkeys(address for address in candidates if address))
        if addresses:
            kept.append((_ROUTER_CLIENT_NAME, ", ".join(addresses)))
    return kept


def console_request(path):
    """True for a request the hook serves: one under ``CONSOLE_PATH`` once percent-decoded, as Flask routes
    it (gunicorn's ``req.path`` is still encoded: ``/%63onsole/login`` skipped the hook and reached the
    console with the client's own header)."""
    return unquote(path).startswith(CONSOLE_PATH)


def router_clients(path, headers):
    """The addresses a console request (at ``path``) passed on by the router may come from
    (``ROUTER_CLIENT``), or [] when not behind the router, not a console request or the hook set none."""
    value = headers.get(ROUTER_CLIENT) if behind_router() and console_request(path) else None
    return value.split(", ") if value else []


def _last_address(value):
    """The last entry of an ``X-Forwarded-For`` value, when it is an IP address."""
    last = value.rpartition(",")[2].strip()
    try:
        return str(ipaddress.ip_address(last))
    except ValueError:
        return None
