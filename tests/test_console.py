"""The operator console through Flask's test client, on a real Redis (and a Storepoint simulator for drift)."""
import http.client
import json
import re
import time
import urllib.parse
from types import SimpleNamespace

import pytest
import redis
import requests
from prometheus_client import REGISTRY
from werkzeug.security import generate_password_hash

from receiver import create_app
from receiver.console import session_key
from receiver.console.auth import check_login, decoy_hash, operators
from tests.fixtures import FORWARD_SECRET, kill_when_reached
from tests.helpers import peak_allocated, seed_dead_letters_up_to, wait_for
from tests.payloads import status_change
from tests.processes import BIN, Process, demo_env
from workers.config import ConfigError, Settings
from workers.domain.locations import Location
from workers.dyno.router import console_request, pass_router_client, router_clients
from workers.ops import operations
from workers.ops.devstack import free_port
from workers.ops.simulators import storepoint
from workers.ops.simulators.base import SimulatorServer
from workers.pipeline import replay
from workers.sinks.forward import ENDPOINT_FAILURES, ForwardSink
from workers.sinks.storepoint import StorepointSink
from workers.store import keys
from workers.store.dead_letters import DeadLetterStore
from workers.store.ledger import Ledger
from workers.store.mappings import MappingStore
from workers.store.quarantine import Quarantine
from workers.store.redis_client import connect

PASSWORD = "console-test-password-123"
SP_TOKEN = "sp-console-token-123"


@pytest.fixture
def console_settings(settings):
    return settings.replace(console_password=PASSWORD)


@pytest.fixture
def app(console_settings):
    return create_app(console_settings)


def csrf_from(response):
    return re.search(r'name="csrf_token" value="([^"]+)"', response.text).group(1)


def log_in(client, name="admin", password=PASSWORD):
    token = csrf_from(client.get("/console/login"))
    return client.post("/console/login", data={"csrf_token": token, "name": name, "password": password})


@pytest.fixture
def client(app):
    client = app.test_client()
    assert log_in(client).status_code == 302
    return client


def hidden_fields(page):
    """The hidden inputs of a console page's form (a confirmation page's), as a browser posts them."""
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))


def post_form(client, path, page, **data):
    """POST ``data`` with the CSRF token of the console page ``page``."""
    return client.post(path, data={"csrf_token": csrf_from(client.get(page)), **data})


def seed_delivery(redis_client, delivery_id, body, received_at, event_type="stop.status-changed", status=None):
    ledger = Ledger(redis_client)
    ledger.record(delivery_id, event_type, json.dumps(body), 86400, received_at=received_at)
    if status:
        ledger.set_status(delivery_id, status)
    return ledger


def seed_dead_letter(redis_client, delivery_id, sink="storepoint", reason="validation_error: Invalid (name: taken)",
                     event_type="stop.status-changed"):
    seed_delivery(redis_client, delivery_id, status_change(164557, "Arrived", "2022-04-27T05:00:00+00:00"),
                  time.time() - 60, event_type=event_type)
    Ledger(redis_client).start_fan_out(delivery_id, [sink])
    record = {"key": "l2u-stop-164557", "version": "2022-04-27T05:00:00+00:00", "event": {"event_type": event_type}}
    Ledger(redis_client).sink_outcome(delivery_id, sink, "dead_lettered", attempts=1, reason=reason)
    return DeadLetterStore(redis_client).add(delivery_id, sink, reason, stage="deliver", action="upsert",
                                             record=record, event_type=event_type, key=record["key"], attempts=1)


def counter(name, action):
    return REGISTRY.get_sample_value(name, {"action": action}) or 0


# ------------------------------------------------------------------ access

def test_console_is_off_without_a_password(settings):
    client = create_app(settings).test_client()
    assert client.get("/console/").status_code == 404
    assert client.get("/console/login").status_code == 404
    assert "Set-Cookie" not in client.get("/healthz").headers


def test_pages_and_actions_refuse_a_client_not_logged_in(app, redis_client):
    seed_dead_letter(redis_client, "d-1")
    client = app.test_client()
    for path in ("/console/", "/console/deliveries", "/console/deliveries/d-1", "/console/stops/164557",
                 "/console/dead-letters", "/console/dead-letters/d-1:storepoint", "/console/quarantine"):
        response = client.get(path)
        assert response.status_code == 302 and response.headers["Location"].startswith("/console/login"), path
    token = csrf_from(client.get("/console/login"))  # a valid token, but no login
    response = client.post("/console/dead-letters/apply", data={"csrf_token": token, "choice": "purge:all"})
    assert response.status_code == 302 and response.headers["Location"].startswith("/console/login")
    assert DeadLetterStore(redis_client).get("d-1:storepoint") is not None


def test_login_cookie_and_security_headers(app, console_settings):
    client = app.test_client()
    page = client.get("/console/login")
    headers = page.headers
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no script at all
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    assert "<script" not in page.text
    response = log_in(client)
    assert response.status_code == 302 and response.headers["Location"] == "/console/"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/console" in cookie and "Expires=" in cookie
    assert "Secure" not in cookie  # plain http locally
    assert client.get("/console/").status_code == 200

    https = create_app(console_settings.replace(public_url="https://relay.example.com")).test_client()
    assert "Secure" in log_in(https).headers["Set-Cookie"]


def test_login_returns_to_the_page_asked_for_but_never_off_the_console(app):
    client = app.test_client()
    assert client.get("/console/dead-letters?sink=b2b").headers["Location"] == (
        "/console/login?next=/console/dead-letters?sink%3Db2b")
    for target, landing in (("/console/dead-letters?sink=b2b", "/console/dead-letters?sink=b2b"),
                            ("//evil.example/console/", "/console/"), ("https://evil.example/", "/console/"),
                            ("/console//evil.example", "/console/")):
        token = csrf_from(client.get("/console/login"))
        answer = client.post("/console/login", data={"csrf_token": token, "name": "admin", "password": PASSWORD,
                                                     "next": target})
        assert answer.headers["Location"] == landing, target


