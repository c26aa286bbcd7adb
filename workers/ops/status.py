"""``l2u-relay status``: the relay at a glance — Redis health, queues, retries, dead letters, breakers,
Locate2u."""
import redis

from workers.config import ConfigError
from workers.locate2u.subscriptions import SubscriptionSync
from workers.metrics import QUEUES
from workers.pipeline.outcomes import ENRICH
from workers.resilience.errors import RelayError
from workers.resilience.retries import RetryScheduler
from workers.store import redis_health
from workers.store import keys
from workers.store.quarantine import Quarantine


def collect(rt):
    """Everything ``status`` shows, as JSON-ready data (one network call: the subscriptions list, with
    a page's timeout: the console's overview shows this too)."""
    return {"redis": redis_health.check(rt.redis),
            "queues": {queue: rt.redis.llen(keys.queue_list(queue)) for queue in QUEUES},
            "in_flight": rt.redis.hlen(keys.KOMBU_UNACKED),
            "scheduled_retries": rt.redis.zcard(RetryScheduler.KEY),
            "dead_letters": rt.dead_letters.counts(),
            "quarantined": rt.redis.llen(Quarantine.KEY),
            "sinks": {name: _sink(rt, name) for name in rt.sinks},
            "locate2u": _locate2u(rt)}


def _sink(rt, name):
    return {"breaker": rt.breaker(name).state(),
            "mapped": rt.redis.hlen(keys.mappings(name)),
            "dead_letters": rt.dead_letters.counts().get(name, 0),
            "paused": rt.sinks[name].paused_endpoints()}


def _locate2u(rt):
    if rt.locate2u is None:
        return {"configured": False}
    info = {"configured": True, "token": rt.locate2u.tokens.describe()}
    try:
        report = SubscriptionSync.from_settings(rt.locate2u.for_a_page(), rt.settings, rt.redis).run(dry_run=True)
    except (RelayError, ConfigError, redis.RedisError) as exc:
        info["subscriptions"] = {"error": getattr(exc, "message", str(exc))}
    else:
        info["subscriptions"] = {"desired": len(rt.settings.event_types), "in_place": report.unchanged,
                                 "pending_changes": [str(change) for change in report.changes],
                                 "foreign": report.foreign}
    return info


def render(data):
    """The compact table a person reads."""
    lines = redis_health.lines(data["redis"])
    lines += ["queues        " + "  ".join(f"{q}={n}" for q, n in data["queues"].items())
             + f"  in-flight={data['in_flight']}  scheduled-retries={data['scheduled_retries']}"]
    lines.append(f"quarantined   {data['quarantined']} (l2u-relay quarantine list)")
    lines.append(f"{'sink':<13} {'breaker':<8} {'mapped':>7} {'dead letters':>13}")
    for name, sink in data["sinks"].items():
        lines.append(f"{name:<13} {sink['breaker']:<8} {sink['mapped']:>7} {sink['dead_letters']:>13}")
        lines += [f"  paused: {endpoint}" for endpoint in sink["paused"]]
    other = {k: v for k, v in data["dead_letters"].items() if k not in data["sinks"]}
    if other.get(ENRICH):
        lines.append(f"dead letters before fan-out (their stop could not be read): {other.pop(ENRICH)}")
    if other:  # a sink whose credentials were removed since: its letters are still in the store
        lines.append("dead letters of sinks not configured now: " + ", ".join(f"{k}={v}" for k, v in other.items()))
    l2u = data["locate2u"]
    if not l2u["configured"]:
        lines.append("locate2u      not configured (LOCATE2U_CLIENT_ID)")
        return "\n".join(lines)
    token = l2u["token"]
    expiry = f", expires in {token['expires_in']}s" if token["expires_in"] is not None else ""
    lines.append(f"locate2u      token {token['status']} ({token['grant']}{expiry})")
    if token["token_key"] != "RELAY_TOKEN_KEYS":
        lines.append(f"warning       {token['token_key']}")
    subs = l2u["subscriptions"]
    if "error" in subs:
        lines.append(f"subscriptions unavailable: {subs['error']}")
    else:
        lines.append(f"subscriptions {subs['in_place']}/{subs['desired']} in place, "
                     f"{len(subs['pending_changes'])} change(s) pending, {subs['foreign']} not ours")
        lines += [f"  pending: {change}" for change in subs["pending_changes"]]
    return "\n".join(lines)
