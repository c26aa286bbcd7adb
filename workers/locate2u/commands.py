"""``l2u-relay oauth | whoami | stops | subscriptions``: the Locate2u side of the relay.

Exit codes: 0 done; 1 Locate2u, the identity server or Redis failed, or some
rows failed to import; 2 configuration problem (including Locate2u not
configured, or an unreadable import file); 3 re-authorisation required.
``subscriptions sync`` exits 0 when it has nothing it can do yet (Locate2u not
configured, or not yet authorised), so a first deploy's release phase passes;
in the release phase (``DYNO=release.…``) it also exits 0 when Locate2u or Redis
is unavailable, postponing to beat's sync: Heroku does not release a deploy whose
release phase failed.
"""
import functools
import json
import os
from urllib.parse import parse_qs, urlencode, urlsplit

import click
import redis
from cryptography.fernet import Fernet

from workers.config import ConfigError, Settings
from workers.resilience.errors import CredentialsRefused, RelayError
from workers.locate2u.client import Locate2uClient, redirect_uri
from workers.locate2u.subscriptions import SubscriptionSync, is_ours, mask_url, our_prefix
from workers.locate2u.linking import accept_pending, link_account
from workers.locate2u.oauth_links import LINK_TTL, OAuthStates, StartLinks, pkce_pair
from workers.locate2u.token_store import TokenStore
from workers.locate2u.tokens import START_PATH, ReauthorizationRequired, describe_account
from workers.pipeline.failures import redis_outage
from workers.store.redis_client import connect

EXIT_FAILED, EXIT_CONFIG, EXIT_REAUTH = 1, 2, 3
NOT_CONFIGURED = "Locate2u is not configured: set LOCATE2U_CLIENT_ID and LOCATE2U_CLIENT_SECRET"


def _fail(message, code):
    click.echo(f"error: {message}", err=True)
    click.get_current_context().exit(code)


def _describe(exc):
    text = exc.message
    if exc.body:
        text += f"\n  response body: {exc.body}"
    if exc.retriable:
        text += "\n  (gave up after bounded retries: check LOCATE2U_API_URL, LOCATE2U_ID_URL and the network)"
    return text


def _reported(command):
    """Turn the relay's errors into one plain message and the documented exit code."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            _fail(str(exc), EXIT_CONFIG)
        except ReauthorizationRequired as exc:
            _fail(f"re-authorisation required: {exc}", EXIT_REAUTH)
        except RelayError as exc:
            _fail(_describe(exc), EXIT_FAILED)
        except redis.RedisError as exc:
            _fail(f"Redis is unavailable: {type(exc).__name__}: {exc}", EXIT_FAILED)
    return wrapper


def _context(require_client=True):
    """(settings, redis client, Locate2uClient or None) from the environment."""
    settings = Settings.from_env()
    if not settings.locate2u_client_id:
        if require_client:
            _fail(NOT_CONFIGURED, EXIT_CONFIG)
        return settings, None, None
    if not settings.redis_url:
        raise ConfigError({"REDIS_URL": "required: the Locate2u tokens and OAuth state live in Redis"})
    redis_client = connect(settings.redis_url, settings.redis_ca_file, settings.redis_max_connections)
    return settings, redis_client, Locate2uClient.from_settings(settings, redis_client)


# --- oauth ----------------------------------------------------------------------

@click.group()
def oauth():
    """Link the Locate2u account (LOCATE2U_GRANT=authorization_code) and manage the key of the stored tokens."""


@oauth.command("url")
@click.option("--direct", is_flag=True,
              help="Print the identity server's authorisation URL instead, for when the relay's own pages cannot "
                   "be reached yet; then finish with l2u-relay oauth exchange CALLBACK_URL.")
@_reported
def oauth_url(direct):
    """Print the operator's link that starts the Locate2u approval (signed, single use, valid 10 minutes)."""
    settings, redis_client, client = _context()
    client.tokens.check_code_flow()
    if direct:
        verifier, challenge = pkce_pair()
        click.echo(client.tokens.authorize_url(OAuthStates(redis_client).issue(verifier), challenge))
        click.echo(f"Open it in any browser and approve. It then goes to {redirect_uri(settings)}; copy that whole "
                   "address from the address bar and run: l2u-relay oauth exchange 'CALLBACK_URL' "
                   "(within 5 minutes).", err=True)
        return
    link = StartLinks(redis_client, settings).make()
    click.echo(f"{settings.public_url.rstrip('/')}{START_PATH}?{urlencode({'link': link})}")
    click.echo(f"Open it within {LINK_TTL // 60} minutes in the browser that will approve (it works once).", err=True)


@oauth.command("exchange")
@click.argument("callback_url")
@_reported
def oauth_exchange(callback_url):
    """Finish a --direct approval: CALLBACK_URL is the address Locate2u redirected to (with code and state)."""
    _, redis_client, client = _context()
    query = parse_qs(urlsplit(callback_url).query)
    if not query.get("code") or not query.get("state"):
        _fail("CALLBACK_URL must be the whole address Locate2u redirected to, with code= and state= "
              "(quote it in the shell)", EXIT_CONFIG)
    record = OAuthStates(redis_client).consume(query["state"][0])
    if record is None:
        _fail("the state is unknown, expired or already used: run l2u-relay oauth url --direct again", EXIT_FAILED)
    user = link_account(client, query["code"][0], record["verifier"])
    click.echo(f"authorised as {user.get('email')} ({user.get('teamName')}); tokens stored encrypted in Redis")


