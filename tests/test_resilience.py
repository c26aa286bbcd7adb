import random
import time

from tests.fixtures import kill_when_reached
from tests.helpers import admit
from workers.celery_config import DELIVER, PROCESS_DELIVERY
from workers.resilience.admission import CircuitBreaker, RateLimiter
from workers.resilience.retries import RetryScheduler, bring_forward, retry_delay

SCHEDULE = (0, 5, 300, 1800)


def test_retry_delay_follows_the_schedule_with_jitter_and_retry_after():
    rng = random.Random(1)
    assert 5 <= retry_delay(SCHEDULE, 1, rng=rng) <= 5.5
    assert 300 <= retry_delay(SCHEDULE, 2, rng=rng) <= 330
    assert retry_delay(SCHEDULE, 1, retry_after=60, rng=rng) == 60
    assert retry_delay(SCHEDULE, 4) is None


def test_scheduler_sends_now_or_holds_until_due(redis_client):
    sent = []
    scheduler = RetryScheduler(redis_client, lambda name, args: sent.append((name, args)))
    scheduler.schedule("t", [1], 0)
    scheduler.schedule("t", [2], 100)
    assert sent == [("t", [1])]
    assert scheduler.release_due() == 0
    assert scheduler.release_due(now=time.time() + 101) == 1
    assert sent[-1] == ("t", [2]) and scheduler.pending() == []



def test_releasers_running_at_once_send_each_due_task_once(redis_client):
    """Chaos finding: a backlog of release tasks ran side by side and each sent the same retries,
    so every retry chain doubled (thousands of redundant deliver tasks in one run)."""
    sent = []
    other = RetryScheduler(redis_client, lambda name, args: sent.append(args[0]))

    def send_and_race(name, args):
        sent.append(args[0])
        if len(sent) == 1:
            other.release_due(now=time.time() + 101)  # a second releaser, mid-way through the first

    scheduler = RetryScheduler(redis_client, send_and_race)
    for number in (1, 2, 3):
        scheduler.schedule("t", [number], 100)
    assert scheduler.release_due(now=time.time() + 101) == 3
    assert sorted(sent) == [1, 2, 3]
    assert redis_client.zcard(RetryScheduler.CLAIMED) == 0


def test_claimed_retries_of_a_releaser_that_died_are_sent_after_the_lease(redis_client):
    """The releaser is SIGKILLed in its first send, with the due retries claimed."""
    releaser = RetryScheduler(redis_client, lambda name, args: None)
    for number in (1, 2):
        releaser.schedule("t", [number], 10)
    now = time.time() + 11
    kill_when_reached(lambda: releaser.release_due(now=now), [(releaser, "send_task")])
    sent = []
    survivor = RetryScheduler(redis_client, lambda name, args: sent.append(args[0]))
    assert survivor.release_due(now=now + 1) == 0  # still claimed by the dead releaser
    assert survivor.release_due(now=now + RetryScheduler.CLAIM_SECONDS + 1) == 2
    assert sorted(sent) == [1, 2]

def test_breaker_lets_one_probe_through_after_cooldown(redis_client):
    breaker = CircuitBreaker(redis_client, "s", threshold=2, cooldown=10)
    now = time.time()
    assert admit(breaker, now) == ("closed", 0.0)
    assert not breaker.failure(now)
    assert breaker.failure(now)
    verdict, wait = admit(breaker, now + 1)
    assert verdict == "open" and 8.9 < wait < 9.1
    assert admit(breaker, now + 11)[0] == "probe"
    assert admit(breaker, now + 11)[0] == "open"  # only one probe at a time
    assert breaker.failure(now + 11)  # the probe failed: open again
    assert admit(breaker, now + 12)[0] == "open"
    assert admit(breaker, now + 22)[0] == "probe"
    breaker.success()
    assert admit(breaker, now + 22) == ("closed", 0.0) and breaker.state() == "closed"


def test_an_unused_probe_is_given_back(redis_client):
    breaker = CircuitBreaker(redis_client, "s", threshold=1, cooldown=10)
    now = time.time()
    breaker.failure(now)
    assert admit(breaker, now + 11)[0] == "probe"
    breaker.abandon_probe()  # e.g. the rate limit held that write back
    assert admit(breaker, now + 11)[0] == "probe"


def test_rate_limiter_is_a_token_bucket_shared_through_redis(redis_client):
    first, second = RateLimiter(redis_client, "s", rate=2, burst=3), RateLimiter(redis_client, "s", rate=2, burst=3)
    now = 1000.0
    assert [first.take(now), second.take(now), first.take(now)] == [0.0, 0.0, 0.0]
    assert second.take(now) == 0.5
    assert first.take(now + 0.5) == 0.0


def test_bring_forward_makes_one_tasks_retries_due_now_and_leaves_the_others(redis_client):
    """What linking Locate2u again does to the deliveries waiting to read their stop. A member holding an
    escape cjson cannot decode (kept before lone surrogates were repaired) must not stop it."""
    scheduler = RetryScheduler(redis_client, send_task=lambda *args, **kwargs: None)
    scheduler.schedule(PROCESS_DELIVERY, ["d-1", "stop.assigned", 2], 300)
    scheduler.schedule(PROCESS_DELIVERY, ["d-2", "stop.assigned", 3, False, None, "cut \ud83d"], 1800)
    scheduler.schedule(DELIVER, ["d-3", "storepoint", "upsert", {}, 2], 300)
    now = time.time()
    assert bring_forward(redis_client, PROCESS_DELIVERY, now=now) == 2
    due = {args[0]: when for _, args, when in scheduler.pending()}
    assert due["d-1"] == due["d-2"] == now and due["d-3"] > now + 200
