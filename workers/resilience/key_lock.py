"""The per-key write lock (``KeyLock``), renewed while its holder works, with a token that fences
what the holder records once its call returns."""
import contextlib
import time
import uuid

from workers.resilience.renewal import renewed


_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# The holder's last write went out without an answer: keep the key fenced until it cannot land.
# Either way the holder let go itself, so its writer mark (KEYS[2], member ARGV[4]) goes too.
_SETTLE_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[4])
return 1
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
return redis.call('DEL', KEYS[1])
"""


class KeyLock:
    """One writer per (sink, key) at a time: a Redis key holding the holder's random token, taken
    by ``VersionStore.begin`` in the same script as the version check.

    ``held()`` renews it every ``renew_every`` seconds while its body runs, so a sink call slower
    than the lock keeps it; a holder that dies stops renewing and the lock lapses between
    ``seconds - renew_every`` and ``seconds`` after its last request.
    The token is the fence: a store that checks it in the same script as a write (the version
    compare-and-set) knows whether the lock was still this holder's. Losing the lock never raises:
    ``lost`` says so, and the holder decides what that means.

    A write sent without an answer keeps the key ``settling`` (``settle``) under its ``writer``
    identity: that very write may take the key again and go out once more (it cannot reorder
    anything), any other waits. A holder that took the key so leaves it settling, for what is
    left of that time, when it lets go (``settles_until``).

    ``marks`` (a sorted set) holds the lock's writer mark, ``mark`` ("<token>:<location key>"),
    while it is taken (``VersionStore.begin`` adds it): letting go under the lock (``release``,
    ``settle``, the version record) drops it, so a mark left once the lock lapsed is a holder that
    vanished, perhaps after its request left (see ``sweeper.reassert_again``).
    """

    SETTLING = "settling"  # the value of a lock kept by ``settle``: "settling:<writer>"

    def __init__(self, client, name, seconds, renew_every, writer, marks, key):
        self.redis = client
        self.name = name
        self.millis = int(seconds * 1000)
        self.renew_every = renew_every
        self.token = uuid.uuid4().hex
        self.marks, self.mark = marks, f"{self.token}:{key}"
        self.settling = f"{self.SETTLING}:{writer}"
        self.settles_until = None  # epoch seconds: taken over from this write's own settle time
        self.lost = False
        self.released = False  # set by a store that released it in the same step as its write
        self._renew = client.register_script(_RENEW_LOCK)
        self._settle = client.register_script(_SETTLE_LOCK)
        self._release = client.register_script(_RELEASE_LOCK)

    def renew(self):
        """Extend the lock by its length; False (and ``lost``) once it is not this holder's."""
        if not self._renew(keys=[self.name], args=[self.token, self.millis]):
            self.lost = True
        return not self.lost

    def took_over(self, settle_millis):
        """The lock was taken from this writer's own settling key, ``settle_millis`` before it lapsed."""
        self.settles_until = time.time() + settle_millis / 1000 if settle_millis > 0 else None

    def settle_millis_left(self):
        """Milliseconds the key must stay settling after this holder lets go (0: none)."""
        return max(0, int((self.settles_until - time.time()) * 1000)) if self.settles_until else 0

    def release(self):
        """Free the lock if it is still this holder's (and not released already), or leave it settling
        for what is left of the time it was taken over with; True if it was this holder's."""
        if self.released:
            return False
        self.released = True
        left = self.settle_millis_left()
        if left:
            return bool(self._settle(keys=[self.name, self.marks], args=[self.token, left, self.settling, self.mark]))
        return bool(self._release(keys=[self.name, self.marks], args=[self.token, self.mark]))

    def settle(self, seconds):
        """Keep the key locked ``seconds`` more (at least what was left of a settle time it was taken
        over with) with no holder (``release`` then leaves it): a write sent without an answer may
        still land, and no other write may go out before it can't."""
        millis = max(int(seconds * 1000), self.settle_millis_left())
        return bool(self._settle(keys=[self.name, self.marks], args=[self.token, millis, self.settling, self.mark]))

    def busy_for(self):
        """Seconds until a lock kept by ``settle`` lapses; None when a live holder has it (or nobody)."""
        with self.redis.pipeline(transaction=False) as pipe:
            value, millis = pipe.get(self.name).pttl(self.name).execute()
        settling = value is not None and value.partition(":")[0] == self.SETTLING
        return max(0.0, millis / 1000) if settling else None

    @contextlib.contextmanager
    def held(self):
        """Renew the lock on the process's renewal thread while the body runs (a Redis error on the way: the
        lock may lapse, and the fence tells)."""
        with renewed(self.renew, self.renew_every, f"the lock {self.name}"):
            yield self
