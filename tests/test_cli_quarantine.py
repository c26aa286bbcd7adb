"""``l2u-relay quarantine list | show | purge`` and the quarantine's size in ``status`` and /metrics,
against a real Redis and receiver: a delivery whose body is missing its key field is quarantined."""
import json
import subprocess

import requests

from tests.helpers import metric, post
from tests.processes import BIN, process_env


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
    purged = cli(settings, "quarantine", "purge", items[0]["id"], "--yes")
    assert purged.returncode == 0 and "purged 1" in purged.stdout
    assert [item["id"] for item in json.loads(cli(settings, "quarantine", "list", "--json").stdout)] == [
        items[1]["id"], items[2]["id"]]
    assert "purged 2" in cli(settings, "quarantine", "purge", "--all", "--yes").stdout
    assert json.loads(cli(settings, "status", "--json").stdout)["quarantined"] == 0