def test_a_cookie_kept_from_before_logout_no_longer_opens_the_console(app, redis_client):
    """The session was only the signed cookie: a copy kept from before a logout (a shared computer, a
    proxy's log) still opened every page and its forms. A login now has a record in Redis that logout
    deletes."""
    client = app.test_client()
    log_in(client)
    cookie = client.get_cookie("l2u_console", path="/console")
    token = csrf_from(client.get("/console/"))
    assert client.post("/console/logout", data={"csrf_token": token}).status_code == 302
    copy = app.test_client()
    copy.set_cookie("l2u_console", cookie.value, path="/console")
    assert copy.get("/console/").status_code == 302 and copy.get("/console/dead-letters").status_code == 302


def test_a_login_lasts_its_session_minutes_however_often_it_is_used(console_settings, redis_client):
    """Flask signs the cookie anew on every request, so a login used every few minutes never expired: the
    setting worked as an idle timeout. The login's record in Redis expires that long after the login,
    and requests do not push it back."""
    app = create_app(console_settings.replace(console_session_minutes=5))
    client = app.test_client()
    log_in(client)
    [record] = redis_client.keys("l2u:console:session:*")
    assert 299 <= redis_client.ttl(record) <= 300
    redis_client.expire(record, 120)  # three minutes on
    for _ in range(3):
        assert client.get("/console/").status_code == 200
    assert redis_client.ttl(record) <= 120  # not renewed by use
    redis_client.delete(record)  # its five minutes are up
    assert client.get("/console/").status_code == 302


def test_an_unknown_operator_name_costs_the_hash_check_a_known_one_costs(console_settings):
    """The decoy an unknown name is checked against was always scrypt: beside pbkdf2 operators (which
    docs/console.md accepts) an unknown name was answered in a third of the time, telling names apart.
    The decoy is now made the way the operators' hashes are (their method and cost)."""
    pbkdf2 = generate_password_hash("alice's password", method="pbkdf2:sha256:600000")
    settings = console_settings.replace(console_operators=(f"alice:{pbkdf2}",))
    assert decoy_hash(tuple(operators(settings).values())).split("$")[0] == "pbkdf2:sha256:600000"
    assert not check_login(settings, "mallory", "alice's password")
    assert check_login(settings, "alice", "alice's password")


def test_session_expires(console_settings):
    app = create_app(console_settings.replace(console_session_minutes=5))
    client = app.test_client()
    log_in(client)
    assert client.get("/console/").status_code == 200
    cookie = client.get_cookie("l2u_console", path="/console")
    # The same signed cookie, presented after its lifetime: itsdangerous checks the signing time.
    later = time.time() + 6 * 60
    import itsdangerous.timed

    real_now = itsdangerous.timed.TimestampSigner.get_timestamp
    try:
        itsdangerous.timed.TimestampSigner.get_timestamp = lambda self: int(later)
        fresh = app.test_client()
        fresh.set_cookie("l2u_console", cookie.value, path="/console")
        assert fresh.get("/console/").status_code == 302
    finally:
        itsdangerous.timed.TimestampSigner.get_timestamp = real_now


def test_wrong_password_and_rate_limit_per_client_ip(app, caplog):
    client = app.test_client()
    assert log_in(client, password="wrong password!").status_code == 401
    assert log_in(client, name="nobody").status_code == 401
    for _ in range(8):
        log_in(client, password="wrong")
    limited = log_in(client)  # the 11th attempt in the window, even with the right password
    assert limited.status_code == 429 and "Too many login attempts" in limited.text
    other_ip = app.test_client()
    token = csrf_from(other_ip.get("/console/login", environ_base={"REMOTE_ADDR": "10.0.0.9"}))
    assert other_ip.post("/console/login", data={"csrf_token": token, "name": "admin", "password": PASSWORD},
                         environ_base={"REMOTE_ADDR": "10.0.0.9"}).status_code == 302
    assert "login_limited" in caplog.text and PASSWORD not in caplog.text


def through_router(web, client_ip, path, forged=(), **headers):
    """A request as Heroku's router passes it on: from its own address (loopback here), the client's
    appended to the first ``X-Forwarded-For`` header the client sent (``forged``: their values; each is
    sent as a header of its own), or in one of its own. ``(status, headers, body)``."""
    connection = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    try:
        body = headers.pop("body", None)
        connection.putrequest("POST" if body is not None else "GET", path)
        forwarded = [f"{forged[0]}, {client_ip}", *forged[1:]] if forged else [client_ip]
        for value in forwarded:
            connection.putheader("X-Forwarded-For", value)
        for name, value in headers.items():
            connection.putheader(name.replace("_", "-"), value)
        if body is not None:
            connection.putheader("Content-Type", "application/x-www-form-urlencoded")
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body.encode() if body is not None else None)
        response = connection.getresponse()
        return response.status, response.headers, response.read().decode()
    finally:
        connection.close()


def log_in_through_router(web, client_ip, password=PASSWORD, forged=(), path="/console/login", **headers):
    """A login from ``client_ip`` through the router (with ``headers`` of the client's, posted to ``path``);
    the answer's status."""
    _, answer_headers, page = through_router(web, client_ip, "/console/login")
    cookie = answer_headers["Set-Cookie"].partition(";")[0]
    form = urllib.parse.urlencode({"csrf_token": csrf_from(SimpleNamespace(text=page)), "name": "admin",
                                   "password": password})
    return through_router(web, client_ip, path, forged, Cookie=cookie, body=form, **headers)[0]


