"""End to end through real processes: gunicorn, the l2u-relay CLI and a Celery worker, against the simulator."""
import json
import signal
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.fixtures import sims_settings
from tests.helpers import post, sink_outcomes, wait_for
from tests.payloads import PUBLISHED, status_change
from tests.processes import BIN, from_a_terminal, process_env
from workers.celery_config import CONTROL_QUEUE, SYNC_SUBSCRIPTIONS, make_celery
from workers.config import SVIX_RETRY_SCHEDULE
from workers.locate2u.token_store import TokenStore
from workers.locate2u.tokens import REAUTH_HINT
from workers.locate2u.webhook_auth import url_token
from workers.ops.devstack import REPO_ROOT, free_port
from workers.store.dead_letters import DeadLetterStore
from workers.store.ledger import Ledger

REAUTH = f"reauthorization required: {REAUTH_HINT}"
STOP_IDS = (7001, 7002, 7003)


@pytest.fixture
def relay_settings(sim, settings):
    """Client-credentials settings whose RELAY_PUBLIC_URL is where ``serve`` starts gunicorn."""
    return sim.configure(settings, public_url=f"http://127.0.0.1:{free_port()}")


@pytest.fixture
def code_settings(relay_settings):
    return relay_settings.replace(locate2u_grant="authorization_code")


@pytest.fixture
def serve(start_process, monkeypatch):
    def serve(settings):
        port = urlsplit(settings.public_url).port
        monkeypatch.setattr("tests.processes.free_port", lambda: port)  # listen where RELAY_PUBLIC_URL points
        return start_process("gunicorn", settings)
    return serve


