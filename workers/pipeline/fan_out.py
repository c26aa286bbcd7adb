"""Fan-out: plan once which sinks take an event and what each writes, then deliver each job.

``plan`` reads the stop from Locate2u (cached briefly) when a routed sink needs it and builds
each sink's record. ``route_delivery`` (first time) delivers the jobs one after the other in
this process, with no message per sink: a slow sink delays the next by at most its timeout,
and a failing one is retried by its own ``deliver`` message, so it never holds the others up
again. ``resume_fan_out`` (a fan-out that stalled: its worker died mid-way, or a message was
lost) queues a ``deliver`` message per stalled sink.
"""
import dataclasses
import json
import logging
import time

from workers.celery_config import PROCESS_DELIVERY
from workers.domain.locations import Location, location_from_stop, stop_record_problem
from workers.pipeline.deliver import deliver_now
from workers.pipeline.jobs import DeliverJob
from workers.pipeline.outcomes import ROUTE, dead_letter, dead_letter_enrich
from workers.pipeline.routes import render
from workers.resilience.errors import NotFound, PermanentError, RetriableError
from workers.resilience.retries import retry_delay
from workers.store import keys
from workers.store.queue_positions import work_queues

log = logging.getLogger(__name__)
STOP_CACHE_SECONDS = 10


@dataclasses.dataclass
class Plan:
    """What one event writes: a job per sink that takes it, the sinks that refused it (with why), and
    the trace lines of its making (the stop read: "enriched")."""

    jobs: list = dataclasses.field(default_factory=list)
    refused: list = dataclasses.field(default_factory=list)  # (DeliverJob without a record, PermanentError)
    steps: list = dataclasses.field(default_factory=list)  # (at, what, details), as Ledger.trace_lines takes them
    stop_read: tuple | None = None  # (stop id, record, when the read left) of a stop read from Locate2u now

    @property
    def sinks(self):
        return [job.sink for job in self.jobs] + [job.sink for job, _ in self.refused]

    def cache_read(self, client):
        """Cache the stop this plan read from Locate2u, if it did (``client``: Redis, or a pipeline)."""
        if self.stop_read is not None:
            cache_stop(client, *self.stop_read)


def plan(rt, event, sinks=None, attempts=None):
    """The Plan for ``event``, limited to ``sinks`` when given (each listed sink the routes no longer
    send it to is refused). ``attempts``: each sink's attempts so far (a resumed fan-out). A failed
    stop fetch raises: RetriableError to try again, PermanentError when it cannot be read (a stop no
    longer in Locate2u does not hold up deletes, which need only the key)."""
    routed = [(route, action) for route in rt.routes.values()
              if route.sink in rt.sinks and (sinks is None or route.sink in sinks)
              and (action := route.action_for(event))]
    attempts = attempts or {}
    result = Plan()
    for sink in sorted(set(sinks or ()) - {route.sink for route, _ in routed}):
        result.refused.append((DeliverJob(event.delivery_id, sink, None, None, attempts.get(sink, 0)),
                               PermanentError(f"{sink} no longer takes {event.event_type}")))
    stop = None
    reading = [(route, action) for route, action in routed if route.needs_stop]
    if event.stop_id is not None and reading:
        started = time.time()
        try:
            stop, source = fetch_stop(rt, event.stop_id, event.action_date.timestamp())
            if source == "locate2u":
                result.stop_read = (event.stop_id, stop, started)
        except NotFound:  # deleted in Locate2u since: what needs only the key goes on without it
            if not all(rt.sinks[route.sink].needs_only_the_key(action) for route, action in reading):
                raise
            source = "locate2u, no such stop"
        read_at = time.time()
        result.steps.append((read_at, "enriched", {"from": source, "took": round(read_at - started, 3)}))
    context = template_context(event, stop)
    for route, action in routed:
        job = DeliverJob(event.delivery_id, route.sink, action, None, attempts.get(route.sink, 0))
        try:
            result.jobs.append(job._replace(record=build_record(route, action, event, stop, context)))
        except PermanentError as exc:
            result.refused.append((job, exc))
    return result


