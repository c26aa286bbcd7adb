"""The Locate2u Customer Integration API client.

One ``requests.Session`` (connection reuse, explicit timeouts) for the API and
the identity server. 429 is retried on every call (the request was refused,
not applied) and 5xx/timeouts on idempotent ones, honouring ``Retry-After``,
a few attempts and at most ``max_wait`` seconds of waiting in all; then the
``RetriableError`` is raised for the caller's own schedule. A 401 renews the
token once and retries once. Errors keep method, URL, status and body, with
every token and secret redacted.
"""
import logging
import random
import time
from urllib.parse import quote

from workers.resilience.errors import BadAnswer, CredentialsRefused, RetriableError
from workers.resilience.http import PAGE_TIMEOUT, HttpClient, make_session
from workers.locate2u.token_store import TokenStore
from workers.locate2u.tokens import CALLBACK_PATH, IdentityServer, ReauthorizationRequired, TokenManager

__all__ = ["Locate2uClient", "ReauthorizationRequired", "RetryPolicy"]

log = logging.getLogger(__name__)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
API_TIMEOUT = (3.05, 20)


class RetryPolicy:
    """Bounded retries: ``attempts`` tries, at most ``max_wait`` seconds asleep in total."""

    def __init__(self, attempts=4, max_wait=30.0, backoff=0.25, sleep=time.sleep):
        self.attempts = attempts
        self.max_wait = max_wait
        self.backoff = backoff
        self.sleep = sleep

    def run(self, call, idempotent):
        """Return ``call()``, retrying RetriableError while allowed (never refused credentials: the
        same ones are refused again); re-raise it when not."""
        waited = 0.0
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except RetriableError as exc:
                delay = self._delay(exc, attempt)
                if attempt == self.attempts or not (idempotent or exc.status == 429) \
                        or isinstance(exc, CredentialsRefused) or waited + delay > self.max_wait:
                    raise
                log.info("%s; retrying in %.1fs (attempt %d of %d)", exc.message, delay, attempt + 1, self.attempts)
                self.sleep(delay)
                waited += delay
        raise AssertionError("unreachable")

    def _delay(self, exc, attempt):
        if exc.retry_after is not None:
            return exc.retry_after
        return self.backoff * 2 ** (attempt - 1) * (1 + random.random() / 2)


def redirect_uri(settings):
    """``RELAY_PUBLIC_URL`` + the OAuth callback path, or None without a public URL."""
    return settings.public_url.rstrip("/") + CALLBACK_PATH if settings.public_url else None


