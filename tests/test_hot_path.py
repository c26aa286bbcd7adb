"""Redis round trips on the worker's hot path (counted, never timed; the benchmark has the times).

A write to a healthy sink takes four: the key lock taken with the version check, the breaker's
verdict with a rate-limit token, the version record that frees the lock, and the outcome. It
made nine before (receipt time, lock, check, breaker, token, record, release, recovery, outcome).
The sinks' own: Storepoint three to create (mapping with the fields last written, the create's
intent mark, the mapping with the mark dropped), two to update, two to delete (mapping, then
forgetting it; a key never created: mapping and intent mark); B2B two either way. They made six,
three, three (four for a never-created key) and three before.
"""
import contextlib
import time
import traceback

import kombu
import redis.connection
from redis._parsers import _HiredisParser

import pytest

from tests.fixtures import STOP_ID, RecordingSink, accept
from tests.payloads import status_change
from tests.sink_contract import sample_location
from tests.test_sink_b2b import settings_for as b2b_settings
from tests.test_sink_storepoint import TOKEN as STOREPOINT_TOKEN
from workers.config import Settings
from workers.pipeline.fan_out import fetch_stop
from workers.pipeline.routes import Route
from workers.resilience.http import HttpClient
from workers.sinks.b2b import B2BSink
from workers.sinks.storepoint import StorepointSink
from workers.store import keys
from workers.store.broker_redis import TRANSPORT
from workers.store.mappings import MappingStore
from workers.store.redis_client import connect


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
    # entry read with the processing lease taken, stop (cached), routed; then the sink's write
    # (versions._call twice). The entry and the lease were two round trips before.
    assert one_sink == ["take_up", "fetch_stop", "route_delivery", "_call", "admit_and_take", "_call", "record"]


def test_a_stop_read_from_locate2u_is_cached_in_the_round_trip_that_routes_its_delivery(driver):
    """The read stop went into the cache with a SET of its own before."""
    first = fan_out(driver, "Enroute", "2022-04-27T05:00:00+00:00")  # the token obtained, the stop read
    driver.rt.redis.delete(keys.stop_cache(STOP_ID))
    read = fan_out(driver, "Arrived", "2022-04-27T05:10:00+00:00")
    assert read[:4] == ["take_up", "fetch_stop", "_read", "route_delivery"], read
    assert len(read) == 8 and "cache_stop" not in first + read
    cached, source = fetch_stop(driver.rt, STOP_ID, time.time() - 1)
    assert source == "cache" and cached["stopId"] == STOP_ID


def storepoint_sink(simulator, redis_client):
    sim = simulator("storepoint", token=STOREPOINT_TOKEN)
    settings = Settings(webhook_secret="x" * 16, storepoint_api_url=sim.url, storepoint_api_token=STOREPOINT_TOKEN)
    return StorepointSink.from_settings(settings, MappingStore(redis_client, "storepoint"))


def b2b_sink(simulator, redis_client):
    sim = simulator("b2b", token="b2b-static-token", username="b2b-user", password="b2b-pass")
    return B2BSink.from_settings(b2b_settings(sim), MappingStore(redis_client, "b2b"))


@pytest.mark.parametrize("make_sink, create, update", [(storepoint_sink, 3, 2), (b2b_sink, 2, 2)])
def test_a_sinks_own_round_trips_to_create_and_to_update(simulator, redis_client, make_sink, create, update):
    sink = make_sink(simulator, redis_client)
    with round_trips() as creating:
        sink.apply("upsert", sample_location())
    with round_trips() as updating:
        sink.apply("upsert", sample_location(status="Arrived"))
    assert (len(creating), len(updating)) == (create, update), (creating, updating)
    remote_id, written = sink.known("l2u-stop-164557")
    assert remote_id and written  # what reconcile compares with was kept


def test_a_storepoint_delete_costs_two_round_trips_mapped_or_never_created(simulator, redis_client):
    sink = storepoint_sink(simulator, redis_client)
    sink.apply("upsert", sample_location())
    with round_trips() as mapped:
        sink.apply("delete", sample_location(status="Cancelled"))
    with round_trips() as never_created:
        sink.apply("delete", sample_location(stop_id=7, status="Cancelled"))
    assert (mapped, never_created) == (["get", "forget"], ["get", "get"])
    assert sink.known("l2u-stop-164557") == (None, {})


def test_redis_replies_are_parsed_by_hiredis(redis_server):
    """The C parser (setup.cfg's hiredis), not redis-py's Python one, reads every reply."""
    client = connect(redis_server.url)
    connection = client.connection_pool.get_connection()
    try:
        connection.connect()
        assert isinstance(connection._parser, _HiredisParser)
    finally:
        client.connection_pool.release(connection)
        client.close()


def test_the_broker_channel_takes_and_acks_messages_with_one_redis_client(redis_server, redis_client, monkeypatch):
    """kombu's Redis channel built a ``redis.Redis`` for each message it took and each ack."""
    built = []
    build = redis.Redis.__init__

    def counted(client, *args, **kwargs):
        built.append(type(client).__name__)
        build(client, *args, **kwargs)

    with kombu.Connection(redis_server.url, transport=TRANSPORT) as connection:
        queue = connection.SimpleQueue("hot-path-acks")
        for number in range(20):
            queue.put({"number": number})
        queue.get(timeout=5).ack()  # the channel's clients are made by the first
        monkeypatch.setattr(redis.Redis, "__init__", counted)
        numbers = []
        for _ in range(19):
            message = queue.get(timeout=5)
            numbers.append(message.payload["number"])
            message.ack()
        queue.close()
    assert sorted(numbers) == list(range(1, 20))
    assert built == []
    assert redis_client.llen("hot-path-acks") == 0