def test_behind_herokus_router_login_attempts_are_limited_per_client_not_per_router(
        console_settings, start_process, redis_client, caplog):
    """On Heroku every request comes from a router node: limited by the address the web process sees,
    one attacker's failures locked every operator out (and an operator's login reset the attacker's
    count). Behind the router (``$DYNO`` set) the limit is per client, and a client cannot leave it by
    sending X-Forwarded-For entries of its own, in one header or several."""
    web = start_process("gunicorn", console_settings, env={"DYNO": "web.1"})
    attacker, operator = "203.0.113.9", "198.51.100.7"
    for attempt in range(10):
        forged = [[], [f"10.0.0.{attempt}"], [f"10.0.1.{attempt}", f"10.0.2.{attempt}"]][attempt % 3]
        assert log_in_through_router(web, attacker, "wrong password!", forged) == 401
    for forged in ([], ["10.0.0.99"], ["10.0.1.99", "10.0.2.99"], [operator], ["10.0.3.1", operator]):
        assert log_in_through_router(web, attacker, PASSWORD, forged) == 429  # even with the right password
    # nor by naming itself in the header the web process passes the client on in, also at a path spelled
    # percent-encoded: the hook saw gunicorn's raw path and skipped it, the console the decoded one
    for path in ("/console/login", "/%63onsole/login", "/console%2Flogin"):
        assert log_in_through_router(web, attacker, PASSWORD, path=path, X_L2U_Router_Client="10.0.4.1") == 429
    assert log_in_through_router(web, operator) == 302  # another client behind the same router
    assert "203.0.113.9" in web.output()  # the audit names the client, not the router


def test_the_router_client_hook_passes_on_only_what_the_router_appended(monkeypatch):
    headers = [("HOST", "relay"), ("X-FORWARDED-FOR", "10.0.0.1, 203.0.113.9"), ("X-FORWARDED-FOR", "10.0.0.2"),
               ("X-L2U-ROUTER-CLIENT", "10.0.0.3"), ("X_L2U_ROUTER_CLIENT", "10.0.0.4")]
    passed = dict(pass_router_client(headers, behind=True))
    assert passed["X-L2U-ROUTER-CLIENT"] == "203.0.113.9, 10.0.0.2" and "X_L2U_ROUTER_CLIENT" not in passed
    assert "X-L2U-ROUTER-CLIENT" not in dict(pass_router_client(headers, behind=False))  # not on a dyno
    assert dict(pass_router_client([("X-FORWARDED-FOR", "not an address")], behind=True)) == {
        "X-FORWARDED-FOR": "not an address"}
    monkeypatch.setenv("DYNO", "web.1")
    assert router_clients("/console/login", {"X-L2U-Router-Client": "203.0.113.9"}) == ["203.0.113.9"]
    # Webhooks skip the hook, so a client's own header there is never trusted
    assert router_clients("/webhooks/locate2u/stop.created/t", {"X-L2U-Router-Client": "10.0.0.3"}) == []
    assert console_request("/%63onsole/login") and console_request("/console%2Flogin")  # as Flask decodes it


def test_an_ipv6_client_cannot_leave_the_login_limit_by_changing_addresses_within_its_network(app):
    """One IPv6 client is given a /64 network: 2**64 addresses to try passwords from, ten each. Attempts
    count per /64; another network, and any IPv4 address, keep their own count."""
    client = app.test_client()

    def log_in_from(address, password="wrong password!"):
        token = csrf_from(client.get("/console/login", environ_base={"REMOTE_ADDR": address}))
        return client.post("/console/login", data={"csrf_token": token, "name": "admin", "password": password},
                           environ_base={"REMOTE_ADDR": address}).status_code

    for host in range(10):
        assert log_in_from(f"2001:db8:1:2:{host:x}::1") == 401
    assert log_in_from("2001:db8:1:2:ffff:ffff:ffff:ffff", PASSWORD) == 429  # the same /64
    assert log_in_from("2001:db8:1:3::1", PASSWORD) == 302  # the next network
    assert log_in_from("192.0.2.1", PASSWORD) == 302
    for _ in range(9):
        log_in_from("192.0.2.7")
    assert log_in_from("192.0.2.7", PASSWORD) == 302  # a login resets its address's count
    assert [log_in_from("192.0.2.7") for _ in range(10)] == [401] * 10


def test_operators_with_password_hashes(settings):
    operators = (f"alice:{generate_password_hash('alice-password-1')}",
                 f"bob:{generate_password_hash('bob-password-22', method='pbkdf2:sha256')}")
    app = create_app(settings.replace(console_operators=operators))
    assert log_in(app.test_client(), "alice", "alice-password-1").status_code == 302
    assert log_in(app.test_client(), "bob", "bob-password-22").status_code == 302
    assert log_in(app.test_client(), "bob", "alice-password-1").status_code == 401
    assert log_in(app.test_client(), "admin", "alice-password-1").status_code == 401  # no shared password set


def test_bad_or_missing_csrf_token_is_refused(client, redis_client):
    seed_dead_letter(redis_client, "d-1")
    for data in ({"choice": "purge:all"}, {"choice": "purge:all", "csrf_token": "forged"}):
        response = client.post("/console/dead-letters/apply", data=data)
        assert response.status_code == 400 and "Form expired" in response.text
    assert DeadLetterStore(redis_client).get("d-1:storepoint") is not None
    assert client.post("/console/logout").status_code == 400  # logout is a form too


