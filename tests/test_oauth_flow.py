"""The code flow is the operator's: a signed start link, a state bound to the starting browser, PKCE S256,
and no silent switch to another Locate2u account (real Redis, the Locate2u simulator, Flask's test client)."""
import time
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from click.testing import CliRunner
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from receiver import create_app
from tests.fixtures import PUBLIC_URL
from workers.ops.cli import main
from workers.locate2u.client import Locate2uClient
from workers.locate2u.oauth_links import LINK_TTL, StartLinks
from workers.locate2u.token_store import ACCOUNT_KEY
from workers.ops.simulators.locate2u import USER, s256

OTHER_USER = {"userId": 999, "email": "intruder@example.com", "teamId": 4242, "teamName": "Someone Else"}


@pytest.fixture
def app(code_settings):
    return create_app(code_settings)


def operator_link(settings, redis_client):
    """What ``l2u-relay oauth url`` prints, as a path on the receiver."""
    output = cli(settings, "oauth", "url")
    assert output.exit_code == 0, output.output
    url = urlsplit(output.stdout.strip())
    assert f"{url.scheme}://{url.netloc}" == settings.public_url
    return f"{url.path}?{url.query}"


def cli(settings, *args):
    return CliRunner().invoke(main, list(args), env=settings.to_env(), catch_exceptions=False)


def consent(browser, path):
    """The browser opens the operator's link and the simulated user approves: the callback's path and query."""
    start = browser.get(path)
    assert start.status_code == 302, start.get_json()
    approved = requests.get(start.headers["Location"], allow_redirects=False, timeout=5)
    callback = urlsplit(approved.headers["Location"])
    assert f"{callback.scheme}://{callback.netloc}{callback.path}" == PUBLIC_URL + "/oauth/locate2u/callback"
    return f"{callback.path}?{callback.query}"


def stored_user(settings, redis_client):
    return Locate2uClient.from_settings(settings, redis_client).whoami()


# --- starting needs the operator ----------------------------------------------------------------------

def expired_link(settings):
    class Past(TimestampSigner):
        def get_timestamp(self):
            return int(time.time()) - LINK_TTL - 5

    return URLSafeTimedSerializer(settings.webhook_secret, salt=StartLinks.SALT, signer=Past).dumps({"nonce": "n"})


@pytest.mark.parametrize("query, error", [
    ("", "invalid_link"),
    ("?link=", "invalid_link"),
    ("?link=eyJub25jZSI6Im4ifQ.Zz0AAA.forged-signature", "invalid_link"),
    ("?link=EXPIRED", "expired_link"),
    ("?link=OTHER_SECRET", "invalid_link"),
], ids=["no link", "empty", "forged", "expired", "signed with another secret"])
def test_an_unauthenticated_start_is_refused_and_writes_nothing(app, code_settings, redis_client, query, error):
    query = query.replace("EXPIRED", expired_link(code_settings)).replace(
        "OTHER_SECRET", StartLinks(redis_client, code_settings.replace(webhook_secret="x" * 32)).make())
    for _ in range(50):
        response = app.test_client().get("/oauth/locate2u/start" + query)
        assert response.status_code == 403 and response.get_json()["error"] == error
        assert "Set-Cookie" not in response.headers
    assert redis_client.dbsize() == 0


def test_the_operator_link_works_once(app, code_settings, redis_client):
    path = operator_link(code_settings, redis_client)
    assert app.test_client().get(path).status_code == 302
    again = app.test_client().get(path)
    assert again.status_code == 403 and again.get_json()["error"] == "used_link"


def test_without_the_code_grant_there_are_no_oauth_routes(sim, settings, redis_client):
    client = create_app(sim.configure(settings, public_url=PUBLIC_URL)).test_client()  # client_credentials
    for _ in range(50):
        for path in ("/oauth/locate2u/start", "/oauth/locate2u/callback?state=s&code=c"):
            response = client.get(path)
            assert response.status_code == 404 and response.get_json()["error"] == "not_found"
    assert redis_client.dbsize() == 0


