"""Redis health: memory used against ``maxmemory``, the eviction policy and persistence.

One function (``check``) computes it; the web process logs it at start-up, ``/readyz``
and ``l2u-relay status`` show it. A relay must not lose work, so only ``noeviction``
is safe (a full Redis then refuses writes, which the receiver answers with 503 and
the workers retry), and a Redis without persistence loses everything on a restart.
"""
import redis

MEMORY_WARNING = 0.8  # fraction of maxmemory from which memory is a warning


def memory(client):
    """``(used_memory, maxmemory)`` in bytes; maxmemory is 0 when Redis has no limit."""
    info = client.info("memory")
    return int(info["used_memory"]), int(info.get("maxmemory", 0))


def check(client):
    """The Redis health report: ``{"status": "ok"|"warning"|"error", "warnings": [...], ...figures}``.

    Never raises: an unreachable Redis is an ``error`` report.
    """
    try:
        info = client.info()
    except redis.RedisError as exc:
        return {"status": "error", "warnings": [f"Redis unreachable: {type(exc).__name__}: {exc}"]}
    used, limit = int(info["used_memory"]), int(info.get("maxmemory", 0))
    policy = info.get("maxmemory_policy", "unknown")
    aof = bool(int(info.get("aof_enabled", 0)))
    rdb = _rdb_saves(client, info)
    warnings = []
    if limit and used >= MEMORY_WARNING * limit:
        warnings.append(f"memory {used / limit:.0%} of maxmemory ({_mb(used)} of {_mb(limit)}): settled history is "
                        "trimmed, but new deliveries are refused (503) once it is full")
    if policy != "noeviction":
        warnings.append(f"EVICTION ENABLED: maxmemory-policy is {policy}; Redis may delete ledger entries, "
                        "mappings or queued work when full. Set it to noeviction")
    if not aof and not rdb:
        warnings.append("no persistence (neither AOF nor RDB snapshots): a Redis restart loses queued work "
                        "and the ledger")
    return {"status": "warning" if warnings else "ok", "warnings": warnings, "used_memory": used,
            "maxmemory": limit, "used_percent": round(100 * used / limit, 1) if limit else None,
            "maxmemory_policy": policy, "aof": aof, "rdb": rdb}


def _rdb_saves(client, info):
    """True when RDB snapshots are configured; a Redis that hides CONFIG (a managed one) counts as yes
    if it has saved before."""
    try:
        return bool(client.config_get("save").get("save", "").strip())
    except redis.ResponseError:
        return int(info.get("rdb_last_save_time", 0)) > 0 and info.get("rdb_last_bgsave_status") == "ok"


def is_full(exc):
    """True when ``exc`` is Redis refusing a write because it is full (``OOM``), also as relayed by a script."""
    return isinstance(exc, redis.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "-OOM command not allowed" in str(exc))


def log_report(client, logger):
    """Log the report at start-up: the figures at INFO, each warning at WARNING."""
    report = check(client)
    if report["status"] == "error":
        logger.error("%s", summary(report))
        return report
    logger.info("%s", summary(report))
    for warning in report["warnings"]:
        logger.warning("redis: %s", warning)
    return report


def lines(report):
    """The summary line, then one ``WARNING redis: …`` line per warning."""
    if report["status"] == "error":
        return [summary(report)]
    return [summary(report)] + [f"WARNING redis: {warning}" for warning in report["warnings"]]


def summary(report):
    """One line for a log or a terminal (the warnings are listed separately)."""
    if report["status"] == "error":
        return "redis: " + report["warnings"][0]
    limit = f"{_mb(report['maxmemory'])} ({report['used_percent']}%)" if report["maxmemory"] else "no limit"
    persistence = "+".join(name for name in ("aof", "rdb") if report[name]) or "none"
    return (f"redis: memory {_mb(report['used_memory'])} of {limit}, policy {report['maxmemory_policy']}, "
            f"persistence {persistence}")


def _mb(size):
    return f"{size / 1024 / 1024:.1f} MB"
