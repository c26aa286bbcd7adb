"""Security checks: URL tokens, constant-time comparison, OAuth state, tokens at rest, Flower auth,
the body size limit and the dependency audit (DESIGN.md guarantees 5 and 7)."""
import ast
import base64
import hmac
import inspect
import io
import ipaddress
import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psutil
import pytest
import redis
import requests

from receiver import create_app
from tests.helpers import TEST_SECRET
from tests.payloads import PUBLISHED
from tests.processes import Process, process_env
from workers.locate2u import webhook_auth
from workers.locate2u.client import Locate2uClient
from workers.locate2u.oauth_links import STATE_PREFIX, STATE_TTL
from workers.locate2u.token_store import TokenStore
from workers.locate2u.webhook_auth import token_matches, url_token
from workers.logs import json_handler, settings_secrets
from workers.ops.devstack import REPO_ROOT, EmbeddedRedis, free_port
from workers.store.dead_letters import DeadLetterStore

PREVIOUS = "previous-secret-0123456789"
ROTATED_OUT = "rotated-out-secret-0123456789"
STOP = PUBLISHED["stop.assigned"]
BODY = json.dumps(STOP).encode()


@pytest.fixture
def client(settings):
    return create_app(settings.replace(webhook_secret_previous=PREVIOUS, max_body_bytes=4096)).test_client()


def post(client, token, body=BODY, event_type="stop.assigned", **kwargs):
    return client.post(f"/webhooks/locate2u/{event_type}/{token}", data=body, content_type="application/json",
                       **kwargs)


def nothing_stored(redis_client):
    return redis_client.dbsize() == 0


# --- URL tokens ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", [
    "x" * 43,
    url_token(TEST_SECRET, "stop.assigned")[:-1],
    url_token(TEST_SECRET, "stop.assigned") + "A",
    url_token(TEST_SECRET, "stop.assigned").swapcase(),
    url_token(TEST_SECRET, "trip.created"),
    url_token(ROTATED_OUT, "stop.assigned"),
    url_token("", "stop.assigned"),
    " ",
    "%00",
], ids=["wrong", "truncated", "extended", "case-changed", "other-event-type", "rotated-out", "empty-secret",
        "blank", "nul"])
def test_wrong_and_rotated_out_tokens_are_refused_with_nothing_stored(client, redis_client, token):
    response = post(client, token)
    assert response.status_code == 401
    assert response.get_json() == {"error": "invalid_token",
                                    "message": "the URL token is not valid for this event type"}
    assert token not in response.get_data(as_text=True) or token.strip() == ""
    assert nothing_stored(redis_client)


@pytest.mark.parametrize("path", ["/webhooks/locate2u/stop.assigned/", "/webhooks/locate2u/stop.assigned",
                                  "/webhooks/locate2u//stop.assigned"])
def test_a_missing_token_is_refused_with_nothing_stored(client, redis_client, path):
    response = client.post(path, data=BODY, content_type="application/json")
    assert response.status_code in (404, 308)
    if response.status_code == 404:
        assert response.get_json()["error"] == "not_found"
    assert nothing_stored(redis_client)


def test_the_token_is_checked_before_the_body_is_read(client, redis_client):
    token = url_token(ROTATED_OUT, "stop.assigned")
    for body in (b"x" * 100_000, b"{not json", b"{}"):
        assert post(client, token, body).status_code == 401
    assert nothing_stored(redis_client)


def test_rotation_current_and_previous_accepted_then_previous_retired(settings, redis_client):
    rotating = create_app(settings.replace(webhook_secret_previous=PREVIOUS)).test_client()
    assert post(rotating, url_token(TEST_SECRET, "stop.assigned")).get_json()["status"] == "accepted"
    assert post(rotating, url_token(PREVIOUS, "stop.assigned"), b'{"stopId": 2}').get_json()["status"] == "accepted"
    redis_client.flushall()
    retired = create_app(settings).test_client()  # rotation done: RELAY_WEBHOOK_SECRET_PREVIOUS unset
    assert post(retired, url_token(PREVIOUS, "stop.assigned")).status_code == 401
    assert nothing_stored(redis_client)


