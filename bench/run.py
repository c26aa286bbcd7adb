"""The benchmark: ``python -m bench.run`` (``make bench``); ``--profile ci`` is a tiny run that checks it works.

1. ingest: the receiver against a bare Flask app, a one-Redis-pipeline app and an app
   that runs only the receiver's ledger script (``bench/apps.py``), all under the
   project's gunicorn settings, driven by wrk (or the Python fallback);
   the rounds alternate the apps and each ratio is the median of per-round ratios.
2. end to end: N deliveries posted to the receiver and applied by the workers
   (the shipped pool and concurrency defaults unless given) to the Storepoint and
   B2B simulators, Locate2u simulated for enrichment; then a paced run at half the
   relay's measured rate for receipt-to-applied latency; then the same events
   applied by a naive Celery consumer (``bench/naive.py``, same pool and
   concurrency), fed straight onto its queue and then through a Flask app that
   calls send_task per webhook, and by a plain threaded requests.Session loop at
   the same concurrency.
3. memory: peak RSS of a web worker and of the Celery worker processes, and Redis bytes per
   pending, settled and dead-lettered delivery (``bench/memory.py``) with what each Heroku
   Key-Value Store plan holds.

Prints a Markdown table with the ratios and writes every number to a JSON file.
Timings depend on the machine and on whatever else runs on it; only ratios from
the same run mean much.
"""
import argparse
import functools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import e2e, load, memory, naive, sims
from bench.stack import Stack, peak_rss_mib
from tests.processes import process_env
from workers.config import Settings
from workers.locate2u.webhook_auth import url_token

SECRET = "bench-webhook-secret-0123456789"
POOL_OPTION = {"thread": "threads"}  # a pool's name in the worker's banner -> its ``-P`` value, where they differ
EVENT_PATH = f"/webhooks/locate2u/{e2e.EVENT_TYPE}/" + url_token(SECRET, e2e.EVENT_TYPE)
PROFILES = {
    # 5,000 stops: each gets four changes, too far apart for the 10 s stop cache (relay and plain loop alike).
    "full": {"rounds": 5, "seconds": 6, "connections": 32, "deliveries": 20000, "stops": 5000,
             "latency_seconds": 30, "settle_timeout": 3600, "memory_deliveries": 10000, "memory_dead_letters": 1000,
             "memory_stops": 100},
    "ci": {"rounds": 1, "seconds": 1, "connections": 8, "deliveries": 60, "stops": 20, "latency_seconds": 2,
           "settle_timeout": 120, "memory_deliveries": 100, "memory_dead_letters": 20,
           "memory_stops": 10},
}
INGEST_APPS = (
    ("bare", "bare Flask: read JSON, answer 200"),
    ("pipeline", "one Redis pipeline (SET NX + LPUSH)"),
    ("record_script", "the receiver's ledger + queue script alone (no checks)"),
    ("receiver", "receiver: auth, checks, dedup, ledger + queue in one script"),
    ("send_task", "receiver with a send_task hand-off (another broker)"),
)


def settings_for(redis_url, workdir, **extra):
    return Settings(webhook_secret=SECRET, redis_url=redis_url, data_dir=str(workdir / "data"), **extra)


# ------------------------------------------------------------------ ingest