@oauth.command("accept-account")
@_reported
def oauth_accept_account():
    """Link the other Locate2u account whose approval was refused in the last 10 minutes."""
    _, _, client = _context()
    accepted = accept_pending(client)
    if accepted is None:
        _fail("no approval from another account is waiting (it is held for 10 minutes)", EXIT_FAILED)
    account, previous = accepted
    click.echo(f"linked {describe_account(account)} instead of "
               f"{describe_account(previous) if previous else 'no account'}; the next subscriptions sync moves "
               "the webhooks (l2u-relay subscriptions sync does it now). Delete the old account's "
               "subscriptions there by hand.")


@oauth.command("new-key")
def oauth_new_key():
    """Print a new Fernet key for RELAY_TOKEN_KEYS (put it first; keep the old one until rotate-key ran)."""
    click.echo(Fernet.generate_key().decode())


@oauth.command("rotate-key")
@_reported
def oauth_rotate_key():
    """Re-encrypt the stored Locate2u tokens under the first key of RELAY_TOKEN_KEYS."""
    settings, redis_client, _ = _context()
    store = TokenStore.from_settings(redis_client, settings)
    if store.key_warning:
        raise ConfigError({"RELAY_TOKEN_KEYS": "unset: nothing to rotate to (l2u-relay oauth new-key makes one)"})
    done, failed = store.rotate()
    click.echo(f"re-encrypted {len(done)} stored value(s) under the first key of RELAY_TOKEN_KEYS")
    if failed:
        _fail(f"{len(failed)} value(s) could not be decrypted with any key and were left as they are: "
              f"{', '.join(failed)}", EXIT_FAILED)


@oauth.command("status")
@_reported
def oauth_status():
    """Show the token state (never the tokens); exit 3 when re-authorisation is required."""
    _, _, client = _context(require_client=False)
    if client is None:
        click.echo("status: not configured")
        click.get_current_context().exit(EXIT_CONFIG)
    facts = client.tokens.describe()
    for name, value in facts.items():
        click.echo(f"{name}: {value}")
    if facts["status"] != "ok":
        click.get_current_context().exit(EXIT_REAUTH)


# --- whoami and stops ----------------------------------------------------------------

@click.command()
@_reported
def whoami():
    """Show the Locate2u user and team the relay acts as."""
    _, _, client = _context()
    click.echo(json.dumps(client.whoami(), indent=2))


@click.group()  # ``stops import`` is in workers/locate2u/stops_command.py
def stops():
    """Locate2u stops."""


# --- subscriptions ------------------------------------------------------------------

@click.group()
def subscriptions():
    """Locate2u webhook subscriptions."""


@subscriptions.command("list")
@_reported
def subscriptions_list():
    """List every subscription of the account (URL tokens shortened)."""
    settings, _, client = _context()
    prefix = our_prefix(settings.public_url) if settings.public_url else None
    for hook in client.list_webhooks():
        owner = "ours" if prefix and is_ours(hook, prefix) else "not ours"
        click.echo(f"{hook.get('id')}\t{hook.get('eventType')}\t{owner}\t{mask_url(str(hook.get('url')))}")


def _hook_id(ctx, param, value):
    """A subscription id as ``subscriptions list`` shows it: one path segment (an empty one deleted
    ``/v1/Webhooks/`` itself)."""
    if not value.strip() or any(mark in value for mark in "/?#") or value != value.strip():
        raise click.BadParameter(f"{value!r} is not a subscription id (l2u-relay subscriptions list shows them)")
    return value


@subscriptions.command("delete")
@click.argument("hook_id", callback=_hook_id)
@_reported
def subscriptions_delete(hook_id):
    """Delete the subscription HOOK_ID."""
    _, _, client = _context()
    client.delete_webhook(hook_id)
    click.echo(f"deleted subscription {hook_id}")


def _in_release_phase():
    """True in a Heroku release phase, whose dyno is ``release.<n>``."""
    return os.environ.get("DYNO", "").startswith("release.")


def _outage(exc):
    """True when ``exc`` says Locate2u or Redis is unavailable for now (not a mistake to fix)."""
    if isinstance(exc, RelayError):  # refused credentials are a mistake to fix, not an outage
        return exc.retriable and not isinstance(exc, CredentialsRefused)
    return redis_outage(exc)


@subscriptions.command("sync")
@click.option("--dry-run", is_flag=True, help="Show the changes without making them.")
@_reported
def subscriptions_sync(dry_run):
    """Create, update and delete our subscriptions to match RELAY_EVENT_TYPES (others untouched)."""
    settings, redis_client, client = _context(require_client=False)
    if client is None:
        click.echo(f"nothing to sync: {NOT_CONFIGURED}")
        return
    try:
        report = SubscriptionSync.from_settings(client, settings, redis_client).run(dry_run=dry_run)
    except ReauthorizationRequired as exc:
        click.echo(f"sync skipped: re-authorisation required: {exc}", err=True)
        return
    except (RelayError, redis.RedisError) as exc:
        if not (_in_release_phase() and _outage(exc)):
            raise
        reason = exc.message if isinstance(exc, RelayError) else f"Redis is unavailable: {type(exc).__name__}: {exc}"
        click.echo(f"sync postponed: {reason}\n  the deploy goes on; the beat task syncs every "
                   f"{settings.subscription_sync_interval} s (or run l2u-relay subscriptions sync)", err=True)
        return
    for change in report.changes:
        click.echo(("would " if dry_run else "") + str(change))
    click.echo(report.summary())