# --- constant-time comparison ----------------------------------------------------------------------------

@pytest.fixture
def compare_calls(monkeypatch):
    """Every call of ``hmac.compare_digest`` while the test runs, as (a, b) pairs."""
    calls, real = [], hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(webhook_auth.hmac, "compare_digest", recording)
    return calls


@pytest.mark.parametrize("token_secret", [TEST_SECRET, PREVIOUS, ROTATED_OUT])
def test_every_configured_secret_is_compared_with_compare_digest(compare_calls, token_secret):
    token = url_token(token_secret, "note.created")
    secrets = (TEST_SECRET, PREVIOUS)
    assert token_matches(token, "note.created", secrets) == (token_secret in secrets)
    # One constant-time comparison per secret, whichever matched: no early exit reveals which one did.
    assert compare_calls == [(token.encode(), url_token(secret, "note.created").encode()) for secret in secrets]


def test_unset_secrets_are_skipped_not_compared(compare_calls):
    assert not token_matches(url_token(TEST_SECRET, "note.created"), "note.created", (TEST_SECRET[:0], None))
    assert compare_calls == []


def test_token_matches_has_no_plain_comparison_and_no_early_exit():
    tree = ast.parse(textwrap.dedent(inspect.getsource(token_matches)))
    nodes = list(ast.walk(tree))
    assert not [node for node in nodes if isinstance(node, ast.Compare)], "a token compared with ==, != or in"
    assert not [node for node in nodes if isinstance(node, (ast.Break, ast.Return)) and _inside_loop(tree, node)]
    calls = [node for node in nodes if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]
    assert any(call.func.attr == "compare_digest" for call in calls)


def _inside_loop(tree, target):
    return any(target in ast.walk(loop) for loop in ast.walk(tree) if isinstance(loop, (ast.For, ast.While)))


def test_the_receiver_compares_through_token_matches(client, compare_calls, redis_client):
    assert post(client, url_token(ROTATED_OUT, "stop.assigned")).status_code == 401
    assert post(client, url_token(TEST_SECRET, "stop.assigned")).status_code == 200
    assert len(compare_calls) == 4  # two requests, the current and the previous secret each


# --- OAuth state --------------------------------------------------------------------------------------

def operator_start(client):
    """``/start`` through the operator's signed link (what ``l2u-relay oauth url`` prints)."""
    return client.get("/oauth/locate2u/start", query_string={"link": client.application.extensions[
        "l2u.oauth_links"].make()})


def start_and_consent(client):
    """``/start``, then the user approves at the identity server: the callback's query string."""
    start = operator_start(client)
    assert start.status_code == 302
    approved = requests.get(start.headers["Location"], allow_redirects=False, timeout=5)
    callback = urlsplit(approved.headers["Location"])
    assert callback.path == "/oauth/locate2u/callback"
    return callback.query


def test_oauth_state_is_single_use(code_settings, redis_client):
    client = create_app(code_settings).test_client()
    query = start_and_consent(client)
    assert client.get(f"/oauth/locate2u/callback?{query}").get_json()["status"] == "authorized"
    replayed = client.get(f"/oauth/locate2u/callback?{query}")
    assert replayed.status_code == 400 and replayed.get_json()["error"] == "invalid_state"


def test_oauth_state_is_spent_even_when_the_callback_fails(code_settings):
    client = create_app(code_settings).test_client()
    query = parse_qs(start_and_consent(client))
    state, code = query["state"][0], query["code"][0]
    bogus = client.get("/oauth/locate2u/callback", query_string={"state": state, "code": "not-a-code"})
    assert bogus.status_code == 400 and bogus.get_json()["error"] == "code_rejected"
    retry = client.get("/oauth/locate2u/callback", query_string={"state": state, "code": code})
    assert retry.status_code == 400 and retry.get_json()["error"] == "invalid_state"


@pytest.mark.parametrize("query", [{}, {"state": ""}, {"state": "forged", "code": "c"},
                                   {"code": "c"}, {"state": "x" * 5000}])
def test_unknown_states_are_refused(code_settings, query):
    response = create_app(code_settings).test_client().get("/oauth/locate2u/callback", query_string=query)
    assert response.status_code == 400 and response.get_json()["error"] == "invalid_state"


