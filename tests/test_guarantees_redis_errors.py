"""Redis error classes (issue 14, item 5): an outage puts the message back, a bug ends dead-lettered.

Every error here comes from a real Redis: a key of the wrong type, a failing script, a server out of
memory under ``noeviction``, a read-only replica, a server busy running a script.
"""
import time

import pytest
import redis
from celery.exceptions import Reject

from tests.fixtures import STOP_ID, RecordingSink, accept, fan_out_job
from tests.payloads import status_change
from workers import tasks
from workers.pipeline import failures
from workers.pipeline.routes import Route
from workers.resilience.http import HttpClient
from workers.store.mappings import MappingStore


def test_wrongtype_is_a_bug_dead_lettered_with_the_error_not_requeued_forever(driver):
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    args = fan_out_job(driver, delivery_id)
    driver.rt.redis.set(driver.rt.versions("storepoint").key, "not a hash")  # a bug elsewhere wrote this
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):  # raised (Flower shows it), not Reject
        tasks.deliver.run(*args)
    [entry] = driver.rt.dead_letters.list()
    assert entry["sink"] == "storepoint" and "WRONGTYPE" in entry["reason"]
    assert driver.rt.ledger.get(delivery_id)["sinks"]["storepoint"]["state"] == "dead_lettered"


def test_a_bug_in_one_sinks_write_during_the_fan_out_leaves_the_other_sinks_written(driver, sink_server):
    """The fan-out writes to each sink in turn in its own process: a bug in one sink's write is
    dead-lettered for that sink only, and the fan-out goes on with the next."""
    driver.rt.routes["second"] = Route("second", on_status={"Cancelled": "delete"})
    driver.rt.sinks["second"] = RecordingSink(HttpClient(sink_server.url),
                                              mappings=MappingStore(driver.rt.redis, "second"))
    driver.rt.redis.set(driver.rt.versions("storepoint").key, "not a hash")  # storepoint's write hits the bug
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    entry = driver.rt.ledger.get(delivery_id)
    assert entry["sinks"]["storepoint"]["state"] == "dead_lettered"
    assert entry["sinks"]["second"]["state"] == "applied" and entry["status"] == "dead_lettered"
    [dead] = driver.rt.dead_letters.list()
    assert dead["sink"] == "storepoint" and "WRONGTYPE" in dead["reason"]


def test_a_script_error_is_a_bug(driver):
    from workers.tasks import redis_outage

    with pytest.raises(redis.ResponseError) as caught:
        driver.rt.redis.eval("return redis.call('NOSUCHCOMMAND')", 0)
    assert not redis_outage(caught.value)


@pytest.fixture
def out_of_memory(redis_client):
    """``set()`` makes the server refuse writes as out of memory (``noeviction``); undone after the test."""
    redis_client.config_set("maxmemory-policy", "noeviction")
    yield lambda: redis_client.config_set("maxmemory", 1)
    redis_client.config_set("maxmemory", 0)


def test_out_of_memory_is_an_outage_and_nothing_is_dead_lettered(driver, out_of_memory):
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    _, args = driver.sent.pop(0)
    out_of_memory()
    with pytest.raises(Reject):
        tasks.process_delivery.run(*args)
    driver.rt.redis.config_set("maxmemory", 0)
    assert driver.rt.dead_letters.list() == []
    assert driver.rt.ledger.get(delivery_id)["status"] == "received"


def test_an_outage_pauses_before_its_message_goes_back_longer_each_time_in_a_row(monkeypatch):
    """A broker still up (RabbitMQ) hands a message put back straight to a worker again: the pause is
    what keeps an outage from being a loop (``tests/test_rabbitmq.py`` has it through real processes)."""
    slept = []
    monkeypatch.setattr(tasks, "_OUTAGE_PAUSE", failures.OutagePause(sleep=slept.append))

    def outage():
        with pytest.raises(Reject), tasks._redis_outage():
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    for _ in range(5):
        outage()
    with tasks._redis_outage():
        pass  # a task that met no outage
    outage()
    assert slept == [1, 2, 4, 8, 8, 1]


def test_a_read_only_replica_is_an_outage(redis_client):
    from workers.ops.devstack import free_port
    from workers.tasks import redis_outage

    redis_client.replicaof("127.0.0.1", free_port())  # nothing listens there: stays a read-only replica
    try:
        with pytest.raises(redis.ResponseError) as caught:
            redis_client.set("l2u:probe", "1")
    finally:
        redis_client.replicaof("NO", "ONE")
    assert redis_outage(caught.value)


def test_a_server_busy_running_a_long_script_is_an_outage(redis_server, redis_client):
    import threading

    from workers.store.redis_client import connect
    from workers.tasks import redis_outage

    redis_client.config_set("lua-time-limit", 100)  # BUSY after 100 ms of one script
    runner = connect(redis_server.url, socket_timeout=30)
    looping = threading.Thread(target=lambda: pytest.raises(redis.ResponseError, runner.eval,
                                                            "while true do end", 0), daemon=True)
    looping.start()
    try:
        caught = None
        for _ in range(100):
            try:
                redis_client.ping()
            except redis.ResponseError as exc:
                caught = exc
                break
            time.sleep(0.05)
    finally:
        for _ in range(200):
            try:
                redis_client.script_kill()
                break
            except redis.ResponseError:  # NOTBUSY: the script has not started yet
                time.sleep(0.05)
        looping.join(10)
        redis_client.config_set("lua-time-limit", 5000)
    assert caught is not None and str(caught).startswith("BUSY")
    assert redis_outage(caught)