def test_console_settings_are_validated():
    base = {"RELAY_WEBHOOK_SECRET": "w" * 20}
    with pytest.raises(ConfigError) as error:
        Settings.from_env({**base, "RELAY_CONSOLE_PASSWORD": "short",
                           "RELAY_CONSOLE_OPERATORS": "alice:plaintext-password",
                           "RELAY_CONSOLE_SESSION_MINUTES": "2", "RELAY_CONSOLE_SECRET_KEY": "tiny"})
    assert set(error.value.problems) == {"RELAY_CONSOLE_PASSWORD", "RELAY_CONSOLE_OPERATORS",
                                         "RELAY_CONSOLE_SESSION_MINUTES", "RELAY_CONSOLE_SECRET_KEY"}
    assert "generate_password_hash" in error.value.problems["RELAY_CONSOLE_OPERATORS"]
    assert "plaintext-password" not in str(error.value)
    good = Settings.from_env({**base, "RELAY_CONSOLE_OPERATORS": f"alice:{generate_password_hash('x' * 12)}"})
    assert good.console_enabled and not Settings.from_env(base).console_enabled


def test_session_key_is_derived_for_the_console_only(settings):
    derived = session_key(settings)
    assert derived != settings.webhook_secret and settings.webhook_secret not in derived
    assert session_key(settings.replace(console_secret_key="k" * 40)) == "k" * 40


# ------------------------------------------------------------------ pages

def test_overview_shows_activity_queues_breakers_and_counts(console_settings, redis_client):
    client = create_app(console_settings.replace(storepoint_api_token=SP_TOKEN)).test_client()
    log_in(client)
    now = time.time()
    redis_client.hset("l2u:breaker:storepoint", mapping={"state": "open", "open_until": now + 20, "failures": 5})
    for i in range(3):
        ledger = seed_delivery(redis_client, f"o-{i}", status_change(1, "Arrived", "2022-04-27T05:00:00+00:00"),
                               now - 600)
    for i in range(2):
        ledger.start_fan_out(f"o-{i}", ["storepoint"])
        ledger.sink_outcome(f"o-{i}", "storepoint", "applied", attempts=1)
    assert ledger.compact(grace=0) == 2  # settled ones leave the full entries; still counted
    seed_dead_letter(redis_client, "d-1")
    Quarantine(redis_client).add("stop.assigned", "{}", "schema validation failed", {"stopId": ["required"]})
    page = client.get("/console/")
    assert page.status_code == 200
    assert page.text.count("<rect") >= 12 and "received: 3 from" in page.text and "storepoint: 2 from" in page.text
    assert re.search(r"<th>quarantined</th><td><a [^>]+>1</a>", page.text)
    assert re.search(r"<th>dead letters</th><td><a [^>]+>1</a>", page.text)
    assert "Redis memory" in page.text and "MiB" in page.text
    assert "not configured (LOCATE2U_CLIENT_ID)" in page.text
    assert re.search(r'<td class="bad">open since [^<]+ UTC, probe after [^<]+ UTC \(5 failure\(s\) counted\)</td>',
                     page.text)


def test_overview_names_the_forward_urls_paused_on_their_own(console_settings, redis_client):
    """A forward URL paused on its own leaves the forward's breaker closed: the overview said "closed"."""
    urls = ("https://hooks.example.com/orders?token=t0ken", "https://other.example.com/hook")
    settings = console_settings.replace(forward_urls=urls, forward_secret=(FORWARD_SECRET,))
    client = create_app(settings).test_client()
    log_in(client)
    for _ in range(ENDPOINT_FAILURES):
        ForwardSink.from_settings(settings, MappingStore(redis_client, "forward")).endpoints[urls[0]].failure()
    page = client.get("/console/")
    assert ('<td class="bad">closed<br>paused: https://hooks.example.com/orders?[redacted] (failed in a row; tried again '
            'every 3 s)</td>') in page.text
    assert "t0ken" not in page.text and "paused: https://other" not in page.text


def test_a_page_without_redis_says_so(app, client):
    app.extensions["l2u.console_runtime"].redis = connect(f"redis://127.0.0.1:{free_port()}/0")
    page = client.get("/console/")
    assert page.status_code == 503 and "Redis cannot be reached (ConnectionError)" in page.text


def test_deliveries_search_filters_and_pages_newest_first(client, redis_client):
    now = time.time()
    for i in range(30):
        body = status_change(1000 + i % 3, "Arrived", f"2022-04-27T05:{i:02d}:00+00:00")
        body["stopRef"] = f"REF-{1000 + i % 3}"
        seed_delivery(redis_client, f"s-{i:02d}", body, now - 3000 + i * 60, status="applied" if i % 2 else None)
    seed_delivery(redis_client, "trip-1", {"tripId": 7, "actionDate": "2022-04-27T05:00:00+00:00"}, now - 10,
                  event_type="trip.created")

    def ids(text):
        return re.findall(r'/console/deliveries/([\w-]+)"', text)

    first = client.get("/console/deliveries")
    assert ids(first.text)[:3] == ["trip-1", "s-29", "s-28"] and len(ids(first.text)) == 25
    assert "older »" in first.text
    second = client.get("/console/deliveries?page=2")
    assert ids(second.text) == [f"s-{i:02d}" for i in range(5, -1, -1)] and "older »" not in second.text
    assert ids(client.get("/console/deliveries?stop=1001").text) == [f"s-{i:02d}" for i in range(28, 0, -3)]
    assert ids(client.get("/console/deliveries?stop=REF-1002").text) == [f"s-{i:02d}" for i in range(29, 0, -3)]
    seed_delivery(redis_client, "s-new", status_change(1001, "Complete", "2022-04-27T07:00:00+00:00"), now - 5)
    assert ids(client.get("/console/deliveries?stop=1001").text)[:2] == ["s-new", "s-28"]  # indexed since
    assert ids(client.get("/console/deliveries?event_type=trip.created").text) == ["trip-1"]
    assert ids(client.get("/console/deliveries?delivery_id=s-07").text) == ["s-07"]
    assert all(int(i[2:]) % 2 for i in ids(client.get("/console/deliveries?status=applied").text))
    assert ids(client.get("/console/deliveries?status=received&stop=1000").text) == [
        f"s-{i:02d}" for i in range(24, -1, -6)]
    recent = ids(client.get("/console/deliveries?since=1470s").text)
    assert recent == ["s-new", "trip-1", "s-29", "s-28", "s-27", "s-26"]
    bad = client.get("/console/deliveries?until=yesterday")
    assert bad.status_code == 400 and "until: use an ISO date/time" in bad.text


