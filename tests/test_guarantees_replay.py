"""Replay (issue 14, item 4): from what the dead letter keeps, redoing only what was refused, and the
CLI saying what became of it. Real Redis, loopback Locate2u and recording sinks, tasks in process."""
import json
import time

import pytest
from click.testing import CliRunner

from tests.fixtures import STOP_ID, Driver, RecordingSink, accept, sim_state
from tests.payloads import PUBLISHED, status_change
from workers import tasks
from workers.celery_config import DELIVER, PROCESS_DELIVERY
from workers.ops import commands as ops_commands
from workers.ops.simulators import recorder
from workers.ops.simulators.base import SimulatorServer
from workers.pipeline.replay import replay_dead_letter, replay_outcome
from workers.pipeline.routes import Route
from workers.resilience.http import HttpClient
from workers.store.mappings import MappingStore

UNKNOWN_STOP = 424242


pytestmark = pytest.mark.usefixtures("driver_mappings")


def _expire(rt, delivery_id):
    """What the ledger's retention does to an entry (its dedup window ended long before)."""
    rt.redis.delete(rt.ledger.key(delivery_id), rt.ledger.dedup_key(delivery_id))


def test_enrich_dead_letter_whose_entry_expired_is_replayed_from_the_body_it_kept(driver, sink_server, l2u):
    delivery_id = accept(driver.rt, status_change(UNKNOWN_STOP, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    [entry] = driver.rt.dead_letters.list()
    assert entry["stage"] == "enrich"
    received_at = float(driver.rt.ledger.get(delivery_id)["received_at"])
    _expire(driver.rt, delivery_id)
    l2u.app.config["STATE"].add_stop(stopId=UNKNOWN_STOP)  # fixed upstream
    assert replay_dead_letter(driver.rt, entry) == "queued"
    driver.run()
    assert sim_state(sink_server).records[f"l2u-stop-{UNKNOWN_STOP}"]["status"] == "Arrived"
    restored = driver.rt.ledger.get(delivery_id)
    assert restored["status"] == "applied" and json.loads(restored["body"])["stopId"] == UNKNOWN_STOP
    assert float(restored["received_at"]) == received_at  # the tie-break keeps the original receipt
    assert driver.rt.redis.ttl(driver.rt.ledger.key(delivery_id)) > 0  # a whole entry: it expires again
    assert driver.rt.dead_letters.list() == []
    assert replay_outcome(driver.rt, entry, since=0)[0] == "applied"


def test_deliver_dead_letter_whose_entry_expired_leaves_no_half_entry(driver, sink_server):
    sink_server.app.config["FAULTS"].inject(400)
    delivery_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    [entry] = driver.rt.dead_letters.list()
    _expire(driver.rt, delivery_id)
    assert replay_dead_letter(driver.rt, entry) == "queued"
    driver.run()
    restored = driver.rt.ledger.get(delivery_id)
    assert restored["status"] == "applied" and "body" in restored
    assert driver.rt.redis.ttl(driver.rt.ledger.key(delivery_id)) > 0
    assert sim_state(sink_server).records[f"l2u-stop-{STOP_ID}"]["status"] == "Arrived"


class KeyNamedSink(RecordingSink):
    """A recording sink for events without a stop: the record's name is its key."""

    name = "forward"

    def upsert(self, location, options):
        body = {"name": location.key, "status": location.status, "version": location.version}
        return self.client.request("PUT", f"/records/{location.key}", json=body).json()["id"]


@pytest.fixture
def two_sinks(driver):
    """storepoint (needs a stop, so it refuses a shipment event at routing) and forward (takes it)."""
    with SimulatorServer(recorder.create_app()) as forward_server:
        rt = driver.rt
        rt.sinks["forward"] = KeyNamedSink(HttpClient(forward_server.url), mappings=MappingStore(rt.redis, "forward"))
        rt.routes = {"storepoint": Route("storepoint", events=("shipment.status-changed",)),
                     "forward": Route("forward", events=("shipment.status-changed",),
                                      key="l2u-shipment-{shipmentId}", ordered=False)}
        yield forward_server


def test_route_stage_replay_redoes_only_the_refused_sink(driver, two_sinks):
    delivery_id = accept(driver.rt, dict(PUBLISHED["shipment.status-changed"]), "shipment.status-changed")
    driver.run()
    [entry] = driver.rt.dead_letters.list()
    assert entry["stage"] == "route" and entry["sink"] == "storepoint"
    assert len(sim_state(two_sinks).writes) == 1
    assert replay_dead_letter(driver.rt, entry) == "queued"
    driver.run()
    assert len(sim_state(two_sinks).writes) == 1  # the sink that took it is not written again
    outcome, reason = replay_outcome(driver.rt, entry, since=entry["at"] + 0.001)
    assert outcome == "refused again" and "no stopId" in reason
    assert driver.rt.ledger.get(delivery_id)["sinks"]["forward"]["state"] == "applied"


class InlineDriver(Driver):
    """Runs each task as soon as it is sent (what live workers would do), so the CLI sees outcomes."""

    def send_task(self, name, args):
        {PROCESS_DELIVERY: tasks.process_delivery, DELIVER: tasks.deliver}[name].run(*args)


def test_cli_replay_says_what_became_of_each_dead_letter(driver, sink_server, l2u, monkeypatch):
    sink_server.app.config["FAULTS"].inject(400)
    applied_id = accept(driver.rt, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    refused_id = accept(driver.rt, status_change(UNKNOWN_STOP, "Arrived", "2022-04-27T05:00:00+00:00"))
    driver.run()
    assert len(driver.rt.dead_letters.list()) == 2
    inline = InlineDriver()
    driver.rt.scheduler.send_task = inline.send_task
    monkeypatch.setattr(ops_commands, "_runtime", lambda: driver.rt)
    result = CliRunner().invoke(ops_commands.dlq, ["replay", "--all", "--wait", "10"])
    assert result.exit_code == 1, result.output  # one was refused again
    assert f"{applied_id}:storepoint  applied" in result.output
    assert f"{refused_id}:enrich  refused again:" in result.output and "404" in result.output
    assert "replayed 2 dead letter(s): 1 applied, 1 refused again" in result.output


def test_cli_replay_waiting_for_outcomes_reads_again_only_those_still_queued(driver, sink_server, l2u, monkeypatch):
    """`dlq replay --all` polled the outcome of every replayed letter every half second until all were
    final, two round trips each: at a million letters, minutes of Redis reads per poll while one stayed
    queued. Each poll now reads only those still queued."""
    faults = sink_server.app.config["FAULTS"]
    monkeypatch.setattr(ops_commands, "_runtime", lambda: driver.rt)

    def reads_replaying(first_stop, wait):
        """HGETALL calls while ten fresh dead letters are replayed, the first staying queued (a 429)."""
        faults.inject(400, times=10)
        for n in range(10):
            sim_state(l2u).add_stop(stopId=first_stop + n)
            accept(driver.rt, status_change(first_stop + n, "Arrived", "2022-04-27T05:00:00+00:00"))
        driver.run()
        time.sleep(1)  # the sink's rate limit fills again
        driver.rt.scheduler.send_task = InlineDriver().send_task
        faults.inject(429, retry_after=60)  # it waits a minute, whatever the others do
        before = driver.rt.redis.info("commandstats")["cmdstat_hgetall"]["calls"]
        result = CliRunner().invoke(ops_commands.dlq, ["replay", "--all", "--wait", wait])
        assert "replayed 10 dead letter(s): 9 applied, 1 queued" in result.output, result.output
        driver.rt.scheduler.send_task = driver.send_task
        return driver.rt.redis.info("commandstats")["cmdstat_hgetall"]["calls"] - before

    once = reads_replaying(1000, "0")
    polled = reads_replaying(2000, "1.6")  # the first poll and about three more
    assert polled - once <= 6, (once, polled)  # about 30 more before: the ten read again each poll


def test_route_stage_replay_whose_message_is_lost_still_redoes_only_the_refused_sink(driver, two_sinks):
    """The sweeper re-queues a replayed delivery whose process_delivery message was lost from what
    the ledger says; the restriction to the refused sink has to be there too."""
    accept(driver.rt, dict(PUBLISHED["shipment.status-changed"]), "shipment.status-changed")
    driver.run()
    [entry] = driver.rt.dead_letters.list()
    assert replay_dead_letter(driver.rt, entry) == "queued"
    driver.sent.clear()  # the replay's message is lost
    time.sleep(driver.rt.settings.sweep_after + 0.3)
    assert tasks.sweep_received.run() == 1
    [(name, args)] = driver.sent  # the sweeper queues through the runtime's sender
    assert name == PROCESS_DELIVERY and args[0] == entry["delivery_id"]
    driver.run()
    assert len(sim_state(two_sinks).writes) == 1
    assert replay_outcome(driver.rt, entry, since=entry["at"] + 0.001)[0] == "refused again"
