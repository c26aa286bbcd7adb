"""The process's one renewal thread (``workers.resilience.renewal``): every holder renewed on its
cadence, none after its body ended, and a forked child renews with a thread of its own."""
import multiprocessing
import threading
import time

import redis

from tests.helpers import wait_for
from workers.resilience.renewal import Renewer, renewed


class Counter:
    def __init__(self, result=True, delay=0.0):
        self.calls, self.result, self.delay = [], result, delay
        self.running = threading.Event()

    def __call__(self):
        self.running.set()
        time.sleep(self.delay)
        self.calls.append(time.monotonic())
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_every_holder_is_renewed_on_its_own_cadence_until_removed():
    renewer = Renewer()
    fast, slow = Counter(), Counter()
    fast_number, slow_number = renewer.add(fast, 0.05, "fast"), renewer.add(slow, 0.3, "slow")
    wait_for(lambda: len(slow.calls) >= 2, timeout=10, interval=0.01)
    renewer.remove(fast_number)
    renewer.remove(slow_number)
    assert len(fast.calls) > 2 * len(slow.calls)
    for calls, every in ((fast.calls, 0.05), (slow.calls, 0.3)):  # never sooner than its cadence
        assert all(later - earlier >= every * 0.99 for earlier, later in zip(calls, calls[1:]))
    counts = len(fast.calls), len(slow.calls)
    time.sleep(0.2)
    assert (len(fast.calls), len(slow.calls)) == counts


class CountingRenewer(Renewer):
    """A Renewer that counts its thread's turns (each wake-up, renewal or not)."""

    turns = 0

    def _next_due(self):
        self.turns += 1
        return super()._next_due()


def test_a_holder_due_after_others_does_not_wake_the_thread_and_an_earlier_one_does():
    renewer = CountingRenewer()
    waiting = renewer.add(Counter(), 30, "waiting")
    wait_for(lambda: renewer.turns >= 1, timeout=5, interval=0.01)
    turns = renewer.turns
    for _ in range(50):  # what 50 sink writes do: each adds its lock and removes it when done
        number = renewer.add(Counter(), 30, "a write's lock")
        time.sleep(0.002)  # the sink call
        renewer.remove(number)
    time.sleep(0.2)
    assert renewer.turns - turns <= 1
    soon = Counter()
    number = renewer.add(soon, 0.05, "due before the others")
    wait_for(lambda: len(soon.calls) >= 2, timeout=5, interval=0.01)
    renewer.remove(number)
    renewer.remove(waiting)


def test_remove_waits_for_a_renewal_under_way():
    renewer = Renewer()
    slow = Counter(delay=0.3)
    number = renewer.add(slow, 0.01, "slow")
    assert slow.running.wait(2)
    renewer.remove(number)
    assert len(slow.calls) == 1  # the renewal that was running had finished when remove returned
    time.sleep(0.1)
    assert len(slow.calls) == 1


def test_a_holder_that_no_longer_holds_is_not_renewed_again():
    lapsed = Counter(result=False)
    with renewed(lapsed, 0.02, "lapsed"):
        time.sleep(0.2)
    assert len(lapsed.calls) == 1


def test_a_redis_error_is_logged_and_the_next_turn_tries_again(caplog):
    failing = Counter(result=redis.ConnectionError("Connection refused"))
    with renewed(failing, 0.02, "the lock l2u:lock:x"):
        wait_for(lambda: len(failing.calls) >= 3, timeout=5)
    assert "could not renew the lock l2u:lock:x: Connection refused" in caplog.text


def _renewals_in_a_child(queue):
    counter = Counter()
    with renewed(counter, 0.02, "child"):
        time.sleep(0.2)
    queue.put(len(counter.calls))


def test_a_forked_child_renews_with_a_thread_of_its_own():
    parent = Counter()
    with renewed(parent, 0.02, "parent"):  # the parent's thread exists when the child is forked
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_renewals_in_a_child, args=(queue,))
        child.start()
        renewals = queue.get(timeout=10)
        child.join(10)
    assert renewals >= 5
    assert len(parent.calls) >= 5
