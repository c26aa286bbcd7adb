"""Locate2u OAuth tokens: encrypted in Redis, renewed ahead of expiry, once for all workers.

Both grants of the identity server's ``/connect/token`` are supported:
``client_credentials`` (unattended) and ``authorization_code`` (one user
consent, with ``offline_access`` so a refresh token keeps it alive, PKCE S256).

The token set is kept encrypted by ``workers.locate2u.token_store``; the code flow's one-time
values (PKCE, ``state``, start links) are in ``workers.locate2u.oauth_links``. Renewal happens
under a Redis lock, so many workers make one token request.
"""
import logging
import math
import time
from urllib.parse import urlencode

from redis.exceptions import RedisError

from workers.celery_config import PROCESS_DELIVERY
from workers.config import ConfigError
from workers.metrics import WorkerMetrics
from workers.resilience.errors import BadAnswer, CredentialsRefused, PermanentError, RetriableError
from workers.resilience.http import HttpClient
from workers.resilience.renewal import HeldLock
from workers.resilience.retries import bring_forward

log = logging.getLogger(__name__)

REAUTH_HINT = "run l2u-relay oauth url and open the link it prints"
CALLBACK_PATH = "/oauth/locate2u/callback"
START_PATH = "/oauth/locate2u/start"
OFFLINE_SCOPE = "offline_access"
MAX_REFRESH_AHEAD = 300  # renew this long before expiry (at most a tenth of the lifetime)
DEFAULT_TOKEN_SECONDS = 3600  # a token answer's lifetime when it gives none (see token_lifetime)
MIN_TOKEN_SECONDS = 60
TOKEN_TIMEOUT = (3.05, 15)


class ReauthorizationRequired(CredentialsRefused):
    """No usable token can be obtained: a user must approve the relay again. What needs Locate2u waits
    on its retry schedule meanwhile, and linking the account again brings it forward (``store_grant``)."""


class TokenRejected(PermanentError):
    """The identity server refused a token request; ``oauth_error`` is its RFC 6749 code."""

    def __init__(self, message, oauth_error=None, **details):
        super().__init__(message, **details)
        self.oauth_error = oauth_error


class IdentityServer:
    """``/connect/authorize`` and ``/connect/token`` of the Locate2u identity server."""

    def __init__(self, base_url, session, retry, client_id, client_secret):
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.retry = retry
        self.client_id = client_id
        self.client_secret = client_secret

    def authorize_url(self, redirect_uri, scope, state, code_challenge):
        query = {"response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri,
                 "scope": scope, "state": state, "code_challenge": code_challenge, "code_challenge_method": "S256"}
        return f"{self.base_url}/connect/authorize?{urlencode(query)}"

    def token(self, form):
        """POST a token request; return the token response or raise TokenRejected / RetriableError."""
        form = {**form, "client_id": self.client_id, "client_secret": self.client_secret}
        redact = (self.client_secret, form.get("code"), form.get("refresh_token"), form.get("code_verifier"))
        http = HttpClient(self.base_url, self.session, timeout=TOKEN_TIMEOUT, redact=redact)
        # Retrying is safe: a lost answer means the code or refresh token is spent either way.
        response = self.retry.run(lambda: http.request("POST", "/connect/token", data=form, accept=(400, 401)),
                                  idempotent=True)
        if response.status_code in (400, 401):
            raise _rejection(http, response, form["grant_type"])
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not body.get("access_token"):  # the body stays out: it may hold tokens
            raise BadAnswer(f"the token response of {http.url('/connect/token')} has no access_token",
                            method="POST", url=http.url("/connect/token"))
        return body


def _rejection(http, response, grant_type):
    """The TokenRejected for an RFC 6749 error answer (400/401) of the token endpoint."""
    try:
        error = str(response.json().get("error") or "unknown_error")
    except (ValueError, AttributeError):
        error = "unknown_error"
    message = f"token request ({grant_type}) rejected by {http.url('/connect/token')}: {error}"
    if response.status_code == 401:
        message += " (check LOCATE2U_CLIENT_ID and LOCATE2U_CLIENT_SECRET)"
    base = http.error_for(response)
    return TokenRejected(message, oauth_error=error, status=base.status, body=base.body, method=base.method,
                         url=base.url)


