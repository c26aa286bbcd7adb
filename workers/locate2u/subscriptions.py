"""Reconcile the Locate2u webhook subscriptions with the configuration.

Desired: one subscription per type in ``RELAY_EVENT_TYPES``, at
``webhook_url(RELAY_PUBLIC_URL, RELAY_WEBHOOK_SECRET, type)``. A subscription
is *ours* when its URL is under ``RELAY_PUBLIC_URL/webhooks/locate2u/``; only
ours are ever updated or deleted, so other integrations on the same account
are left alone. URLs are compared in canonical form (scheme and host in lower
case, no default port), as a platform that parses them may give them back.
Planning is pure (``plan``); ``SubscriptionSync.run`` applies the plan under a
Redis lock, so the release process and beat never race. The lock is renewed
while the sync runs (a slow Locate2u can make one outlast the lock's
timeout), and a sync that finds it lost stops before its next change.
"""
import dataclasses
import logging
import re

from workers.config import ConfigError
from workers.resilience.errors import NotFound, PermanentError, RetriableError
from workers.resilience.renewal import HeldLock
from workers.store import keys
from workers.locate2u.webhook_auth import canonical_url, webhook_url

log = logging.getLogger(__name__)
SYNC_LOCK = keys.LOCATE2U_SYNC_LOCK
SYNC_LOCK_TIMEOUT = 120
_TOKEN_IN_URL = re.compile(r"(/webhooks/locate2u/[^/?#]+/)([^/?#]{4})[^/?#]*")


def mask_url(url):
    """``url`` with its capability token cut to four characters, for logs and listings."""
    return _TOKEN_IN_URL.sub(r"\1\2…", url)


def our_prefix(public_url):
    return canonical_url(public_url).rstrip("/") + "/webhooks/locate2u/"


def _url(hook):
    """A listed subscription's URL in canonical form (``canonical_url``): what ours are compared in."""
    return canonical_url(str(hook.get("url") or ""))


def is_ours(hook, prefix):
    """Whether the listed subscription ``hook`` points under ``prefix`` (``our_prefix``)."""
    return _url(hook).startswith(prefix)


@dataclasses.dataclass(frozen=True)
class Change:
    """One step of a plan: ``create``, ``update`` (to ``url``) or ``delete`` a subscription."""

    action: str
    event_type: str
    url: str
    hook_id: object = None

    def __str__(self):
        target = f" #{self.hook_id}" if self.hook_id is not None else ""
        return f"{self.action} {self.event_type}{target} {mask_url(self.url)}"


_APPLY = {
    "create": lambda client, change: client.create_webhook(change.event_type, change.url),
    "update": lambda client, change: client.update_webhook(change.hook_id, change.event_type, change.url),
    "delete": lambda client, change: client.delete_webhook(change.hook_id),
}


def plan(existing, desired, prefix):
    """The changes turning ``existing`` subscriptions into ``desired`` ({type: url}), ours only."""
    ours = [hook for hook in existing if is_ours(hook, prefix)]
    changes, keep = [], set()
    for event_type, url in desired.items():
        mine = sorted((hook for hook in ours if hook.get("eventType") == event_type), key=lambda h: _url(h) != url)
        if not mine:
            changes.append(Change("create", event_type, url))
            continue
        keep.add(mine[0]["id"])
        if _url(mine[0]) != url:
            changes.append(Change("update", event_type, url, mine[0]["id"]))
    changes += [Change("delete", hook.get("eventType"), hook["url"], hook["id"])
                for hook in ours if hook["id"] not in keep]
    return changes


@dataclasses.dataclass
class SyncReport:
    """What a sync found and did (``applied`` False for a dry run)."""

    changes: list
    unchanged: int
    foreign: int
    applied: bool

    def counts(self):
        counts = {action: sum(c.action == action for c in self.changes) for action in _APPLY}
        return {**counts, "unchanged": self.unchanged, "foreign": self.foreign}

    def summary(self):
        counts = self.counts()
        verb = "" if self.applied else "would be "
        return (f"{verb}created {counts['create']}, {verb}updated {counts['update']}, "
                f"{verb}deleted {counts['delete']}, unchanged {counts['unchanged']}, "
                f"not ours (left alone) {counts['foreign']}")


class SubscriptionSync:
    """Desired subscriptions from settings, reconciled through a Locate2uClient."""

    def __init__(self, client, redis_client, public_url, secret, event_types):
        if not public_url:
            raise ConfigError({"RELAY_PUBLIC_URL": "required to subscribe to Locate2u webhooks"})
        self.client = client
        self.redis = redis_client
        self.prefix = our_prefix(public_url)
        self.desired = {event_type: webhook_url(public_url, secret, event_type) for event_type in event_types}

    @classmethod
    def from_settings(cls, client, settings, redis_client):
        return cls(client, redis_client, settings.public_url, settings.webhook_secret, settings.event_types)

    def run(self, dry_run=False):
        """Plan and (unless ``dry_run``) apply; a second run right after changes nothing."""
        if dry_run:
            return self._reconcile(apply=False)
        lock = self.redis.lock(SYNC_LOCK, timeout=SYNC_LOCK_TIMEOUT, blocking_timeout=SYNC_LOCK_TIMEOUT / 2,
                               thread_local=False)  # the renewal thread renews it
        if not lock.acquire():
            raise RetriableError("another subscriptions sync is still running; try again later")
        held = HeldLock(lock, "the subscriptions sync lock",
                        "so that two syncs do not subscribe twice; the next sync finishes")
        with held.kept():
            return self._reconcile(apply=True, held=held)

    def _reconcile(self, apply, held=None):
        self._check_event_types()
        existing = self.client.list_webhooks()
        changes = plan(existing, self.desired, self.prefix)
        foreign = sum(not is_ours(hook, self.prefix) for hook in existing)
        unchanged = len(self.desired) - sum(change.action != "delete" for change in changes)
        for change in changes if apply else ():
            held.check(change)
            self._apply(change)
        return SyncReport(changes, unchanged, foreign, apply)

    def _apply(self, change):
        try:
            _APPLY[change.action](self.client, change)
        except NotFound:
            if change.action != "delete":
                raise
        log.info("Locate2u subscription: %s", change)

    def _check_event_types(self):
        offered = {item if isinstance(item, str) else item.get("eventType") or item.get("name")
                   for item in self.client.event_types()}
        missing = sorted(set(self.desired) - offered)
        if missing:
            raise PermanentError(f"Locate2u does not offer event type(s) {', '.join(missing)} "
                                 f"(offered: {', '.join(sorted(map(str, offered)))}); fix RELAY_EVENT_TYPES")
