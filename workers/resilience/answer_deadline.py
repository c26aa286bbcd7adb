"""The deadline of one HTTP exchange, and the longest answer read.

``requests``' read timeout bounds each read, not their sum: an answer that crawls in (a byte
within every read timeout, in its head or its body) would hold the caller for as long as it lasts,
and an answer is read whole into memory, however long it is or inflates to. ``AnswerDeadline``
bounds both for ``workers.resilience.http.HttpClient``; ``WatchedAdapter`` is the ``requests``
adapter (``make_session`` mounts it) whose connections it watches.
"""
import contextlib
import socket
import threading
import time

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from workers.resilience.renewal import RENEWER

# The longest answer read, decompressed: an API page is kilobytes; a URL that points elsewhere may
# answer gigabytes (or a small gzip body that inflates to them), read whole into a worker's memory.
MAX_ANSWER_BYTES = 32 * 1024 * 1024


class AnswerUnread(Exception):
    """Raised while reading an answer the relay stopped reading: its head or body cut at the
    exchange's deadline (a head or a body without a length ends quietly where it was cut), or its
    body run past ``MAX_ANSWER_BYTES``."""


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
        if length.isdigit() and int(length) > MAX_ANSWER_BYTES:
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
                    self._cut()
                    raise AnswerUnread(self.too_long)
                yield chunk
            if self.cut:
                raise AnswerUnread("its body was cut at the deadline")
        return bounded

    def _cut(self):
        self.cut = True
        if self._socket is not None:  # else nothing is read after this but what is there already
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
