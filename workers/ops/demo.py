"""Demo mode of ``l2u-relay run``: the whole mission on loopback, without any account.

With no Locate2u credentials configured, ``run`` starts the loopback
simulators of Locate2u and every downstream system (``workers/ops/simulators``,
shipped in the package), points the relay at them, syncs the subscriptions
through the real release command, plays a delivery day through the real
receiver, and prints what each system now holds and what was dead-lettered.
"""
import base64
import logging
import subprocess
import threading
import time
from collections import Counter

import requests
from redis.exceptions import RedisError

from workers.store.dead_letters import DeadLetterStore
from workers.store.ledger import FINAL_STATES as FINAL, Ledger
from workers.store.redis_client import connect

SECRETS = {"locate2u": "demo-locate2u-client-secret", "storepoint": "demo-storepoint-token", "b2b": "demo-b2b-token", "locate": "demo-locate-key",
           "deliverycom": "demo-deliverycom-token",
           "forward": "whsec_" + base64.b64encode(b"demo-forward-signing-secret-0001").decode()}
# The secret settings of demo mode (fixed test values), re-read by commands that find the demo stack.
DEMO_SECRETS = {"LOCATE2U_CLIENT_SECRET": SECRETS["locate2u"], "STOREPOINT_API_TOKEN": SECRETS["storepoint"],
                "B2B_API_TOKEN": SECRETS["b2b"], "LOCATE_API_TOKEN": SECRETS["locate"],
                "DELIVERYCOM_ACCESS_TOKEN": SECRETS["deliverycom"], "FORWARD_SECRET": SECRETS["forward"]}

STOPS = {
    7001: ("Joe's Coffee", "199 Water St, New York, NY 10038, USA", (40.7068885, -74.0042710), "212-555-0101"),
    7002: ("Park Ave office", "235 Park Ave S, New York, NY 10003, USA", (40.7377100, -73.9879490), "212-555-0102"),
    7003: ("Brooklyn Bakery", "75 Front St, Brooklyn, NY 11201, USA", (40.7025500, -73.9877800), "718-555-0103"),
    7004: ("Locate2u Sydney", "Level 4, Suite 4.11, 55 Miller St, Pyrmont NSW 2009, Australia",
           (-33.8706672, 151.192487), "0212345678"),
}


def _stop_event(stop_id, status, minute, old=None):
    return ("stop.status-changed", {"stopId": stop_id, "stopRef": f"DEMO{stop_id}", "tripDate": "2026-11-23",
                                    "shipmentId": None, "actionDate": f"2026-11-23T{minute}:00.0000000+00:00",
                                    "oldStatus": old, "newStatus": status, "notes": None, "location": None})


# Where the day waits until everything delivered so far has settled (so the next event is older than
# one already applied, whatever order the workers would otherwise take them in).
SETTLED_FIRST = "settled first"
# A delivery day: assignments, status changes, a duplicate, an out-of-order pair (Complete sent before
# the older Arrived), a cancellation, a stop Delivery.com cannot take, and trip/shipment/note events.
DAY = [
    *[("stop.assigned", {"stopId": stop_id, "stopRef": f"DEMO{stop_id}", "tripDate": "2026-11-23",
                         "actionDate": "2026-11-23T07:00:00.0000000+00:00", "shipmentId": None,
                         "assignedTo": {"name": "Dana Driver", "id": "d-1"}}) for stop_id in STOPS],
    ("trip.created", {"tripId": 900, "tripDate": "2026-11-23", "actionDate": "2026-11-23T07:01:00+00:00"}),
    _stop_event(7001, "Enroute", "08:00", "Pending"),
    _stop_event(7001, "Arrived", "08:20", "Enroute"),
    _stop_event(7001, "Arrived", "08:20", "Enroute"),  # sent twice: recognised as a duplicate
    _stop_event(7001, "Complete", "08:30", "Arrived"),
    _stop_event(7002, "Enroute", "09:00", "Pending"),
    _stop_event(7002, "Complete", "09:40", "Arrived"),  # newer, delivered first...
    SETTLED_FIRST,
    _stop_event(7002, "Arrived", "09:25", "Enroute"),   # ...older, delivered once it is applied: stale
    _stop_event(7003, "Cancelled", "10:00", "Pending"),
    _stop_event(7004, "Arrived", "11:00", "Enroute"),
    ("shipment.status-changed", {"shipmentId": 31, "shipmentRef": "DEMOSHIP31", "tripDate": "2026-11-23",
                                 "actionDate": "2026-11-23T11:05:00+00:00", "oldStatus": "Picked up",
                                 "newStatus": "Complete"}),
    ("note.created", {"stopId": 7001, "actionDate": "2026-11-23T08:31:00+00:00", "text": "Left with reception"}),
    ("trip.status-changed", {"tripId": 900, "tripDate": "2026-11-23", "actionDate": "2026-11-23T12:00:00+00:00",
                             "oldStatus": "Started", "newStatus": "Complete"}),
]

