"""An outage (try again later) or a bug (dead-letter it now): the one place that tells them apart."""
import contextlib
import logging
import time

import redis
from kombu.exceptions import OperationalError

from workers.resilience.errors import PermanentError

log = logging.getLogger(__name__)
# Redis (ledger) or broker unavailable for a while: put the message back, never dead-letter it as a bug.
OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, redis.OutOfMemoryError, OperationalError)
# The same conditions as Redis words them from inside a script, where they have no class of their own.
OUTAGE_REPLIES = ("LOADING", "READONLY", "OOM", "MASTERDOWN", "BUSY")


def redis_outage(exc):
    """True when ``exc`` means Redis or the broker is unavailable for now (down, restarting, loading its
    file, a read-only replica, out of memory): trying later will work.

    Every other error, Redis ones included (``WRONGTYPE``, a script error, a lost lock), is a bug:
    the same call fails the same way again, so it is dead-lettered with the error at the first try.
    """
    return isinstance(exc, OUTAGES) or (isinstance(exc, redis.ResponseError) and _reply_code(exc) in OUTAGE_REPLIES)


def _reply_code(exc):
    """The code of a Redis error reply, also when a script relays it (``Error running script … -OOM …``)."""
    text = str(exc)
    if text.startswith("Error running script"):
        text = text.rpartition(": -")[2]
    return text.split(" ", 1)[0]


class OutagePause:
    """How long a worker process pauses before it puts a message back during an outage.

    A broker that is still up while the ledger's Redis is not (RabbitMQ, or a second Redis) hands a
    message put back straight to a worker again: without a pause every process would go round its
    messages as fast as it can take them, logging a traceback each time, for the whole outage. The
    pause doubles from ``FIRST`` to ``LONGEST`` seconds while outages follow one another, and starts
    again after a task that met none. Nothing else could run meanwhile: every task needs Redis.
    """

    FIRST, LONGEST = 1.0, 8.0

    def __init__(self, sleep=time.sleep):
        self.seconds = 0.0
        self._sleep = sleep

    def wait(self):
        """Pause before putting a message back (longer each time in a row)."""
        self.seconds = min(self.LONGEST, self.seconds * 2 or self.FIRST)
        self._sleep(self.seconds)

    def reset(self):
        """A task ran without an outage."""
        self.seconds = 0.0


@contextlib.contextmanager
def bugs_dead_lettered(dead_letter):
    """Run the body; a bug is dead-lettered by ``dead_letter(error)`` with its reason, then raised
    again so Flower shows it. An outage passes through untouched."""
    try:
        yield
    except Exception as exc:
        if redis_outage(exc):
            raise
        log.exception("unexpected error; dead-lettering")
        dead_letter(PermanentError(f"internal error: {type(exc).__name__}: {exc}"))
        raise
