"""The ``deliver`` job: one routed write for one sink, serialized in one place."""
import typing

from workers.celery_config import DELIVER


class DeliverJob(typing.NamedTuple):
    """What a ``deliver`` task gets: which delivery, which sink, what to do with which record."""

    delivery_id: str
    sink: str
    action: str | None
    record: dict | None
    attempt: int = 0
    replay: bool = False

    @property
    def event_type(self):
        """The event type kept in the record (None for a job without one)."""
        return (self.record or {}).get("event", {}).get("event_type")

    def next_attempt(self):
        return self._replace(attempt=self.attempt + 1)

    def send(self, rt, delay=0.0, for_health=False):
        """Queue the job after ``delay`` seconds (``for_health``: held for the sink's health,
        released early once it answers again; see ``RetryScheduler``)."""
        if for_health:
            rt.scheduler.hold(list(self), delay)
        else:
            rt.scheduler.schedule(DELIVER, list(self), delay)