EXPECTED = {
    "storepoint": {"l2u-stop-7001": "complete", "l2u-stop-7002": "complete", "l2u-stop-7004": "arrived"},
    "b2b active": {"l2u-stop-7001": True, "l2u-stop-7002": True, "l2u-stop-7003": False, "l2u-stop-7004": True},
    "locate": {"l2u-stop-7001", "l2u-stop-7002", "l2u-stop-7004"},
    "deliverycom": {"199 WATER ST", "235 PARK AVE S", "75 FRONT ST"},
    "dead letters": {("deliverycom", "l2u-stop-7004")},
}


class DemoSystems:
    """The simulators of every external system, on free loopback ports."""

    def __init__(self):
        from workers.ops.simulators import b2b, deliverycom, forward_receiver, locate, locate2u, storepoint
        from workers.ops.simulators.base import SimulatorServer

        self.l2u = locate2u.Locate2uState(client_id="demo-client", client_secret=SECRETS["locate2u"])
        for stop_id, (name, address, (lat, lng), phone) in STOPS.items():
            self.l2u.add_stop(stopId=stop_id, name=name, address=address, status="Pending",
                              location={"latitude": lat, "longitude": lng},
                              contact={"name": "Front desk", "phone": phone, "email": "desk@example.com"})
        apps = {"locate2u": locate2u.create_app(self.l2u),
                "storepoint": storepoint.create_app(storepoint.StorepointState(token=SECRETS["storepoint"])),
                "b2b": b2b.create_app(b2b.B2BState(token=SECRETS["b2b"], countries=("US", "AU"))),
                "locate": locate.create_app(locate.LocateState(api_key=SECRETS["locate"])),
                "deliverycom": deliverycom.create_app(deliverycom.DeliverycomState(SECRETS["deliverycom"])),
                "forward": forward_receiver.create_receiver({"demo": SECRETS["forward"]})}
        self.servers = {name: SimulatorServer(app) for name, app in apps.items()}
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no request lines from the simulators

    def state(self, name):
        return self.servers[name].app.config["STATE"]

    def __enter__(self):
        for server in self.servers.values():
            server.start()
        return self

    def __exit__(self, *exc):
        for server in self.servers.values():
            server.stop()

    def env(self):
        """Environment that wires the relay to the simulators."""
        urls = {name: server.url for name, server in self.servers.items()}
        return {"LOCATE2U_CLIENT_ID": self.l2u.client_id, "LOCATE2U_API_URL": urls["locate2u"],
                "LOCATE2U_ID_URL": urls["locate2u"], "STOREPOINT_API_URL": urls["storepoint"],
                "B2B_API_URL": urls["b2b"], "B2B_BUSINESS_PARTNER_ID": "BP-1", "B2B_COUNTRY_ID": "US",
                "LOCATE_API_URL": urls["locate"], "DELIVERYCOM_API_URL": urls["deliverycom"],
                "FORWARD_URLS": urls["forward"] + "/hooks/demo", "RELAY_RETRY_SCHEDULE": "0,1,2,5,10",
                **DEMO_SECRETS}

    def holdings(self, redis_url):
        """What every downstream system holds now, and the dead letters."""
        storepoint = {next(t[4:] for t in loc["tags"] if t.startswith("l2u:")): loc["tags"][1]
                      for loc in self.state("storepoint").locations.values()}
        b2b = {loc["idRemote"]: loc["active"] for loc in self.state("b2b").locations.values()}
        locate = {row["remote_key"] for row in self.state("locate").rows("customeraddress")}
        deliverycom = {loc["street"] for loc in self.state("deliverycom").locations.values()}
        letters = {(entry["sink"], entry.get("key")) for entry in DeadLetterStore(connect(redis_url)).list()}
        return {"storepoint": storepoint, "b2b active": b2b, "locate": locate, "deliverycom": deliverycom,
                "dead letters": letters, "forward messages": len(self.state("forward").log)}


def _sink_states(entry):
    return ", ".join(f"{name}={outcome['state']}" for name, outcome in sorted(entry["sinks"].items()))


