"""Redis memory budget against the real Redis of the suite: settled deliveries are compacted to a few
hundred bytes, every store is bounded, and history is trimmed oldest first before pending work is touched."""
import hashlib
import json
import time

import pytest

from workers.ops import operations

from workers.config import Settings
from workers.store import housekeeping
from workers.store.dead_letters import DeadLetterStore
from workers.store.ledger import Ledger, SETTLED_BUCKET_SECONDS, SETTLE_GRACE
from workers.store.quarantine import Quarantine
from tests.helpers import TEST_SECRET

BODY = json.dumps({"stopId": 100001, "stopRef": "L2022E0000001", "tripDate": "2022-04-27", "shipmentId": None,
                   "actionDate": "2022-04-27T00:00:01.0000001+00:00", "oldStatus": "Enroute", "newStatus": "Arrived",
                   "notes": None, "location": None,
                   "assignedTo": {"name": "Filbert Nicholas", "id": "a823361e-9d40-4438-bb28-b2b58cdb957e"},
                   "changedByUser": {"name": "Filbert Nicholas", "id": "a823361e-9d40-4438-bb28-b2b58cdb957e"},
                   "source": None, "sourceReference": None})
SINKS = ("storepoint", "b2b")
# A settled delivery as f3ac69c packed it (format "z"): applied to both sinks, B2B after one 503.
PACKED_BY_FORMAT_Z = ("zi$)4ktf|G&+|0xnY?7X#ktvo$fh(dhqRJFcTmkb^d}30vp^-5$k#31>k`by&78Zs^@Q61eE#^(B5cQytg2%r(yj(+z"
                      "epu-P<S8WP6_<kwGX+xvV{j}$A_>TYmq|dQpe9;UlB8g6LrGU)LFB~c14>P<kkn&HIHegvQ<@=xlm-9")
DAY = 86400


def delivery_id(n, tag="d"):
    return hashlib.sha256(f"{tag}{n}".encode()).hexdigest()


def settle(ledger, delivery_id, received_at=None, body=BODY):
    """What the pipeline writes for a delivery applied to two sinks."""
    ledger.record(delivery_id, "stop.status-changed", body, 86400, received_at=received_at)
    now = time.time()
    ledger.start_fan_out(delivery_id, list(SINKS), list(SINKS), [(now, "validated", {}), (
        now + 0.0123, "enriched", {"from": "locate2u", "took": 0.0121})], entity="stop")
    for number, sink in enumerate(SINKS):
        ledger.sink_outcome(delivery_id, sink, "applied", attempts=1, remote_id=f"R-{number}")
        ledger.trace(delivery_id, "applied", sink=sink, action="upsert", key="l2u-stop-100001", took=0.0234)


def pending(ledger, delivery_id):
    ledger.record(delivery_id, "stop.status-changed", BODY, 86400)
    ledger.start_fan_out(delivery_id, list(SINKS), entity="stop")


def used(client):
    return client.info("memory")["used_memory"]


def compact_all(ledger, now):
    while ledger.compact(now=now):
        pass


@pytest.fixture
def maxmemory(redis_client):
    """Set the suite Redis's maxmemory for one test, then lift the limit again."""
    yield lambda size: redis_client.config_set("maxmemory", size)
    redis_client.config_set("maxmemory", 0)


def test_a_settled_delivery_keeps_outcome_and_trace_without_its_body(redis_client):
    ledger = Ledger(redis_client)
    settle(ledger, "d-1")
    before, history = ledger.get("d-1"), ledger.history("d-1")
    assert ledger.compact() == 0  # not before the grace, so the last trace lines are in
    assert ledger.compact(now=time.time() + SETTLE_GRACE) == 1

    entry = ledger.get("d-1")
    assert entry["compacted"] is True
    assert json.loads(entry["body"]) == {name: value for name, value in json.loads(BODY).items()
                                         if name in ("stopId", "stopRef", "actionDate", "newStatus")}
    assert {key: entry[key] for key in ("status", "event_type", "entity")} == {
        "status": "applied", "event_type": "stop.status-changed", "entity": "stop"}
    assert float(entry["received_at"]) == pytest.approx(float(before["received_at"]), abs=0.001)
    for sink in SINKS:
        assert entry["sinks"][sink]["state"] == "applied" and entry["sinks"][sink]["remote_id"]
        assert entry["sinks"][sink]["at"] == pytest.approx(before["sinks"][sink]["at"], abs=0.002)
    assert [(line["what"], line.get("sink")) for line in ledger.history("d-1")] == [
        (line["what"], line.get("sink")) for line in history]
    # the per-delivery keys and index members are gone; the delivery is still counted and listed
    assert not redis_client.exists(Ledger.key("d-1"), "l2u:trace:d-1")
    assert redis_client.zscore(Ledger.ALL, "d-1") is None and redis_client.zscore(Ledger.FINAL, "d-1") is None
    assert ledger.count() == 1 and ledger.ids() == ["d-1"]