def ingest(workdir, profile, use_wrk):
    with Stack(workdir / "ingest") as stack:
        redis_url = stack.start_redis()
        env = process_env(settings_for(redis_url, workdir))
        # The same Redis named differently: the receiver then publishes with send_task, as with RabbitMQ.
        other_broker = redis_url.replace("127.0.0.1", "localhost")
        apps = {"bare": stack.gunicorn("bare", "bench.apps:bare()", env, wait=False),
                "pipeline": stack.gunicorn("pipeline", "bench.apps:one_pipeline()", env, wait=False),
                "record_script": stack.gunicorn("record_script", "bench.apps:record_script()", env, wait=False),
                "receiver": stack.gunicorn("receiver", "receiver.wsgi:app", env, wait=False),
                "send_task": stack.gunicorn("send_task", "receiver.wsgi:app", wait=False,
                                            env=process_env(settings_for(redis_url, workdir, broker_url=other_broker)))}
        for app in apps.values():
            app.ready()
        rounds = []
        names = list(apps)
        for number in range(profile["rounds"]):
            order = names[number % len(names):] + names[:number % len(names)]
            results = {}
            for name in order:
                before = stack.cpu()
                results[name] = load.drive(apps[name].url, EVENT_PATH, profile["seconds"], profile["connections"],
                                           f"{name}{number}", use_wrk)
                after, requests = stack.cpu(), max(1, results[name]["requests"])
                results[name]["cpu_us_per_request"] = {
                    "web": round((after[name] - before[name]) * 1e6 / requests),
                    "redis": round((after["redis"] - before["redis"]) * 1e6 / requests)}
            rounds.append(results)
            print(f"  ingest round {number + 1}: " + ", ".join(f"{name} {results[name]['rate']:.0f}/s"
                                                               for name in names), flush=True)
        memory = {"web_worker_peak_rss_mib": max(peak_rss_mib(pid) for pid in apps["receiver"].children())}
    summary = {name: {key: statistics.median(r[name][key] for r in rounds) for key in ("rate", "p50", "p99")}
               for name in names}
    for name in names:
        summary[name]["errors"] = sum(r[name]["errors"] for r in rounds)
        summary[name]["cpu_us_per_request"] = {part: statistics.median(r[name]["cpu_us_per_request"][part]
                                                                       for r in rounds) for part in ("web", "redis")}
        summary[name]["tool"] = rounds[0][name]["tool"]
    ratios = {"pipeline/bare": _ratio(rounds, "pipeline", "bare"),
              "receiver/bare": _ratio(rounds, "receiver", "bare"),
              "record_script/pipeline": _ratio(rounds, "record_script", "pipeline"),
              "receiver/pipeline": _ratio(rounds, "receiver", "pipeline"),
              "send_task/pipeline": _ratio(rounds, "send_task", "pipeline")}
    return {"rounds": rounds, "summary": summary, "ratios": ratios, "memory": memory}


def _ratio(rounds, a, b):
    return statistics.median(r[a]["rate"] / r[b]["rate"] for r in rounds)


# ------------------------------------------------------------------ end to end

def end_to_end(workdir, profile, pool, concurrency):
    events = e2e.make_events(profile["deliveries"], 0, profile["stops"], "E")
    stop_args = ("--stops", str(profile["stops"]), "--first-stop", str(load.STOP_BASE))
    with Stack(workdir / "relay") as stack:
        redis_url = stack.start_redis()
        urls = stack.simulators(e2e.SINKS + ("locate2u",), *stop_args)
        # A 20,000-delivery burst waits in the queue for minutes: the sweeper must not re-queue it.
        settings = sims.relay_settings(settings_for(redis_url, workdir, sweep_after=3600), urls, workdir)
        env = process_env(settings)
        web = stack.gunicorn("receiver", "receiver.wsgi:app", env, wait=False)
        worker_args = ["worker", "-n", "bench@%h", "--without-gossip", "--without-mingle"]
        worker_args += ["-P", pool] if pool else []
        worker_args += ["-c", str(concurrency)] if concurrency else []
        worker = stack.celery("worker", worker_args, env, wait=False)
        stack.celery("beat", ["beat", "-s", str(workdir / "data" / "celerybeat-schedule")], env, ready=None)
        web.ready()
        worker.ready()
        pool, threads = worker_banner(worker.output())
        connections = profile["connections"]
        cpu_before, own_before, commands_before = stack.cpu(), time.process_time(), stack.redis_commands()
        relay = e2e.relay_run(web.url, EVENT_PATH, redis_url, events, connections,
                               timeout=profile["settle_timeout"])
        relay["cpu_ms_per_event"] = cpu_per_event(cpu_before, stack.cpu(), len(events),
                                                  load_generator=time.process_time() - own_before)
        relay["redis_commands_per_event"] = commands_per_event(commands_before, stack.redis_commands(), len(events))
        print(f"  relay ({pool} pool, concurrency {threads}): {relay['rate']:.0f} events/s; per event: "
              f"{cost_line(relay)}", flush=True)
        half = max(1.0, relay["rate"] / 2)
        paced_events = e2e.make_events(max(10, int(half * profile["latency_seconds"])), len(events),
                                       profile["stops"], "L")
        cpu_before, own_before, commands_before = stack.cpu(), time.process_time(), stack.redis_commands()
        paced = e2e.relay_run(web.url, EVENT_PATH, redis_url, paced_events, connections, rate=half,
                               timeout=profile["settle_timeout"])
        paced["target_rate"] = half
        # steady state, as a relay that keeps up runs: its processes' idle time included
        paced["cpu_ms_per_event"] = cpu_per_event(cpu_before, stack.cpu(), len(paced_events),
                                                  load_generator=time.process_time() - own_before)
        paced["redis_commands_per_event"] = commands_per_event(commands_before, stack.redis_commands(),
                                                               len(paced_events))
        print(f"  relay at {half:.0f}/s: p99 " + ", ".join(f"{sink} {paced['sinks'][sink]['p99_ms']:.0f} ms"
                                                         for sink in e2e.SINKS)
              + f"; per event: {cost_line(paced)}", flush=True)
        pids = [worker.pid] + worker.children()
        memory = {"celery_worker_peak_rss_mib": max(peak_rss_mib(pid) for pid in pids),
                  "celery_processes": len(pids),
                  "web_worker_peak_rss_mib": max(peak_rss_mib(pid) for pid in web.children())}

    naive_runs = {via: naive_consumer(workdir, events, profile, stop_args, pool, threads, via)
                  for via in ("queue", "receiver")}

    with Stack(workdir / "plain") as stack:
        urls = stack.simulators(e2e.SINKS + ("locate2u",), *stop_args)
        cpu_before, own_before = stack.cpu(), time.process_time()
        plain = e2e.plain_loop(urls, events, threads)
        plain["cpu_ms_per_event"] = cpu_per_event(cpu_before, stack.cpu(), len(events),
                                                  plain_loop=time.process_time() - own_before)
        print(f"  plain loop, {threads} threads: {plain['rate']:.0f} events/s; per event: {cost_line(plain)}",
              flush=True)
    return {"plain": plain, "naive": naive_runs["queue"], "naive_relay": naive_runs["receiver"], "relay": relay,
            "paced": paced, "memory": memory, "threads": threads, "pool": pool}