def test_the_state_cookie_is_httponly_lax_and_secure_behind_https(app, code_settings, redis_client):
    start = app.test_client().get(operator_link(code_settings, redis_client))
    [header] = start.headers.getlist("Set-Cookie")
    cookie = SimpleCookie(header)["l2u_oauth_browser"]
    assert cookie["httponly"] and cookie["secure"] and cookie["samesite"] == "Lax"
    assert cookie["path"] == "/oauth/locate2u/" and int(cookie["max-age"]) == 600
    plain_settings = code_settings.replace(public_url="http://relay.internal")
    start = create_app(plain_settings).test_client().get(operator_link(plain_settings, redis_client))
    assert "Secure" not in start.headers["Set-Cookie"]


# --- the state belongs to the browser that started ----------------------------------------------------

def test_a_callback_with_a_state_from_another_browser_is_refused(app, code_settings, redis_client, sim):
    operator = app.test_client()
    callback = consent(operator, operator_link(code_settings, redis_client))
    attacker = app.test_client()  # no cookie: e.g. the callback URL sent to someone else
    refused = attacker.get(callback)
    assert refused.status_code == 400 and refused.get_json()["error"] == "foreign_browser"
    wrong_cookie = app.test_client()
    wrong_cookie.set_cookie("l2u_oauth_browser", "guessed", path="/oauth/locate2u/")
    assert wrong_cookie.get(callback).get_json()["error"] == "invalid_state"  # the first try spent the state
    assert grants(sim) == []  # the code was never redeemed
    assert Locate2uClient.from_settings(code_settings, redis_client).tokens.store.load() is None


def test_the_starting_browser_completes_the_flow(app, code_settings, redis_client, sim):
    browser = app.test_client()
    done = browser.get(consent(browser, operator_link(code_settings, redis_client)))
    assert done.status_code == 200 and done.get_json()["status"] == "authorized"
    assert "l2u_oauth_browser=;" in done.headers["Set-Cookie"]  # the cookie is cleared
    assert stored_user(code_settings, redis_client) == USER


def grants(sim):
    return [request["grant_type"] for request in sim.state.token_requests]


# --- PKCE ---------------------------------------------------------------------------------------------

def test_the_pkce_verifier_is_sent_and_matches_the_s256_challenge(app, code_settings, redis_client, sim):
    browser = app.test_client()
    start = browser.get(operator_link(code_settings, redis_client))
    authorize = parse_qs(urlsplit(start.headers["Location"]).query)
    assert authorize["code_challenge_method"] == ["S256"]
    approved = requests.get(start.headers["Location"], allow_redirects=False, timeout=5)
    callback = urlsplit(approved.headers["Location"])
    assert browser.get(f"{callback.path}?{callback.query}").status_code == 200
    [request] = sim.state.token_requests
    assert request["grant_type"] == "authorization_code"
    assert s256(request["code_verifier"]) == authorize["code_challenge"][0]
    assert request["code_verifier"] not in redis_client.execute_command("KEYS", "*")


def test_the_simulator_refuses_a_code_without_its_verifier(sim):
    redirect = PUBLIC_URL + "/oauth/locate2u/callback"
    code = sim.state.issue_code(redirect, "integrations-api", "s", challenge=s256("the-verifier"))
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect,
            "client_id": sim.state.client_id, "client_secret": sim.state.client_secret}
    refused = requests.post(sim.url + "/connect/token", data=form, timeout=5)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    code = sim.state.issue_code(redirect, "integrations-api", "s", challenge=s256("the-verifier"))
    wrong = requests.post(sim.url + "/connect/token", data={**form, "code": code, "code_verifier": "other"}, timeout=5)
    assert wrong.json()["error"] == "invalid_grant"
    code = sim.state.issue_code(redirect, "integrations-api", "s", challenge=s256("the-verifier"))
    right = requests.post(sim.url + "/connect/token", data={**form, "code": code, "code_verifier": "the-verifier"},
                          timeout=5)
    assert right.status_code == 200 and right.json()["access_token"]


# --- another Locate2u account -------------------------------------------------------------------------

