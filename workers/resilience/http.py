"""The HTTP client every connector uses: one session, explicit timeouts, error classes.

``HttpClient.request`` raises ``RetriableError`` for 408/425/429/5xx (with ``Retry-After``
parsed) and for a connection never made (refused, unreachable, a certificate refused),
``NoAnswer`` (retriable) for a request sent without an answer (a read timeout, a dropped
connection, a head still coming in when the exchange's time is up: ``answer_deadline``),
``BadAnswer`` (retriable) for one whose status came but whose body was not read whole (broken
off, undecodable, longer than ``MAX_ANSWER_BYTES`` or still coming in at the end of that time),
``NotFound`` for 404 and ``PermanentError`` for other 4xx and a redirect loop — unless the
status is in ``accept``, in which case the response is returned for the caller to interpret. A write answered
with a redirect is not sent on (``requests`` would send a 301 or 302 POST on as a
GET, without its body): it is a ``PermanentError`` naming where it points. ``answer`` reads a
2xx answer's JSON and raises ``BadAnswer`` (retriable) when it is not the API's.
Secrets given in ``redact``, and the password and query of the URLs the client is for
(``url_secrets``), never appear in an error.
"""
import email.utils
import ssl
import time
from urllib.parse import urljoin, urlsplit

import requests
from requests.utils import requote_uri
from urllib3.exceptions import NewConnectionError, SSLError

from workers.domain import json_text
from workers.resilience.answer_deadline import WATCHING, AnswerDeadline, AnswerUnread, WatchedAdapter, answer_seconds
from workers.resilience.errors import BadAnswer, CredentialsRefused, NoAnswer, NotFound, PermanentError, RetriableError

USER_AGENT = "locate2u-relay/0.1 (+https://github.com/locate2u-relay)"
DEFAULT_TIMEOUT = (3.05, 30)
# For a call a web page waits on (the console): gunicorn kills a web worker, one that also takes webhooks,
# after 30 s, so such a call gets 8.05 s in all and no retry.
PAGE_TIMEOUT = (3.05, 5)
RETRIABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
REFUSED_CREDENTIALS = frozenset({401, 403})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# An answer whose status came but whose body broke off or cannot be decoded (``requests`` raises
# these outside its connection errors).
UNREADABLE_ANSWER = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)


def read_timeout(timeout):
    """The read timeout of a ``requests`` timeout (``(connect, read)`` or one number)."""
    return timeout[1] if isinstance(timeout, tuple) else timeout


def settle_seconds(timeout):
    """How long after sending a request we got no answer for it may still take effect there: a
    server finishes a request whose client gave up or died. No vendor documents it, so twice the
    read timeout of ``timeout``."""
    return 2 * read_timeout(timeout)


def never_sent(exc):
    """True when a ``requests`` connection error happened before the request left (refused,
    unreachable, connect timeout, a certificate refused), so it cannot take effect later."""
    return (isinstance(exc, requests.ConnectTimeout) or isinstance(_reason(exc), NewConnectionError)
            or refused_certificate(exc) is not None)


def refused_certificate(exc):
    """Why the server's certificate was refused in the TLS handshake, when that is what the
    ``requests`` connection error ``exc`` is, else None."""
    reason = _reason(exc)
    cause = reason.args[0] if isinstance(reason, SSLError) and reason.args else None
    return cause.verify_message if isinstance(cause, ssl.SSLCertVerificationError) else None


def _reason(exc):
    """urllib3's reason for the failed request behind a ``requests`` connection error."""
    return getattr(exc.args[0], "reason", None) if exc.args else None


def url_secrets(url):
    """The parts of a configured URL that may carry a credential: its password and its query, as
    written and as ``requests`` sends them."""
    parts = {part for each in (url, requote_uri(url)) for part in (urlsplit(each).password, urlsplit(each).query)}
    return tuple(sorted(part for part in parts if part))


def make_session(pool_size=10):
    """A ``requests.Session`` with connection reuse and our User-Agent."""
    session = requests.Session()
    session.trust_env = False
    adapter = WatchedAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session


