"""The HTTP client every connector uses: one session, explicit timeouts, error classes.

``HttpClient.request`` raises ``RetriableError`` for 408/425/429/5xx and for a
connection never made (with ``Retry-After`` parsed), ``NoAnswer`` (retriable)
for a request sent without an answer (a read timeout, a dropped connection, a head still coming in
when the exchange's time is up: ``answer_seconds``), ``BadAnswer`` (retriable) for one whose status
came but whose body was not read whole (broken off, undecodable, longer than ``MAX_ANSWER_BYTES``
or still coming in at the end of that time), ``NotFound``
for 404 and ``PermanentError`` for other 4xx and a redirect loop — unless the status is in ``accept``, in which
case the response is returned for the caller to interpret. A write answered
with a redirect is not sent on (``requests`` would send a 301 or 302 POST on as a
GET, without its body): it is a ``PermanentError`` naming where it points. ``answer`` reads a
2xx answer's JSON and raises ``BadAnswer`` (retriable) when it is not the API's.
Secrets given in ``redact`` never appear in an error.
"""
import contextlib
import email.utils
import socket
import ssl
import threading
import time
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError, SSLError

from workers.resilience.errors import BadAnswer, NoAnswer, NotFound, PermanentError, RetriableError
from workers.resilience.renewal import RENEWER

USER_AGENT = "locate2u-relay/0.1 (+https://github.com/locate2u-relay)"
DEFAULT_TIMEOUT = (3.05, 30)
RETRIABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# An answer whose status came but whose body broke off or cannot be decoded (``requests`` raises
# these outside its connection errors).
UNREADABLE_ANSWER = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)
# The longest answer read, decompressed: an API page is kilobytes; a URL that points elsewhere may
# answer gigabytes (or a small gzip body that inflates to them), read whole into a worker's memory.
MAX_ANSWER_BYTES = 32 * 1024 * 1024


class AnswerUnread(Exception):
    """Raised while reading an answer the relay stopped reading: its head or body cut at the
    exchange's deadline (a head or a body without a length ends quietly where it was cut), or its
    body run past ``MAX_ANSWER_BYTES``."""


def read_timeout(timeout):
    """The read timeout of a ``requests`` timeout (``(connect, read)`` or one number)."""
    return timeout[1] if isinstance(timeout, tuple) else timeout


def answer_seconds(timeout):
    """How long a whole exchange may take, from sending to the answer's last byte: the connect plus
    the read timeout of ``timeout``. ``requests``' read timeout bounds each read, not their sum, so an
    answer that crawls in (a byte within every read timeout) would otherwise hold the caller for as
    long as it lasts."""
    return sum(timeout) if isinstance(timeout, tuple) else 2 * timeout


class AnswerDeadline:
    """Shuts the connection of an answer still coming in ``seconds`` after the request started (its
    status line and headers, then its body), so its read ends at once, and at once that of an answer
    announcing more than ``MAX_ANSWER_BYTES``; the read of one without a length (or compressed)
    stops once it has inflated past them. The connection's ``getresponse`` (``WatchedResponses``)
    has it ``watch`` the socket the answer comes on, with its own duplicate of it (a server's
    ``Connection: close`` leaves the connection without one), closed again on ``disarm``;
    ``requests``' response hook (``arm``) sees the head before the body is read. The process's one
    timer thread (``RENEWER``) does the cutting."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.cut = False
        self.status = None  # the status of the answer whose body is being read
        self.too_long = None  # why its body is not read whole: it is over MAX_ANSWER_BYTES
        self._number = self._socket = None

    def watch(self, sock):
        """Cut ``sock``, the connection an answer is awaited on, if the answer is not in by the end."""
        self.disarm()  # of a redirect's answer before this one: what is kept is this one's
        self.status, self.too_long, self.cut = None, None, False
        try:
            self._socket = socket.fromfd(sock.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, ValueError):  # closed under it: its read fails at once
            return
        self._number = RENEWER.add(self._cut, max(0.0, self.end - time.monotonic()), "an answer's deadline")

    def arm(self, response, **_):
        """The response hook: the head is in (unless cut short); bound what is read of ``response``'s body."""
        if self.cut:
            raise AnswerUnread("its head was cut at the deadline")
        self.status = response.status_code
        response.raw.stream = self._bounded(response.raw.stream)
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_ANSWER_BYTES and self._socket is not None:
            self.too_long = f"of {int(length):,} bytes is over the {MAX_ANSWER_BYTES:,} the relay reads"
            self._cut()
        return response

    def disarm(self):
        if self._number is not None:
            RENEWER.remove(self._number)
        if self._socket is not None:
            self._socket.close()
        self._number = self._socket = None

    def unread(self, exc):
        """Why the body of the answer whose status came was not read (``exc``: what ``requests`` raised)."""
        if self.too_long:
            return self.too_long
        if self.cut:
            return f"was not complete within {self.seconds:g} s"
        return f"could not be read whole ({type(exc).__name__})"

    def _bounded(self, stream):
        """``stream`` (urllib3's, yielding the body decompressed) stopped once it runs past
        ``MAX_ANSWER_BYTES``: ``AnswerUnread``, the connection shut; also when it ended because the
        deadline cut it."""
        def bounded(*args, **kwargs):
            read = 0
            for chunk in stream(*args, **kwargs):
                read += len(chunk)
                if read > MAX_ANSWER_BYTES:
                    self.too_long = f"ran past the {MAX_ANSWER_BYTES:,} bytes the relay reads"
                    if self._socket is not None:
                        self._cut()
                    raise AnswerUnread(self.too_long)
                yield chunk
            if self.cut:
                raise AnswerUnread("its body was cut at the deadline")
        return bounded

    def _cut(self):
        self.cut = True
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        return False  # once


