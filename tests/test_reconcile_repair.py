"""``l2u-relay reconcile SINK --repair`` against the loopback Storepoint and B2B simulators, with a real
receiver and worker: a deleted, a changed and an unmapped location are found (exit 1) and put back
through the workers (exit 0 after), each location existing once."""
import subprocess

import pytest

from tests.helpers import post, settled, wait_for
from tests.payloads import status_change
from tests.processes import BIN, process_env

STOPS = (7101, 7102, 7103)
DELETED, CHANGED, UNMAPPED = (f"l2u-stop-{stop}" for stop in STOPS)


def reconcile(settings, *args):
    return subprocess.run([str(BIN / "l2u-relay"), "reconcile", *args], env=process_env(settings),
                          capture_output=True, text=True, timeout=120)


def locations(sims, sink):
    """``{key: [location…]}`` of what the simulator holds."""
    state = sims[sink].app.config["STATE"]
    found = {}
    for item in state.locations.values():
        key = item["idRemote"] if sink == "b2b" else next(t[4:] for t in item["tags"] if t.startswith("l2u:"))
        found.setdefault(key, []).append(item)
    return found


@pytest.mark.parametrize("sink", ["storepoint", "b2b"])
def test_reconcile_repairs_a_deleted_a_changed_and_an_unmapped_location(sink, stack, stack_settings, sims,
                                                                        redis_client):
    for stop in STOPS:
        sims["locate2u"].app.config["STATE"].add_stop(stopId=stop, name=f"Stop {stop}")
        delivery = post(stack.url, "stop.status-changed", status_change(stop, "Arrived", "2026-11-23T08:00:00+00:00"))
        entry = wait_for(lambda: settled(redis_client, delivery.json()["delivery_id"]))
        assert entry["status"] == "applied", entry
    held = locations(sims, sink)
    assert all(len(held[key]) == 1 for key in (DELETED, CHANGED, UNMAPPED))
    assert reconcile(stack_settings, sink).returncode == 0  # no drift yet

    state = sims[sink].app.config["STATE"]
    state.locations.pop(held[DELETED][0]["id"])
    state.locations[held[CHANGED][0]["id"]]["name"] = "Renamed by hand"
    redis_client.hdel(f"l2u:map:{sink}", UNMAPPED)
    redis_client.hdel(f"l2u:map:{sink}:written", UNMAPPED)  # what we wrote is lost with the mapping

    found = reconcile(stack_settings, sink)
    assert found.returncode == 1, found.stdout + found.stderr
    assert f"ours missing there: 1\n    {DELETED}" in found.stdout
    assert f"changed there: 1\n    {CHANGED}: ['name']" in found.stdout
    assert f"mappings rebuilt: 1\n    {UNMAPPED}" in found.stdout
    assert "drift found" in found.stdout

    repaired = reconcile(stack_settings, sink, "--repair")
    assert repaired.returncode == 1, repaired.stdout + repaired.stderr
    assert "repaired: 2" in repaired.stdout  # the unmapped one was remapped by the first run, unchanged there

    def restored():
        held = locations(sims, sink)
        return DELETED in held and held[CHANGED][0]["name"] == f"Stop {STOPS[1]}" and held

    held = wait_for(restored, timeout=60)
    after = reconcile(stack_settings, sink)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "no drift" in after.stdout
    held = locations(sims, sink)
    assert all(len(held[key]) == 1 for key in (DELETED, CHANGED, UNMAPPED)), held  # no duplicates

    # The rebuilt mapping kept what we last wrote: a later change there is drift again.
    state.locations[held[UNMAPPED][0]["id"]]["name"] = "Changed again"
    assert f"changed there: 1\n    {UNMAPPED}: ['name']" in reconcile(stack_settings, sink).stdout


def test_only_sinks_that_can_reconcile_are_offered_and_since_takes_durations(stack_settings):
    forward = reconcile(stack_settings, "forward")
    assert forward.returncode == 2 and "Traceback" not in forward.stderr
    assert "'forward' is not one of" in forward.stderr
    since = reconcile(stack_settings, "b2b", "--since", "2h")
    assert since.returncode == 0, since.stdout + since.stderr
    bad = reconcile(stack_settings, "b2b", "--since", "yesterday")
    assert bad.returncode == 2 and "ISO date/time" in bad.stderr and "Traceback" not in bad.stderr
