"""Operator commands over the stores: dead letters, delivery traces, reconciliation."""
import json
import time
from datetime import datetime, timezone

import click

from workers.ops import operations
from workers.config import ConfigError, Settings
from workers.ops.reconcile import RECONCILABLE
from workers.pipeline.routes import load_routes
from workers.sinks import SINK_NAMES


def _runtime():
    """The stores and sinks; a configuration problem (REDIS_URL unset or malformed too) raises ConfigError."""
    settings = Settings.from_env()  # a configuration problem is reported before anything else loads
    if not settings.redis_url:
        raise ConfigError({"REDIS_URL": "not set: the relay's state is in Redis; set REDIS_URL "
                                        "(redis://host:6379/0), or start `l2u-relay run` in this checkout, "
                                        "whose settings every command here picks up"})
    load_routes(settings.routes_file)  # said as a command's problem, before the Celery app would say it
    from workers.app import app
    from workers.runtime import Runtime

    try:
        return Runtime(settings, app.send_task)
    except ValueError as exc:  # redis-py's words for a URL it cannot use
        raise ConfigError({"REDIS_URL": str(exc)}) from None


def _when(epoch):
    return datetime.fromtimestamp(float(epoch), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _since(value):
    """``--since``: an ISO date/time, or a duration such as 30m, 2h, 7d."""
    try:
        return operations.parse_moment(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--since'") from None


def _echo_json(data):
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


REPLAY_WAIT = 30.0  # seconds `dlq replay` waits for outcomes by default
REPLAY_POLL = 0.5
REPLAY_REPORTED = ("id", "delivery_id", "stage", "sink")  # what the report reads of a replayed dead letter
REPLAY_OUTCOMES = ("applied", "stale", "unrouted", "refused again", "not replayable", "queued")

sink_option = click.option("--sink", type=click.Choice(SINK_NAMES + ("enrich",)), help="Only this sink.")
since_option = click.option("--since", help="Only since this time (ISO, or 30m, 2h, 7d).")


@click.group()
def dlq():
    """Inspect, replay and purge dead letters."""


@dlq.command("list")
@sink_option
@since_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dlq_list(sink, since, as_json):
    """List dead letters, oldest first."""
    entries = _runtime().dead_letters.scan(sink=sink, since=_since(since))
    if as_json:
        return _echo_json(list(entries))
    count = 0
    for count, entry in enumerate(entries, 1):  # printed as read: a million need not fit in memory
        click.echo(f"{_when(entry['at'])}  {entry['id']:<80}  {entry.get('event_type') or '-':<24} "
                   f"{entry['reason'][:100]}")
    click.echo(f"{count} dead letter(s)")


@dlq.command("show")
@click.argument("entry_id")
def dlq_show(entry_id):
    """Show one dead letter in full."""
    entry = _runtime().dead_letters.get(entry_id)
    if entry is None:
        raise click.ClickException(f"no dead letter {entry_id}")
    _echo_json(entry)


def _select(rt, ids, all_, sink, since):
    if bool(ids) == bool(all_):
        raise click.UsageError("give dead-letter IDs or --all (with --sink/--since to narrow it)")
    if ids and (sink or since):  # said, rather than silently ignored
        raise click.UsageError("--sink and --since narrow --all; with IDs, give only the IDs")
    if all_:  # an iterator: a million letters need not be held at once
        return operations.dead_letters_matching(rt, sink=sink, since=_since(since))
    entries, missing = operations.dead_letters_by_id(rt, ids)
    if missing:
        raise click.ClickException(f"no dead letter {', '.join(missing)}")
    return entries


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Replay every dead letter (narrow with --sink/--since).")
@sink_option
@since_option
@click.option("--wait", type=click.FloatRange(min=0), default=REPLAY_WAIT, show_default=True,
              help="Seconds to wait for the workers' outcome of each replay (0: only queue them).")
def dlq_replay(ids, all_, sink, since, wait):
    """Queue dead letters again and report what became of each: applied, stale, refused again (with the
    reason), or still queued when --wait ran out. Each leaves the store only once applied (or stale).

    Exit 1 when any was refused again or could not be replayed.
    """
    from workers.pipeline.replay import replay_dead_letter, replay_outcome

    rt = _runtime()
    started, outcomes, entries = time.time(), {}, []
    for entry in _select(rt, ids, all_, sink, since):  # replayed as read; only what the report needs is kept
        outcomes[entry["id"]] = replay_dead_letter(rt, entry)
        entries.append({name: entry[name] for name in REPLAY_REPORTED})
    queued = [entry for entry in entries if outcomes[entry["id"]] == "queued"]
    click.echo(f"queued {len(queued)} dead letter(s) for replay")
    deadline, details, pending = time.monotonic() + wait, {}, queued
    while True:  # each poll reads only those still queued: a million need not be read every half second
        details.update((entry["id"], replay_outcome(rt, entry, started)) for entry in pending)
        pending = [entry for entry in pending if details[entry["id"]][0] == "queued"]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(REPLAY_POLL)
    for entry in entries:
        outcome, detail = details.get(entry["id"], (outcomes[entry["id"]], ""))
        if outcome == "queued" and wait:
            detail = f"no outcome within {wait:g}s ({detail or 'waiting'}); see `l2u-relay deliveries show`"
        click.echo(f"{entry['id']}  {outcome}" + (f": {detail}" if detail else ""))
    found = [details.get(entry["id"], (outcomes[entry["id"]], ""))[0].partition(":")[0] for entry in entries]
    counts = {what: found.count(what) for what in REPLAY_OUTCOMES if what in found}
    click.echo(f"replayed {len(entries)} dead letter(s): " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    if counts.get("refused again") or counts.get("not replayable"):
        raise SystemExit(1)


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Purge every dead letter (narrow with --sink/--since).")
@sink_option
@since_option
@click.option("--yes", is_flag=True, help="Purge without asking.")
def dlq_purge(ids, all_, sink, since, yes):
    """Delete dead letters for good: those chosen when it asks (letters recorded while it waits for the
    answer are left alone)."""
    rt = _runtime()
    chosen = [entry["id"] for entry in _select(rt, ids, all_, sink, since)]
    if not yes:
        click.confirm(f"Purge {len(chosen)} dead letter(s) for good?", abort=True)
    click.echo(f"purged {operations.purge_dead_letters(rt, chosen)} dead letter(s)")


@click.group()
def deliveries():
    """Look up deliveries in the ledger."""


@deliveries.command("show")
@click.argument("delivery_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def deliveries_show(delivery_id, as_json):
    """Print a delivery's ledger entry, per-sink outcomes and whole trace."""
    rt = _runtime()
    entry = rt.ledger.get(delivery_id)
    if entry is None:
        raise click.ClickException(f"no delivery {delivery_id} in the ledger")
    history = rt.ledger.history(delivery_id)
    if as_json:
        return _echo_json({"delivery": entry, "history": history})
    click.echo(f"delivery  {delivery_id}\nevent     {entry['event_type']}\nreceived  {_when(entry['received_at'])}"
               f"\nstatus    {entry['status']}")
    for sink, outcome in sorted(entry["sinks"].items()):
        details = ", ".join(f"{k}={v}" for k, v in outcome.items() if k not in ("state", "at"))
        click.echo(f"  {sink:<12} {outcome['state']:<14} {details}")
    click.echo("history:")
    for line in history:
        details = ", ".join(f"{k}={v}" for k, v in line.items() if k not in ("at", "what"))
        click.echo(f"  {_when(line['at'])}  {line['what']:<14} {details}")
    click.echo(f"body: {entry['body']}")


@click.group()
def quarantine():
    """Inspect and purge quarantined deliveries (authenticated, but not valid events)."""


@quarantine.command("list")
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True,
              help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def quarantine_list(limit, as_json):
    """List quarantined deliveries, newest first, with the ID that show and purge take."""
    rt = _runtime()
    items = operations.quarantine_items(rt, limit)
    if as_json:
        return _echo_json([{"id": item_id, **item} for item_id, item in items])
    for item_id, item in items:
        click.echo(f"{item_id}  {_when(item['received_at'])}  {item.get('event_type') or '-':<24} "
                   f"{item['reason'][:100]}")
    click.echo(f"{len(items)} of {operations.quarantine_count(rt)} quarantined delivery(ies)")


@quarantine.command("show")
@click.argument("item_id")
def quarantine_show(item_id):
    """Show one quarantined delivery in full: body, reason and the fields that failed."""
    item = operations.quarantine_item(_runtime(), item_id)
    if item is None:
        raise click.ClickException(f"no quarantined delivery {item_id} (l2u-relay quarantine list shows the IDs)")
    _echo_json(item)


@quarantine.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Purge every quarantined delivery.")
@click.option("--yes", is_flag=True, help="Purge without asking.")
def quarantine_purge(ids, all_, yes):
    """Delete quarantined deliveries for good (IDs, or --all: those counted when it asks, not those
    quarantined while it waits for the answer)."""
    if bool(ids) == bool(all_):
        raise click.UsageError("give quarantine IDs or --all")
    rt = _runtime()
    missing = sorted(set(ids) - {operations.quarantine_id(raw) for raw in operations.quarantined(rt, ids)})
    if missing:
        raise click.ClickException(f"no quarantined delivery {', '.join(missing)} (l2u-relay quarantine list "
                                   "shows the IDs)")
    count, newest = operations.quarantine_counted(rt) if all_ else (len(ids), None)
    if not yes:
        click.confirm(f"Purge {count} quarantined delivery(ies) for good?", abort=True)
    removed = operations.purge_quarantine(rt, None if all_ else ids, newest)
    if removed is None:
        raise click.ClickException("the quarantine changed while asking (the newest delivery counted is gone): "
                                   "nothing purged; run it again")
    click.echo(f"purged {removed} quarantined delivery(ies)")


@click.command()
@click.argument("sink", type=click.Choice(RECONCILABLE))
@click.option("--since", help="Only records changed since this time, where the system can filter (ISO, or 30m, "
                              "2h, 7d); then nothing is reported missing.")
@click.option("--repair", is_flag=True, help="Re-apply our last record where the system lost or changed it "
                                             "(queued for the workers, like any delivery).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def reconcile(sink, since, repair, as_json):
    """Compare a sink's records with what we wrote; rebuild lost mappings; report (and repair) drift.

    Exit 0: no drift; 1: drift found (repaired with --repair once the workers have run); 2: a
    configuration problem, or Redis or the sink failed. Records that are not ours are listed but are
    not drift.
    """
    from workers.ops import reconcile as reconciliation

    rt = _runtime()
    if sink not in rt.sinks:
        raise click.UsageError(f"sink {sink} is not configured (set its credentials)")
    report = reconciliation.reconcile(rt, sink, _since(since))
    repaired = reconciliation.repair(rt, sink, report) if repair else {}
    if as_json:
        _echo_json({**report.to_json(), "drift": report.drift, "repaired": repaired})
    else:
        click.echo(f"{sink}: scanned {report.scanned} remote record(s)")
        for title, items in (("mappings rebuilt", report.rebuilt), ("ours missing there", report.missing_remote),
                             ("changed there", report.changed_remote),
                             ("ours, untracked (duplicates)", report.untracked),
                             ("not ours", report.unknown_remote), ("repaired", repaired)):
            click.echo(f"  {title}: {len(items)}")
            for item in list(items)[:50]:
                click.echo(f"    {item}" + (f": {items[item]}" if isinstance(items, dict) else ""))
        click.echo("drift found" + ("; repairs queued" if repaired else " (--repair re-applies our records)")
                   if report.drift else "no drift")
    click.get_current_context().exit(1 if report.drift else 0)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def status(as_json):
    """Queues, retries, dead letters, breakers, Locate2u token and subscriptions at a glance."""
    from workers.ops import status as relay_status

    data = relay_status.collect(_runtime())
    if as_json:
        return _echo_json(data)
    click.echo(relay_status.render(data))
