"""Operator commands over the stores: dead letters, delivery traces, reconciliation."""
import json
import time
from datetime import datetime, timezone

import click

from workers import operations
from workers.sinks import SINK_NAMES


def _runtime():
    from workers.cli import _settings

    settings = _settings()  # a configuration problem is reported before anything else loads
    from workers.app import app
    from workers.runtime import Runtime

    return Runtime(settings, app.send_task)


def _when(epoch):
    return datetime.fromtimestamp(float(epoch), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _since(value):
    """``--since``: an ISO date/time, or a duration such as 30m, 2h, 7d."""
    try:
        return operations.parse_moment(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _echo_json(data):
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


REPLAY_WAIT = 30.0  # seconds `dlq replay` waits for outcomes by default
REPLAY_POLL = 0.5
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
    entries = _runtime().dead_letters.list(sink=sink, since=_since(since))
    if as_json:
        return _echo_json(entries)
    for entry in entries:
        click.echo(f"{_when(entry['at'])}  {entry['id']:<80}  {entry.get('event_type') or '-':<24} "
                   f"{entry['reason'][:100]}")
    click.echo(f"{len(entries)} dead letter(s)")


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
    if all_:
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
    from workers.pipeline import replay_dead_letter, replay_outcome

    rt = _runtime()
    entries = _select(rt, ids, all_, sink, since)
    started = time.time()
    outcomes = {entry["id"]: replay_dead_letter(rt, entry) for entry in entries}
    queued = [entry for entry in entries if outcomes[entry["id"]] == "queued"]
    click.echo(f"queued {len(queued)} dead letter(s) for replay")
    deadline = time.monotonic() + wait
    while True:
        details = {entry["id"]: replay_outcome(rt, entry, started) for entry in queued}
        if all(outcome != "queued" for outcome, _ in details.values()) or time.monotonic() >= deadline:
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
@click.confirmation_option(prompt="Dead letters purged are gone for good. Continue?")
def dlq_purge(ids, all_, sink, since):
    """Delete dead letters for good."""
    rt = _runtime()
    removed = operations.purge_dead_letters(rt, _select(rt, ids, all_, sink, since))
    click.echo(f"purged {removed} dead letter(s)")


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


@click.command()
@click.argument("sink", type=click.Choice(SINK_NAMES))
@click.option("--since", help="Only records changed since this date (where the system can filter).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def reconcile(sink, since, as_json):
    """Compare a sink's records with our mappings; rebuild lost mappings; report drift."""
    rt = _runtime()
    if sink not in rt.sinks:
        raise click.ClickException(f"sink {sink} is not configured (set its credentials)")
    report = rt.sinks[sink].reconcile(since=since)
    if as_json:
        return _echo_json(report.to_json())
    click.echo(f"{sink}: scanned {report.scanned} remote record(s)")
    for title, items in (("mappings rebuilt", report.rebuilt), ("ours missing there", report.missing_remote),
                         ("changed there", report.changed_remote), ("unknown to us", report.unknown_remote)):
        click.echo(f"  {title}: {len(items)}")
        for item in list(items)[:50]:
            click.echo(f"    {item}" + (f": {items[item]}" if isinstance(items, dict) else ""))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def status(as_json):
    """Queues, retries, dead letters, breakers, Locate2u token and subscriptions at a glance."""
    from workers import status as relay_status

    data = relay_status.collect(_runtime())
    if as_json:
        return _echo_json(data)
    click.echo(relay_status.render(data))
