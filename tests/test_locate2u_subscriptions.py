"""Subscription reconciliation: the plan, and syncs against the simulator."""
import threading
import time

import pytest

from workers.resilience.errors import BadAnswer, PermanentError, RetriableError
from workers.locate2u import subscriptions
from workers.locate2u.client import Locate2uClient
from workers.locate2u.subscriptions import Change, SubscriptionSync, mask_url, plan
from workers.store import keys
from workers.locate2u.webhook_auth import webhook_url

PUBLIC = "https://relay.example"
PREFIX = PUBLIC + "/webhooks/locate2u/"
FOREIGN = "https://crm.example/hooks/locate2u"
NEW_SECRET = "rotated-webhook-secret-0123456789"


def hook(hook_id, event_type, url):
    return {"id": hook_id, "eventType": event_type, "url": url}


# --- plan (pure) ---------------------------------------------------------------------

def test_plan_creates_updates_deletes_only_ours():
    desired = {"stop.assigned": PREFIX + "stop.assigned/new", "trip.created": PREFIX + "trip.created/tok",
               "note.created": PREFIX + "note.created/tok"}
    existing = [hook(1, "stop.assigned", PREFIX + "stop.assigned/old"),   # drifted (rotated token)
                hook(2, "trip.created", PREFIX + "trip.created/tok"),     # as desired
                hook(3, "trip.created", PREFIX + "trip.created/dup"),     # our duplicate
                hook(4, "shipment.assigned", PREFIX + "shipment.assigned/x"),  # no longer wanted
                hook(5, "stop.assigned", FOREIGN),                        # someone else's
                hook(6, "note.created", "https://relay.example.evil/webhooks/locate2u/note.created/x")]
    assert plan(existing, desired, PREFIX) == [
        Change("update", "stop.assigned", PREFIX + "stop.assigned/new", 1),
        Change("create", "note.created", PREFIX + "note.created/tok"),
        Change("delete", "trip.created", PREFIX + "trip.created/dup", 3),
        Change("delete", "shipment.assigned", PREFIX + "shipment.assigned/x", 4),
    ]


def test_plan_of_the_desired_state_is_empty():
    desired = {"stop.assigned": PREFIX + "stop.assigned/t"}
    assert plan([hook(9, "stop.assigned", PREFIX + "stop.assigned/t")], desired, PREFIX) == []


def test_url_tokens_are_masked_for_display():
    url = webhook_url(PUBLIC, "a-secret-of-enough-length", "stop.assigned")
    token = url.rsplit("/", 1)[1]
    assert mask_url(url) == f"{PREFIX}stop.assigned/{token[:4]}…" and token not in str(Change("create", "x", url))
    assert mask_url(FOREIGN) == FOREIGN


# --- syncs against the simulator ---------------------------------------------------------

@pytest.fixture
def configured(sim, settings):
    return sim.configure(settings, public_url=PUBLIC)


def sync(settings, redis_client, dry_run=False):
    client = Locate2uClient.from_settings(settings, redis_client)
    return SubscriptionSync.from_settings(client, settings, redis_client).run(dry_run=dry_run)


def urls(sim):
    return {h["eventType"]: h["url"] for h in sim.state.list_webhooks() if h["url"] != FOREIGN}


def test_sync_is_idempotent_and_leaves_foreign_subscriptions_alone(sim, configured, redis_client):
    foreign = sim.state.add_webhook("stop.assigned", FOREIGN)
    dry = sync(configured, redis_client, dry_run=True)
    assert dry.counts()["create"] == 8 and not dry.applied and len(sim.state.webhooks) == 1
    first = sync(configured, redis_client)
    assert first.counts() == {"create": 8, "update": 0, "delete": 0, "unchanged": 0, "foreign": 1}
    assert urls(sim) == {t: webhook_url(PUBLIC, configured.webhook_secret, t) for t in configured.event_types}
    snapshot = sim.state.list_webhooks()
    second = sync(configured, redis_client)
    assert second.changes == [] and second.counts()["unchanged"] == 8
    assert sim.state.list_webhooks() == snapshot and sim.state.webhooks[foreign["id"]] == foreign
    assert second.summary() == ("created 0, updated 0, deleted 0, unchanged 8, not ours (left alone) 1")


def test_fewer_event_types_deletes_our_stale_ones(sim, configured, redis_client):
    sync(configured, redis_client)
    report = sync(configured.replace(event_types=("stop.assigned", "stop.status-changed")), redis_client)
    assert report.counts()["delete"] == 6 and set(urls(sim)) == {"stop.assigned", "stop.status-changed"}


def test_secret_rotation_updates_every_url(sim, configured, redis_client):
    sync(configured, redis_client)
    ids = {h["eventType"]: h["id"] for h in sim.state.list_webhooks()}
    rotated = configured.replace(webhook_secret=NEW_SECRET, webhook_secret_previous=configured.webhook_secret)
    report = sync(rotated, redis_client)
    assert report.counts()["update"] == 8 and report.counts()["create"] == 0
    assert urls(sim) == {t: webhook_url(PUBLIC, NEW_SECRET, t) for t in configured.event_types}
    assert {h["eventType"]: h["id"] for h in sim.state.list_webhooks()} == ids  # updated in place
    assert sync(rotated, redis_client).changes == []
    # the token stored under the old secret still decrypts: no new token request
    assert len(sim.state.token_requests) == 1


def test_event_types_are_checked_before_any_change(sim, configured, redis_client):
    sim.state.event_types = ("stop.assigned",)
    with pytest.raises(PermanentError, match="does not offer event type"):
        sync(configured, redis_client)
    assert sim.state.webhooks == {}