def test_a_delivery_compacted_by_the_earlier_format_still_reads_back(redis_client):
    """Settled entries packed before the trace had its validated and enriched steps (format "z", as
    commit f3ac69c packed them) stay in Redis for the history's days, and read back as they were."""
    ledger = Ledger(redis_client)
    redis_client.hset(f"{Ledger.SETTLED}{int(time.time() // SETTLED_BUCKET_SECONDS * SETTLED_BUCKET_SECONDS)}",
                      "d-old", PACKED_BY_FORMAT_Z)  # settled in this quarter hour
    entry = ledger.get("d-old")
    assert entry["compacted"] is True and entry["status"] == "applied" and entry["entity"] == "stop"
    assert float(entry["received_at"]) == pytest.approx(1764300000.125, abs=0.001)
    assert {sink: (outcome["state"], outcome["attempts"], outcome["remote_id"])
            for sink, outcome in entry["sinks"].items()} == {
        "storepoint": ("applied", 1, "loc_abc123"), "b2b": ("applied", 2, "8812")}
    assert json.loads(entry["body"]) == {"stopId": 100001, "stopRef": "L2022E0000001",
                                         "actionDate": "2022-04-27T00:00:01.0000001+00:00", "newStatus": "Arrived"}
    assert [(line["what"], line.get("sink"), line.get("status")) for line in ledger.history("d-old")] == [
        ("routed", None, None), ("applied", "storepoint", None), ("retry", "b2b", 503), ("applied", "b2b", None)]


def test_dead_lettered_and_unsettled_deliveries_keep_their_body(redis_client):
    ledger = Ledger(redis_client)
    pending(ledger, "open")
    ledger.record("dead", "stop.status-changed", BODY, 86400)
    ledger.start_fan_out("dead", ["storepoint"])
    ledger.sink_outcome("dead", "storepoint", "dead_lettered", attempts=1, reason="400")
    compact_all(ledger, time.time() + SETTLE_GRACE)
    assert ledger.get("open")["body"] == BODY and ledger.get("dead")["body"] == BODY  # a replay needs it


def test_a_late_outcome_after_compaction_leaves_no_fragment(redis_client):
    ledger = Ledger(redis_client)
    settle(ledger, "d-1")
    compact_all(ledger, time.time() + SETTLE_GRACE)
    assert ledger.sink_outcome("d-1", "storepoint", "stale", attempts=1) == 0.0  # a redelivered deliver task
    assert not redis_client.exists(Ledger.key("d-1"))
    assert ledger.get("d-1")["sinks"]["storepoint"]["state"] == "applied"


def test_a_redelivered_message_of_a_compacted_delivery_finds_it_settled_and_takes_no_lease(redis_client):
    """``take_up`` reads the entry with the lease in one script; a compacted entry has no hash left,
    so it is read from its settled record, and nothing is written back for it."""
    ledger = Ledger(redis_client)
    settle(ledger, "d-1")
    compact_all(ledger, time.time() + SETTLE_GRACE)
    entry, claimed = ledger.take_up("d-1", "late-worker", 60)
    assert entry.status.value == "applied" and entry.delivery_id == "d-1" and not claimed
    assert not redis_client.exists(Ledger.key("d-1")) and redis_client.zscore(Ledger.OPEN, "d-1") is None
    assert ledger.take_up("never-recorded", "late-worker", 60) == (None, False)