def test_deliveries_full_and_compacted_are_listed_newest_first_together(client, redis_client):
    now = time.time()
    old = seed_dead_letter(redis_client, "old-dead-letter")["delivery_id"]  # keeps its full entry
    redis_client.zadd(Ledger.ALL, {old: now - 7200})
    redis_client.hset(Ledger.key(old), "received_at", repr(now - 7200))
    for i, age in enumerate((300, 100)):
        ledger = seed_delivery(redis_client, f"settled-{i}", status_change(5, "Arrived", "2022-04-27T05:00:00+00:00"),
                               now - age)
        ledger.start_fan_out(f"settled-{i}", ["storepoint"])
        ledger.sink_outcome(f"settled-{i}", "storepoint", "applied", attempts=1)
    assert ledger.compact(grace=0) == 2
    page = client.get("/console/deliveries").text
    assert re.findall(r'/console/deliveries/([\w-]+)"', page) == ["settled-1", "settled-0", "old-dead-letter"]


def test_delivery_page_shows_the_whole_trace(client, redis_client):
    seed_dead_letter(redis_client, "d-1")
    ledger = Ledger(redis_client)
    ledger.trace("d-1", "routed", sinks=["storepoint"])
    ledger.trace("d-1", "retry", sink="storepoint", error="HTTP 503 from storepoint: busy", status=503, delay=5)
    ledger.trace("d-1", "dead-lettered", sink="storepoint", reason="validation_error: Invalid (name: taken)")
    page = client.get("/console/deliveries/d-1")
    assert page.status_code == 200
    for text in ("received", "routed", "retry", "HTTP 503 from storepoint: busy", "status=503", "dead-lettered",
                 "dead_lettered", "&#34;stopId&#34;: 164557"):
        assert text in page.text, text
    assert client.get("/console/deliveries/missing").status_code == 404


def test_dead_letters_filter_show_confirm_replay_and_results(app, client, redis_client, caplog):
    seed_dead_letter(redis_client, "d-1")
    seed_dead_letter(redis_client, "d-2", sink="b2b", reason="Parameter city is required")
    seed_dead_letter(redis_client, "d-3", event_type="stop.assigned")
    listing = client.get("/console/dead-letters?sink=storepoint")
    assert "d-1:storepoint" in listing.text and "d-3:storepoint" in listing.text and "d-2:b2b" not in listing.text
    assert "2 dead letter(s) match" in client.get("/console/dead-letters?reason=INVALID").text
    assert "1 dead letter(s) match" in client.get("/console/dead-letters?event_type=stop.assigned").text
    shown = client.get("/console/dead-letters/d-2:b2b")
    assert shown.status_code == 200 and "Parameter city is required" in shown.text

    confirm = post_form(client, "/console/dead-letters/confirm", "/console/dead-letters?sink=storepoint",
                        choice="replay:all", sink="storepoint")
    assert "Replay 2 dead letters?" in confirm.text
    assert DeadLetterStore(redis_client).get("d-1:storepoint")["reason"]  # nothing done before confirming
    before = counter("l2u_console_action_items_total", "replay_dead_letters")
    done = client.post("/console/dead-letters/apply", data=hidden_fields(confirm.text))
    assert done.status_code == 302 and done.headers["Location"].startswith("/console/replays/")
    assert redis_client.llen("control") == 1 and redis_client.llen("deliver") == 0  # a replay task for the workers
    assert counter("l2u_console_action_items_total", "replay_dead_letters") == before + 2
    [record] = [record for record in caplog.records if getattr(record, "console_action", "") == "replay_dead_letters"]
    assert (record.operator, record.count) == ("admin", 2)

    results = done.headers["Location"]
    assert "0 of 2 replayed so far" in client.get(results).text
    batch = results.rpartition("/")[2]
    assert replay.replay_batch(app.extensions["l2u.console_runtime"], batch) == 2  # the task's work
    assert redis_client.llen("deliver") == 2  # two deliver tasks queued
    assert "2 of 2 replayed." in client.get(results).text and "queued: 2" in client.get(results).text
    ledger = Ledger(redis_client)
    ledger.sink_outcome("d-1", "storepoint", "applied", attempts=1)  # what the worker does next
    DeadLetterStore(redis_client).remove("d-1:storepoint")
    ledger.sink_outcome("d-3", "storepoint", "dead_lettered", attempts=1, reason="still invalid")
    DeadLetterStore(redis_client).add("d-3", "storepoint", "still invalid", stage="deliver")
    page = client.get(results).text
    assert "applied: 1" in page and "refused again: 1" in page and "still invalid" in page