def test_a_different_account_is_refused_until_the_operator_accepts_it(app, code_settings, redis_client, sim):
    browser = app.test_client()
    assert browser.get(consent(browser, operator_link(code_settings, redis_client))).status_code == 200
    sim.state.user = dict(OTHER_USER)  # someone else approves the next consent
    browser = app.test_client()
    refused = browser.get(consent(browser, operator_link(code_settings, redis_client)))
    assert refused.status_code == 409 and refused.get_json()["error"] == "account_changed"
    assert "l2u-relay oauth accept-account" in refused.get_json()["message"]
    assert stored_user(code_settings, redis_client) == USER  # the relay still acts as the linked account

    accepted = cli(code_settings, "oauth", "accept-account")
    assert accepted.exit_code == 0, accepted.output
    assert "linked intruder@example.com (Someone Else, team 4242) instead of sim.user@example.com" in accepted.stdout
    assert stored_user(code_settings, redis_client) == OTHER_USER
    again = cli(code_settings, "oauth", "accept-account")
    assert again.exit_code == 1 and "no approval from another account is waiting" in again.stderr


def test_the_same_team_relinks_without_confirmation(app, code_settings, redis_client, sim):
    browser = app.test_client()
    assert browser.get(consent(browser, operator_link(code_settings, redis_client))).status_code == 200
    sim.state.user = {**USER, "userId": 777, "email": "colleague@example.com"}  # a colleague, same team
    browser = app.test_client()
    assert browser.get(consent(browser, operator_link(code_settings, redis_client))).status_code == 200
    assert stored_user(code_settings, redis_client)["email"] == "colleague@example.com"


def test_the_cli_direct_flow_checks_the_account_too(code_settings, redis_client, sim):
    def direct_consent():
        url = cli(code_settings, "oauth", "url", "--direct")
        assert url.exit_code == 0 and "l2u-relay oauth exchange 'CALLBACK_URL'" in url.stderr
        assert parse_qs(urlsplit(url.stdout.strip()).query)["code_challenge_method"] == ["S256"]
        return requests.get(url.stdout.strip(), allow_redirects=False, timeout=5).headers["Location"]

    first = cli(code_settings, "oauth", "exchange", direct_consent())
    assert first.exit_code == 0 and "authorised as sim.user@example.com (Simulated Team)" in first.stdout
    sim.state.user = dict(OTHER_USER)
    callback = direct_consent()
    second = cli(code_settings, "oauth", "exchange", callback)
    assert second.exit_code == 1 and "not the linked account" in second.stderr
    assert stored_user(code_settings, redis_client) == USER
    replay = cli(code_settings, "oauth", "exchange", callback)
    assert replay.exit_code == 1 and "the state is unknown, expired or already used" in replay.stderr
    bare = cli(code_settings, "oauth", "exchange", "just-a-code")
    assert bare.exit_code == 2 and "with code= and state=" in bare.stderr


def test_without_a_public_url_start_says_so_and_spends_nothing(code_settings, redis_client):
    link = StartLinks(redis_client, code_settings).make()
    client = create_app(code_settings.replace(public_url=None)).test_client()
    answer = client.get("/oauth/locate2u/start", query_string={"link": link})
    assert answer.status_code == 409 and answer.get_json()["error"] == "code_flow_unavailable"
    assert "RELAY_PUBLIC_URL" in answer.get_json()["message"]
    assert redis_client.dbsize() == 0


def test_tokens_linked_before_accounts_were_recorded_are_protected_too(app, code_settings, redis_client, sim):
    browser = app.test_client()
    assert browser.get(consent(browser, operator_link(code_settings, redis_client))).status_code == 200
    redis_client.delete(ACCOUNT_KEY)  # as stored by a relay before this check existed
    sim.state.user = dict(OTHER_USER)
    browser = app.test_client()
    refused = browser.get(consent(browser, operator_link(code_settings, redis_client)))
    assert refused.status_code == 409 and refused.get_json()["error"] == "account_changed"
    assert stored_user(code_settings, redis_client) == USER