def template_context(event, stop):
    """Names a key or field template may use: the stop record, the payload, the keys."""
    entity_id = event.keys.get(f"{event.entity}Id", event.delivery_id)
    return {**(stop or {}), **event.payload, **event.keys, "event_type": event.event_type,
            "entity": event.entity, "entity_id": entity_id, "status": event.status or ""}


def build_record(route, action, event, stop, context):
    """The Location (as JSON) one route writes for ``event`` with ``action``."""
    key = render(route.key, context)
    fields = {name: render(template, context) for name, template in route.fields.items()}
    if event.stop_id is None and route.needs_stop and action != "delete":
        raise PermanentError(f"{event.event_type} carries no stopId, so {route.sink} has no location to write")
    if stop is None:
        return Location(key=key, version=event.version, status=event.status, fields=fields,
                        event=event.to_json()).to_json()
    location = location_from_stop(stop, event.to_json(), key, fields)
    overrides = {name: value for name, value in fields.items() if hasattr(location, name) and name != "fields"}
    record = location.to_json()
    record.update(overrides)
    return record


def fetch_stop(rt, stop_id, happened_at):
    """``(the stop record, where it was read: "cache" or "locate2u")`` for an event that happened at
    ``happened_at`` (epoch seconds). Reads are cached briefly (``Plan.cache_read``), so a burst of
    events for one stop costs one call; a cached read is used only if it was taken after the event
    happened (a read from before it may miss a change the event follows)."""
    cached = json.loads(rt.redis.get(keys.stop_cache(stop_id)) or "{}")
    if cached.get("read_at", 0) >= happened_at:  # an entry of the older format has no read_at: read again
        return cached["stop"], "cache"
    if rt.locate2u is None:
        raise PermanentError("Locate2u is not configured (LOCATE2U_CLIENT_ID), so stops cannot be fetched")
    stop = rt.locate2u.get_stop(stop_id)
    problem = stop_record_problem(stop)
    if problem:
        raise PermanentError(f"Locate2u's stop {stop_id} cannot be mapped: {problem}")
    return stop, "locate2u"


def cache_stop(client, stop_id, stop, read_at):
    """Keep ``stop`` (read from Locate2u at ``read_at``) for ``STOP_CACHE_SECONDS``."""
    client.set(keys.stop_cache(stop_id), json.dumps({"read_at": read_at, "stop": stop}), ex=STOP_CACHE_SECONDS)


def route_delivery(rt, event, received_at, attempt=0, replay=False, sinks=None, *, validated_at):
    """Plan ``event`` (received at ``received_at``, its body checked at ``validated_at``) and deliver
    one job per routed sink (only ``sinks``, when given: a route-stage replay redoes the sink that
    refused, not the ones that took it)."""
    validated = [(validated_at, "validated", {})]
    try:
        planned = plan(rt, event, sinks)
    except RetriableError as exc:
        return _retry_enrich(rt, event, attempt, exc, replay, sinks, validated)
    except PermanentError as exc:
        return dead_letter_enrich(rt, event, attempt, exc, validated)
    if not planned.sinks:
        rt.ledger.set_status(event.delivery_id, "unrouted", entity=event.entity)
        rt.ledger.trace_lines(event.delivery_id, [*validated, (time.time(), "unrouted",
                                                               {"reason": "no enabled sink takes this event"})])
        return "unrouted"
    with rt.redis.pipeline() as pipe:  # one round trip: the stop read is cached as the fan-out starts
        planned.cache_read(pipe)
        rt.ledger.start_fan_out(event.delivery_id, planned.sinks, [job.sink for job in planned.jobs],
                                validated + planned.steps, pipe, entity=event.entity)
        pipe.execute()
    if replay:  # what is redone supersedes the earlier dead letters of this delivery
        for name in ["enrich"] + planned.sinks:
            rt.dead_letters.remove(rt.dead_letters.entry_id(event.delivery_id, name))
    _refuse(rt, event, planned)
    for job in planned.jobs:
        deliver_now(rt, job, received_at)
    return "routed" if planned.jobs else "dead_lettered"