def test_a_settled_delivery_costs_at_most_400_bytes_at_default_retention(redis_client):
    ledger, count = Ledger(redis_client), 2000
    ids = [delivery_id(n) for n in range(count)]
    start = used(redis_client)
    for n, one in enumerate(ids):
        settle(ledger, one, body=BODY.replace("E0000001", f"E{n:07d}"))
    full = (used(redis_client) - start) / count
    compact_all(ledger, time.time() + SETTLE_GRACE)
    with_dedup = (used(redis_client) - start) / count
    assert set(ledger.ids()) == set(ids) and ledger.get(ids[7])["delivery_id"] == ids[7]  # ids survive packing
    assert set(ledger.get_many(ids[:5])) == set(ids[:5]) and ledger.history(ids[7])[2]["what"] == "routed"
    redis_client.delete(*[Ledger.dedup_key(one) for one in ids])  # the dedup window (a day) is over
    record = (used(redis_client) - start) / count
    # kept 14 days; the dedup key only the first of them
    at_default_retention = record + (with_dedup - record) / 14
    print(f"bytes per delivery: full {full:.0f}, compacted {with_dedup:.0f}, after the dedup window {record:.0f}")
    assert at_default_retention <= 400 < full
    assert (25 * 1024 * 1024 - start) / at_default_retention >= 50000


def test_a_delivery_compacted_by_a_clock_ahead_is_still_found(redis_client):
    """The housekeeper's host may run ahead of the console's: the bucket is that of the settling."""
    ledger = Ledger(redis_client)
    settle(ledger, "d-1")
    compact_all(ledger, time.time() + 3600)
    assert ledger.get("d-1")["compacted"] is True and ledger.ids() == ["d-1"]