WATCHING = threading.local()  # .deadline: the AnswerDeadline of the exchange this thread is in


class WatchedResponses:
    """A urllib3 connection whose answer the current exchange's ``AnswerDeadline`` watches from the
    moment it is awaited: ``requests``' read timeout bounds each read of the head, not their sum."""

    def getresponse(self):
        deadline = getattr(WATCHING, "deadline", None)
        if deadline is not None and self.sock is not None:
            deadline.watch(self.sock)
        return super().getresponse()


class WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = type("WatchedHTTPConnection", (WatchedResponses, HTTPConnection), {})


class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = type("WatchedHTTPSConnection", (WatchedResponses, HTTPSConnection), {})


class WatchedAdapter(HTTPAdapter):
    """``requests``' adapter with connections the exchange's deadline watches (``WatchedResponses``)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": WatchedHTTPConnectionPool,
                                                   "https": WatchedHTTPSConnectionPool}


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
    """Requests against one base URL, with the relay's error classification."""

    def __init__(self, base_url, session=None, timeout=DEFAULT_TIMEOUT, headers=None, auth=None, redact=()):
        self.base_url = base_url.rstrip("/") + "/"
        self.session = session or make_session()
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.auth = auth
        self.redact = tuple(secret for secret in redact if secret)

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
            raise PermanentError(f"{method} {self._scrub(url)} was redirected more than {self.session.max_redirects} "
                                 "times (a redirect loop): set the API URL to where the API is", method=method,
                                 url=url) from None
        except (requests.Timeout, requests.ConnectionError, AnswerUnread, *UNREADABLE_ANSWER) as exc:
            raise self._unanswered(method, url, exc, deadline, kwargs["timeout"]) from None
        finally:
            WATCHING.deadline = None
            deadline.disarm()
        if refuse_redirect and response.is_redirect:
            raise self.error_for(response, f"{method} {self._scrub(url)} was redirected ({response.status_code}) to "
                                           f"{self._scrub(response.headers.get('Location', '?'))}: set the API URL "
                                           "to where it points")
        if response.ok or response.status_code in accept:
            return response
        raise self.error_for(response)

    def _unanswered(self, method, url, exc, deadline, timeout):
        """The RelayError of a request that got no whole answer: ``requests`` raised ``exc`` (or
        ``AnswerDeadline`` stopped the read: ``deadline``). ``NoAnswer`` only if it may still land."""
        url = self._scrub(url)
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

    def answer(self, response, *path, needs=()):
        """The JSON of ``response``, or the value at ``path`` (keys, indexes) in it, an object holding
        every key in ``needs``. ``BadAnswer`` when the body is not JSON or lacks one of them: not the
        API's answer, whatever its status."""
        try:
            value = response.json()
        except ValueError:
            raise self._bad_answer(response, "that is not JSON") from None
        try:
            for step in path:
                value = value[step]
        except (LookupError, TypeError):
            raise self._bad_answer(response, f"without {'.'.join(map(str, path))}") from None
        missing = [key for key in needs if not isinstance(value, dict) or key not in value]
        if missing:
            raise self._bad_answer(response, "without " + ", ".join(".".join(map(str, (*path, key)))
                                                                  for key in missing))
        return value

    def _bad_answer(self, response, what):
        method, url = response.request.method, self._scrub(response.request.url)
        return BadAnswer(f"{method} {url} answered {response.status_code} with a body {what}",
                         body=self._scrub(response.text), method=method, url=url)

    def error_for(self, response, message=None):
        """The RelayError an unexpected response stands for."""
        method, url = response.request.method, self._scrub(response.request.url)
        status = response.status_code
        body = self._scrub(response.text)
        message = message or f"{method} {url} answered {status}"
        details = {"status": status, "body": body, "method": method, "url": url}
        if status in RETRIABLE_STATUSES:
            return RetriableError(message, retry_after=parse_retry_after(response.headers.get("Retry-After")),
                                  **details)
        if status == 404:
            return NotFound(message, **details)
        return PermanentError(message, **details)

    def _scrub(self, text):
        for secret in self.redact:
            text = text.replace(secret, "[redacted]")
        return text