def test_concurrent_callbacks_with_one_state_let_exactly_one_through(code_settings):
    app = create_app(code_settings)
    browser = app.test_client()
    state = parse_qs(urlsplit(operator_start(browser).headers["Location"]).query)["state"][0]
    cookie = browser.get_cookie("l2u_oauth_browser", path="/oauth/locate2u/")
    barrier, errors = threading.Barrier(8), []

    def callback():
        same_browser = app.test_client()
        same_browser.set_cookie(cookie.key, cookie.value, path=cookie.path)
        barrier.wait()
        answer = same_browser.get("/oauth/locate2u/callback", query_string={"state": state, "error": "access_denied"})
        errors.append(answer.get_json()["error"])

    threads = [threading.Thread(target=callback) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(errors) == ["authorization_denied"] + ["invalid_state"] * 7


def test_oauth_states_are_kept_hashed_and_expire(code_settings, redis_client):
    client = create_app(code_settings).test_client()
    state = parse_qs(urlsplit(operator_start(client).headers["Location"]).query)["state"][0]
    [key] = redis_client.keys(STATE_PREFIX + "*")
    assert state not in key and state not in dump_redis(redis_client.connection_pool.connection_kwargs)
    assert 0 < redis_client.ttl(key) <= STATE_TTL


# --- tokens at rest -----------------------------------------------------------------------------------

def dump_redis(connection_kwargs):
    """Every key and every value in Redis, raw bytes joined (strings, hashes, lists, sets, sorted sets, streams)."""
    raw = redis.Redis(host=connection_kwargs["host"], port=connection_kwargs["port"], db=connection_kwargs["db"])
    chunks = []
    for key in raw.scan_iter(count=1000):
        chunks.append(key)
        kind = raw.type(key)
        if kind == b"string":
            chunks.append(raw.get(key))
        elif kind == b"hash":
            chunks.extend(b for pair in raw.hgetall(key).items() for b in pair)
        elif kind == b"list":
            chunks.extend(raw.lrange(key, 0, -1))
        elif kind == b"set":
            chunks.extend(raw.smembers(key))
        elif kind == b"zset":
            chunks.extend(member for member, _ in raw.zrange(key, 0, -1, withscores=True))
        elif kind == b"stream":
            chunks.extend(b for _, fields in raw.xrange(key) for pair in fields.items() for b in pair)
    raw.close()
    return b"\n".join(chunks).decode("latin-1")


def test_stored_tokens_are_unreadable_in_raw_redis(sim, code_settings, redis_client):
    client = Locate2uClient.from_settings(code_settings, redis_client)
    flask_client = create_app(code_settings).test_client()
    assert flask_client.get(f"/oauth/locate2u/callback?{start_and_consent(flask_client)}").status_code == 200
    first = TokenStore.from_settings(redis_client, code_settings).load()
    client.tokens.renew_rejected(first["access_token"])  # a refresh stores a second token set
    tokens = TokenStore.from_settings(redis_client, code_settings).load()
    assert tokens["access_token"] != first["access_token"]
    assert tokens["access_token"] and tokens["refresh_token"]
    everything = dump_redis(redis_client.connection_pool.connection_kwargs)
    secrets = [tokens["access_token"], tokens["refresh_token"], first["access_token"], first["refresh_token"],
               sim.state.client_secret, code_settings.webhook_secret]
    for secret in secrets:
        for form in (secret, base64.b64encode(secret.encode()).decode(), json.dumps(secret)):
            assert form not in everything
    assert "access_token" not in everything and "refresh_token" not in everything


def test_tokens_stored_under_another_secret_cannot_be_read(settings, redis_client):
    TokenStore.from_settings(redis_client, settings).save({"access_token": "a", "refresh_token": "r"})
    assert TokenStore.from_settings(redis_client, settings.replace(webhook_secret=ROTATED_OUT)).load() is None
    rotating = settings.replace(webhook_secret=ROTATED_OUT, webhook_secret_previous=TEST_SECRET)
    assert TokenStore.from_settings(redis_client, rotating).load()["access_token"] == "a"


# --- Flower -------------------------------------------------------------------------------------------

def flower(settings, **env):
    environment = {key: value for key, value in process_env(settings, **env).items()
                   if key not in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH", "FLOWER_ADDRESS", "FLOWER_PORT", "PORT", "DYNO")
                   or key in env}
    return Process("flower", [str(Path(sys.executable).parent / "celery"), "-A", "workers.app", "flower"],
                   environment)


def wait_listening(url, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"flower exited:\n{proc.output()[-3000:]}")
        try:
            return requests.get(url + "/healthcheck", timeout=2)
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError(f"flower not listening:\n{proc.output()[-3000:]}")


def test_flower_refuses_requests_without_basic_auth(settings):
    port = free_port()
    proc = flower(settings, FLOWER_BASIC_AUTH="admin:s3cret-flower-pass", FLOWER_ADDRESS="127.0.0.1",
                  FLOWER_PORT=port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_listening(url, proc)
        for path in ("/", "/workers", "/api/workers", "/tasks"):
            assert requests.get(url + path, timeout=10).status_code == 401, path
            wrong = requests.get(url + path, auth=("admin", "wrong"), timeout=10)
            assert wrong.status_code == 401, path
        assert requests.get(url + "/", auth=("admin", "s3cret-flower-pass"), timeout=10).status_code == 200
        assert requests.get(url + "/api/workers", auth=("admin", "s3cret-flower-pass"),
                            timeout=30).status_code == 200
    finally:
        proc.stop()
    assert "s3cret-flower-pass" not in proc.output()


def non_loopback_ipv4():
    """An IPv4 address of this machine other than loopback, as a dyno's own IP is."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return address.address
    raise AssertionError("this machine has no IPv4 address but loopback to reach Flower on")


def test_flower_on_a_heroku_dyno_listens_where_heroku_exec_forwards_and_asks_for_auth(settings):
    """Heroku routes the internet only to web dynos and sets PORT only there. A ``flower`` dyno is
    reached with ``heroku ps:forward 5555 --dyno flower.1``, whose tunnel connects to the dyno's own
    IP (Heroku Exec), not to its loopback: Flower listening on 127.0.0.1 there is out of reach."""
    port = free_port()
    proc = flower(settings, DYNO="flower.1", FLOWER_BASIC_AUTH="admin:s3cret-flower-pass", FLOWER_PORT=port)
    try:
        url = f"http://{non_loopback_ipv4()}:{port}"
        wait_listening(url, proc)
        assert requests.get(url + "/workers", timeout=10).status_code == 401
        assert requests.get(url + "/workers", auth=("admin", "s3cret-flower-pass"), timeout=30).status_code == 200
    finally:
        proc.stop()


def flower_refused(settings, **env):
    """The output of a Flower started with ``env`` that must exit at once, with an error and no traceback."""
    proc = flower(settings, **env)
    try:
        proc.proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise AssertionError(f"flower started with {env}:\n{proc.output()[-2000:]}") from None
    assert proc.proc.returncode != 0 and "Traceback" not in proc.output(), proc.output()[-2000:]
    return proc.output()


@pytest.mark.parametrize("env", [{"FLOWER_ADDRESS": "0.0.0.0"}, {"PORT": "placeholder"}, {"DYNO": "flower.1"}],
                         ids=["FLOWER_ADDRESS=0.0.0.0", "PORT set (binds 0.0.0.0)", "a Heroku dyno (binds 0.0.0.0)"])
def test_flower_will_not_start_on_all_interfaces_without_auth(settings, env):
    env = {name: (free_port() if value == "placeholder" else value) for name, value in env.items()}
    output = flower_refused(settings, **({"FLOWER_PORT": free_port()} if "PORT" not in env else {}), **env)
    assert "refusing to listen on 0.0.0.0 without authentication" in output


def test_flower_on_a_port_already_taken_says_so(settings):
    """A taken port ended Flower in tornado's ``OSError: Address already in use`` traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        output = flower_refused(settings, FLOWER_BASIC_AUTH="admin:s3cret-flower-pass", FLOWER_ADDRESS="127.0.0.1",
                                FLOWER_PORT=port)
    assert f"flower: port {port} is already in use on 127.0.0.1" in output


def test_flower_with_a_port_it_cannot_use_says_so(settings):
    """``FLOWER_PORT=70000`` quietly listened on 4464 (70000 modulo 65536): an operator forwarding 70000
    reached nothing. (``FLOWER_PORT=abc`` is refused by Flower itself, in a traceback of its own, before
    it reads this configuration; ``PORT=abc`` by the relay's settings.)"""
    output = flower_refused(settings, FLOWER_BASIC_AUTH="admin:s3cret-flower-pass", FLOWER_PORT="70000")
    assert "flower: FLOWER_PORT must be a port number (1-65535), not '70000'" in output


# --- body size limit ----------------------------------------------------------------------------------

def padded(size):
    """A valid delivery of exactly ``size`` bytes."""
    body = json.dumps({**STOP, "pad": ""})
    return json.dumps({**STOP, "pad": "x" * (size - len(body))}).encode()


def test_a_body_at_the_limit_is_accepted_one_byte_more_is_413(client, redis_client):
    token = url_token(TEST_SECRET, "stop.assigned")
    over = post(client, token, padded(4097))
    assert over.status_code == 413
    assert over.get_json() == {"error": "request_entity_too_large",
                               "message": "request body is larger than the limit of 4096 bytes"}
    assert nothing_stored(redis_client)
    assert post(client, token, padded(4096)).get_json()["status"] == "accepted"


def test_size_limit_through_gunicorn_including_chunked_bodies(settings, start_process, redis_client):
    web = start_process("gunicorn", settings.replace(max_body_bytes=4096))
    url = f"{web.url}/webhooks/locate2u/stop.assigned/{url_token(TEST_SECRET, 'stop.assigned')}"

    def chunked(body, piece=1024):  # a generator body: Transfer-Encoding chunked, no Content-Length
        return (body[i:i + piece] for i in range(0, len(body), piece))

    refused = [requests.post(url, data=padded(64 * 1024), timeout=10),
               requests.post(url, data=chunked(padded(64 * 1024)), timeout=10),
               requests.post(url, data=chunked(padded(4097)), timeout=10),
               # valid JSON within the limit, then spaces past it: once cut at the limit and accepted
               requests.post(url, data=chunked(padded(4000) + b" " * 10_000), timeout=10)]
    for response in refused:
        assert response.status_code == 413 and response.json()["error"] == "request_entity_too_large"
    assert redis_client.keys("l2u:*") == []
    assert requests.post(url, data=chunked(padded(4096)), timeout=10).json()["status"] == "accepted"
    assert url_token(TEST_SECRET, "stop.assigned") not in web.output()  # the token is never logged


# --- /metrics -----------------------------------------------------------------------------------------

def strict_media_type(value):
    """``(type, {param: value})`` parsed as strictly as Go's ``mime.ParseMediaType`` (which Prometheus 3
    uses to choose the scrape format): a repeated parameter, an empty name or a bare value is an error."""
    kind, *parts = value.split(";")
    params = {}
    for part in parts:
        name, sep, val = part.strip().partition("=")
        name = name.strip().lower()
        if not sep or not name or not val.strip():
            raise ValueError(f"malformed parameter {part!r} in {value!r}")
        if name in params:
            raise ValueError(f"duplicate parameter {name!r} in {value!r}")
        params[name] = val.strip().strip('"')
    return kind.strip().lower(), params


def test_the_strict_parser_refuses_a_repeated_parameter():
    with pytest.raises(ValueError, match="duplicate parameter 'charset'"):
        strict_media_type("text/plain; version=1.0.0; charset=utf-8; charset=utf-8")


def test_metrics_content_type_has_exactly_one_charset(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert strict_media_type(response.headers["Content-Type"]) == (
        "text/plain", {"version": "1.0.0", "charset": "utf-8"})


METRICS_TOKEN = "metrics-bearer-token-0123456789"
METRICS_BASIC = "prometheus:metrics-basic-pass-0123"


@pytest.mark.parametrize("protection, accepted, refused", [
    ({}, [{}], []),
    ({"metrics_token": METRICS_TOKEN},
     [{"Authorization": f"Bearer {METRICS_TOKEN}"}],
     [{}, {"Authorization": f"Bearer {METRICS_TOKEN}x"}, {"Authorization": "Bearer "},
      {"Authorization": "Basic " + base64.b64encode(METRICS_TOKEN.encode()).decode()}]),
    ({"metrics_basic_auth": METRICS_BASIC},
     [{"Authorization": "Basic " + base64.b64encode(METRICS_BASIC.encode()).decode()}],
     [{}, {"Authorization": "Basic " + base64.b64encode(b"prometheus:wrong").decode()},
      {"Authorization": f"Bearer {METRICS_BASIC}"}]),
    ({"metrics_token": METRICS_TOKEN, "metrics_basic_auth": METRICS_BASIC},
     [{"Authorization": f"Bearer {METRICS_TOKEN}"},
      {"Authorization": "Basic " + base64.b64encode(METRICS_BASIC.encode()).decode()}],
     [{}]),
], ids=["off", "bearer", "basic", "both"])
def test_metrics_protection_on_and_off(settings, protection, accepted, refused):
    client = create_app(settings.replace(**protection)).test_client()
    for headers in accepted:
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 200 and b"l2u_dead_letters" in response.data
    for headers in refused:
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.get_json()["error"] == "unauthorized" and b"l2u_" not in response.data
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_scrape_while_redis_is_down_keeps_the_receivers_series_and_says_redis_is_down(settings, tmp_path):
    """During a Redis outage the receiver's own series (its 503s) are what shows the outage; the scrape
    answered 500 instead, with a traceback in the log for every scrape."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    client = create_app(settings.replace(redis_url=server.url)).test_client()
    assert b"l2u_redis_up 1.0" in client.get("/metrics").data
    server.stop()
    assert post(client, url_token(TEST_SECRET, "stop.assigned")).status_code == 503
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"l2u_redis_up 0.0" in response.data and b"l2u_dead_letters" not in response.data
    assert b'l2u_receiver_requests_total{route="/webhooks/locate2u/<event_type>/<token>",status="503"}' in response.data


def test_metrics_through_gunicorn_protected_and_strictly_typed(settings, start_process):
    web = start_process("gunicorn", settings.replace(metrics_token=METRICS_TOKEN))
    assert requests.get(web.url + "/metrics", timeout=10).status_code == 401
    scrape = requests.get(web.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert scrape.status_code == 200 and "l2u_receiver_requests_total" in scrape.text, (
        scrape.status_code, scrape.text[:500], web.output()[-3000:])
    assert strict_media_type(scrape.headers["Content-Type"])[1] == {"version": "1.0.0", "charset": "utf-8"}
    assert METRICS_TOKEN not in web.output()


def test_an_empty_metrics_file_left_by_a_killed_web_worker_does_not_break_every_scrape(settings, start_process,
                                                                                    tmp_path):
    """A gunicorn worker creates its Prometheus file empty and sizes it a moment later; one killed
    in between (gunicorn's timeout, a dyno's SIGKILL) leaves it empty for good, and a scrape while
    one is being created reads it so (prometheus/client_python#1199). Either made /metrics answer
    500: the first for good, the second once in a parallel CI run."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    web = start_process("gunicorn", settings, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    (metrics_dir / "counter_4194301.db").touch()  # a pid no worker has here
    scrape = requests.get(web.url + "/metrics", timeout=10)
    assert scrape.status_code == 200 and "l2u_receiver_requests_total" in scrape.text, scrape.text[:500]


def redis_output_bytes(redis_client):
    return int(redis_client.info("stats")["total_net_output_bytes"])


def scrape_cost(client, redis_client):
    """Bytes Redis sent while one /metrics scrape ran (the INFO calls around it cancel out)."""
    before = redis_output_bytes(redis_client)
    assert client.get("/metrics").status_code == 200
    return redis_output_bytes(redis_client) - before


def test_a_scrape_reads_the_same_from_redis_for_10_or_2000_dead_letters(client, redis_client):
    dead_letters = DeadLetterStore(redis_client)

    def fill(count):
        for number in range(count):
            dead_letters.add(f"{number:064x}", "storepoint", "HTTP 422 from the sink: " + "x" * 200)

    fill(10)
    scrape_cost(client, redis_client)  # warm: script loading and first connections
    small = scrape_cost(client, redis_client)
    fill(2000)
    large = scrape_cost(client, redis_client)
    assert b'l2u_dead_letters{sink="storepoint"} 2000.0' in client.get("/metrics").data
    assert abs(large - small) < 200, (small, large)  # loading every entry would be ~500 kB more


def test_dead_letter_counts_follow_add_replace_remove_and_older_entries(redis_client):
    store = DeadLetterStore(redis_client)
    for number in range(3):
        store.add(f"{number:064x}", "b2b", "reason")
    store.add(f"{0:064x}", "b2b", "again")  # the same entry replaced: still three
    store.add(f"{0:064x}", "enrich", "reason")
    assert store.counts() == {"b2b": 3, "enrich": 1}
    assert store.remove(store.entry_id(f"{1:064x}", "b2b")) and not store.remove("no-such:b2b")
    assert store.counts() == {"b2b": 2, "enrich": 1}
    redis_client.delete(DeadLetterStore.COUNTS)  # entries written before the counts were kept
    assert store.counts() == {"b2b": 2, "enrich": 1}


# --- error answers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/webhooks/locate2u/stop.assigned/" + "x" * 43, {"POST"}),
    ("PUT", "/metrics", {"GET", "HEAD"}),
    ("DELETE", "/healthz", {"GET", "HEAD"}),
    ("POST", "/openapi.json", {"GET", "HEAD"}),
])
def test_every_405_names_the_allowed_methods(client, method, path, allowed):
    response = client.open(path, method=method)
    assert response.status_code == 405 and response.get_json()["error"] == "method_not_allowed"
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}


