"""The code flow's one-time values: PKCE pairs, ``state`` values and the operator's signed start links."""
import base64
import hashlib
import hmac
import json
import secrets

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from workers.store import keys

STATE_PREFIX = keys.LOCATE2U_OAUTH_STATE
LINK_PREFIX = keys.LOCATE2U_OAUTH_LINK
STATE_TTL = 600          # seconds a /start state stays redeemable
LINK_TTL = 600           # seconds a signed /start link printed by the CLI stays valid


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