def test_settled_history_expires_with_the_history_setting(redis_client):
    ledger = Ledger(redis_client, history=2 * DAY)
    settle(ledger, "d-1")
    settled_at = redis_client.zscore(Ledger.FINAL, "d-1")
    compact_all(ledger, time.time() + SETTLE_GRACE)
    bucket, = ledger.settled_buckets()
    start = int(settled_at // SETTLED_BUCKET_SECONDS) * SETTLED_BUCKET_SECONDS
    expected = start + SETTLED_BUCKET_SECONDS + 2 * DAY - time.time()
    assert redis_client.ttl(bucket) == pytest.approx(expected, abs=5)


def test_memory_pressure_trims_settled_history_oldest_first_and_never_pending_work(redis_client, maxmemory):
    ledger = Ledger(redis_client)
    now = time.time()
    hours = [now - 3 * 3600, now - 2 * 3600, now - 3600]  # three buckets of settled history
    for hour, settled_at in enumerate(hours):
        for n in range(300):
            settle(ledger, delivery_id(n, f"h{hour}"))
            redis_client.zadd(Ledger.FINAL, {delivery_id(n, f"h{hour}"): settled_at})  # settled back then
        compact_all(ledger, settled_at + SETTLE_GRACE)
    open_ids = [delivery_id(n, "open") for n in range(300)]
    for one in open_ids:
        pending(ledger, one)
    oldest, middle, newest = ledger.settled_buckets()
    # clients left by earlier tests would free their buffers whenever they go: not during this test
    redis_client.client_kill_filter(_type="normal", skipme=True)
    # a limit that trimming half the oldest bucket would meet, so only part of the history has to go
    maxmemory(int((used(redis_client) - redis_client.memory_usage(oldest) / 2) * 100 / 70))
    settings = Settings(webhook_secret=TEST_SECRET, history_trim_percent=70)

    trimmed = housekeeping.trim_for_memory(redis_client, ledger, settings.history_trim_percent)

    assert trimmed == 300  # the oldest bucket alone was enough
    assert not redis_client.exists(oldest) and redis_client.exists(middle) and redis_client.exists(newest)
    assert all(ledger.get(one)["body"] == BODY for one in open_ids)  # pending work untouched

    maxmemory(1)  # nothing but pending work would fit: all history goes, still no pending entry
    housekeeping.trim_for_memory(redis_client, ledger, 70)
    assert ledger.settled_buckets() == []
    assert all(ledger.get(one)["status"] == "routed" for one in open_ids)


def test_dead_letters_are_bounded_by_age_and_count(redis_client):
    store = DeadLetterStore(redis_client)
    now = time.time()
    for n in range(10):
        store.add(f"d-{n}", "storepoint", "400")
        redis_client.zadd(DeadLetterStore.INDEX, {f"d-{n}:storepoint": now - (10 - n) * DAY})  # d-0 is oldest
    assert store.trim(limit=100, max_age=7 * DAY + 60, now=now) == 3  # 10, 9 and 8 days old
    assert store.trim(limit=5, max_age=30 * DAY, now=now) == 2  # then the oldest beyond five
    assert [entry["delivery_id"] for entry in store.list()] == [f"d-{n}" for n in range(5, 10)]
    assert not redis_client.exists("l2u:dlq:d-0:storepoint", "l2u:dlq:d-4:storepoint")


def test_the_quarantine_keeps_the_newest_up_to_its_limit(redis_client):
    quarantine = Quarantine(redis_client, limit=3)
    for n in range(5):
        quarantine.add("stop.created", json.dumps({"n": n}), "invalid")
    assert [json.loads(item["body"])["n"] for item in quarantine.items()] == [4, 3, 2]


def test_locations_not_written_for_the_location_days_are_forgotten(redis_client):
    now = time.time()
    for key, days_ago in (("old", 31), ("recent", 2)):
        write = json.dumps({"delivery_id": "d", "received_at": now - days_ago * DAY, "action": "upsert"})
        redis_client.hset("l2u:version:storepoint:writes", key, write)
        for name in housekeeping.location_hashes("storepoint")[:-1]:
            redis_client.hset(name, key, "x")
        redis_client.zadd("l2u:version:storepoint:reassert", {key: now})
        redis_client.hset("l2u:version:storepoint:reassert:queued", key, "l2u-broker:deliver:1")
    redis_client.hset("l2u:version:b2b:writes", "old", json.dumps({"received_at": now - 31 * DAY}))

    assert housekeeping.prune_locations(redis_client, ["storepoint"], 30 * DAY, now) == 1

    for name in housekeeping.location_hashes("storepoint"):
        assert redis_client.hkeys(name) == ["recent"]
    assert redis_client.zrange("l2u:version:storepoint:reassert", 0, -1) == ["recent"]
    assert redis_client.hkeys("l2u:version:storepoint:reassert:queued") == ["recent"]
    assert redis_client.hkeys("l2u:version:b2b:writes") == ["old"]  # only the sinks asked for


def runtime(client, settings):
    """What housekeeping and the console's searches read from the workers' Runtime."""
    class Rt:
        redis = client
        ledger = Ledger(client, history=settings.history_days * DAY)
        dead_letters = DeadLetterStore(client)
        sinks = {}

    Rt.settings = settings
    return Rt


def test_housekeeping_applies_the_settings(redis_client):
    settings = Settings(webhook_secret=TEST_SECRET, dead_letter_limit=1, dead_letter_days=14)
    Rt = runtime(redis_client, settings)
    settle(Rt.ledger, "d-1")
    Rt.dead_letters.add("d-2", "storepoint", "400")
    Rt.dead_letters.add("d-3", "storepoint", "400")
    done = housekeeping.run(Rt, now=time.time() + SETTLE_GRACE)
    assert done["compacted"] == 1 and done["dead_letters"] == 1 and done["trimmed"] == 0
    assert [entry["delivery_id"] for entry in Rt.dead_letters.list()] == ["d-3"]


def test_with_the_console_on_compacted_deliveries_are_still_found_by_stop_and_listed(redis_client):
    rt = runtime(redis_client, Settings(webhook_secret=TEST_SECRET, console_password="console-password-1"))
    settle(rt.ledger, "d-1")
    pending(rt.ledger, "d-2")
    assert housekeeping.run(rt, now=time.time() + SETTLE_GRACE)["compacted"] == 1

    by_stop, _ = operations.search_deliveries(rt, stop="L2022E0000001")
    assert [(row["delivery_id"], row["stop_id"], row["status"]) for row in by_stop] == [
        ("d-2", "100001", "routed"), ("d-1", "100001", "applied")]
    listed, _ = operations.search_deliveries(rt)
    assert [row["delivery_id"] for row in listed] == ["d-2", "d-1"]


def test_a_redis_full_of_pending_work_loses_history_not_work_and_housekeeping_carries_on(redis_client, maxmemory):
    rt = runtime(redis_client, Settings(webhook_secret=TEST_SECRET, console_password="console-password-1",
                                        dead_letter_limit=1))
    rt.sinks = {"storepoint": None}
    settle(rt.ledger, "old")
    housekeeping.run(rt, now=time.time() + SETTLE_GRACE)  # compacted: settled history
    settle(rt.ledger, "new")  # settled, not yet compacted
    pending(rt.ledger, "open")
    rt.dead_letters.add("d-1", "storepoint", "400")
    rt.dead_letters.add("d-2", "storepoint", "400")
    maxmemory(1)  # full: every write refused, scripts too

    done = housekeeping.run(rt, now=time.time() + SETTLE_GRACE)

    assert done["trimmed"] == 1 and done["compacted"] is None
    assert rt.ledger.get("old") is None
    assert rt.ledger.get("open")["body"] == BODY and rt.ledger.get("new")["body"] == BODY