@pytest.mark.parametrize("body", [b"", b"  \n"])
def test_an_empty_body_is_named_as_such(client, redis_client, body):
    response = post(client, url_token(TEST_SECRET, "stop.assigned"), body)
    assert response.status_code == 400
    assert response.get_json() == {"error": "empty_body", "message": "the request body is empty; a JSON object is required"}
    assert nothing_stored(redis_client)


# --- no secret in any log field -------------------------------------------------------------------------

ALL_SECRETS = {"webhook_secret": "webhook-secret-0123456789abcdef", "webhook_secret_previous": "previous-0123456789abcdef",
               "locate2u_client_secret": "l2u-client-secret-0123456789", "storepoint_api_token": "sp-token-0123456789",
               "b2b_api_token": "b2b-token-0123456789", "b2b_password": "b2b-password-0123456789",
               "locate_api_token": "locate-token-0123456789", "deliverycom_access_token": "dc-token-0123456789",
               "flower_basic_auth": "admin:flower-pass-0123456789", "metrics_token": "metrics-token-0123456789",
               "metrics_basic_auth": "prom:metrics-pass-0123456789",
               "token_keys": ("kgV1uKdJq3Ogv2q6qkJbVn1S2qkW3dGz9uYdXo1rQhE=", "ajwUAxnvK4f1hQb7s1cCeUxOZ3FwcIYaD8Ss8ZLq2L0="),
               "forward_secret": ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",)}
# tokens that are no setting: recognised by where they stand (an Authorization value, a credential-like key)
DYNAMIC = {"access": "eyJhbGciOiJSUzI1NiJ9.access-token-value", "refresh": "refresh-token-value-0123456789",
           "verifier": "pkce-verifier-value-0123456789", "opaque": "opaque-api-key-0123456789",
           "link": "eyJub25jZSI6Im4ifQ.Zz0AAA.signed-start-link", "code": "authorization-code-0123456789",
           "state": "oauth-state-value-0123456789"}


def every_secret(settings):
    """Each configured secret, the basic-auth passwords alone and as an ``Authorization: Basic`` value."""
    values = [value for value in ALL_SECRETS.values() if isinstance(value, str)]
    values += [value for group in ALL_SECRETS.values() if isinstance(group, tuple) for value in group]
    for pair in (settings.flower_basic_auth, settings.metrics_basic_auth):
        values += [pair.partition(":")[2], base64.b64encode(pair.encode()).decode()]
    return values


def test_no_secret_appears_in_any_field_of_any_log_line(settings):
    settings = settings.replace(**ALL_SECRETS)
    secrets = every_secret(settings)
    assert len(secrets) >= 17
    handler = json_handler(settings_secrets(settings))
    stream = io.StringIO()
    handler.setStream(stream)
    logger = logging.getLogger("test.security.redaction")
    logger.handlers, logger.propagate, logger.level = [handler], False, logging.DEBUG
    basic = base64.b64encode(settings.metrics_basic_auth.encode()).decode()
    for secret in secrets:
        logger.info("message carries %s" % secret)
        logger.info("args carry %s and %r", secret, {"value": secret})
        try:
            try:
                raise ValueError(f"inner {secret}")
            except ValueError as inner:
                raise RuntimeError(f"outer {secret}") from inner
        except RuntimeError:
            logger.exception("failed", extra={"error": RuntimeError(secret)})
        logger.warning("extra fields", extra={"url": f"https://x.example/?q={secret}", "body": secret,
                                              "raw": secret.encode(), "status": 400})
        logger.warning("nested extra", extra={"response": {"body": {"detail": [secret, {"deeper": (secret,)}]}},
                                              "request": {"headers": {"X-Echo": secret}}})
        logger.info("stack", stack_info=True, extra={"note": f"see {secret}"})
    logger.warning("headers", extra={"headers": {"Authorization": f"Bearer {DYNAMIC['access']}",
                                                 "authorization": f"Basic {basic}", "X-Api-Key": DYNAMIC["opaque"]}})
    logger.warning("token response", extra={"body": {"access_token": DYNAMIC["access"],
                                                     "refresh_token": DYNAMIC["refresh"],
                                                     "code_verifier": DYNAMIC["verifier"]}})
    logger.warning("Authorization: Token %s, form code_verifier=%s", DYNAMIC["opaque"], DYNAMIC["verifier"])
    logger.warning("refresh", extra={"refresh_token": DYNAMIC["refresh"], "api_key": DYNAMIC["opaque"]})
    logger.info('"GET /oauth/locate2u/start?link=%s HTTP/1.1" 302', DYNAMIC["link"])  # an access-log line
    logger.info("GET /oauth/locate2u/callback", extra={"url": f"/oauth/locate2u/callback?code={DYNAMIC['code']}"
                                                              f"&state={DYNAMIC['state']}"})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 6 * len(secrets) + 6
    assert any("exc_info" in line for line in lines) and any("stack_info" in line for line in lines)
    text = stream.getvalue()
    leaked = [value for value in secrets + list(DYNAMIC.values()) if value in text]
    assert leaked == []
    assert {"body", "status", "raw", "url", "response"} <= set().union(*lines)  # the fields stay, scrubbed
    assert lines[1]["message"].startswith("args carry [redacted]")


# --- dependency audit ---------------------------------------------------------------------------------

RELIABILITY_DOC = REPO_ROOT / "docs" / "reliability.md"


def test_dependency_audit_is_clean_or_every_finding_is_explained():
    """``pip-audit`` over the installed environment; every finding must be named in docs/reliability.md."""
    try:
        result = subprocess.run([str(Path(sys.executable).parent / "pip-audit"), "-f", "json",
                                 "--progress-spinner", "off", "--timeout", "10"],
                                capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("pip-audit timed out: no vulnerability service answered")
    if not result.stdout.strip().startswith("{"):
        pytest.skip(f"pip-audit could not reach a vulnerability service: {result.stderr.strip()[-300:]}")
    dependencies = json.loads(result.stdout)["dependencies"]
    audited = [dep for dep in dependencies if "skip_reason" not in dep]
    if not audited:
        pytest.skip("pip-audit audited nothing: the vulnerability service is unreachable from here "
                    "(see docs/reliability.md, 'Dependency audit')")
    explained = RELIABILITY_DOC.read_text()
    unexplained = [f"{dep['name']} {dep['version']}: {vuln['id']}" for dep in audited for vuln in dep["vulns"]
                   if vuln["id"] not in explained and not set(vuln.get("aliases", ())) & set(explained.split())]
    assert unexplained == [], "explain or fix each finding in docs/reliability.md"