@pytest.mark.parametrize("behind", [0, 60], ids=["same-clock", "worker-clock-a-minute-behind"])
def test_purge_all_removes_the_dead_letters_confirmed_not_those_that_came_after(client, redis_client, monkeypatch,
                                                                               behind):
    """During an outage letters keep arriving. An operator who confirmed "Purge 2 dead letters?" must
    not lose, for good, a third that matched the filter only after the confirmation page was shown.
    Letters were stamped by the recording worker's clock: one recorded by a worker whose clock is
    behind looked older than those confirmed, and was purged unseen."""
    seed_dead_letter(redis_client, "d-1")
    seed_dead_letter(redis_client, "d-2")
    confirm = post_form(client, "/console/dead-letters/confirm", "/console/dead-letters?sink=storepoint",
                        choice="purge:all", sink="storepoint")
    assert "Purge 2 dead letters?" in confirm.text
    clock = time.time
    monkeypatch.setattr("workers.store.dead_letters.time", SimpleNamespace(time=lambda: clock() - behind))
    seed_dead_letter(redis_client, "d-3")  # arrives while the operator reads the page
    done = client.post("/console/dead-letters/apply", data=hidden_fields(confirm.text))
    assert done.status_code == 302
    assert "Purged 2 dead letter(s)." in client.get(done.headers["Location"]).text
    assert [entry["id"] for entry in DeadLetterStore(redis_client).list()] == ["d-3:storepoint"]
    unconfirmed = post_form(client, "/console/dead-letters/apply", "/console/dead-letters", choice="purge:all")
    assert unconfirmed.status_code == 400 and "confirmed_until" in unconfirmed.text  # only from its confirmation
    assert DeadLetterStore(redis_client).get("d-3:storepoint")


def test_replay_one_and_purge_selected_dead_letters(app, client, redis_client):
    seed_dead_letter(redis_client, "d-1")
    seed_dead_letter(redis_client, "d-2", sink="b2b")
    seed_dead_letter(redis_client, "d-3", sink="b2b")
    one = post_form(client, "/console/dead-letters/confirm", "/console/dead-letters/d-1:storepoint",
                    choice="replay:selected", id="d-1:storepoint")
    assert "Replay 1 dead letter?" in one.text
    done = post_form(client, "/console/dead-letters/apply", "/console/dead-letters", choice="replay:selected",
                     id="d-1:storepoint")
    assert replay.replay_batch(app.extensions["l2u.console_runtime"], done.headers["Location"].rpartition("/")[2]) == 1
    assert Ledger(redis_client).get("d-1")["sinks"]["storepoint"]["state"] == "pending"
    assert redis_client.llen("deliver") == 1

    purge = post_form(client, "/console/dead-letters/apply", "/console/dead-letters", choice="purge:selected",
                      id=["d-2:b2b", "d-3:b2b"])
    assert purge.status_code == 302
    assert "Purged 2 dead letter(s)." in client.get(purge.headers["Location"]).text
    assert [entry["id"] for entry in DeadLetterStore(redis_client).list()] == ["d-1:storepoint"]
    nothing = post_form(client, "/console/dead-letters/confirm", "/console/dead-letters", choice="purge:selected")
    assert nothing.status_code == 400 and "tick at least one" in nothing.text
    assert post_form(client, "/console/dead-letters/apply", "/console/dead-letters",
                     choice="explode:all").status_code == 400


def test_replaying_all_of_many_dead_letters_answers_at_once_and_the_workers_replay_them(
        console_settings, redis_client, start_process):
    """An operator's "replay all" after a long outage: 8,000 dead letters. Replayed in the request (~1 ms
    each) it outlives the web worker's timeout (30 s in production, and Heroku's router's 30 s; 3 s
    here, so that 8,000 stand for the 40,000 that would) and the worker is killed mid-way. The
    request only hands the batch to the workers; a worker replays it and the results page follows."""
    for number in range(8000):
        seed_dead_letter(redis_client, f"d-{number}")
    web = start_process("gunicorn", console_settings, env={"GUNICORN_CMD_ARGS": "--timeout 3"})
    browser = requests.Session()
    login_page = browser.get(f"{web.url}/console/login")
    browser.post(f"{web.url}/console/login", data={"csrf_token": csrf_from(login_page), "name": "admin",
                                                   "password": PASSWORD})
    confirm = browser.post(f"{web.url}/console/dead-letters/confirm", data={
        "csrf_token": csrf_from(browser.get(f"{web.url}/console/dead-letters")), "choice": "replay:all"})
    assert "Replay 8000 dead letters?" in confirm.text
    done = browser.post(f"{web.url}/console/dead-letters/apply", data=hidden_fields(confirm.text), timeout=60)
    assert done.status_code == 200 and "/console/replays/" in done.url, done.text[:500]
    assert "0 of 8000 replayed" in done.text
    assert redis_client.llen("deliver") == 0  # nothing replayed in the request

    start_process("worker", console_settings, queues="control")  # deliver messages stay queued, to count
    wait_for(lambda: "8000 of 8000 replayed" in browser.get(done.url).text, timeout=120)  # the workers finish
    assert redis_client.llen("deliver") == 8000
    assert Ledger(redis_client).get("d-7999")["sinks"]["storepoint"]["state"] == "pending"
    page = browser.get(done.url).text
    assert "queued: 5000" in page and "outcomes counted over the first 5000, the first 500 listed" in page


def test_a_replay_batch_cut_short_goes_on_from_its_last_chunk_when_run_again(app, redis_client):
    """The replay task redelivered after its worker was killed mid-way (SIGKILL in its fourth replay,
    in the second chunk) replays what was left, and again at most the chunk it was in; a dead letter
    purged meanwhile is skipped."""
    rt = app.extensions["l2u.console_runtime"]
    ids = [seed_dead_letter(redis_client, f"d-{number}")["id"] for number in range(7)]
    batch = replay.start_batch(rt, ids)
    DeadLetterStore(redis_client).remove(ids[5])  # purged before the workers reach it
    kill_when_reached(lambda: replay.replay_batch(rt, batch, chunk=2), [(replay, "replay_dead_letter")], passed=3)
    assert replay.batch_progress(rt, batch) == (2, 7)  # the first chunk recorded, the second cut short
    assert replay.replay_batch(rt, batch, chunk=2) == 4  # d-2 again, d-3, d-4, d-6
    assert replay.batch_progress(rt, batch) == (7, 7)
    assert redis_client.llen("deliver") == 3 + 4
    assert replay.replay_batch(rt, batch, chunk=2) == 0  # a third run finds nothing left


