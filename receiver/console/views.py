"""Console pages: overview, deliveries, one stop, dead letters (replay, purge), quarantine."""
import collections
import json
import math

from flask import abort, flash, redirect, render_template, request, url_for

from receiver.console.blueprint import bp, record_action, runtime
from receiver.console.chart import activity_chart
from workers.domain.events import EVENT_TYPES
from workers.ops import operations
from workers.sinks import SINK_NAMES
from workers.store.ledger import FINAL_STATES

PAGE_SIZE = 25
DEAD_LETTER_ROWS = 500  # the newest matching dead letters listed; the rest are counted, and "all" acts on them
DEAD_LETTER_FILTERS = ("sink", "reason", "event_type", "since", "until")
DELIVERY_STATUSES = ("received", "routed", "retrying", "open") + FINAL_STATES


def _moment(name):
    """A time filter from the query or form (ISO, or 30m / 2h / 7d back); 400 with the reason when bad."""
    try:
        return operations.parse_moment(request.values.get(name, "").strip())
    except ValueError as exc:
        abort(400, f"{name}: {exc}")


@bp.errorhandler(400)
@bp.errorhandler(404)
def _refused(exc):
    return render_template("console/error.html", title=exc.name, message=exc.description), exc.code


@bp.get("/")
def overview():
    data = operations.overview(runtime())
    return render_template("console/overview.html", data=data, chart=activity_chart(data["activity"]))


