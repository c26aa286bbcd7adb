"""Beat task: keep the Locate2u webhook subscriptions in line with the configuration."""
import logging

from celery import shared_task

from workers.celery_config import SYNC_SUBSCRIPTIONS
from workers.resilience.errors import RelayError
from workers.locate2u.subscriptions import SubscriptionSync
from workers.locate2u.tokens import ReauthorizationRequired
from workers.runtime import runtime

log = logging.getLogger(__name__)


@shared_task(name=SYNC_SUBSCRIPTIONS)
def sync_subscriptions():
    """Reconcile the subscriptions; return the counts (or why nothing was done)."""
    rt = runtime()
    if rt.locate2u is None:
        return {"status": "not configured"}
    try:
        report = SubscriptionSync.from_settings(rt.locate2u, rt.settings, rt.redis).run()
    except ReauthorizationRequired:
        return {"status": "reauthorization required"}  # the token manager has logged it plainly
    except RelayError as exc:
        log.error("Locate2u subscriptions sync failed: %s", exc.message, extra={"error": exc.to_json()})
        return {"status": "failed", "error": exc.to_json()}
    log.info("Locate2u subscriptions sync: %s", report.summary())
    return {"status": "ok", **report.counts()}
