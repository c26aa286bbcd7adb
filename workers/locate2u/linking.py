"""Linking a Locate2u account: redeem the code, ask ``whoami``, refuse a different account.

The relay's webhook subscriptions live in the linked account, so a consent
from another Locate2u account must not silently replace its tokens: such a
token set is held for ``PENDING_TTL`` seconds until the operator accepts it
from the CLI (``l2u-relay oauth accept-account``).
"""
import logging

from workers.resilience.errors import PermanentError, RelayError
from workers.locate2u.token_store import PENDING_TTL
from workers.locate2u.tokens import account_id, describe_account

log = logging.getLogger(__name__)


class AccountChanged(PermanentError):
    """The consent was given by another Locate2u account than the one linked; nothing was replaced."""


def link_account(client, code, code_verifier):
    """Redeem ``code`` and store its tokens when they act as the linked account (or none is linked yet).

    Returns the whoami answer; raises AccountChanged (tokens held as pending), TokenRejected or RetriableError.
    """
    body = client.tokens.redeem_code(code, code_verifier)
    user = client.whoami(access_token=body["access_token"])
    linked = _linked_account(client)
    if linked and account_id(linked) != account_id(user):
        client.tokens.store.save_pending(body, user)
        log.warning("a consent from another Locate2u account (%s) was refused; linked: %s",
                    describe_account(user), describe_account(linked))
        raise AccountChanged(f"the approving Locate2u account {describe_account(user)} is not the linked account "
                             f"{describe_account(linked)}; its tokens were not stored. To switch accounts, the "
                             f"operator runs l2u-relay oauth accept-account within {PENDING_TTL // 60} minutes")
    client.tokens.store_grant(body, user)
    return user


def _linked_account(client):
    """The account recorded at the last link; for tokens stored before accounts were recorded, their whoami."""
    linked = client.tokens.store.account()
    if linked is None and client.tokens.store.load():
        try:
            linked = client.whoami()
        except RelayError as exc:  # the old tokens no longer work: no account left to protect
            log.info("the stored Locate2u tokens do not answer whoami (%s); linking without a comparison",
                     exc.message)
    return linked


def accept_pending(client):
    """Store the held token set of another account: ``(new account, previous account or None)``, or None."""
    pending = client.tokens.store.take_pending()
    if pending is None:
        return None
    previous = client.tokens.store.account()
    client.tokens.store_grant(pending["tokens"], pending["account"])
    log.warning("the operator switched the linked Locate2u account from %s to %s",
                describe_account(previous) if previous else "none", describe_account(pending["account"]))
    return pending["account"], previous
