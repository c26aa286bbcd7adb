"""Locate2u OAuth tokens: encrypted in Redis, renewed ahead of expiry, once for all workers.

Both grants of the identity server's ``/connect/token`` are supported:
``client_credentials`` (unattended) and ``authorization_code`` (one user
consent, with ``offline_access`` so a refresh token keeps it alive).

The token set is one Fernet-encrypted JSON value in Redis; the key is derived
from ``RELAY_WEBHOOK_SECRET`` with HKDF, and ``RELAY_WEBHOOK_SECRET_PREVIOUS``
still decrypts (the value is then re-encrypted under the current secret).
Renewal happens under a Redis lock, so many workers make one token request.
"""
import base64
import hashlib
import json
import logging
import secrets
import time
from urllib.parse import urlencode

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.exceptions import LockError

from workers.config import ConfigError
from workers.errors import PermanentError, RetriableError
from workers.http import HttpClient
from workers.metrics import WorkerMetrics
from workers.stores import PREFIX

log = logging.getLogger(__name__)

REAUTH_HINT = "run l2u-relay oauth url or open /oauth/locate2u/start"
CALLBACK_PATH = "/oauth/locate2u/callback"
OFFLINE_SCOPE = "offline_access"
TOKENS_KEY = PREFIX + "locate2u:tokens"
REAUTH_KEY = PREFIX + "locate2u:reauth"
LOCK_KEY = PREFIX + "locate2u:token-lock"
STATE_PREFIX = PREFIX + "locate2u:oauth-state:"
STATE_TTL = 600          # seconds a /start state stays redeemable
LOCK_TIMEOUT = 120       # longer than a renewal can take with its bounded retries
LOCK_WAIT = 40           # how long a worker waits for another's renewal
MAX_REFRESH_AHEAD = 300  # renew this long before expiry (at most a tenth of the lifetime)
TOKEN_TIMEOUT = (3.05, 15)


class ReauthorizationRequired(PermanentError):
    """No usable token can be obtained: a user must approve the relay again."""


class TokenRejected(PermanentError):
    """The identity server refused a token request; ``oauth_error`` is its RFC 6749 code."""

    def __init__(self, message, oauth_error=None, **details):
        super().__init__(message, **details)
        self.oauth_error = oauth_error


def _fernet(secret):
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"locate2u-relay", info=b"locate2u token store v1")
    return Fernet(base64.urlsafe_b64encode(hkdf.derive(secret.encode())))


class TokenStore:
    """The token set in Redis, encrypted under the current (or previous) webhook secret."""

    def __init__(self, redis_client, secret, previous_secret=None):
        self.redis = redis_client
        self._ciphers = [_fernet(s) for s in (secret, previous_secret) if s]

    def load(self):
        """The stored token set as a dict, or None (absent or undecryptable)."""
        blob = self.redis.get(TOKENS_KEY)
        if blob is None:
            return None
        for index, cipher in enumerate(self._ciphers):
            try:
                tokens = json.loads(cipher.decrypt(blob))
            except InvalidToken:
                continue
            if index:  # still under the previous secret: move it to the current one
                self.save(tokens)
            return tokens
        log.warning("stored Locate2u tokens cannot be decrypted with RELAY_WEBHOOK_SECRET(_PREVIOUS); ignoring them")
        return None

    def save(self, tokens):
        """Store ``tokens`` encrypted and clear any re-authorisation mark."""
        with self.redis.pipeline() as pipe:
            pipe.set(TOKENS_KEY, self._ciphers[0].encrypt(json.dumps(tokens).encode()).decode())
            pipe.delete(REAUTH_KEY)
            pipe.execute()

    def mark_reauthorization_required(self, reason):
        """Forget the tokens and remember why a user must approve again."""
        with self.redis.pipeline() as pipe:
            pipe.delete(TOKENS_KEY)
            pipe.set(REAUTH_KEY, reason)
            pipe.execute()

    def reauthorization_reason(self):
        return self.redis.get(REAUTH_KEY)

    def lock(self):
        return self.redis.lock(LOCK_KEY, timeout=LOCK_TIMEOUT, blocking_timeout=LOCK_WAIT)