class TokenManager:
    """Hands out a valid access token; fetches or renews it at most once across workers."""

    def __init__(self, store, identity, *, grant, scope, redirect_uri=None, clock=time.time):
        self.store = store
        self.identity = identity
        self.grant = grant
        self.scope = scope
        self.redirect_uri = redirect_uri
        self.clock = clock

    def access_token(self):
        """A valid access token; renewed ahead of expiry without blocking while still valid."""
        tokens = self._load()
        if self._fresh(tokens):
            return tokens["access_token"]
        if tokens and self.clock() < tokens["expires_at"]:
            try:
                return self._renew(wait=False) or tokens["access_token"]
            except RetriableError as exc:
                log.warning("could not renew the Locate2u token ahead of expiry (%s); using the current one",
                            exc.message)
                return tokens["access_token"]
        return self._renew()

    def renew_rejected(self, token):
        """A new access token after the API rejected ``token`` (unless another worker renewed it)."""
        return self._renew(rejected=token)

    def authorize_url(self, state, code_challenge):
        """Where a user approves the relay (code flow, offline_access for a refresh token, PKCE S256)."""
        self._require_code_grant()
        scopes = self.scope.split()
        scope = " ".join(scopes if OFFLINE_SCOPE in scopes else [*scopes, OFFLINE_SCOPE])
        return self.identity.authorize_url(self._redirect_uri(), scope, state, code_challenge)

    def redeem_code(self, code, code_verifier):
        """Redeem an authorization code with its PKCE verifier; return the token response (not stored)."""
        self._require_code_grant()
        body = self.identity.token({"grant_type": "authorization_code", "code": code,
                                    "redirect_uri": self._redirect_uri(), "code_verifier": code_verifier})
        if not body.get("refresh_token"):
            log.warning("Locate2u granted no refresh token (offline_access refused?); "
                        "re-authorisation will be needed when the access token expires")
        return body

    def store_grant(self, body, account):
        """Store a redeemed token response as the tokens of ``account`` (the whoami answer), and make the
        deliveries waiting to read their stop (re-authorisation was required) due now."""
        tokens = self._save(body, account=account)
        try:
            waiting = bring_forward(self.store.redis, PROCESS_DELIVERY)
        except RedisError as exc:  # linked all the same: they go out on their schedule
            log.warning("could not bring forward the deliveries waiting for Locate2u: %s", exc)
        else:
            if waiting:
                log.info("Locate2u linked: %d deliveries waiting to read their stop are due now", waiting)
        return tokens

    def status(self):
        """"ok" or "reauthorization required: ..." (reads Redis only, never the network)."""
        if self.store.reauthorization_reason() is not None:
            return f"reauthorization required: {REAUTH_HINT}"
        tokens = self._load()
        if self.grant == "authorization_code" and not (tokens and (tokens.get("refresh_token")
                                                                   or self.clock() < tokens["expires_at"])):
            return f"reauthorization required: {REAUTH_HINT}"
        return "ok"

    def describe(self):
        """Token facts safe to show an operator (never the tokens themselves)."""
        tokens = self._load() or {}
        account = self.store.account() or {}
        return {"grant": self.grant, "status": self.status(), "reason": self.store.reauthorization_reason(),
                "has_access_token": bool(tokens), "has_refresh_token": bool(tokens.get("refresh_token")),
                "expires_in": round(tokens["expires_at"] - self.clock()) if tokens else None,
                "scope": tokens.get("scope"), "account": describe_account(account) if account else None,
                "token_key": self.store.key_warning or "RELAY_TOKEN_KEYS"}

    # internals -------------------------------------------------------------

    def _load(self):
        tokens = self.store.load()
        if tokens and tokens.get("grant") == self.grant and tokens.get("client_id") == self.identity.client_id:
            return tokens
        return None

    def _fresh(self, tokens, rejected=None):
        return bool(tokens) and tokens["access_token"] != rejected and self.clock() < tokens["refresh_at"]

    def _renew(self, rejected=None, wait=True):
        lock = self.store.lock()
        if not lock.acquire(blocking=wait):
            if wait:
                raise RetriableError("timed out waiting for another worker to renew the Locate2u token")
            return None
        held = HeldLock(lock, "the Locate2u token lock", "so that two workers do not renew with one refresh token; "
                              "the next call renews it")
        with held.kept():
            tokens = self._load()
            if self._fresh(tokens, rejected):
                return tokens["access_token"]  # another worker renewed it meanwhile
            held.check("the token request")
            return self._fetch(tokens)["access_token"]

    def _fetch(self, tokens):
        if self.grant == "client_credentials":
            return self._save(self.identity.token({"grant_type": "client_credentials", "scope": self.scope}))
        refresh_token = (tokens or {}).get("refresh_token")
        if not refresh_token:
            raise self._reauthorization_required("Locate2u has not been authorised yet (no refresh token stored)")
        try:
            body = self.identity.token({"grant_type": "refresh_token", "refresh_token": refresh_token})
        except TokenRejected as exc:
            if exc.oauth_error != "invalid_grant":
                raise
            self.store.mark_reauthorization_required("the refresh token was rejected (invalid_grant)")
            raise self._reauthorization_required("the Locate2u refresh token was rejected") from None
        return self._save(body, previous_refresh=refresh_token)

    def _save(self, body, previous_refresh=None, account=None):
        now = self.clock()
        lifetime = token_lifetime(body)
        tokens = {"access_token": body["access_token"], "refresh_token": body.get("refresh_token") or previous_refresh,
                  "expires_at": now + lifetime, "refresh_at": now + lifetime - min(MAX_REFRESH_AHEAD, lifetime / 10),
                  "scope": body.get("scope"), "grant": self.grant, "client_id": self.identity.client_id}
        self.store.save(tokens, account=account)
        WorkerMetrics(self.store.redis).incr("l2u_worker_token_refreshes", grant=self.grant)
        log.info("obtained a Locate2u access token (%s grant, valid %ds)", self.grant, lifetime)
        return tokens

    def check_code_flow(self):
        """Raise ConfigError unless the code grant is configured with a RELAY_PUBLIC_URL."""
        self._require_code_grant()
        self._redirect_uri()

    def _require_code_grant(self):
        if self.grant != "authorization_code":
            raise ConfigError({"LOCATE2U_GRANT": f"is {self.grant}; set authorization_code to use the code flow"})

    def _redirect_uri(self):
        if not self.redirect_uri:
            raise ConfigError({"RELAY_PUBLIC_URL": "required for the OAuth redirect_uri"})
        return self.redirect_uri

    @staticmethod
    def _reauthorization_required(reason):
        log.error("Locate2u re-authorisation required: %s; %s", reason, REAUTH_HINT)
        return ReauthorizationRequired(f"{reason}; {REAUTH_HINT}")


def token_lifetime(body):
    """Seconds the token answer ``body`` gives its access token: its ``expires_in``, an hour when it
    has none or not a number, and at least ``MIN_TOKEN_SECONDS`` (a lifetime at or below zero would
    have every API call fetch a new token; a token refused sooner is renewed on its 401)."""
    try:
        lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_SECONDS)
    except (TypeError, ValueError):
        lifetime = math.nan
    if not math.isfinite(lifetime):
        log.warning("the Locate2u token answer's expires_in is %r, not a number of seconds: taking %ds",
                    body.get("expires_in"), DEFAULT_TOKEN_SECONDS)
        lifetime = DEFAULT_TOKEN_SECONDS
    return max(MIN_TOKEN_SECONDS, lifetime)


def account_id(user):
    """What makes two whoami answers the same Locate2u account: the team (the user when there is none)."""
    return str(user.get("teamId") if user.get("teamId") is not None else user.get("userId"))


def describe_account(user):
    return f"{user.get('email')} ({user.get('teamName')}, team {user.get('teamId')})"
