"""What operators see: /metrics series, JSON logs with the delivery's context, no secrets, docs in sync."""
import json
import subprocess
from pathlib import Path

import requests
from click.testing import CliRunner

from tests.fixtures import B2B_TOKEN, FORWARD_SECRET, SP_TOKEN, STOP_ID
from tests.helpers import metric, peak_allocated, post, seed_dead_letters_up_to, settled, wait_for
from tests.payloads import status_change
from tests.processes import BIN, answer_when_asked, process_env
from workers.config import SettingsSchema
from workers.logs import settings_secrets
from workers.ops import commands as ops_commands
from workers.sinks.forward import ENDPOINT_FAILURES, ForwardSink
from workers.store.dead_letters import DeadLetterStore
from workers.store.mappings import MappingStore

REPO = Path(__file__).resolve().parents[1]


def test_metrics_logs_and_secrets_after_a_delivery(stack_settings, start_process, redis_client):
    web = start_process("gunicorn", stack_settings)
    worker = start_process("worker", stack_settings, beat=True)
    first = post(web.url, "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    post(web.url, "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    post(web.url, "stop.status-changed", {"no": "stopId"})
    delivery_id = first.json()["delivery_id"]
    wait_for(lambda: settled(redis_client, delivery_id))

    text = requests.get(web.url + "/metrics", timeout=10).text
    route = "/webhooks/locate2u/<event_type>/<token>"
    assert metric(text, "l2u_receiver_requests_total", route=route, status="200") == 2
    assert metric(text, "l2u_receiver_duplicates_total") == 1
    assert metric(text, "l2u_receiver_rejections_total", reason="missing_field") == 1
    assert metric(text, "l2u_receiver_ack_seconds_count") == 3
    for sink in ("storepoint", "b2b"):
        assert metric(text, "l2u_worker_deliveries_total", sink=sink, outcome="applied") == 1
        assert metric(text, "l2u_worker_receipt_to_applied_seconds_count", sink=sink) == 1
        assert metric(text, "l2u_dead_letters", sink=sink) == 0
        assert metric(text, "l2u_breaker_open", sink=sink) == 0
    assert metric(text, "l2u_queue_depth", queue="deliver") is not None
    assert metric(text, "l2u_scheduled_retries") == 0
    assert metric(text, "l2u_worker_token_refreshes_total", grant="client_credentials") == 1

    worker.stop()
    output = worker.output()
    lines = [line for line in output.splitlines() if delivery_id in line]
    assert lines, "the worker logged nothing about the delivery"
    records = [json.loads(line) for line in lines]
    assert all(record.get("delivery_id") == delivery_id for record in records), lines
    assert {record.get("sink") for record in records} >= {"storepoint", "b2b"}
    assert any(record["message"].startswith("applied upsert") for record in records)

    everything = output + web.output()
    for secret in settings_secrets(stack_settings) + [SP_TOKEN, B2B_TOKEN]:
        if secret:
            assert secret not in everything


def test_app_json_and_readme_document_every_setting():
    app_json = json.loads((REPO / "app.json").read_text())
    readme = (REPO / "README.md").read_text()
    provided_by_the_host = {"REDIS_URL", "PORT", "RELAY_DATA_DIR"}
    for field in SettingsSchema().fields.values():
        assert f"`{field.data_key}`" in readme, field.data_key
        if field.data_key not in provided_by_the_host:
            assert field.data_key in app_json["env"], field.data_key
    assert set(app_json["env"]) <= {field.data_key for field in SettingsSchema().fields.values()}


def test_procfile_is_the_documented_interface():
    procfile = (REPO / "Procfile").read_text().splitlines()
    assert procfile == ["web: gunicorn receiver.wsgi:app",
                        "worker: celery -A workers.app worker --without-gossip --without-mingle",
                        "beat: celery -A workers.app beat", "flower: celery -A workers.app flower",
                        "release: l2u-relay subscriptions sync"]


def cli(settings, *args):
    result = subprocess.run([str(BIN / "l2u-relay"), *args], env=process_env(settings), capture_output=True,
                            text=True, timeout=60, input="y\n")
    return result


def test_status_dlq_and_deliveries_commands_against_a_live_stack(stack_settings, sims, start_process,
                                                                  redis_client):
    settings = stack_settings.replace(public_url="http://127.0.0.1:9")
    web = start_process("gunicorn", settings)
    start_process("worker", settings, beat=True)
    sims["storepoint"].app.config["FAULTS"].inject(400, body={"error": "validation_error", "message": "Invalid",
                                                              "details": {"name": ["is taken"]}})
    delivery_id = post(web.url, "stop.status-changed",
                       status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00")).json()["delivery_id"]
    assert wait_for(lambda: settled(redis_client, delivery_id))["status"] == "dead_lettered"

    status = json.loads(cli(settings, "status", "--json").stdout)
    assert status["dead_letters"] == {"storepoint": 1}
    assert status["sinks"]["storepoint"] == {"breaker": "closed", "mapped": 0, "dead_letters": 1, "paused": []}
    assert status["sinks"]["b2b"]["mapped"] == 1
    assert set(status["queues"]) == {"ingest", "deliver", "control"} and status["scheduled_retries"] == 0
    assert status["locate2u"]["token"]["status"] == "ok"
    assert status["locate2u"]["subscriptions"]["desired"] == 8
    assert len(status["locate2u"]["subscriptions"]["pending_changes"]) == 8  # not synced yet
    table = cli(settings, "status").stdout
    assert "storepoint    closed         0             1" in table and "subscriptions 0/8 in place" in table

    listing = cli(settings, "dlq", "list", "--sink", "storepoint")
    assert listing.returncode == 0 and "1 dead letter(s)" in listing.stdout
    assert "validation_error: Invalid (name: is taken)" in listing.stdout
    entry_id = f"{delivery_id}:storepoint"
    shown = json.loads(cli(settings, "dlq", "show", entry_id).stdout)
    assert shown["error"]["status"] == 400 and shown["attempts"] == 1
    assert cli(settings, "dlq", "show", "nope").returncode == 1

    replayed = cli(settings, "dlq", "replay", entry_id)
    assert replayed.returncode == 0 and "queued 1 dead letter(s)" in replayed.stdout
    wait_for(lambda: DeadLetterStore(redis_client).list() == [])
    assert wait_for(lambda: settled(redis_client, delivery_id))["status"] == "applied"

    trace = cli(settings, "deliveries", "show", delivery_id).stdout
    for step in ("routed", "dead-lettered", "replayed", "applied"):
        assert step in trace
    assert "storepoint   applied" in trace
    assert cli(settings, "dlq", "replay").returncode == 2  # neither IDs nor --all
    narrowed = cli(settings, "dlq", "purge", entry_id, "--sink", "b2b", "--yes")  # --sink was ignored: purged
    assert narrowed.returncode == 2 and "--sink and --since narrow --all" in narrowed.stderr
    since = cli(settings, "dlq", "list", "--since", "yesterday")
    assert since.returncode == 2 and "'--since'" in since.stderr


def test_status_says_which_dead_letters_are_before_fan_out_and_which_are_of_a_sink_not_configured_now(
        settings, redis_client):
    """Dead letters of a sink whose credentials were removed since were listed as "before fan-out"."""
    letters = DeadLetterStore(redis_client)
    letters.add("d-1", "enrich", "Locate2u's stop 1 cannot be mapped", stage="enrich")
    for number in (2, 3):
        letters.add(f"d-{number}", "b2b", "refused", stage="deliver")
    table = cli(settings.replace(storepoint_api_token="sp-token"), "status").stdout
    assert "dead letters before fan-out (their stop could not be read): 1" in table
    assert "dead letters of sinks not configured now: b2b=2" in table


def test_status_names_the_forward_urls_paused_on_their_own(settings, redis_client):
    """A forward URL paused after failing in a row left the forward's breaker closed (the other URLs
    answer): status said "closed" and nothing else, so nobody learnt that one URL got nothing."""
    urls = ("https://hooks.example.com/orders?token=t0ken", "https://other.example.com/hook")
    sink = ForwardSink.from_settings(settings.replace(forward_urls=urls, forward_secret=(FORWARD_SECRET,)),
                                     MappingStore(redis_client, "forward"))
    for _ in range(ENDPOINT_FAILURES):
        sink.endpoints[urls[0]].failure()
    table = cli(settings.replace(forward_urls=urls, forward_secret=(FORWARD_SECRET,)), "status").stdout
    assert "forward       closed" in table
    assert "  paused: https://hooks.example.com/orders?[redacted] (failed in a row; tried again every 3 s)" in table
    assert "t0ken" not in table and "other.example.com" not in table


def test_dlq_replay_all_keeps_what_its_report_needs_not_every_letter(settings, redis_client):
    """`dlq replay --all` in a one-off dyno (512 MB) after a long outage: it parsed and kept every dead
    letter before replaying the first, so its memory grew with the store (``RELAY_DEAD_LETTER_LIMIT``
    may be a million). It replays letters as it reads them and keeps only what the report needs:
    the peak for 6,000 letters stays within twice that for 1,500 (tracemalloc, exact)."""
    body = json.dumps({**status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"), "notes": "n" * 1500})

    def peak_replaying(count):
        seed_dead_letters_up_to(redis_client, count, body)
        return peak_allocated(lambda: CliRunner().invoke(ops_commands.dlq, ["replay", "--all", "--wait", "0"],
                                                         env=settings.to_env()))

    small, _ = peak_replaying(1500)
    large, result = peak_replaying(6000)
    assert result.exit_code == 0, result.output
    assert "queued 6000 dead letter(s) for replay" in result.output and "d-5999:storepoint  queued" in result.output
    assert redis_client.llen("deliver") == 1500 + 6000  # every letter's deliver message queued, each run
    assert large < 2 * small, (small, large)


def test_dlq_purge_all_asks_with_the_count_and_purges_only_what_it_counted(settings, redis_client):
    """`dlq purge --all` asked "gone for good. Continue?" without a count, then purged whatever matched
    once answered: a letter recorded while the prompt waited was purged unseen. It counts first, says
    the count, and purges those."""
    letters = DeadLetterStore(redis_client)
    for number in (1, 2):
        letters.add(f"d-{number}", "storepoint", "refused", stage="deliver")
    asked, output, status = answer_when_asked(  # a letter arrives while the operator reads the question
        ["dlq", "purge", "--all"], process_env(settings),
        lambda: letters.add("d-3", "storepoint", "refused", stage="deliver"))
    assert "Purge 2 dead letter(s) for good?" in asked
    assert status == 0 and "purged 2 dead letter(s)" in output, output
    assert [entry["id"] for entry in letters.list()] == ["d-3:storepoint"]
    assert "purged 1 dead letter(s)" in cli(settings, "dlq", "purge", "--all", "--yes").stdout  # no prompt
