"""Creates that must not happen twice, for systems without an idempotent create (Storepoint, Delivery.com,
LOCATE, whose create may run later in the background).

Before a create is sent, an intent mark (when it was sent) is kept for the key until the sink has
saved the mapping. A create refused with a 4xx drops the mark: nothing was created. One answered
otherwise (a 5xx, or a 2xx we could not read) marks it answered: it is over there or not at all.
One without an answer (a timeout, a dropped connection, a killed worker) keeps the time it was sent.
The next create or delete of that key finds the mark and looks for what the earlier create left
before it creates again; while an attempt without an answer may still land (the client's settle
time after it was sent), it waits (``NotYet``) instead of looking.
"""
import functools
import time

from workers.resilience.errors import BadAnswer, NotYet, RelayError
from workers.store.mappings import MappingStore

ANSWERED = "0"  # the intent of a create that was answered: nothing of it is in flight


class GuardedCreates:
    """For a sink whose create is not idempotent: its ``CreateGuard`` as ``_guard``."""

    @functools.cached_property
    def _guard(self):
        return CreateGuard(self)


class CreateGuard:
    """The intent marks of one sink (``l2u:map:<sink>:intent``: key → when its create was sent)."""

    def __init__(self, sink):
        self.sink = sink

    @property
    def intents(self):
        """Read from the sink's mapping store's Redis when used (a sink may be built without one)."""
        return MappingStore(self.sink.mappings.redis, f"{self.sink.name}:intent")

    def create(self, key, send, find):
        """``(what send() returned, True)``, or ``(what find(key) returned, False)`` when an earlier
        create for ``key`` left a record: ``find`` looks for it (None: it left nothing)."""
        earlier = self.intents.set_unless_held(key, repr(time.time()))
        found = earlier and self.left_by(key, earlier, find)
        if found:
            return found, False
        if earlier:  # it left nothing: this create is the one in flight now
            self.intents.set(key, repr(time.time()))
        try:
            return send(), True
        except RelayError as exc:
            if exc.status is not None and exc.status < 500:  # refused: nothing was created
                self.intents.delete(key)
            elif exc.status is not None or isinstance(exc, BadAnswer):  # answered: applied or not; look at once
                self.intents.set(key, ANSWERED)
            raise

    def pending(self, key):
        """The intent mark of an earlier create for ``key`` whose mapping was not saved, or None."""
        return self.intents.get(key)

    def left_by(self, key, sent_at, find):
        """What an earlier create for ``key`` (its intent mark: ``sent_at``) left, as ``find(key)``
        finds it, or None; ``NotYet`` while that create may still land."""
        if not sent_at:
            return None
        settles_in = float(sent_at) + self.sink.settle_seconds - time.time()
        if settles_in > 0:
            raise NotYet(f"{self.sink.name}: an earlier create for {key} may still land; looking for it "
                         f"in {settles_in:.0f}s", retry_after=settles_in)
        return find(key)

    def done(self, key, pipe=None):
        """Drop the intent mark of ``key`` (its mapping is saved, or what it created is gone); with
        ``pipe``, queued on that pipeline."""
        (pipe or self.intents.redis).hdel(self.intents.key, key)