def test_a_long_replay_batch_hands_its_rest_on_instead_of_outliving_the_visibility_timeout(app, redis_client):
    """A task still running past the broker's visibility timeout (240 s by default) is handed to a
    second worker while the first goes on, and both replay the same letters. A run stops after its
    time budget (a quarter of that timeout; none here) and queues a task for the rest."""
    rt = app.extensions["l2u.console_runtime"]
    ids = [seed_dead_letter(redis_client, f"d-{number}")["id"] for number in range(5)]
    batch = replay.start_batch(rt, ids)
    redis_client.delete("control")  # the task start_batch queued: this test runs it
    assert replay.replay_batch(rt, batch, chunk=2, budget=0) == 2
    assert replay.batch_progress(rt, batch) == (2, 5) and redis_client.llen("control") == 1  # the rest
    assert replay.replay_batch(rt, batch, chunk=2, budget=0) == 2
    assert replay.replay_batch(rt, batch, chunk=2, budget=0) == 1
    assert replay.batch_progress(rt, batch) == (5, 5) and redis_client.llen("control") == 2  # none after the last
    assert 0 < redis_client.ttl(keys.replay_batch(batch)) <= 86400  # the results page is kept for a day
    assert 0 < redis_client.ttl(keys.replay_batch_progress(batch)) <= 86400
    assert redis_client.llen("deliver") == 5


def test_the_dead_letter_pages_hold_a_page_of_letters_however_many_match(client, redis_client):
    """After a long outage (``RELAY_DEAD_LETTER_LIMIT`` may be a million), the dead-letter list and its
    "all matching" actions must not parse every letter at once in a web worker: its memory would
    grow with the letters (realistic ones: +67 MB of RSS per 10,000) until the dyno is killed.
    Python's own allocation count (tracemalloc) is exact, not a timing: the peak while serving 6,000
    letters stays within twice that of 1,500."""
    body = json.dumps({**status_change(164557, "Arrived", "2022-04-27T05:00:00+00:00"), "notes": "n" * 1500})

    def peak_serving(count):
        seed_dead_letters_up_to(redis_client, count, body)
        return peak_allocated(lambda: (client.get("/console/dead-letters").text, post_form(
            client, "/console/dead-letters/confirm", "/console/dead-letters", choice="purge:all").text))

    small, _ = peak_serving(1500)
    large, (page, confirm) = peak_serving(6000)
    assert "6000 dead letter(s) match" in page and "Purge 6000 dead letters?" in confirm
    assert page.count('name="id"') == 500 and "d-5999:storepoint" in page and "d-0:storepoint" not in page
    assert large < 2 * small, (small, large)