def parse_retry_after(value, now=None):
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class HttpClient:
    """Requests against one base URL, with the relay's error classification. ``redact``: secrets an
    error must not show, besides those of the base URL and of ``urls`` (``url_secrets``), the other
    URLs the client calls."""

    def __init__(self, base_url, session=None, timeout=DEFAULT_TIMEOUT, headers=None, auth=None, redact=(),
                 urls=()):
        self.base_url = base_url.rstrip("/") + "/"
        self.session = session or make_session()
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.auth = auth
        secrets = {*redact, *(part for url in (base_url, *urls) for part in url_secrets(url))} - {"", None}
        self.redact = tuple(sorted(secrets, key=len, reverse=True))  # a secret inside another goes after it

    @property
    def settle_seconds(self):
        """See ``settle_seconds``: for this client's read timeout."""
        return settle_seconds(self.timeout)

    def url(self, path):
        return urljoin(self.base_url, path.lstrip("/"))

    def request(self, method, path, accept=(), **kwargs):
        """Send a request; return the response if 2xx or in ``accept``, else raise."""
        url = self.url(path)
        kwargs.setdefault("timeout", self.timeout)
        kwargs["headers"] = {**self.headers, **kwargs.get("headers", {})}
        if self.auth is not None:
            kwargs.setdefault("auth", self.auth)
        refuse_redirect = "allow_redirects" not in kwargs and method.upper() not in SAFE_METHODS
        if refuse_redirect:
            kwargs["allow_redirects"] = False
        deadline = WATCHING.deadline = AnswerDeadline(answer_seconds(kwargs["timeout"]))
        kwargs["hooks"] = {"response": deadline.arm}
        try:
            response = self.session.request(method, url, **kwargs)
        except requests.TooManyRedirects:
            shown = self.scrub(url)
            raise PermanentError(f"{method} {shown} was redirected more than {self.session.max_redirects} times "
                                 "(a redirect loop): set the API URL to where the API is", method=method,
                                 url=shown) from None
        except (requests.Timeout, requests.ConnectionError, AnswerUnread, *UNREADABLE_ANSWER) as exc:
            raise self._unanswered(method, url, exc, deadline, kwargs["timeout"]) from None
        finally:
            WATCHING.deadline = None
            deadline.disarm()
        if refuse_redirect and response.is_redirect:
            raise self.error_for(response, f"{method} {self.scrub(url)} was redirected ({response.status_code}) to "
                                           f"{self.scrub(response.headers.get('Location', '?'))}: set the API URL "
                                           "to where it points")
        if response.ok or response.status_code in accept:
            return response
        raise self.error_for(response)

    def _unanswered(self, method, url, exc, deadline, timeout):
        """The RelayError of a request that got no whole answer: ``requests`` raised ``exc`` (or
        ``AnswerDeadline`` stopped the read: ``deadline``). ``NoAnswer`` only if it may still land."""
        url = self.scrub(url)
        if deadline.status is not None:  # its status came: done there, only the body is missing
            return BadAnswer(f"{method} {url} answered {deadline.status}, but its answer {deadline.unread(exc)}",
                             method=method, url=url)
        message = f"{method} {url} failed: {type(exc).__name__}"
        certificate = refused_certificate(exc)
        if certificate is not None:
            message = f"{method} {url} failed: its TLS certificate was refused (certificate verify failed: " \
                      f"{certificate})"
        if never_sent(exc):
            return RetriableError(message, method=method, url=url)
        settles_in = settle_seconds(timeout)  # a connection dropped: maybe applied just now
        if isinstance(exc, requests.ReadTimeout):  # sent at least the read timeout ago
            settles_in -= read_timeout(timeout)
        if deadline.cut:  # its head crawled in: it may still land
            message = f"{method} {url} got no whole answer within {deadline.seconds:g} s"
        return NoAnswer(message, settles_in=settles_in, method=method, url=url)

    def answer(self, response, *path, needs=(), listed=False):
        """The JSON of ``response``, or the value at ``path`` (keys, indexes) in it, an object holding
        every key in ``needs``, a list when ``listed``. ``BadAnswer`` when the body is not JSON or lacks
        one of them (a null counts as missing): not the API's answer, whatever its status."""
        try:
            value = response.json()
        except ValueError:
            raise self.bad_answer(response, "that is not JSON") from None
        if json_text.holds_escaped_surrogate(response.content):
            value = json_text.repaired(value)
        try:
            for step in path:
                value = value[step]
        except (LookupError, TypeError):
            value = None
        if path and value is None:  # missing, or null: as good as missing for what is read
            raise self.bad_answer(response, f"without {'.'.join(map(str, path))}")
        missing = [key for key in needs if not isinstance(value, dict) or value.get(key) is None]
        if missing:
            raise self.bad_answer(response, "without " + ", ".join(".".join(map(str, (*path, key)))
                                                                  for key in missing))
        if listed and not isinstance(value, list):
            raise self.bad_answer(response, "that is not a list")
        return value

    def bad_answer(self, response, what):
        """The BadAnswer for ``response``: "<method> <url> answered <status> with a body <what>"."""
        method, url = response.request.method, self.scrub(response.request.url)
        return BadAnswer(f"{method} {url} answered {response.status_code} with a body {what}",
                         body=self.scrub(response.text), method=method, url=url)

    def error_for(self, response, message=None, status=None):
        """The RelayError an unexpected response stands for (as if answered ``status``, when given: the
        status a 2xx's error body says)."""
        method, url = response.request.method, self.scrub(response.request.url)
        status = status or response.status_code
        body = self.scrub(response.text)
        message = self.scrub(message) if message else f"{method} {url} answered {status}"
        details = {"status": status, "body": body, "method": method, "url": url}
        if status in RETRIABLE_STATUSES:
            return RetriableError(message, retry_after=parse_retry_after(response.headers.get("Retry-After")),
                                  **details)
        if status in REFUSED_CREDENTIALS:
            return CredentialsRefused(f"{message}: the credentials were refused (rotated or revoked there?)",
                                      **details)
        if status == 404:
            return NotFound(message, **details)
        return PermanentError(message, **details)

    def scrub(self, text):
        """``text`` with every secret the client knows (``redact``) shown as ``[redacted]``."""
        for secret in self.redact:
            text = text.replace(secret, "[redacted]")
        return text