def test_a_platform_that_gives_urls_back_parsed_gets_no_second_subscription_per_sync(sim, settings, redis_client):
    """A platform that parses a subscription's URL (a .NET ``Uri``) gives it back with scheme and host in
    lower case and without the default port. With ``RELAY_PUBLIC_URL`` written otherwise, every sync took
    ours for someone else's and subscribed again: eight more subscriptions every 15 minutes."""
    sim.state.parses_urls = True
    configured = sim.configure(settings, public_url="HTTPS://Relay.Example:443")
    assert sync(configured, redis_client).counts()["create"] == 8
    again = sync(configured, redis_client)
    assert again.counts() == {"create": 0, "update": 0, "delete": 0, "unchanged": 8, "foreign": 0}
    assert urls(sim) == {t: webhook_url(PUBLIC, configured.webhook_secret, t) for t in configured.event_types}


def test_our_subscriptions_kept_as_written_are_ours_however_the_public_url_is_spelled(sim, settings, redis_client):
    """Registered (as given) before the public URL's spelling changed: the same URLs, not foreign ones."""
    sync(sim.configure(settings, public_url="HTTPS://Relay.Example:443/"), redis_client)
    again = sync(sim.configure(settings, public_url=PUBLIC), redis_client)
    assert again.changes == [] and again.counts()["unchanged"] == 8 and len(sim.state.webhooks) == 8


@pytest.mark.parametrize("listed", [{"data": [], "total": 0}, "ok", 42])
def test_a_subscription_list_that_is_not_a_list_is_a_bad_answer_not_a_crash(sim, configured, redis_client, listed):
    """An envelope (``{"data": [...]}``), a string or nothing where the list was: the sync (also the
    release phase's) ended in an AttributeError traceback, or took the account for one without ours."""
    sim.faults.inject(200, body=list(sim.state.event_types), path_prefix="/v1/Webhooks/event-types")
    sim.faults.inject(200, body=listed, path_prefix="/v1/Webhooks")
    with pytest.raises(BadAnswer, match=r"GET .*/v1/Webhooks answered 200 with a body that is not a list"):
        sync(configured, redis_client)
    assert sim.state.webhooks == {}


@pytest.mark.parametrize("item", [7, "hook", {"eventType": "stop.assigned", "url": PREFIX + "stop.assigned/x"}])
def test_a_listed_subscription_that_is_not_one_is_a_bad_answer_not_a_crash(sim, configured, redis_client, item):
    """A list holding a number, a string or an object without an id: the sync ended in a traceback."""
    sim.faults.inject(200, body=list(sim.state.event_types), path_prefix="/v1/Webhooks/event-types")
    sim.faults.inject(200, body=[item], path_prefix="/v1/Webhooks")
    with pytest.raises(BadAnswer, match=r"GET .*/v1/Webhooks answered 200 with 1 subscription\(s\) without an id") \
            as refused:
        sync(configured, redis_client)
    assert sim.state.webhooks == {} and "stop.assigned/x" not in refused.value.message  # a URL holds the token


def started_sync(settings, redis_client):
    """A sync running in a thread; ``join()`` returns its report or the error it raised."""
    outcome = []

    def run():
        try:
            outcome.append(sync(settings, redis_client))
        except Exception as exc:  # the test looks at what the sync ended with
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join_outcome = lambda: (thread.join(60), outcome[0])[1]
    return thread


def test_a_sync_slowed_past_its_lock_keeps_the_lock_so_a_second_one_cannot_subscribe_again(
        sim, configured, redis_client, monkeypatch):
    """Locate2u answering slowly (each call well inside its timeout) made a sync outlast its 120 s lock.
    The release phase's sync or beat's then took the lock, listed what the first had created so far and
    created the rest again: five duplicate subscriptions here, each event sent twice until the next sync.
    Both ended in LockNotOwnedError (which the release phase reported as Redis unavailable). Shown with
    the times cut down:
    a 3 s lock, calls of 0.5 s, ten calls a sync."""
    monkeypatch.setattr(subscriptions, "SYNC_LOCK_TIMEOUT", 3)
    sim.faults.latency(0.5)
    first = started_sync(configured, redis_client)
    time.sleep(2)  # the second waits for the lock (1.5 s) until past the first's 3 s
    second = started_sync(configured, redis_client)
    assert first.join_outcome().counts()["create"] == 8
    refused = second.join_outcome()
    assert isinstance(refused, RetriableError) and "another subscriptions sync is still running" in str(refused)
    assert sorted(h["eventType"] for h in sim.state.list_webhooks()) == sorted(configured.event_types)
    assert not redis_client.exists(keys.LOCATE2U_SYNC_LOCK)


def test_a_sync_that_loses_its_lock_stops_before_its_next_change_and_says_so(
        sim, configured, redis_client, monkeypatch):
    """A lock Redis no longer holds (a failover to a replica that had not got it, a flush) lets another
    sync in: the sync stops changing subscriptions and says why, and the next one finishes the work."""
    monkeypatch.setattr(subscriptions, "SYNC_LOCK_TIMEOUT", 1.5)
    sim.faults.latency(0.3)
    running = started_sync(configured, redis_client)
    time.sleep(1.2)  # event types and the list read, some creates made
    redis_client.delete(keys.LOCATE2U_SYNC_LOCK)
    stopped = running.join_outcome()
    assert isinstance(stopped, RetriableError) and "lost the subscriptions sync lock" in str(stopped)
    made = len(sim.state.webhooks)
    assert made < 8  # stopped before its last change (how many it made depends on the machine's pace)
    sim.faults.latency(0)
    assert sync(configured, redis_client).counts()["create"] == 8 - made
    assert len(sim.state.webhooks) == 8
