"""Beat schedules that send a control task only when it has something to do.

``RetriesDue`` is due when a scheduled retry, a lapsed claim or a failing
sink's recovery probe is due: beat reads the earliest due time from Redis at
each check (one ZRANGE per set, no task, no log line), so
``release_due_retries`` is not sent — nor logged by the worker — while nothing
waits.
"""
import time

import redis
from celery.schedules import schedule

from workers.resilience.retries import RetryScheduler
from workers.store.redis_client import connect


class RetriesDue(schedule):
    """Due when the earliest retry in ``RetryScheduler``'s sets is due; checked every ``check_every`` s."""

    def __init__(self, redis_url, check_every=1.0, ca_file=None, app=None):
        super().__init__(run_every=check_every, app=app)
        self.redis_url = redis_url
        self.ca_file = ca_file
        self._client = None

    def next_due(self):
        """Epoch seconds of the earliest scheduled or claimed retry or recovery probe, or None when there is none."""
        if self._client is None:
            self._client = connect(self.redis_url, self.ca_file, max_connections=1)
        pipe = self._client.pipeline(transaction=False)
        for key in (RetryScheduler.KEY, RetryScheduler.CLAIMED, RetryScheduler.PROBES):
            pipe.zrange(key, 0, 0, withscores=True)
        found = [score for earliest in pipe.execute() for _, score in earliest]
        return min(found, default=None)

    def is_due(self, last_run_at):
        check = self.run_every.total_seconds()
        try:
            due = self.next_due()
        except redis.RedisError:  # Redis away: send the task, whose worker handles the outage
            return True, check
        if due is None:
            return False, check
        wait = due - time.time()
        return (True, check) if wait <= 0 else (False, min(wait, check))

    def __reduce__(self):  # beat keeps its schedule in a shelve: no Redis client in it
        return self.__class__, (self.redis_url, self.run_every.total_seconds(), self.ca_file)

    def __repr__(self):
        return f"<retries due, checked every {self.run_every.total_seconds():g}s>"
