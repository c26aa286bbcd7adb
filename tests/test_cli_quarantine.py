"""``l2u-relay quarantine list | show | purge`` and the quarantine's size in ``status`` and /metrics,
against a real Redis and receiver: a delivery whose body is missing its key field is quarantined."""
import json
import subprocess

import requests

from tests.helpers import metric, post
from tests.processes import BIN, answer_when_asked, process_env
from workers.store.quarantine import Quarantine


def cli(settings, *args):
    return subprocess.run([str(BIN / "l2u-relay"), *args], env=process_env(settings), capture_output=True,
                          text=True, timeout=120)


def test_quarantine_list_show_purge_and_its_size_in_status_and_metrics(settings, start_process):
    web = start_process("gunicorn", settings)
    for stop_ref in ("Q1", "Q2", "Q3"):
        assert post(web.url, "stop.status-changed", {"stopRef": stop_ref}).status_code == 422

    listed = cli(settings, "quarantine", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)
    assert [json.loads(item["body"])["stopRef"] for item in items] == ["Q3", "Q2", "Q1"]  # newest first
    assert all(item["event_type"] == "stop.status-changed" for item in items)
    table = cli(settings, "quarantine", "list")
    assert "3 of 3 quarantined delivery(ies)" in table.stdout
    assert all(item["id"] in table.stdout for item in items)

    shown = cli(settings, "quarantine", "show", items[1]["id"])
    assert shown.returncode == 0 and json.loads(json.loads(shown.stdout)["body"]) == {"stopRef": "Q2"}
    missing = cli(settings, "quarantine", "show", "nope")
    assert missing.returncode == 1 and "no quarantined delivery nope" in missing.stderr

    status = json.loads(cli(settings, "status", "--json").stdout)
    assert status["quarantined"] == 3
    assert "quarantined   3" in cli(settings, "status").stdout
    assert metric(requests.get(web.url + "/metrics", timeout=10).text, "l2u_quarantined") == 3

    assert cli(settings, "quarantine", "purge", "--yes").returncode == 2  # neither IDs nor --all
    unknown = cli(settings, "quarantine", "purge", "nope", "--yes")  # said "purged 0", exit 0, as if done
    assert unknown.returncode == 1 and "no quarantined delivery nope" in unknown.stderr
    purged = cli(settings, "quarantine", "purge", items[0]["id"], "--yes")
    assert purged.returncode == 0 and "purged 1" in purged.stdout
    assert [item["id"] for item in json.loads(cli(settings, "quarantine", "list", "--json").stdout)] == [
        items[1]["id"], items[2]["id"]]
    assert "purged 2" in cli(settings, "quarantine", "purge", "--all", "--yes").stdout
    assert json.loads(cli(settings, "status", "--json").stdout)["quarantined"] == 0


def test_quarantine_purge_all_asks_with_the_count_and_purges_only_what_it_counted(settings, redis_client):
    """`quarantine purge --all` deleted the whole list once answered, deliveries quarantined while it
    waited included: it counts first, says the count and purges those."""
    quarantine = Quarantine(redis_client)
    for stop_ref in ("Q1", "Q2"):
        quarantine.add("stop.status-changed", json.dumps({"stopRef": stop_ref}), "schema validation failed", {})
    asked, output, status = answer_when_asked(
        ["quarantine", "purge", "--all"], process_env(settings),
        lambda: quarantine.add("stop.status-changed", '{"stopRef": "Q3"}', "schema validation failed", {}))
    assert "Purge 2 quarantined delivery(ies) for good?" in asked
    assert status == 0 and "purged 2 quarantined delivery(ies)" in output, output
    assert [json.loads(json.loads(raw)["body"]) for raw in redis_client.lrange(Quarantine.KEY, 0, -1)] == [
        {"stopRef": "Q3"}]