def naive_consumer(workdir, events, profile, stop_args, pool, threads, via):
    """``events`` applied by the naive Celery consumer (``bench/naive.py``) on its own Redis and
    simulators, with the relay's pool and concurrency, fed straight onto its queue (``via``
    "queue") or posted to the naive receiver app (``via`` "receiver") at the relay's concurrency."""
    with Stack(workdir / f"naive-{via}") as stack:
        redis_url = stack.start_redis()
        urls = stack.simulators(e2e.SINKS + ("locate2u",), *stop_args)
        env = dict(os.environ, PYTHONUNBUFFERED="1", BENCH_NAIVE=json.dumps({"broker_url": redis_url, "urls": urls}))
        stack.celery("worker", ["worker", "-l", "INFO", "-n", "naive@%h", "--without-gossip", "--without-mingle",
                                "-P", pool, "-c", str(threads)], env, app="bench.naive")
        post = None
        if via == "receiver":
            web = stack.gunicorn("receiver", "bench.apps:naive_receiver()", env)
            post = functools.partial(load.post_all, web.url, EVENT_PATH, concurrency=profile["connections"])
        cpu_before, own_before = stack.cpu(), time.process_time()
        result = naive.run(redis_url, events, profile["settle_timeout"], post)
        result["cpu_ms_per_event"] = cpu_per_event(cpu_before, stack.cpu(), len(events),
                                                   load_generator=time.process_time() - own_before)
    print(f"  naive Celery consumer fed {'through a send_task app' if post else 'straight'} ({pool} pool, "
          f"concurrency {threads}): {result['rate']:.0f} events/s; per event: {cost_line(result)}", flush=True)
    return result


def cpu_per_event(before, after, events, **own):
    """Milliseconds of CPU per event, by process (sinks summed), from two ``Stack.cpu()`` readings."""
    used = {name: after[name] - before.get(name, 0.0) for name in after}
    used["sinks"] = sum(used.pop(name) for name in e2e.SINKS + ("locate2u",))
    used.update(own)
    return {name: round(seconds * 1000 / events, 3) for name, seconds in used.items()}


def cost_line(run):
    """CPU ms per event by process, and Redis commands per event when measured, on one line."""
    cpu = ", ".join(f"{name} {ms:.1f} ms" for name, ms in sorted(run["cpu_ms_per_event"].items(), key=lambda i: -i[1]))
    commands = run.get("redis_commands_per_event")
    return f"CPU {cpu}" + (f"; {commands['total']} Redis commands" if commands else "")


