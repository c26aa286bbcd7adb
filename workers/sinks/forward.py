"""Signed forward: the normalized event POSTed to every ``FORWARD_URLS`` endpoint.

Each message is signed with Standard Webhooks headers (``webhook-id``,
``webhook-timestamp``, ``webhook-signature``) by the ``standardwebhooks``
package, one ``v1`` signature per secret in ``FORWARD_SECRET`` so receivers
can rotate. The endpoints a message has reached are remembered in Redis, so a
retry only goes to the ones that failed.
"""
import hashlib
import json
import math
from datetime import datetime, timezone
from secrets import token_hex
from urllib.parse import urlsplit

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from workers.domain.events import EVENT_TYPES
from workers.resilience.admission import CircuitBreaker, SlowCalls
from workers.resilience.answer_deadline import answer_seconds
from workers.resilience.errors import ConfigError, NotYet, PermanentError, RelayError, RetriableError
from workers.resilience.http import HttpClient
from workers.settings_fields import CommaList, SinkSetting
from workers.sinks.base import Sink
from workers.store import keys
from workers.store.ledger import LEDGER_RETENTION

ENDPOINT_FAILURES = 3  # failures in a row that pause one URL
ENDPOINT_PAUSE_SECONDS = 3  # while a URL is paused, one message tries it this often
# A message that finds half of a worker's processes in calls to a URL, each over ENDPOINT_BUSY_AFTER
# seconds (a URL answering sooner is never limited) or any while its last call failed, waits
# ENDPOINT_CROWDED_SECONDS for it.
ENDPOINT_BUSY_AFTER = 0.25
ENDPOINT_CROWDED_SECONDS = 1
# Why a message skips a URL, by the verdict of its breaker's ``admit``.
SKIPPED = {"open": "paused: it failed {endpoint.threshold} times in a row; a message tries it every "
                   "{endpoint.cooldown:g} s",
           "slow": f"slow: a call to it has waited over {SlowCalls.SLOW_AFTER:g} s; messages skip it until that "
                   "call ends",
           "crowded": "busy: {calls.limit} calls to it are in flight from this worker"}


def signer(secret):
    """A ``Webhook`` signer for ``secret``; ConfigError (never showing it) when it is not a valid one."""
    try:
        return Webhook(secret)
    except (ValueError, EmptyWebhookSecretError):
        raise ConfigError({"FORWARD_SECRET": "each secret must be a Standard Webhooks secret: "
                                             "whsec_ followed by base64"}) from None


def _digest(text):
    """16 hex digits of ``text``'s SHA-256: a stable short name (a URL in a Redis key, which may hold a
    token; a message body in its webhook id)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def not_http_urls(urls):
    """The problem with ``urls`` (FORWARD_URLS) when one is not an http(s) URL (naming the last such), else None."""
    bad = [url for url in urls if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc]
    return f"{bad[-1]!r} is not an http(s) URL" if bad else None


def combined(errors, total):
    """One error for several failed endpoints: retriable if any of them is, keeping the first one's answer."""
    if len(errors) == 1:
        return errors[0]
    retriable = [error for error in errors if error.retriable]
    first = (retriable or errors)[0]
    waits = [error.retry_after for error in retriable if error.retry_after is not None]
    return (RetriableError if retriable else PermanentError)(
        f"{len(errors)} of {total} forward endpoints failed: " + "; ".join(error.message for error in errors),
        status=first.status, body=first.body, method=first.method, url=first.url, retry_after=max(waits, default=None))


