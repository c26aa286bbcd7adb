"""Tokens: encrypted at rest, renewed ahead of expiry, once for many workers; code grant and refresh."""
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.fixtures import PUBLIC_URL
from workers.locate2u.client import Locate2uClient
from workers.locate2u.linking import link_account
from workers.locate2u.oauth_links import OAuthStates, pkce_pair
from workers.locate2u.token_store import LOCK_KEY, TOKENS_KEY, TokenStore
from workers.locate2u.tokens import REAUTH_HINT, ReauthorizationRequired
from workers.resilience.errors import BadAnswer


@pytest.fixture
def cc_settings(sim, settings):
    return sim.configure(settings)


def grants(sim):
    return [request["grant_type"] for request in sim.state.token_requests]


def consent(client):
    """Play the user: open the authorize URL, approve, read the code off the redirect; link it."""
    verifier, challenge = pkce_pair()
    state = OAuthStates(client.tokens.store.redis).issue(verifier)
    answer = requests.get(client.tokens.authorize_url(state, challenge), allow_redirects=False, timeout=5)
    location = answer.headers["Location"]
    assert location.startswith(PUBLIC_URL + "/oauth/locate2u/callback?")
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == [state]
    return link_account(client, query["code"][0], verifier)


def in_threads(count, target):
    barrier = threading.Barrier(count)
    results, errors = [], []

    def run():
        barrier.wait()
        try:
            results.append(target())
        except Exception as exc:  # collected and asserted on by the test
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return results


def test_tokens_under_the_derived_key_survive_webhook_secret_rotation(settings, redis_client):
    old = TokenStore.from_settings(redis_client, settings.replace(webhook_secret="old-secret-0123456789"))
    old.save({"access_token": "plain-access-token"})
    assert "plain-access-token" not in redis_client.get(TOKENS_KEY)
    new = settings.replace(webhook_secret="new-secret-0123456789")
    assert TokenStore.from_settings(redis_client, new).load() is None
    rotated = TokenStore.from_settings(redis_client, new.replace(webhook_secret_previous="old-secret-0123456789"))
    assert rotated.load() == {"access_token": "plain-access-token"}
    # re-encrypted under the new secret: readable once the old one is retired
    assert TokenStore.from_settings(redis_client, new).load() == {"access_token": "plain-access-token"}


def test_expired_token_is_renewed(sim, cc_settings, redis_client):
    sim.state.token_lifetime = 1
    client = Locate2uClient.from_settings(cc_settings, redis_client)
    first = client.tokens.access_token()
    assert client.tokens.access_token() == first
    time.sleep(1.05)
    assert client.whoami()["userId"] == 12345
    assert client.tokens.access_token() != first and grants(sim) == ["client_credentials"] * 2


def test_a_token_answer_that_is_not_the_apis_is_retriable_and_keeps_no_body(sim, cc_settings, redis_client):
    """A proxy answered the token request 200 with its own page: a PermanentError, so the delivery
    whose stop read needed the token was dead-lettered at once. Now it is retried; the error keeps
    no body (a token answer may hold tokens)."""
    sim.app.config["FAULTS"].fail_after_apply("garbled", path_prefix="/connect/token")
    client = Locate2uClient.from_settings(cc_settings, redis_client)
    with pytest.raises(BadAnswer) as caught:
        client.get_stop(1)
    assert "has no access_token" in caught.value.message and caught.value.body is None
    assert client.whoami()["userId"] == 12345  # the next request gets a token
    assert grants(sim) == ["client_credentials"] * 2


def test_renewed_ahead_of_expiry_without_waiting_for_a_busy_lock(sim, cc_settings, redis_client):
    client = Locate2uClient.from_settings(cc_settings, redis_client)
    first = client.tokens.access_token()
    now = time.time()
    client.tokens.clock = lambda: now + 3600 - 60  # inside the renewal margin, still valid
    lock = redis_client.lock(LOCK_KEY, timeout=10)
    assert lock.acquire(blocking=False)
    assert client.tokens.access_token() == first  # someone else is renewing: keep using it
    lock.release()
    sim.faults.inject(503, times=4, path_prefix="/connect/token")
    client.tokens.identity.retry.sleep = lambda seconds: None
    assert client.tokens.access_token() == first  # the identity server is down: still valid, keep it
    second = client.tokens.access_token()
    assert second != first and grants(sim) == ["client_credentials"] * 2 and sim.faults.injected == 4


def test_many_workers_fetch_one_token(sim, cc_settings, redis_client):
    clients = [Locate2uClient.from_settings(cc_settings, redis_client) for _ in range(8)]
    users = in_threads(8, lambda: clients.pop().whoami())
    assert len(users) == 8 and grants(sim) == ["client_credentials"]


