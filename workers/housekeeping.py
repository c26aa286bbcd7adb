"""Bounds on what Redis keeps, applied by the sweeper on every run.

- settled deliveries are compacted (``Ledger.compact``) and their history expires after
  ``RELAY_HISTORY_DAYS``;
- once Redis uses ``RELAY_HISTORY_TRIM_PERCENT`` of its ``maxmemory``, settled history is
  trimmed oldest first until it is below again; pending work (full ledger entries, queues,
  retries, dead letters) is never trimmed, so history cannot crowd it out;
- dead letters are kept ``RELAY_DEAD_LETTER_DAYS`` and at most ``RELAY_DEAD_LETTER_LIMIT``;
  the quarantine keeps the newest ``RELAY_QUARANTINE_LIMIT`` (``Quarantine.add`` trims it).
"""
import logging

import redis

from workers import redis_health

log = logging.getLogger(__name__)
DAY = 86400


def run(rt, now=None):
    """Apply every bound once; return what each step removed.

    Trimming comes first: deleting works even when Redis is full, compacting (a script) does not.
    """
    settings = rt.settings
    done = {"trimmed": trim_for_memory(rt.redis, rt.ledger, settings.history_trim_percent),
            "dead_letters": rt.dead_letters.trim(settings.dead_letter_limit, settings.dead_letter_days * DAY, now),
            "expired_ids": rt.ledger.prune(now)}
    try:
        done["compacted"] = rt.ledger.compact(now)
    except redis.OutOfMemoryError:
        done["compacted"] = 0
        log.error("Redis is full of pending work (no settled history left to trim): new deliveries get 503 "
                  "until the workers catch up or the plan grows")
    if done["trimmed"]:
        log.warning("Redis memory above %d%% of maxmemory: trimmed the %d oldest settled deliveries",
                    settings.history_trim_percent, done["trimmed"])
    if done["dead_letters"]:
        log.warning("dropped %d dead letters past RELAY_DEAD_LETTER_DAYS or RELAY_DEAD_LETTER_LIMIT",
                    done["dead_letters"])
    return done


def trim_for_memory(client, ledger, percent):
    """Trim settled history, oldest first, while Redis uses ``percent`` % of its maxmemory or more."""
    def below():
        used, limit = redis_health.memory(client)
        return not limit or used < limit * percent / 100

    return 0 if below() else ledger.trim_history(below)