class DemoDriver(threading.Thread):
    """Waits for the stack, syncs subscriptions, plays the day, then prints a summary that stands alone.

    While it waits it says what for and how far along it is; ``on_done(ok)`` is called last.
    """

    def __init__(self, systems, env, web_url, flower_url, log_path, on_done, echo=print, timeout=180):
        super().__init__(daemon=True)
        self.systems, self.env, self.web_url, self.flower_url = systems, env, web_url, flower_url
        self.log_path, self.on_done, self.echo, self.timeout = log_path, on_done, echo, timeout
        self.ok = self.reported = False
        self.summary = []
        self.stopped = threading.Event()  # set once the stack's processes have stopped (Ctrl-C)

    def run(self):
        try:
            self._wait_ready()
            self.echo("demo: syncing the Locate2u subscriptions (l2u-relay subscriptions sync)")
            with open(self.log_path, "a") as log:
                subprocess.run(["l2u-relay", "subscriptions", "sync"], env=self.env, check=True, timeout=60,
                               stdout=log, stderr=subprocess.STDOUT)
            self._play()
            self._settle()
            self.ok = self._report()
        except (OSError, RuntimeError, subprocess.SubprocessError, requests.RequestException, RedisError) as exc:
            if self.stopped.is_set():  # stopped under it (Ctrl-C): nothing to report
                return
            self.summary.append(f"demo: FAILED: {exc}")
        self.summary.append(f"process logs: {self.log_path} (l2u-relay run -v streams them)")
        self.echo("\n".join(["", "=== demo summary ===", *self.summary]))
        self.reported = True
        self.on_done(self.ok)

    def _wait_ready(self):
        self.echo(f"demo: waiting for the receiver to be ready ({self.web_url}/readyz)")
        started = time.monotonic()
        next_note = started + 10
        while time.monotonic() < started + self.timeout:
            try:
                if requests.get(self.web_url + "/readyz", timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() >= next_note:
                self.echo(f"demo: still waiting for the receiver ({time.monotonic() - started:.0f}s)")
                next_note += 10
            time.sleep(0.5)
        raise RuntimeError(f"the receiver at {self.web_url} did not become ready within {self.timeout}s")

    def _play(self):
        answers = {"accepted": 0, "duplicate": 0}
        for event in DAY:
            if event is SETTLED_FIRST:
                self._wait_settled(answers["accepted"])
                continue
            for response in self.systems.l2u.deliver(*event):
                response.raise_for_status()
                answers[response.json()["status"]] += 1
        self.accepted = answers["accepted"]
        line = (f"demo: Locate2u delivered {len(DAY) - DAY.count(SETTLED_FIRST)} events: {answers['accepted']} "
                f"accepted, {answers['duplicate']} recognised as duplicates")
        self.echo(line)
        self.summary.append(line)

    def _wait_settled(self, accepted):
        """The ledger entries once ``accepted`` deliveries have a final status, telling how many have."""
        ledger = Ledger(connect(self.env["REDIS_URL"]))
        started, shown = time.monotonic(), None
        while True:
            entries = [entry for entry in map(ledger.get, ledger.ids()) if entry]
            settled = [e for e in entries if e["status"] in FINAL]
            progress = (len(settled), len(entries))
            if progress != shown:
                self.echo(f"demo: waiting for the workers: {len(settled)} of {accepted} deliveries settled")
                shown = progress
            if len(settled) >= accepted:
                return settled
            if time.monotonic() > started + self.timeout:
                waiting = [f"{e['delivery_id']}: {e['status']} ({_sink_states(e)})"
                           for e in entries if e["status"] not in FINAL]
                raise RuntimeError(f"{len(settled)} of {accepted} deliveries settled within {self.timeout}s; "
                                   "still open: " + ("; ".join(waiting[:5]) or "none recorded") +
                                   " (are the worker and beat running? see the process logs)")
            time.sleep(0.5)

    def _settle(self):
        """Wait until every accepted delivery has a final status, then sum up their outcomes per sink."""
        settled = self._wait_settled(self.accepted)
        outcomes = {}
        for entry in settled:
            for sink, outcome in entry["sinks"].items():
                outcomes.setdefault(sink, Counter())[outcome["state"]] += 1
        self.summary.append(f"demo: all {len(settled)} deliveries settled; outcomes per sink:")
        self.summary += [f"  {sink:<16} {dict(sorted(counts.items()))}" for sink, counts in sorted(outcomes.items())]

    def _report(self):
        held = self.systems.holdings(self.env["REDIS_URL"])
        self.summary.append("demo: what each downstream system now holds")
        for name, value in held.items():
            shown = sorted(value.items()) if isinstance(value, dict) else sorted(value) if isinstance(value, set) \
                else value
            mark = "" if name not in EXPECTED else ("  ✓" if value == EXPECTED[name] else "  ✗ expected "
                                                                                       f"{EXPECTED[name]}")
            self.summary.append(f"  {name:<16} {shown}{mark}")
        self.summary.append(f"Flower (task monitor): {self.flower_url}")
        ok = all(held[name] == expected for name, expected in EXPECTED.items())
        self.summary.append("demo: all downstream state as expected" if ok else "demo: downstream state NOT as expected")
        return ok
