"""Keeping leases and locks alive while their holder works: one renewal thread per process.

A sink write or a fan-out takes milliseconds and its lease is renewed every 10 s or more, so a
thread per holder (as before) cost a thread start and join per write for renewals that almost
never ran. Now every holder registers with the process's one ``Renewer`` thread instead.
"""
import contextlib
import heapq
import itertools
import logging
import os
import threading
import time

import redis
from redis.exceptions import LockNotOwnedError

from workers.resilience.errors import RetriableError

log = logging.getLogger(__name__)


class Renewer:
    """Calls each registered ``renew()`` every ``every`` seconds until it is removed or returns False.

    Adding a holder wakes the thread only when that holder is due before every other (a write
    adds and removes one per sink call, and most of them are due after those already waiting).
    Its thread starts with the first holder, and again in a forked child (threads do not survive
    ``fork``). ``remove`` returns only once no renewal of that holder is running, so none runs
    after its body ended.
    """

    def __init__(self):
        self._forget()
        self._numbers = itertools.count()

    def _forget(self):
        """A fresh start (also in a forked child, whose copy of a lock may be held by a thread it lacks)."""
        self._changed = threading.Condition()
        self._due = []  # heap of (when, number)
        self._holders = {}  # number -> (renew, every, what)
        self._running = None  # the number whose renew() is running now
        self._started = False

    def add(self, renew, every, what):
        """Renew from ``every`` seconds from now on; returns the number ``remove`` takes."""
        with self._changed:
            if not self._started:
                threading.Thread(target=self._loop, name="renewer", daemon=True).start()
                self._started = True
            number = next(self._numbers)
            self._holders[number] = (renew, every, what)
            heapq.heappush(self._due, (time.monotonic() + every, number))
            if self._due[0][1] == number:  # due before any other: the thread waits for a later one
                self._changed.notify()
            return number

    def remove(self, number):
        """Stop renewing ``number``, waiting for a renewal of it that is under way."""
        with self._changed:
            self._holders.pop(number, None)
            while self._running == number:
                self._changed.wait()

    def _loop(self):
        while True:
            with self._changed:
                number, holder = self._next_due()
                if holder is None:
                    continue
                self._running = number
            try:
                kept = self._renew(*holder)
            finally:
                with self._changed:
                    self._running = None
                    if number in self._holders:
                        if kept:
                            heapq.heappush(self._due, (time.monotonic() + holder[1], number))
                        else:
                            del self._holders[number]
                    self._changed.notify_all()

    def _next_due(self):
        """Wait (holding the condition) for the soonest renewal that is due: ``(number, holder)``,
        or ``(None, None)`` when woken for a change."""
        while self._due and self._due[0][1] not in self._holders:
            heapq.heappop(self._due)
        if not self._due:
            self._changed.wait()
            return None, None
        when, number = self._due[0]
        wait = when - time.monotonic()
        if wait > 0:
            self._changed.wait(wait)
            return None, None
        heapq.heappop(self._due)
        return number, self._holders[number]

    @staticmethod
    def _renew(renew, every, what):
        """One renewal: False once the holder no longer holds it. A Redis error is logged and the
        next turn tries again; a holder that dies stops renewing, so what it held lapses."""
        try:
            return renew()
        except redis.RedisError as exc:
            log.warning("could not renew %s: %s", what, exc)
            return True


RENEWER = Renewer()
os.register_at_fork(after_in_child=RENEWER._forget)


class HeldLock:
    """A redis-py lock (``thread_local=False``) while its holder works: renewed on the renewal thread
    (``kept``), checked before each step that another holder must not repeat."""

    def __init__(self, lock, what, why):
        self.lock = lock
        self.what = what  # "the subscriptions sync lock"
        self.why = why  # what stopping protects, and what happens next
        self.lost = False

    def renew(self):
        """Reset the lock's timeout; False (and ``lost``) once Redis no longer holds it for us."""
        try:
            self.lock.reacquire()
        except LockNotOwnedError:
            self.lost = True
        return not self.lost

    def check(self, step):
        """RetriableError before ``step`` when the lock was lost: another holder may be at work."""
        if self.lost:
            raise RetriableError(f"lost {self.what} (Redis no longer held it) before: {step}; stopped {self.why}")

    @contextlib.contextmanager
    def kept(self):
        """Renew the lock every third of its timeout while the body runs, then release it (a warning
        when it was lost meanwhile: nothing of ours is left to release)."""
        try:
            with renewed(self.renew, self.lock.timeout / 3, self.what):
                yield self
        finally:
            try:
                self.lock.release()
            except LockNotOwnedError:
                self.lost = True
            if self.lost:
                log.warning("%s was lost while held (Redis no longer held it)", self.what)


@contextlib.contextmanager
def renewed(renew, every, what):
    """Call ``renew()`` every ``every`` seconds (on the process's renewal thread) while the body
    runs, until it returns False (no longer held); ``what`` names it in a warning."""
    number = RENEWER.add(renew, every, what)
    try:
        yield
    finally:
        RENEWER.remove(number)