class OAuthStates:
    """Single-use ``state`` values for the code flow, kept (hashed) in Redis for ten minutes."""

    def __init__(self, redis_client):
        self.redis = redis_client

    @staticmethod
    def _key(state):
        return STATE_PREFIX + hashlib.sha256(state.encode()).hexdigest()

    def issue(self):
        state = secrets.token_urlsafe(32)
        self.redis.set(self._key(state), "1", ex=STATE_TTL)
        return state

    def consume(self, state):
        """True exactly once for a state issued here and not yet expired."""
        return bool(state) and self.redis.delete(self._key(state)) == 1


class IdentityServer:
    """``/connect/authorize`` and ``/connect/token`` of the Locate2u identity server."""

    def __init__(self, base_url, session, retry, client_id, client_secret):
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.retry = retry
        self.client_id = client_id
        self.client_secret = client_secret

    def authorize_url(self, redirect_uri, scope, state):
        query = {"response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri,
                 "scope": scope, "state": state}
        return f"{self.base_url}/connect/authorize?{urlencode(query)}"

    def token(self, form):
        """POST a token request; return the token response or raise TokenRejected / RetriableError."""
        form = {**form, "client_id": self.client_id, "client_secret": self.client_secret}
        redact = (self.client_secret, form.get("code"), form.get("refresh_token"))
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
        if not isinstance(body, dict) or not body.get("access_token"):
            raise PermanentError(f"the token response of {http.url('/connect/token')} has no access_token",
                                 status=response.status_code, method="POST", url=http.url("/connect/token"))
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

    def authorize_url(self, state):
        """Where a user approves the relay (code flow, with offline_access for a refresh token)."""
        self._require_code_grant()
        scopes = self.scope.split()
        scope = " ".join(scopes if OFFLINE_SCOPE in scopes else [*scopes, OFFLINE_SCOPE])
        return self.identity.authorize_url(self._redirect_uri(), scope, state)

    def exchange_code(self, code):
        """Redeem an authorization code and store the tokens it buys."""
        self._require_code_grant()
        body = self.identity.token({"grant_type": "authorization_code", "code": code,
                                    "redirect_uri": self._redirect_uri()})
        if not body.get("refresh_token"):
            log.warning("Locate2u granted no refresh token (offline_access refused?); "
                        "re-authorisation will be needed when the access token expires")
        return self._save(body)

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
        return {"grant": self.grant, "status": self.status(), "reason": self.store.reauthorization_reason(),
                "has_access_token": bool(tokens), "has_refresh_token": bool(tokens.get("refresh_token")),
                "expires_in": round(tokens["expires_at"] - self.clock()) if tokens else None,
                "scope": tokens.get("scope")}

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
        try:
            tokens = self._load()
            if self._fresh(tokens, rejected):
                return tokens["access_token"]  # another worker renewed it meanwhile
            return self._fetch(tokens)["access_token"]
        finally:
            try:
                lock.release()
            except LockError:
                log.warning("the Locate2u token lock expired during a renewal")

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

    def _save(self, body, previous_refresh=None):
        now = self.clock()
        lifetime = float(body.get("expires_in") or 3600)
        tokens = {"access_token": body["access_token"], "refresh_token": body.get("refresh_token") or previous_refresh,
                  "expires_at": now + lifetime, "refresh_at": now + lifetime - min(MAX_REFRESH_AHEAD, lifetime / 10),
                  "scope": body.get("scope"), "grant": self.grant, "client_id": self.identity.client_id}
        self.store.save(tokens)
        WorkerMetrics(self.store.redis).incr("l2u_worker_token_refreshes", grant=self.grant)
        log.info("obtained a Locate2u access token (%s grant, valid %ds)", self.grant, lifetime)
        return tokens

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