def test_a_purge_drops_five_hundred_dead_letters_per_redis_call(app, redis_client, monkeypatch):
    rt = app.extensions["l2u.console_runtime"]
    seed_dead_letters_up_to(redis_client, 1200, "{}")
    ids = [entry["id"] for entry in DeadLetterStore(redis_client).list()]
    rt.dead_letters.remove("none:storepoint")  # the script loaded, so only its calls are counted
    scripts, send = [], redis.connection.AbstractConnection.send_packed_command

    def counted(connection, command, check_health=True):
        scripts.extend(b"EVALSHA" in bytes(part)[:40] for part in (command if isinstance(command, list) else [command]))
        return send(connection, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    assert operations.purge_dead_letters(rt, ids) == 1200
    assert sum(scripts) == 3 and DeadLetterStore(redis_client).list() == []


def test_a_replay_batch_whose_task_the_broker_lost_is_sent_again_by_the_sweeper(app, redis_client):
    """A broker can lose the replay task (RabbitMQ restarted before persisting it, a Redis failover).
    The dead letters stay in the store, but the operator's replay would wait forever: the sweeper
    sends the task again once the batch made no progress for the visibility timeout plus
    ``RELAY_SWEEP_AFTER``, and forgets the batch once it is done."""
    rt = app.extensions["l2u.console_runtime"]
    ids = [seed_dead_letter(redis_client, f"d-{number}")["id"] for number in range(3)]
    batch = replay.start_batch(rt, ids)
    redis_client.delete("control")  # lost
    stalled_at = time.time() + rt.settings.visibility_timeout + rt.settings.sweep_after
    assert replay.resend_stalled(rt, now=stalled_at - 1) == 0  # it may still be queued or running
    assert replay.resend_stalled(rt, now=stalled_at + 1) == 1 and redis_client.llen("control") == 1
    assert replay.replay_batch(rt, batch) == 3
    assert replay.resend_stalled(rt, now=stalled_at + 86400) == 0 and redis_client.llen("control") == 1


def test_the_replay_results_of_a_large_batch_read_a_bounded_number_of_outcomes(app, redis_client):
    """A batch of a million letters must not read a million outcomes (~0.13 ms each) per page view:
    the outcomes are counted over the first ``counted`` letters gone through, and the page says so."""
    rt = app.extensions["l2u.console_runtime"]
    ids = [seed_dead_letter(redis_client, f"d-{number}")["id"] for number in range(6)]
    batch = replay.start_batch(rt, ids)
    replay.replay_batch(rt, batch)
    done, total, totals, results = operations.replay_results(rt, batch, rows=2, counted=4)
    assert (done, total, totals, [entry_id for entry_id, _, _ in results]) == (
        6, 6, {"queued": 4}, ["d-0:storepoint", "d-1:storepoint"])


def test_quarantine_list_view_and_purge(client, redis_client):
    quarantine = Quarantine(redis_client)
    quarantine.add("stop.assigned", '{"stopId": "x"}', "schema validation failed", {"stopId": ["Not a valid integer."]})
    quarantine.add("trip.created", '{"tripId": 1}', "schema validation failed", {"actionDate": ["required"]})
    quarantine.add("note.created", "{}", "schema validation failed", {"stopId": ["one of stopId"]})
    listing = client.get("/console/quarantine")
    item_ids = re.findall(r"/console/quarantine/([0-9a-f]{16})", listing.text)
    assert len(item_ids) == 3 and "3 kept" in listing.text
    item = client.get(f"/console/quarantine/{item_ids[-1]}")
    assert "Not a valid integer." in item.text and "&#34;stopId&#34;: &#34;x&#34;" in item.text
    confirm = post_form(client, "/console/quarantine/confirm", "/console/quarantine", scope="selected",
                        id=item_ids[-1])
    assert "Purge 1 quarantined delivery?" in confirm.text
    purged = client.post("/console/quarantine/apply", data=hidden_fields(confirm.text))  # its "Yes" button
    assert purged.status_code == 302, purged.text  # (the confirmation's form was refused with 400 before)
    assert redis_client.llen(Quarantine.KEY) == 2
    assert client.get(f"/console/quarantine/{item_ids[-1]}").status_code == 404
    confirm = post_form(client, "/console/quarantine/confirm", "/console/quarantine", scope="all")
    assert "Purge 2 quarantined deliveries?" in confirm.text
    quarantine.add("stop.created", "{}", "schema validation failed", {"stopId": ["required"]})  # meanwhile
    unconfirmed = post_form(client, "/console/quarantine/apply", "/console/quarantine", scope="all")
    assert unconfirmed.status_code == 400 and "confirmed_newest" in unconfirmed.text
    client.post("/console/quarantine/apply", data=hidden_fields(confirm.text))
    assert [json.loads(raw)["event_type"] for raw in redis_client.lrange(Quarantine.KEY, 0, -1)] == [
        "stop.created"]  # the two counted are gone; the one that came after the count is kept
    confirm = post_form(client, "/console/quarantine/confirm", "/console/quarantine", scope="all")
    redis_client.delete(Quarantine.KEY)  # the newest counted goes (purged elsewhere) before the answer
    quarantine.add("trip.created", "{}", "schema validation failed", {"tripId": ["required"]})
    changed = client.post("/console/quarantine/apply", data=hidden_fields(confirm.text), follow_redirects=True)
    assert "nothing was purged" in changed.text and redis_client.llen(Quarantine.KEY) == 1


def test_stop_page_orders_events_and_shows_drift_read_live(console_settings, redis_client):
    state = storepoint.StorepointState(token=SP_TOKEN)
    with SimulatorServer(storepoint.create_app(state)) as server:
        settings = console_settings.replace(storepoint_api_url=server.url, storepoint_api_token=SP_TOKEN)
        client = create_app(settings).test_client()
        log_in(client)
        key = "l2u-stop-77"
        later = status_change(77, "Complete", "2022-04-27T06:00:00+00:00")
        earlier = status_change(77, "Arrived", "2022-04-27T05:00:00+00:00")
        ledger = seed_delivery(redis_client, "late", later, time.time() - 100)  # received first, happened later
        seed_delivery(redis_client, "early", earlier, time.time() - 50)
        sink = StorepointSink.from_settings(settings, MappingStore(redis_client, "storepoint"))
        location = Location(key=key, version="2022-04-27T06:00:00+00:00", status="Complete", name="Depot",
                            address="1 Main St", latitude=-33.87, longitude=151.19)
        remote_id = sink.apply("upsert", location, {"require_coordinates": True})
        ledger.start_fan_out("late", ["storepoint"])
        ledger.sink_outcome("late", "storepoint", "applied", attempts=1, remote_id=remote_id)
        ledger.trace("late", "applied", sink="storepoint", action="upsert", key=key)
        redis_client.hset("l2u:version:storepoint", key, repr(1651039200.0))

        page = client.get("/console/stops/77").text
        assert page.index("2022-04-27T05:00:00+00:00") < page.index("2022-04-27T06:00:00+00:00")
        assert remote_id in page and "in step" in page and "drift" not in page.split("What each sink")[1]

        state.locations[remote_id]["name"] = "Renamed by hand"
        page = client.get("/console/stops/77").text
        assert 'id="drift-storepoint"' in page and "drift: 1 field(s)" in page
        assert re.search(r'<tr class="drift"><td>name</td><td>Depot</td>\s*<td>Renamed by hand</td>', page)
        assert "version applied: 2022-04-27T06:00:00+00:00" in page
        assert client.get("/console/stops?stop=77").headers["Location"] == "/console/stops/77"


# ------------------------------------------------------------------ l2u-relay run

def test_run_turns_the_console_on_with_a_generated_password(tmp_path):
    port, data_dir = free_port(), tmp_path / "data"
    stack = Process("l2u-relay-run", [str(BIN / "l2u-relay"), "run", "--port", str(port), "--data-dir",
                                      str(data_dir)], demo_env())
    try:
        stack.wait_for_output("generated for this run", timeout=120)
        line = next(line for line in stack.output().splitlines() if line.startswith("console: "))
        url, password = re.fullmatch(r"console: (\S+)  name admin, password (\S+) \(generated for this run\)",
                                     line).groups()
        assert url == f"http://127.0.0.1:{port}/console/"
        stack.wait_for_output("the stack keeps running", timeout=240)
        browser = requests.Session()
        token = csrf_from(browser.get(url + "login", timeout=10))
        answer = browser.post(url + "login", data={"csrf_token": token, "name": "admin", "password": password},
                              timeout=10)
        assert answer.status_code == 200 and "<h1>Overview</h1>" in answer.text
        assert password not in (data_dir / "stack.json").read_text()
        assert password not in (data_dir / "demo.log").read_text()
    finally:
        stack.stop()
    assert password not in stack.output().replace(line, "")  # printed once, at start-up, nowhere else
