"""The encrypted token store: the Locate2u token set, the linked account and a pending account change.

They are Fernet values in Redis under ``RELAY_TOKEN_KEYS`` (a ``MultiFernet``: the first key
encrypts, every key decrypts). Without it the key is derived from ``RELAY_WEBHOOK_SECRET`` with
HKDF, and ``key_warning`` says so; keys derived from the webhook secrets always still decrypt, so a
value is moved to the current first key when it is next read (or by ``rotate``). The store also
holds the renewal lock (``workers.locate2u.tokens``).
"""
import base64
import json
import logging

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from workers.config import is_fernet_key
from workers.store import keys

log = logging.getLogger(__name__)

TOKENS_KEY = keys.LOCATE2U_TOKENS
ACCOUNT_KEY = keys.LOCATE2U_ACCOUNT
PENDING_KEY = keys.LOCATE2U_PENDING_LINK
REAUTH_KEY = keys.LOCATE2U_REAUTH
LOCK_KEY = keys.LOCATE2U_TOKEN_LOCK
PENDING_TTL = 600        # seconds the operator has to accept a different account
# The renewal lock lapses LOCK_TIMEOUT after its last renewal (every third of it while the token
# request and its retries run), so a killed renewer holds up the others for less than LOCK_WAIT.
LOCK_TIMEOUT = 30
LOCK_WAIT = 40           # how long a worker waits for another's renewal
# Re-encrypt a value only if nobody replaced it meanwhile (a renewal must never be undone by a rotation).
_REPLACE_IF_UNCHANGED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') end
return false
"""
KEY_WARNING = ("RELAY_TOKEN_KEYS is unset: stored Locate2u tokens are encrypted under a key derived from "
               "RELAY_WEBHOOK_SECRET; set RELAY_TOKEN_KEYS (l2u-relay oauth new-key)")


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