class Locate2uClient:
    """Discovery, Stops and Webhooks endpoints of the Customer Integration API."""

    def __init__(self, api_url, session, tokens, retry, timeout=API_TIMEOUT):
        self.api_url = api_url
        self.session = session
        self.tokens = tokens
        self.retry = retry
        self.timeout = timeout

    def for_a_page(self):
        """This client with ``PAGE_TIMEOUT`` and no retries, for calls a web page waits on (the API
        timeout and retries could take minutes)."""
        return Locate2uClient(self.api_url, self.session, self.tokens, RetryPolicy(attempts=1), PAGE_TIMEOUT)

    @classmethod
    def from_settings(cls, settings, redis_client, retry=None):
        """The client for ``settings``, or None when ``LOCATE2U_CLIENT_ID`` is unset."""
        if not settings.locate2u_client_id:
            return None
        session = make_session()
        retry = retry or RetryPolicy()
        identity = IdentityServer(settings.locate2u_id_url, session, retry, settings.locate2u_client_id,
                                  settings.locate2u_client_secret)
        store = TokenStore.from_settings(redis_client, settings)
        tokens = TokenManager(store, identity, grant=settings.locate2u_grant, scope=settings.locate2u_scope,
                              redirect_uri=redirect_uri(settings))
        return cls(settings.locate2u_api_url, session, tokens, retry)

    # endpoints ---------------------------------------------------------------

    def whoami(self, access_token=None):
        """``GET /v1/Discovery/User``: the authenticated user and team (of ``access_token`` when given)."""
        if access_token is None:
            return self.call("GET", "/v1/Discovery/User")
        http, response = self._attempt(access_token, "GET", "/v1/Discovery/User", None)
        if response.status_code == 401:
            raise http.error_for(response, f"GET {http.url('/v1/Discovery/User')} refused the new access token")
        return http.answer(response)

    def get_stop(self, stop_id):
        """``GET /v1/Stops/{id}``; NotFound when there is no such stop, ``BadAnswer`` when the answer
        is not that stop's record (none, or another stop's: a cache keyed without the path would
        put another stop's name and address under this one's key in every sink)."""
        path = f"/v1/Stops/{quote(str(stop_id), safe='')}"
        stop = self.call("GET", path, needs=("stopId",))
        if str(stop["stopId"]) != str(stop_id):
            raise self._bad_answer(path, f"stop {stop['stopId']}")
        return stop

    def create_stop(self, stop):
        """``POST /v1/Stops``: create one stop; return the stop record."""
        return self.call("POST", "/v1/Stops", stop)

    def import_stops(self, stops):
        """``POST /v1/Stops/import``: create many stops in one request."""
        return self.call("POST", "/v1/Stops/import", list(stops))

    def event_types(self):
        """``GET /v1/Webhooks/event-types`` (a list)."""
        return self.call("GET", "/v1/Webhooks/event-types", listed=True)

    def list_webhooks(self):
        """``GET /v1/Webhooks``: every subscription of this account (a list of objects with an ``id``)."""
        hooks = self.call("GET", "/v1/Webhooks", listed=True)
        odd = [hook for hook in hooks if not isinstance(hook, dict) or hook.get("id") is None]
        if odd:
            first = (f"an object with {', '.join(sorted(map(str, odd[0])))}" if isinstance(odd[0], dict)
                     else f"a {type(odd[0]).__name__}")  # never its URL: it holds our webhook token
            raise self._bad_answer("/v1/Webhooks", f"{len(odd)} subscription(s) without an id (the first: {first})")
        return hooks

    def get_webhook(self, hook_id):
        return self.call("GET", f"/v1/Webhooks/{quote(str(hook_id), safe='')}")

    def create_webhook(self, event_type, url):
        return self.call("POST", "/v1/Webhooks", {"eventType": event_type, "url": url})

    def update_webhook(self, hook_id, event_type, url):
        return self.call("PUT", f"/v1/Webhooks/{quote(str(hook_id), safe='')}", {"eventType": event_type, "url": url})

    def delete_webhook(self, hook_id):
        return self.call("DELETE", f"/v1/Webhooks/{quote(str(hook_id), safe='')}")

    # transport ---------------------------------------------------------------

    def _bad_answer(self, path, what):
        """The BadAnswer of a ``GET path`` answered 200 with ``what`` instead of what the API documents."""
        url = HttpClient(self.api_url, self.session).url(path)
        return BadAnswer(f"GET {url} answered 200 with {what}", method="GET", url=url)

    def call(self, method, path, body=None, needs=(), listed=False):
        """Send one API request with a bearer token; return the decoded JSON (None if empty), an object
        holding every key in ``needs`` when given, a list when ``listed`` (``HttpClient.answer``)."""
        token = self.tokens.access_token()
        http, response = self._attempt(token, method, path, body)
        if response.status_code == 401:
            log.info("Locate2u rejected the access token on %s %s; renewing it once", method, path)
            http, response = self._attempt(self.tokens.renew_rejected(token), method, path, body)
        if response.status_code == 401:
            raise http.error_for(response, f"{method} {http.url(path)} answered 401 even with a renewed token")
        return http.answer(response, needs=needs, listed=listed) if response.content or needs or listed else None

    def _attempt(self, token, method, path, body):
        http = HttpClient(self.api_url, self.session, timeout=self.timeout,
                          headers={"Authorization": f"Bearer {token}"}, redact=(token,))
        kwargs = {"json": body} if body is not None else {}
        response = self.retry.run(lambda: http.request(method, path, accept=(401,), **kwargs),
                                  idempotent=method in IDEMPOTENT_METHODS)
        return http, response