def test_many_workers_after_a_401_renew_once(sim, cc_settings, redis_client):
    Locate2uClient.from_settings(cc_settings, redis_client).whoami()
    sim.state.revoke_access_tokens()
    clients = [Locate2uClient.from_settings(cc_settings, redis_client) for _ in range(6)]
    in_threads(6, lambda: clients.pop().whoami())
    assert grants(sim) == ["client_credentials"] * 2


def test_code_grant_refreshes_once_for_many_workers(sim, code_settings, redis_client):
    sim.state.token_lifetime = 1
    client = Locate2uClient.from_settings(code_settings, redis_client)
    consent(client)
    assert client.tokens.status() == "ok" and client.whoami()["userId"] == 12345
    time.sleep(1.05)
    clients = [Locate2uClient.from_settings(code_settings, redis_client) for _ in range(6)]
    in_threads(6, lambda: clients.pop().whoami())  # refresh tokens rotate: a second refresh would fail
    assert grants(sim) == ["authorization_code", "refresh_token"]
    assert sim.state.token_requests[0]["redirect_uri"] == PUBLIC_URL + "/oauth/locate2u/callback"


def test_a_refresh_slower_than_the_lock_timeout_is_still_the_only_one(sim, code_settings, redis_client, monkeypatch):
    """The renewal lock lapsed after a fixed time (120 s; 2 s here) however long the renewal took
    (bounded retries of a slow identity server), so a second worker then refreshed with the same
    refresh token: refresh tokens rotate, one of the two was refused (invalid_grant) and the account
    was marked as needing re-authorisation. Now the lock is renewed while the renewal runs."""
    monkeypatch.setattr("workers.locate2u.token_store.LOCK_TIMEOUT", 2)
    sim.state.token_lifetime = 1
    first, second = (Locate2uClient.from_settings(code_settings, redis_client) for _ in range(2))
    consent(first)
    time.sleep(1.05)
    sim.faults.slow(4, path_prefix="/connect/token")  # the refresh's answer takes 4 s
    renewing = threading.Thread(target=first.whoami)
    renewing.start()
    time.sleep(2.5)  # past the lock's timeout; the first refresh still waits for its answer
    assert second.whoami()["userId"] == 12345
    renewing.join()
    assert grants(sim) == ["authorization_code", "refresh_token"] and first.tokens.status() == "ok"


def test_rejected_refresh_token_requires_reauthorization(sim, code_settings, redis_client, caplog):
    sim.state.token_lifetime = 1
    client = Locate2uClient.from_settings(code_settings, redis_client)
    consent(client)
    sim.state.revoke_refresh_tokens()
    time.sleep(1.05)
    with pytest.raises(ReauthorizationRequired):
        client.get_stop(1)
    assert client.tokens.status() == f"reauthorization required: {REAUTH_HINT}"
    assert "re-authorisation required: the Locate2u refresh token was rejected" in caplog.text
    assert client.tokens.describe()["reason"] == "the refresh token was rejected (invalid_grant)"
    consent(client)  # a new consent clears it
    assert client.tokens.status() == "ok" and client.whoami()["userId"] == 12345


def test_oauth_state_is_single_use(redis_client):
    states = OAuthStates(redis_client)
    state = states.issue("verifier")
    assert states.consume(state) == {"verifier": "verifier", "browser": None} and not states.consume(state)
    assert not states.consume("made-up") and not states.consume(None)


def test_a_token_lifetime_at_or_below_zero_is_not_a_token_request_per_call(sim, cc_settings, redis_client):
    """An identity server whose clock or configuration is off answers ``expires_in`` -5: taken as
    said, every API call would first fetch a new token (and fight for the renewal lock). It is
    used for at least a minute instead; if it is refused sooner, its 401 renews it."""
    sim.state.token_lifetime = -5
    client = Locate2uClient.from_settings(cc_settings, redis_client)
    tokens = {client.tokens.access_token() for _ in range(5)}
    assert len(tokens) == 1 and grants(sim) == ["client_credentials"]


def test_a_token_lifetime_that_is_not_a_number_is_taken_for_an_hour(sim, cc_settings, redis_client):
    """``"expires_in": "soon"`` failed inside the relay (a bug for every delivery needing a stop)."""
    sim.faults.inject(200, body={"access_token": "the-token", "expires_in": "soon", "token_type": "Bearer"},
                      path_prefix="/connect/token")
    client = Locate2uClient.from_settings(cc_settings, redis_client)
    assert client.tokens.access_token() == "the-token"
    assert client.tokens.access_token() == "the-token" and sim.faults.injected == 1
