"""Redis round trips on the worker's hot path (counted, never timed; the benchmark has the times).

A write to a healthy sink takes four: the key lock taken with the version check, the breaker's
verdict with a rate-limit token, the version record that frees the lock, and the outcome. It
made nine before (receipt time, lock, check, breaker, token, record, release, recovery, outcome).
"""
import contextlib
import traceback

import redis.connection

from tests.fixtures import STOP_ID, RecordingSink, accept
from tests.payloads import status_change
from workers.pipeline.routes import Route
from workers.resilience.http import HttpClient
from workers.store.stores import MappingStore


@contextlib.contextmanager
def round_trips():
    """The relay functions that made each Redis round trip in the body (a pipeline is one)."""
    made = []
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(connection, command, check_health=True):
        made.append(next((frame.name for frame in reversed(traceback.extract_stack()[:-1])
                          if "/workers/" in frame.filename), "?"))
        return send(connection, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counted
    try:
        yield made
    finally:
        redis.connection.AbstractConnection.send_packed_command = send


def fan_out(driver, status, action_date):
    """The round trips of one delivery's fan-out (its stop already cached)."""
    accept(driver.rt, status_change(STOP_ID, status, action_date))
    with round_trips() as made:
        driver.run(release_retries=False)
    return made


def test_a_write_to_a_healthy_sink_costs_four_round_trips(driver, sink_server):
    fan_out(driver, "Enroute", "2022-04-27T05:00:00+00:00")  # token, stop cache, first write
    one_sink = fan_out(driver, "Arrived", "2022-04-27T05:10:00+00:00")
    driver.rt.routes["second"] = Route("second", on_status={"Complete": "upsert"})
    driver.rt.sinks["second"] = RecordingSink(HttpClient(sink_server.url), mappings=MappingStore(driver.rt.redis, "second"))
    two_sinks = fan_out(driver, "Complete", "2022-04-27T05:20:00+00:00")
    assert len(two_sinks) - len(one_sink) == 4, (one_sink, two_sinks)
    # entry, processing lease, stop (cached), routed; then the sink's write (versions._call twice)
    assert one_sink == ["get", "claim", "fetch_stop", "start_fan_out", "_call", "admit_and_take", "_call", "record"]