def cli(settings, *args, **env):
    return subprocess.run([str(BIN / "l2u-relay"), *args], env=process_env(settings, **env), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def locate2u_check(web):
    ready = requests.get(web.url + "/readyz", timeout=5)
    assert ready.status_code == 200  # Locate2u's auth state never makes the receiver unready
    return ready.json()["checks"]["locate2u"]


def link_through_the_receiver(sim, settings, web):
    """The operator's link: ``oauth url``, opened in a browser, the user consents, the callback stores the
    tokens. Returns the callback URL (spent)."""
    browser = requests.Session()  # keeps the state cookie, as the operator's browser does
    link = cli(settings, "oauth", "url").stdout.strip()
    assert link.startswith(web.url + "/oauth/locate2u/start?link=")
    start = browser.get(link, allow_redirects=False, timeout=5)
    assert start.status_code == 302 and start.headers["Location"].startswith(sim.url + "/connect/authorize?")
    assert parse_qs(urlsplit(start.headers["Location"]).query)["scope"] == ["integrations-api offline_access"]
    approved = requests.get(start.headers["Location"], allow_redirects=False, timeout=5)  # the user consents
    callback = approved.headers["Location"]
    assert callback.startswith(settings.public_url + "/oauth/locate2u/callback?code=")
    done = browser.get(callback, timeout=10)
    assert done.status_code == 200 and done.json()["status"] == "authorized"
    return callback


def grants(sim):
    return [request["grant_type"] for request in sim.state.token_requests]


def test_code_flow_through_the_receiver_then_refresh_and_reauthorization(sim, code_settings, serve, redis_client):
    sim.state.token_lifetime = 1
    web = serve(code_settings)
    assert locate2u_check(web) == REAUTH
    callback = link_through_the_receiver(sim, code_settings, web)
    assert locate2u_check(web) == "ok"
    assert json.loads(redis_client.lindex(CONTROL_QUEUE, 0))["headers"]["task"] == SYNC_SUBSCRIPTIONS
    replayed = requests.get(callback, timeout=5)
    forged = requests.get(web.url + "/oauth/locate2u/callback", params={"code": "c", "state": "forged"}, timeout=5)
    for answer in (replayed, forged):
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_state"

    time.sleep(1.05)  # the access token has expired: the CLI refreshes it from the stored refresh token
    whoami = cli(code_settings, "whoami")
    assert whoami.returncode == 0 and json.loads(whoami.stdout)["teamName"] == "Simulated Team"
    assert grants(sim) == ["authorization_code", "refresh_token"]
    tokens = TokenStore.from_settings(redis_client, code_settings).load()
    for secret in (tokens["access_token"], tokens["refresh_token"], sim.state.client_secret):
        assert secret not in web.output() + whoami.stdout + whoami.stderr

    sim.state.revoke_refresh_tokens()  # the user withdraws the relay's access
    time.sleep(1.05)
    refused = cli(code_settings, "whoami")
    assert refused.returncode == 3
    assert "re-authorisation required: the Locate2u refresh token was rejected" in refused.stderr
    assert locate2u_check(web) == REAUTH
    status = cli(code_settings, "oauth", "status")
    assert status.returncode == 3 and "reason: the refresh token was rejected (invalid_grant)" in status.stdout


def test_oauth_cli_for_hosts_without_a_browser(sim, code_settings):
    url = cli(code_settings, "oauth", "url", "--direct")
    assert url.returncode == 0 and "l2u-relay oauth exchange 'CALLBACK_URL'" in url.stderr
    approved = requests.get(url.stdout.strip(), allow_redirects=False, timeout=5)
    callback = approved.headers["Location"]  # read off the address bar
    code = parse_qs(urlsplit(callback).query)["code"][0]
    exchanged = cli(code_settings, "oauth", "exchange", callback)
    assert exchanged.returncode == 0 and "authorised as sim.user@example.com (Simulated Team)" in exchanged.stdout
    status = cli(code_settings, "oauth", "status")
    assert status.returncode == 0 and "status: ok" in status.stdout and "has_refresh_token: True" in status.stdout
    again = cli(code_settings, "oauth", "exchange", callback)
    assert again.returncode == 1 and "already used" in again.stderr and code not in again.stderr


def test_release_sync_then_a_delivery_reaches_the_receiver(sim, relay_settings, serve):
    serve(relay_settings)  # the receiver the simulator delivers to
    foreign = sim.state.add_webhook("trip.created", "https://crm.example/hooks/trips")
    first = cli(relay_settings, "subscriptions", "sync")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[-1] == "created 8, updated 0, deleted 0, unchanged 0, not ours (left alone) 1"
    second = cli(relay_settings, "subscriptions", "sync")
    assert second.stdout == "created 0, updated 0, deleted 0, unchanged 8, not ours (left alone) 1\n"
    assert sim.state.webhooks[foreign["id"]] == foreign

    [answer] = sim.state.deliver("stop.status-changed", PUBLISHED["stop.status-changed"])
    assert answer.status_code == 200 and answer.json()["status"] == "accepted"

    listing = cli(relay_settings, "subscriptions", "list")
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == 9
    assert "\tnot ours\thttps://crm.example/hooks/trips" in listing.stdout
    assert url_token(relay_settings.webhook_secret, "stop.assigned") not in listing.stdout + first.stdout
    ours = next(h["id"] for h in sim.state.list_webhooks() if h["eventType"] == "stop.assigned")
    assert cli(relay_settings, "subscriptions", "delete", str(ours)).returncode == 0
    for not_an_id in ("", "../Stops/1"):  # sent as DELETE /v1/Webhooks/ and /v1/Webhooks/../Stops/1
        refused = cli(relay_settings, "subscriptions", "delete", not_an_id)
        assert refused.returncode == 2 and "is not a subscription id" in refused.stderr
    dry = cli(relay_settings, "subscriptions", "sync", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would create stop.assigned ")
    assert len(sim.state.webhooks) == 8


@pytest.mark.parametrize("outage", ["Locate2u answers 503", "Redis is down"])
def test_an_outage_postpones_the_release_phase_sync_instead_of_failing_the_deploy(sim, relay_settings, outage):
    """Heroku does not release a deploy whose release phase exits non-zero, so a Locate2u or Redis
    outage blocked every deploy, a fix for that outage included; beat syncs again anyway. Run by
    hand (no ``DYNO=release.…``) the same outage still exits 1."""
    settings = relay_settings
    if outage == "Redis is down":
        settings = relay_settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    else:
        sim.app.config["FAULTS"].fail_rate(1.0, 503)
    release = cli(settings, "subscriptions", "sync", DYNO="release.4711")
    assert release.returncode == 0, release.stderr
    assert release.stderr.startswith("sync postponed: ") and "Traceback" not in release.stderr
    assert "the beat task syncs every 900 s" in release.stderr
    by_hand = cli(settings, "subscriptions", "sync")
    assert by_hand.returncode == 1 and by_hand.stderr.startswith("error: ")
    assert sim.state.webhooks == {}


@pytest.mark.parametrize("mistake, said", [("a rejected client secret", "invalid_client"),
                                            ("a type Locate2u does not offer", "does not offer event type"),
                                            ("a client without the webhooks' permission", "credentials were refused")])
def test_a_mistake_to_fix_still_fails_the_release_phase(sim, relay_settings, mistake, said):
    """A mistake to fix is not an outage: the deploy stops and says why. Refused credentials (a 403) are
    retriable for deliveries (held until fixed), but in the release phase a mistake, not "postponed"."""
    settings = relay_settings
    if mistake == "a rejected client secret":
        settings = relay_settings.replace(locate2u_client_secret="not-the-secret")
    elif mistake == "a client without the webhooks' permission":
        sim.faults.inject(403, times=10, path_prefix="/v1/Webhooks")
    else:
        sim.state.event_types = ("stop.assigned",)
    release = cli(settings, "subscriptions", "sync", DYNO="release.4711")
    assert release.returncode == 1 and release.stderr.startswith("error: ") and said in release.stderr
    assert "Traceback" not in release.stderr
    assert sim.state.webhooks == {}


def test_secret_rotation_moves_every_subscription_and_deliveries_follow(sim, relay_settings, serve):
    assert cli(relay_settings, "subscriptions", "sync").returncode == 0
    rotated = relay_settings.replace(webhook_secret="rotated-webhook-secret-0123456789",
                                     webhook_secret_previous=relay_settings.webhook_secret)
    serve(rotated)  # the redeployed receiver accepts both secrets
    moved = cli(rotated, "subscriptions", "sync")
    assert moved.stdout.splitlines()[-1] == "created 0, updated 8, deleted 0, unchanged 0, not ours (left alone) 0"
    assert all(h["url"].endswith(url_token(rotated.webhook_secret, h["eventType"]))
               for h in sim.state.list_webhooks())
    [answer] = sim.state.deliver("trip.assigned", PUBLISHED["trip.assigned"])
    assert answer.status_code == 200 and answer.json()["status"] == "accepted"


def test_unreachable_locate2u_is_a_clear_error_and_exit_1(relay_settings):
    id_down = cli(relay_settings.replace(locate2u_id_url="http://127.0.0.1:9"), "subscriptions", "sync")
    assert id_down.returncode == 1
    assert "error: POST http://127.0.0.1:9/connect/token failed: ConnectionError" in id_down.stderr
    api_down = cli(relay_settings.replace(locate2u_api_url="http://127.0.0.1:9"), "whoami")
    assert api_down.returncode == 1
    assert "error: GET http://127.0.0.1:9/v1/Discovery/User failed: ConnectionError" in api_down.stderr
    assert "gave up after bounded retries" in api_down.stderr


def test_stops_import_cli_creates_good_rows_and_reports_bad_ones(sim, relay_settings, tmp_path):
    path = tmp_path / "stops.csv"
    path.write_text("name,address,contact.email,durationMinutes\n"
                    "Alpha,1 George St,a@example.com,10\n"
                    "Bravo,,b@example.com,5\n"
                    "Charlie,3 Pitt St,,15\n"
                    "Delta,4 King St,not-an-email,x\n"
                    "Echo,5 Market St,,\n")
    result = cli(relay_settings, "stops", "import", str(path), "--batch-size", "2")
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["line 3: address: Missing data for required field.",
                                          "line 5: contact.email: Not a valid email address.",
                                          "line 5: durationMinutes: Not a valid integer.",
                                          "created 3, failed 2"]
    assert sorted(stop["name"] for stop in sim.state.stops.values()) == ["Alpha", "Charlie", "Echo"]
    missing = cli(relay_settings, "stops", "import", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_sync_task_runs_in_a_worker_and_beat_schedules_it(sim, relay_settings, start_process):
    start_process("worker", relay_settings)
    make_celery(relay_settings).send_task(SYNC_SUBSCRIPTIONS, queue=CONTROL_QUEUE)
    deadline = time.monotonic() + 20
    while len(sim.state.webhooks) < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(sim.state.webhooks) == 8
    probe = ("from workers.app import create_worker_app\nfrom workers.config import Settings\ns = Settings.from_env()\n"
             "for each in (s, s.replace(locate2u_client_id=None)):\n"
             "    print(create_worker_app(each).conf.beat_schedule.get('sync-subscriptions'))\n")
    printed = subprocess.run([sys.executable, "-c", probe], env=process_env(relay_settings), cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert printed == [str({"task": SYNC_SUBSCRIPTIONS, "schedule": 900}), "None"]


def test_stops_import_cli_reports_rows_whose_request_got_no_answer_as_unconfirmed(sim, relay_settings, tmp_path):
    path = tmp_path / "stops.csv"
    path.write_text("name,address\nAlpha,1 George St\nBravo,2 Pitt St\n")
    sim.faults.fail_after_apply("drop", path_prefix="/v1/Stops/import")
    result = cli(relay_settings, "stops", "import", str(path), "--batch-size", "1")
    assert result.returncode == 1 and len(sim.state.stops) == 2
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"line 2: row: may have been created: POST {sim.url}/v1/Stops/import ")
    assert lines[1:] == ["created 1, failed 0, unconfirmed 1 (the request got no usable answer: the stops may have "
                         "been created; look in Locate2u before importing those rows again)"]


def test_stops_import_cli_interrupted_mid_batch_says_what_was_created_what_may_be_and_what_was_not_sent(
        sim, relay_settings, tmp_path):
    """Ctrl-C during the second batch: before, nothing was printed but "Aborted!"."""
    path = tmp_path / "stops.csv"
    path.write_text("name,address\n" + "".join(f"S{n},{n} George St\n" for n in range(4)))
    sim.faults.slow(0, path_prefix="/v1/Stops/import")  # the first import answered at once
    sim.faults.slow(10, path_prefix="/v1/Stops/import")  # the second held (of the client's 20 s read timeout)
    importing = subprocess.Popen(from_a_terminal([BIN / "l2u-relay", "stops", "import", path, "--batch-size", "1"]),
                                 env=process_env(relay_settings), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30

    def imports():
        return sum(entry[1] == "/v1/Stops/import" for entry in sim.state.requests_log)

    while not (imports() == 2 and len(sim.state.stops) == 1):  # the first answered, the second held
        assert time.monotonic() < deadline and importing.poll() is None
        time.sleep(0.01)
    importing.send_signal(signal.SIGINT)  # the second batch is out
    stdout, stderr = importing.communicate(timeout=30)
    assert importing.returncode == 1 and "Aborted!" in stderr
    assert stdout.splitlines()[0].startswith("line 3: row: may have been created: ")
    assert stdout.splitlines()[1:] == [
        "created 1, failed 0, unconfirmed 1 (the request got no usable answer: the stops may have been created; "
        "look in Locate2u before importing those rows again), not sent 2 (from line 4 on: import them once the "
        "problem is fixed)"]


def test_deliveries_that_arrive_while_locate2u_needs_reauthorisation_wait_for_it_not_the_dead_letter_store(
        sim, code_settings, serve, start_process, simulator, redis_client):
    """The user withdraws the relay's access in Locate2u (or the refresh token's lifetime ends) while
    stops keep changing. Each delivery's stop read then needs a new consent; it was a PermanentError,
    so every stop delivery was dead-lettered at once until an operator linked the account again and
    replayed them all (past ``RELAY_DEAD_LETTER_LIMIT`` the oldest were dropped). They now wait on the
    retry schedule, and linking the account again brings them forward: applied within seconds."""
    storepoint = simulator("storepoint")
    for stop_id in STOP_IDS:
        sim.state.add_stop(stopId=stop_id, name=f"Stop {stop_id}")
    relay = sims_settings(code_settings, {"storepoint": storepoint}, retry_schedule=SVIX_RETRY_SCHEDULE)
    web = serve(relay)
    start_process("worker", relay, beat=True)
    link_through_the_receiver(sim, relay, web)
    sim.state.token_lifetime = 1
    link_through_the_receiver(sim, relay, web)  # tokens of a second's life: the next read refreshes
    sim.state.revoke_refresh_tokens()  # the user withdraws the relay's access
    time.sleep(1.05)
    delivery_ids = [post(web.url, "stop.status-changed", status_change(stop_id, "Arrived", "2022-04-27T05:00:00+00:00"))
                    .json()["delivery_id"] for stop_id in STOP_IDS]
    waiting = wait_for(lambda: (found := {d: Ledger(redis_client).get(d) for d in delivery_ids}) and all(
        entry["status"] == "retrying" for entry in found.values()) and found, timeout=60)
    assert DeadLetterStore(redis_client).list() == []
    assert locate2u_check(web) == REAUTH
    assert all(REAUTH_HINT in str(Ledger(redis_client).history(d)) for d in waiting)  # the trace says what to do

    sim.state.token_lifetime = 3600
    linked_at = time.time()
    link_through_the_receiver(sim, relay, web)
    outcomes = wait_for(lambda: (found := sink_outcomes(redis_client, delivery_ids)) and all(
        outcome.get("state") == "applied" for outcome in found.values()) and found, timeout=60)
    seconds = max(outcome["at"] for outcome in outcomes.values()) - linked_at
    print(f"\nLocate2u needed a new consent; all {len(delivery_ids)} waiting deliveries applied {seconds:.1f} s "
          "after the account was linked again")
    assert seconds < 30  # the schedule's next step was 300 s away
    assert len(storepoint.app.config["STATE"].find(lambda location: True)) == len(STOP_IDS)
