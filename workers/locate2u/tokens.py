"""Locate2u OAuth tokens: encrypted in Redis, renewed ahead of expiry, once for all workers.

Both grants of the identity server's ``/connect/token`` are supported:
``client_credentials`` (unattended) and ``authorization_code`` (one user
consent, with ``offline_access`` so a refresh token keeps it alive, PKCE S256).

The token set, the linked account and a pending account change are Fernet
values in Redis under ``RELAY_TOKEN_KEYS`` (a ``MultiFernet``: the first key
encrypts, every key decrypts). Without it the key is derived from
``RELAY_WEBHOOK_SECRET`` with HKDF, as before, and ``key_warning`` says so;
keys derived from the webhook secrets always still decrypt, so a value is
moved to the current first key when it is next read (or by ``rotate``).
Renewal happens under a Redis lock, so many workers make one token request.
"""
import base64
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from urllib.parse import urlencode

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from redis.exceptions import RedisError

from workers.celery_config import PROCESS_DELIVERY
from workers.config import ConfigError, is_fernet_key
from workers.metrics import WorkerMetrics
from workers.resilience.errors import BadAnswer, CredentialsRefused, PermanentError, RetriableError
from workers.resilience.http import HttpClient
from workers.resilience.renewal import HeldLock, renewed
from workers.resilience.retries import bring_forward
from workers.store import keys

log = logging.getLogger(__name__)