def commands_per_event(before, after, events):
    """Redis commands per event, in all and by command (the most used first), from two readings;
    the settle loop's own polling is counted too (a few per second)."""
    used = {name: (after[name] - before.get(name, 0)) / events for name in after}
    by_command = {name: round(count, 2) for name, count in sorted(used.items(), key=lambda item: -item[1]) if count}
    return {"total": round(sum(used.values()), 1), "by_command": by_command}


def worker_banner(text):
    """The pool (as ``celery worker -P`` names it) and concurrency a Celery worker reports at start-up
    ("concurrency: 8 (thread)": the threads pool)."""
    match = re.search(r"concurrency:\s*(\d+)\s*\(([\w-]+)\)", text)
    if not match:
        raise RuntimeError(f"no concurrency line in the worker's banner:\n{text[-2000:]}")
    return POOL_OPTION.get(match.group(2), match.group(2)), int(match.group(1))


# ------------------------------------------------------------------ report

def table(result):
    ing, end = result["ingest"], result["e2e"]
    s, r = ing["summary"], ing["ratios"]
    tool = s["bare"]["tool"]
    rows = [("ingest", f"{label}", f"{s[name]['rate']:,.0f} accepted/s", f"{s[name]['p50']:.1f} ms",
             f"{s[name]['p99']:.1f} ms", ratio)
            for (name, label), ratio in zip(INGEST_APPS, (
                "1.00× bare", f"{r['pipeline/bare']:.2f}× bare", f"{r['record_script/pipeline']:.2f}× pipeline",
                f"{r['receiver/pipeline']:.2f}× pipeline ({r['receiver/bare']:.2f}× bare)",
                f"{r['send_task/pipeline']:.2f}× pipeline"))]
    plain, relay, paced = end["plain"], end["relay"], end["paced"]
    straight, paired = end["naive"], end["naive_relay"]
    rows.append(("end to end", f"plain requests.Session loop, {end['threads']} threads",
                 f"{plain['rate']:,.0f} events/s", "—", "—", "1.00×"))
    rows.append(("end to end", f"naive Celery consumer ({end['pool']} ×{end['threads']}, one task per event), "
                               "fed straight onto its queue", f"{straight['rate']:,.0f} events/s", "—", "—",
                 f"{straight['rate'] / plain['rate']:.2f}× plain loop"))
    rows.append(("end to end", "the same consumer behind a Flask app that calls send_task per webhook",
                 f"{paired['rate']:,.0f} events/s", "—", "—", f"{paired['rate'] / plain['rate']:.2f}× plain loop"))
    for sink in e2e.SINKS:
        rows.append(("end to end", f"relay, {relay['events']:,} deliveries → {sink}",
                     f"{relay['rate']:,.0f} events/s", _s(relay["sinks"][sink]["p50_ms"]),
                     _s(relay["sinks"][sink]["p99_ms"]), f"{relay['rate'] / plain['rate']:.2f}× plain loop "
                     f"({relay['rate'] / paired['rate']:.2f}× the naive pair)"))
    for sink in e2e.SINKS:
        rows.append(("latency", f"relay at half that rate ({paced['target_rate']:,.0f}/s) → {sink}",
                     "receipt to applied", _s(paced["sinks"][sink]["p50_ms"]), _s(paced["sinks"][sink]["p99_ms"]),
                     "target p99 < 1 s"))
    mem = end["memory"]
    rows.append(("memory", "web worker (gunicorn sync), peak RSS", f"{mem['web_worker_peak_rss_mib']:.0f} MiB",
                 "", "", ""))
    rows.append(("memory", f"Celery worker process ({end['pool']} pool), peak RSS",
                 f"{mem['celery_worker_peak_rss_mib']:.0f} MiB", "", "", f"{mem['celery_processes']} processes"))
    if "redis_memory" in result:
        mem = result["redis_memory"]
        for label, key in (("pending delivery", "pending"), ("settled delivery, full entry", "settled_full"),
                           ("settled delivery, compacted, at default retention", "settled_at_default_retention"),
                           ("dead-lettered delivery", "dead_lettered")):
            rows.append(("memory", f"Redis bytes per {label}", f"{mem[key]:,} B", "", "", ""))
        rows.append(("memory", "settled deliveries a 25 MB plan holds",
                     f"{mem['plans']['mini']['settled_deliveries']:,}", "", "", "target ≥ 50,000"))
    lines = ["| phase | what | throughput | p50 | p99 | ratio |", "| --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines.append(f"load generator: {tool}; machine: {result['machine']}")
    lines.append(f"per event, relay: {cost_line(relay)}; relay at half rate (idle time included): "
                 f"{cost_line(paced)}; naive consumer: {cost_line(straight)}; naive pair: {cost_line(paired)}; "
                 f"plain loop: {cost_line(plain)}")
    lines.append("targets: " + "; ".join(f"{name} {'met' if ok else 'NOT met'} ({value})"
                                         for name, ok, value in targets(result)))
    return "\n".join(lines)


def targets(result):
    ratios, end = result["ingest"]["ratios"], result["e2e"]
    worst = max(end["paced"]["sinks"][sink]["p99_ms"] for sink in e2e.SINKS)
    e2e_ratio = end["relay"]["rate"] / end["plain"]["rate"]
    found = [("ingest ≥ 0.9× pipeline", ratios["receiver/pipeline"] >= 0.9, f"{ratios['receiver/pipeline']:.2f}×"),
             ("end to end ≥ 0.7× plain loop", e2e_ratio >= 0.7, f"{e2e_ratio:.2f}×"),
             ("p99 at half rate < 1 s", worst < 1000, f"{worst:.0f} ms")]
    if "redis_memory" in result:
        mem = result["redis_memory"]
        found += [("settled delivery ≤ 400 B", mem["settled_at_default_retention"] <= 400,
                   f"{mem['settled_at_default_retention']} B"),
                  ("25 MB plan holds ≥ 50,000 settled", mem["plans"]["mini"]["settled_deliveries"] >= 50000,
                   f"{mem['plans']['mini']['settled_deliveries']:,}")]
    return found


def _s(ms):
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem = next((int(line.split()[1]) // 1024 // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return f"{os.cpu_count()} cores {cpu}, {mem} GiB, Linux {platform.release()}, Python {platform.python_version()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Ingest and end-to-end benchmark of the relay.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--deliveries", type=int, help="end-to-end deliveries (default: the profile's)")
    parser.add_argument("--seconds", type=int, help="seconds per ingest load run (default: the profile's)")
    parser.add_argument("--rounds", type=int, help="ingest rounds (default: the profile's)")
    parser.add_argument("--memory-deliveries", type=int, help="deliveries of the Redis memory phase (default: the "
                                                              "profile's)")
    parser.add_argument("--memory-dead-letters", type=int, help="dead-lettered deliveries of the Redis memory phase "
                                                                "(default: the profile's)")
    parser.add_argument("--pool", help="Celery pool for the workers (default: the app's)")
    parser.add_argument("--concurrency", type=int, help="Celery concurrency (default: the app's)")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator even if wrk is there")
    parser.add_argument("--skip", choices=("ingest", "e2e", "memory"), action="append", default=[])
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs after a run that worked")
    parser.add_argument("--json", default=".l2u-relay/bench/last.json", help="where to write every number")
    args = parser.parse_args(argv)
    # A SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so every Stack stops the processes it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    profile = dict(PROFILES[args.profile])
    for name in ("deliveries", "seconds", "rounds", "memory_deliveries", "memory_dead_letters"):
        if getattr(args, name):
            profile[name] = getattr(args, name)
    use_wrk = load.have_wrk() and not args.python_load
    if not use_wrk and not args.python_load:
        print("wrk not found (Debian: apt-get install wrk); using the Python load generator", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="l2u-bench-"))
    result = {"profile": args.profile, "settings": profile, "machine": machine(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"bench ({args.profile} profile), logs in {workdir} (removed after a run that worked)", flush=True)
    if "ingest" not in args.skip:
        result["ingest"] = ingest(workdir, profile, use_wrk)
    if "e2e" not in args.skip:
        result["e2e"] = end_to_end(workdir, profile, args.pool, args.concurrency)
    if "memory" not in args.skip:
        result["redis_memory"] = memory.run(workdir, profile, SECRET, EVENT_PATH)
        print("\n".join("  " + line for line in memory.lines(result["redis_memory"])), flush=True)
    incomplete = [name for name in ("relay", "paced", "naive", "naive_relay")
                  if not result.get("e2e", {}).get(name, {"complete": True})["complete"]]
    if not args.keep_logs and not incomplete:  # kept when the run failed, for its logs
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    if "ingest" in result and "e2e" in result:
        print()
        print(table(result))
    print(f"\nall numbers: {args.json}")
    if incomplete:
        print(f"INCOMPLETE: some deliveries of the {' and '.join(incomplete)} run did not settle in time; "
              f"logs in {workdir}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