def resume_fan_out(rt, event, entry, grace=0.0):
    """Queue ``deliver`` again for the stalled sinks of a routed delivery (a ``LedgerEntry``).

    A fan-out stalls when the worker dies between marking the sinks pending and
    queueing the last deliver job (the redelivered ``process_delivery`` finds it
    "routed"), or when the broker loses a message. A sink whose deliver message is
    still queued is left to it, and so is a fan-out whose worker still renews its
    lease (it is alive, in a slow write: ``LedgerEntry.fan_out_live``). Deliver is
    idempotent, so queueing one that was merely slow costs a redundant write, never
    a wrong one.
    """
    if entry.fan_out_live(rt.settings.sweep_after):  # its worker is alive and still writing
        return entry.status.value
    queued = work_queues(rt)
    stalled = [sink for sink in entry.stalled_sinks(grace) if not queued.waiting(entry.tickets.get(sink))]
    if not stalled:
        return entry.status.value
    attempts = {sink: entry.sinks[sink]["attempts"] for sink in stalled}
    try:
        planned = plan(rt, event, stalled, attempts)
    except RetriableError as exc:  # the sweeper comes back to it
        rt.ledger.trace(event.delivery_id, "resume postponed", error=exc.message)
        return "routed"
    except PermanentError as exc:  # every stalled sink is refused for it
        planned = Plan(refused=[(DeliverJob(event.delivery_id, sink, None, None, attempts[sink]), exc)
                                for sink in stalled])
    planned.cache_read(rt.redis)
    # Only a sink still open: its write may have landed since ``entry`` was read.
    jobs = [job for job in planned.jobs if rt.ledger.sink_outcome(
        job.delivery_id, job.sink, "pending", only_open=True, attempts=job.attempt, reason="resumed") >= 0]
    _refuse(rt, event, planned)
    resumed = [job.sink for job in jobs] + [job.sink for job, _ in planned.refused]
    if not resumed:
        settled = rt.ledger.entry(event.delivery_id)
        return settled.status.value if settled else "missing"
    for job in jobs:
        job.send(rt)
    rt.ledger.count_resume(event.delivery_id)
    rt.ledger.trace_lines(event.delivery_id, [*planned.steps, (time.time(), "resumed", {"sinks": resumed})])
    log.warning("resumed a stalled fan-out to %s", ", ".join(resumed))
    return "resumed"


def _refuse(rt, event, planned):
    """Dead-letter the sinks the plan refused (route stage)."""
    for job, exc in planned.refused:
        dead_letter(rt, job, job.attempt + 1, exc, stage=ROUTE, event_type=event.event_type)


def _retry_enrich(rt, event, attempt, exc, replay, sinks, validated):
    """Schedule ``process_delivery`` again; the ledger keeps the attempt and when it is due, so the
    sweeper re-queues it if the retry message is lost. ``validated``: the trace line of the body's
    check, written first."""
    delay = retry_delay(rt.settings.retry_schedule, attempt + 1, exc.retry_after)
    if delay is None:
        return dead_letter_enrich(rt, event, attempt, exc, validated)
    rt.ledger.trace_lines(event.delivery_id, [*validated, (time.time(), "enrich retry",
                                                           {"error": exc.message, "delay": round(delay, 1)})])
    rt.ledger.set_status(event.delivery_id, "retrying", due=time.time() + delay, attempt=attempt + 1,
                         replay=int(bool(replay)))
    rt.scheduler.schedule(PROCESS_DELIVERY, [event.delivery_id, event.event_type, attempt + 1, replay, sinks], delay)
    return "retrying"