REAUTH_HINT = "run l2u-relay oauth url and open the link it prints"
CALLBACK_PATH = "/oauth/locate2u/callback"
START_PATH = "/oauth/locate2u/start"
OFFLINE_SCOPE = "offline_access"
TOKENS_KEY = keys.LOCATE2U_TOKENS
ACCOUNT_KEY = keys.LOCATE2U_ACCOUNT
PENDING_KEY = keys.LOCATE2U_PENDING_LINK
REAUTH_KEY = keys.LOCATE2U_REAUTH
LOCK_KEY = keys.LOCATE2U_TOKEN_LOCK
STATE_PREFIX = keys.LOCATE2U_OAUTH_STATE
LINK_PREFIX = keys.LOCATE2U_OAUTH_LINK
STATE_TTL = 600          # seconds a /start state stays redeemable
LINK_TTL = 600           # seconds a signed /start link printed by the CLI stays valid
PENDING_TTL = 600        # seconds the operator has to accept a different account
# The renewal lock lapses LOCK_TIMEOUT after its last renewal (every third of it while the token
# request and its retries run), so a killed renewer holds up the others for less than LOCK_WAIT.
LOCK_TIMEOUT = 30
LOCK_WAIT = 40           # how long a worker waits for another's renewal
MAX_REFRESH_AHEAD = 300  # renew this long before expiry (at most a tenth of the lifetime)
DEFAULT_TOKEN_SECONDS = 3600  # a token answer's lifetime when it gives none (see token_lifetime)
MIN_TOKEN_SECONDS = 60
TOKEN_TIMEOUT = (3.05, 15)
# Re-encrypt a value only if nobody replaced it meanwhile (a renewal must never be undone by a rotation).
_REPLACE_IF_UNCHANGED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') end
return false
"""
KEY_WARNING = ("RELAY_TOKEN_KEYS is unset: stored Locate2u tokens are encrypted under a key derived from "
               "RELAY_WEBHOOK_SECRET; set RELAY_TOKEN_KEYS (l2u-relay oauth new-key)")


class ReauthorizationRequired(CredentialsRefused):
    """No usable token can be obtained: a user must approve the relay again. What needs Locate2u waits
    on its retry schedule meanwhile, and linking the account again brings it forward (``store_grant``)."""


class TokenRejected(PermanentError):
    """The identity server refused a token request; ``oauth_error`` is its RFC 6749 code."""

    def __init__(self, message, oauth_error=None, **details):
        super().__init__(message, **details)
        self.oauth_error = oauth_error


def _derived_fernet(secret, info=b"locate2u token store v1"):
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"locate2u-relay", info=info)
    return Fernet(base64.urlsafe_b64encode(hkdf.derive(secret.encode())))


def _token_key_fernet(key):
    """A Fernet key as it is; another secret (app.json generates 64 hex characters) through HKDF."""
    return Fernet(key.encode()) if is_fernet_key(key) else _derived_fernet(key, info=b"RELAY_TOKEN_KEYS v1")


def token_fernets(settings):
    """``RELAY_TOKEN_KEYS`` in order, then the keys derived from the webhook secrets (decryption only
    while dedicated keys are set; the current webhook secret's key encrypts when they are not)."""
    derived = [_derived_fernet(s) for s in (settings.webhook_secret, settings.webhook_secret_previous) if s]
    return [_token_key_fernet(key) for key in settings.token_keys] + derived


class TokenStore:
    """Encrypted values in Redis: the token set, the linked account, a pending account change."""

    def __init__(self, redis_client, fernets, dedicated=True):
        self.redis = redis_client
        self._fernets = list(fernets)
        self._all = MultiFernet(self._fernets)
        self.dedicated = dedicated
        self._decrypted = {}  # key -> (the value read last, its plaintext): unchanged, it is not decrypted again
        self._replace_if_unchanged = redis_client.register_script(_REPLACE_IF_UNCHANGED)

    @classmethod
    def from_settings(cls, redis_client, settings):
        return cls(redis_client, token_fernets(settings), dedicated=bool(settings.token_keys))

    @property
    def key_warning(self):
        """None with ``RELAY_TOKEN_KEYS`` set, else what to do about the derived key."""
        return None if self.dedicated else KEY_WARNING

    def _encrypt(self, value):
        return self._fernets[0].encrypt(json.dumps(value).encode()).decode()

    def _read(self, key):
        """The decrypted JSON value at ``key`` (moved to the first key if an older one encrypted it)."""
        blob = self.redis.get(key)
        if blob is None:
            return None
        last_blob, plaintext = self._decrypted.get(key, (None, None))
        if blob == last_blob:
            return json.loads(plaintext)
        try:
            plaintext = self._fernets[0].decrypt(blob)
        except InvalidToken:
            pass
        else:
            self._decrypted[key] = (blob, plaintext)
            return json.loads(plaintext)
        try:
            value = json.loads(self._all.decrypt(blob))
        except InvalidToken:
            log.warning("a stored Locate2u value (%s) cannot be decrypted with RELAY_TOKEN_KEYS or the webhook "
                        "secrets; ignoring it", key)
            return None
        self._reencrypt(key, blob)
        return value

    def _reencrypt(self, key, blob):
        """Store ``blob`` under the first key unless the value changed since it was read."""
        self._replace_if_unchanged(keys=[key], args=[blob, self._all.rotate(blob)])

    def load(self):
        """The stored token set as a dict, or None (absent or undecryptable)."""
        return self._read(TOKENS_KEY)

    def save(self, tokens, account=None):
        """Store ``tokens`` (and the ``account`` they act as) encrypted; clear any re-authorisation mark."""
        with self.redis.pipeline() as pipe:
            pipe.set(TOKENS_KEY, self._encrypt(tokens))
            if account is not None:
                pipe.set(ACCOUNT_KEY, self._encrypt(account))
            pipe.delete(REAUTH_KEY)
            pipe.execute()

    def account(self):
        """The Locate2u user/team linked last (kept through re-authorisation), or None."""
        return self._read(ACCOUNT_KEY)

    def save_pending(self, tokens, account):
        """Hold a token set for a different account until the operator accepts it (or it expires)."""
        self.redis.set(PENDING_KEY, self._encrypt({"tokens": tokens, "account": account}), ex=PENDING_TTL)

    def take_pending(self):
        """The pending ``{"tokens", "account"}`` (removed from Redis), or None."""
        blob = self.redis.getdel(PENDING_KEY)
        if blob is None:
            return None
        try:
            return json.loads(self._all.decrypt(blob))
        except InvalidToken:
            return None

    def rotate(self):
        """Re-encrypt every stored value under the first key: ``(re-encrypted, undecryptable)`` key names."""
        done, failed = [], []
        for key in (TOKENS_KEY, ACCOUNT_KEY, PENDING_KEY):
            blob = self.redis.get(key)
            if blob is None:
                continue
            try:
                self._reencrypt(key, blob)
                done.append(key)
            except InvalidToken:
                failed.append(key)
        return done, failed

    def mark_reauthorization_required(self, reason):
        """Forget the tokens and remember why a user must approve again."""
        with self.redis.pipeline() as pipe:
            pipe.delete(TOKENS_KEY)
            pipe.set(REAUTH_KEY, reason)
            pipe.execute()

    def reauthorization_reason(self):
        return self.redis.get(REAUTH_KEY)

    def lock(self):
        """The renewal lock, renewed from the renewal thread while held (``HeldLock``)."""
        return self.redis.lock(LOCK_KEY, timeout=LOCK_TIMEOUT, blocking_timeout=LOCK_WAIT, thread_local=False)


def _digest(value):
    return hashlib.sha256(value.encode()).hexdigest()


def pkce_pair():
    """A PKCE ``(code_verifier, code_challenge)`` pair, method S256 (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class OAuthStates:
    """Single-use ``state`` values for the code flow, kept (hashed) in Redis for ten minutes.

    Each holds the PKCE verifier and, for a browser flow, the hash of the
    nonce in the starting browser's cookie.
    """

    def __init__(self, redis_client):
        self.redis = redis_client

    def issue(self, verifier, browser_nonce=None):
        state = secrets.token_urlsafe(32)
        record = {"verifier": verifier, "browser": _digest(browser_nonce) if browser_nonce else None}
        self.redis.set(STATE_PREFIX + _digest(state), json.dumps(record), ex=STATE_TTL)
        return state

    def consume(self, state):
        """The state's record exactly once for a state issued here and not yet expired, else None."""
        raw = self.redis.getdel(STATE_PREFIX + _digest(state)) if state else None
        return json.loads(raw) if raw else None

    @staticmethod
    def same_browser(record, browser_nonce):
        """True when ``browser_nonce`` (the callback's cookie) is the one that started the flow."""
        if not record.get("browser") or not browser_nonce:
            return False
        return hmac.compare_digest(record["browser"], _digest(browser_nonce))


class StartLinks:
    """The operator's signed, expiring, single-use links to ``/oauth/locate2u/start``."""

    SALT = "l2u-relay oauth start link"

    def __init__(self, redis_client, settings):
        self.redis = redis_client
        keys = [key for key in (settings.webhook_secret_previous, settings.webhook_secret) if key]  # newest last
        self.serializer = URLSafeTimedSerializer(keys, salt=self.SALT)

    def make(self):
        return self.serializer.dumps({"nonce": secrets.token_urlsafe(16)})

    def check(self, link):
        """None when ``link`` is valid and unused (it is then spent), else the error code."""
        try:
            payload = self.serializer.loads(link or "", max_age=LINK_TTL)
        except SignatureExpired:
            return "expired_link"
        except BadSignature:
            return "invalid_link"
        if not isinstance(payload, dict) or not self.redis.set(LINK_PREFIX + _digest(str(payload.get("nonce"))),
                                                                "1", nx=True, ex=LINK_TTL + 60):
            return "used_link"
        return None


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
        try:
            with renewed(held.renew, LOCK_TIMEOUT / 3, held.what):
                tokens = self._load()
                if self._fresh(tokens, rejected):
                    return tokens["access_token"]  # another worker renewed it meanwhile
                held.check("the token request")
                return self._fetch(tokens)["access_token"]
        finally:
            held.release()
            if held.lost:
                log.warning("the Locate2u token lock was lost during a renewal (Redis no longer held it)")

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