@bp.get("/deliveries")
def deliveries():
    args = request.args
    page = max(1, args.get("page", 1, type=int))
    rows, more = operations.search_deliveries(
        runtime(), delivery_id=args.get("delivery_id", "").strip(), stop=args.get("stop", "").strip(),
        event_type=args.get("event_type"), status=args.get("status"), since=_moment("since"),
        until=_moment("until"), offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
    query = {key: value for key, value in args.items() if key != "page" and value}
    return render_template("console/deliveries.html", rows=rows, more=more, page=page, query=query,
                           event_types=EVENT_TYPES, statuses=DELIVERY_STATUSES)


@bp.get("/deliveries/<delivery_id>")
def delivery(delivery_id):
    rt = runtime()
    entry = rt.ledger.get(delivery_id)
    if entry is None:
        abort(404)
    return render_template("console/delivery.html", delivery_id=delivery_id, entry=entry,
                           history=rt.ledger.history(delivery_id), body=_pretty(entry["body"]))


@bp.get("/stops")
def stop_lookup():
    stop = request.args.get("stop", "").strip()
    return redirect(url_for("console.stop", stop_id=stop)) if stop else redirect(url_for("console.deliveries"))


@bp.get("/stops/<stop_id>")
def stop(stop_id):
    rt = runtime()
    events = operations.stop_events(rt, stop_id)
    return render_template("console/stop.html", stop_id=stop_id, events=events,
                           sinks=operations.stop_sinks(rt, events))


@bp.get("/dead-letters")
def dead_letters():
    """The newest ``DEAD_LETTER_ROWS`` dead letters matching the filter, and how many match."""
    newest, count = collections.deque(maxlen=DEAD_LETTER_ROWS), 0
    for count, entry in enumerate(operations.dead_letters_matching(runtime(), **_dead_letter_filter()), 1):
        newest.append(entry)
    return render_template("console/dead_letters.html", entries=list(reversed(newest)), count=count,
                           query=_filter_query(), sinks=SINK_NAMES + ("enrich",), event_types=EVENT_TYPES)


@bp.get("/dead-letters/<path:entry_id>")
def dead_letter(entry_id):
    entry = runtime().dead_letters.get(entry_id)
    if entry is None:
        abort(404)
    return render_template("console/dead_letter.html", entry=entry, text=json.dumps(entry, indent=2, default=str))


@bp.post("/dead-letters/confirm")
def dead_letters_confirm():
    """Show what an action would touch (count) and ask for confirmation."""
    action, ids, newest = _chosen_dead_letters()
    # "all" is then bounded by what was shown: letters arriving meanwhile are not purged unseen
    query = {**_filter_query(), **({"confirmed_until": repr(newest)} if newest is not None else {})}
    return render_template("console/confirm.html", action=action, count=len(ids), what=("dead letter", "dead letters"),
                           target=url_for("console.dead_letters_apply"), ids=ids,
                           scope=request.form["choice"].partition(":")[2], query=query,
                           back=url_for("console.dead_letters", **_filter_query()))


@bp.post("/dead-letters/apply")
def dead_letters_apply():
    action, ids, _ = _chosen_dead_letters(confirmed=True)
    rt = runtime()
    if action == "purge":
        purged = operations.purge_dead_letters(rt, ids)
        record_action("purge_dead_letters", purged, scope=request.form["choice"])
        flash(f"Purged {purged} dead letter(s).")
        return redirect(url_for("console.dead_letters", **_filter_query()))
    batch = operations.replay_dead_letters(rt, ids)  # the workers replay them: no request outlives that
    record_action("replay_dead_letters", len(ids), scope=request.form["choice"])
    return redirect(url_for("console.replay_results", batch=batch))


@bp.get("/replays/<batch>")
def replay_results(batch):
    done, total, totals, results = operations.replay_results(runtime(), batch)
    return render_template("console/replay.html", batch=batch, results=results, totals=totals, done=done,
                           total=total, counted=operations.REPLAY_COUNTED)


@bp.get("/quarantine")
def quarantine():
    rt = runtime()
    return render_template("console/quarantine.html", items=operations.quarantine_items(rt),
                           total=operations.quarantine_count(rt))


@bp.get("/quarantine/<item_id>")
def quarantine_item(item_id):
    item = operations.quarantine_item(runtime(), item_id)
    if item is None:
        abort(404)
    return render_template("console/quarantine_item.html", item_id=item_id, item=item, body=_pretty(item["body"]),
                           errors=json.dumps(item.get("errors"), indent=2))


@bp.post("/quarantine/confirm")
def quarantine_confirm():
    ids, scope = _chosen_quarantine()
    count, newest = operations.quarantine_counted(runtime()) if scope == "all" else (len(ids), None)
    # "all" is then bounded by what was counted: deliveries quarantined meanwhile are not purged unseen
    return render_template("console/confirm.html", action="purge", count=count, what=("quarantined delivery", "quarantined deliveries"),
                           target=url_for("console.quarantine_apply"), ids=ids, scope=scope,
                           query={"confirmed_newest": newest} if newest else {}, back=url_for("console.quarantine"))


@bp.post("/quarantine/apply")
def quarantine_apply():
    ids, scope = _chosen_quarantine()
    newest = None
    if scope == "all" and not (newest := request.form.get("confirmed_newest")):
        abort(400, "confirmed_newest: missing; purge all from its confirmation page")
    purged = operations.purge_quarantine(runtime(), None if scope == "all" else ids, newest)
    if purged is None:
        flash("The quarantine changed since the confirmation (the newest delivery it counted is gone): "
              "nothing was purged. Choose again.")
        return redirect(url_for("console.quarantine"))
    record_action("purge_quarantine", purged, scope=scope)
    flash(f"Purged {purged} quarantined deliver{'y' if purged == 1 else 'ies'}.")
    return redirect(url_for("console.quarantine"))


def _dead_letter_filter():
    return {"sink": request.values.get("sink") or None, "reason": request.values.get("reason", "").strip() or None,
            "event_type": request.values.get("event_type") or None, "since": _moment("since"),
            "until": _moment("until")}


def _filter_query():
    return {name: request.values[name] for name in DEAD_LETTER_FILTERS if request.values.get(name)}


def _chosen_dead_letters(confirmed=False):
    """``(action, ids, newest)`` of a dead-letter form: the ticked ones still there, or every one
    matching the filter (``confirmed``: recorded no later than the confirmation page showed, its
    ``confirmed_until``); ``newest``: when the newest of them was recorded (None if none or ticked)."""
    action, _, scope = request.form.get("choice", "").partition(":")
    if action not in ("replay", "purge") or scope not in ("selected", "all"):
        abort(400, "choose replay or purge, for the selected dead letters or all matching the filter")
    if scope == "all":
        bound = _confirmed_until() if confirmed else math.inf
        entries = [(entry["id"], entry["at"]) for entry in operations.dead_letters_matching(
            runtime(), **_dead_letter_filter()) if entry["at"] <= bound]
        return action, [entry_id for entry_id, _ in entries], max((at for _, at in entries), default=None)
    ids = request.form.getlist("id")
    if not ids:
        abort(400, "no dead letter selected: tick at least one, or choose all matching the filter")
    entries, _ = operations.dead_letters_by_id(runtime(), ids)
    return action, [entry["id"] for entry in entries], None


def _confirmed_until():
    """The ``confirmed_until`` of a confirmed "all matching" form; 400 without one."""
    try:
        return float(request.form["confirmed_until"])
    except (KeyError, ValueError):
        abort(400, "confirmed_until: missing or not a time; act on all matching from its confirmation page")


def _chosen_quarantine():
    """``(ids, scope)`` of a quarantine form: the list page's ``scope`` button, or the confirmation
    page's ``choice`` (``purge:<scope>``)."""
    scope = request.form.get("scope") or request.form.get("choice", "").partition(":")[2]
    ids = request.form.getlist("id")
    if scope not in ("selected", "all") or (scope == "selected" and not ids):
        abort(400, "no quarantined delivery selected: tick at least one, or choose all")
    return ids, scope


def _pretty(body):
    try:
        return json.dumps(json.loads(body), indent=2, sort_keys=True)
    except (TypeError, ValueError):
        return body