class ForwardSink(Sink):
    """Every action POSTs the event (with ``action``) to each URL; 2xx means applied."""

    name = "forward"
    supports_deactivate = True
    settings = (
        SinkSetting("FORWARD_URLS", CommaList(load_default=()),
                    "Comma list of URLs that receive every event, signed (Standard Webhooks).", check=not_http_urls),
        SinkSetting("FORWARD_SECRET", CommaList(load_default=()),
                    "whsec_... signing secret(s) for the forward; a comma list during rotation.", secret=True),
    )
    enabled_by = ("FORWARD_URLS",)
    requires = ("FORWARD_SECRET",)
    default_route = {"events": tuple(EVENT_TYPES), "key": "l2u-{entity}-{entity_id}", "ordered": False}
    needs_stop = False  # it forwards events; it writes a stop's location when another sink fetched it
    bulkhead = False  # one per URL: a URL that hangs keeps neither the others nor the worker waiting

    def __init__(self, client, mappings, urls, secrets, options=None):
        super().__init__(client, mappings, options)
        self.urls = tuple(urls)
        self.signers = tuple(signer(secret) for secret in secrets)
        # Each URL's breaker: paused after ENDPOINT_FAILURES failures in a row, then tried by one
        # message every ENDPOINT_PAUSE_SECONDS (one at a time, however long its call takes), so one URL
        # down neither costs every message a call to it nor pauses the forward (whose breaker only
        # hears of it when no URL answers). Each URL's calls in flight from this worker (``SlowCalls``):
        # none while one has waited over SLOW_AFTER seconds, and no more once half of its processes have
        # waited over ENDPOINT_BUSY_AFTER (or are in calls at all after a failure), so a URL that hangs
        # ties up at most about that and the other URLs get each message as it comes.
        self.endpoints = {url: CircuitBreaker(mappings.redis, f"{self.name}:{_digest(url)}",
                                              threshold=ENDPOINT_FAILURES, cooldown=ENDPOINT_PAUSE_SECONDS,
                                              probe_seconds=math.ceil(answer_seconds(client.timeout)))
                          for url in self.urls}
        self.calls = {url: SlowCalls(f"{self.name}:{_digest(url)}") for url in self.urls}

    @classmethod
    def from_settings(cls, settings, mappings):
        client = HttpClient(settings.forward_urls[0], redact=settings.forward_secret, urls=settings.forward_urls)
        return cls(client, mappings, settings.forward_urls, settings.forward_secret)

    def upsert(self, location, options):
        """Forward the event as an upsert; return the webhook id."""
        return self.forward("upsert", location)

    def deactivate(self, location, options):
        """Forward the event as a deactivation; return the webhook id."""
        return self.forward("deactivate", location)

    def delete(self, location, options):
        """Forward the event as a deletion; return the webhook id."""
        return self.forward("delete", location)

    def forward(self, action, location):
        """POST the message to every URL it has not reached yet, but to one paused (``endpoints``) only
        as its probe and to none with a slow call or its share of calls in flight (``calls``); raise
        one error for those that failed or were skipped, marked ``others_answer`` when another URL
        answers (see ``workers.resilience.errors.RelayError``), or NotYet when the only ones left were
        busy."""
        data = json.dumps(self.message(action, location), sort_keys=True, separators=(",", ":"), default=str)
        webhook_id = self.webhook_id(location, data)
        reached = keys.forward_sent(self.name, webhook_id)
        done = self.mappings.redis.smembers(reached)
        errors, busy = {}, []
        for url in self.urls:
            if _digest(url) in done or url in done:  # named by digest (a URL may hold a token); whole before
                continue
            endpoint, calls = self.endpoints[url], self.calls[url]
            call = SlowCalls.Call(token_hex(8), endpoint.probe_seconds)
            verdict = endpoint.admit(calls, call, ENDPOINT_BUSY_AFTER)[0]
            if verdict in SKIPPED:
                why = f"forward endpoint {self.client.scrub(url)} is " + SKIPPED[verdict].format(endpoint=endpoint,
                                                                                                  calls=calls)
                if verdict == "crowded":
                    busy.append(why)
                else:
                    errors[url] = RetriableError(why, method="POST", url=self.client.scrub(url))
                continue
            error = self._send(url, call.member, webhook_id, data, reached)
            if error is not None:
                errors[url] = error
        if errors:
            error = combined(list(errors.values()), len(self.urls))
            error.others_answer = self._others_answer(errors)
            raise error
        if busy:
            raise NotYet("; ".join(busy), retry_after=ENDPOINT_CROWDED_SECONDS)
        return webhook_id

    def _send(self, url, call, webhook_id, data, reached):
        """POST the message to ``url`` as the call ``call`` (counted in flight by ``admit``); record
        its outcome (the URL reached, its breaker, the call over) and return its RelayError or None."""
        endpoint, calls, error = self.endpoints[url], self.calls[url], None
        try:
            self._post(url, webhook_id, data)
        except RelayError as exc:
            error = exc
        except BaseException:  # cut short (a time limit): not in flight any more
            calls.ended(call, self.mappings.redis)
            raise
        with self.mappings.redis.pipeline() as pipe:
            calls.ended(call, pipe)
            if error is None:
                pipe.sadd(reached, _digest(url)).expire(reached, LEDGER_RETENTION)
            if error is None or not error.retriable:  # answered: a refusal of this message is not the URL down
                endpoint.success(pipe)
            pipe.execute()
        if error is not None and error.retriable:
            endpoint.failure()
        return error

    def _others_answer(self, failed):
        """Whether a URL other than those ``failed`` answers: its last call did not fail."""
        others = [self.endpoints[url].key for url in self.urls if url not in failed]
        with self.mappings.redis.pipeline(transaction=False) as pipe:
            for key in others:
                pipe.hget(key, "failures")
            return any(int(failures or 0) == 0 for failures in pipe.execute())

    def paused_endpoints(self):
        """The URLs paused after failing in a row (without their query or password, which may be a credential)."""
        return [f"{self.client.scrub(url)} (failed in a row; tried again every "
                f"{endpoint.cooldown:g} s)" for url, endpoint in self.endpoints.items() if endpoint.state() == "open"]

    def message(self, action, location):
        """The normalized event plus ``action``, and the location's fields when it is a stop's."""
        body = {**location.event, "action": action}
        if location.stop_id is not None:
            body["location"] = {name: value for name, value in location.to_json().items() if name != "event"}
        return body

    def webhook_id(self, location, data):
        """The delivery id plus a suffix stable for this sink and message, so retries keep the id."""
        return f"{location.event['delivery_id']}.{self.name}.{_digest(data)}"

    def _post(self, url, webhook_id, data):
        timestamp = datetime.now(timezone.utc)
        headers = {"Content-Type": "application/json", "webhook-id": webhook_id,
                   "webhook-timestamp": str(int(timestamp.timestamp())),
                   "webhook-signature": " ".join(each.sign(webhook_id, timestamp, data) for each in self.signers)}
        response = self.client.request("POST", url, accept=(410,), data=data.encode(), headers=headers,
                                       allow_redirects=False)
        if response.status_code == 410:
            raise self.client.error_for(response, f"forward endpoint {url} answered 410 Gone: it is disabled; "
                                                  "remove it from FORWARD_URLS or re-enable it")
        if response.status_code >= 300:
            raise self.client.error_for(response, f"forward endpoint {url} answered a redirect "
                                                  f"({response.status_code}); configure its final URL")
