"""Chaos run: the whole relay under the faults it was not designed around.

    python -m tests.chaos --profile ci|large [--seed N] [--keep-logs DIR] [--json]

Real gunicorn, several Celery worker processes plus a separate beat, a real
redis-server with append-only persistence (``appendfsync everysec``), and
loopback simulators of Locate2u, Storepoint and B2B. Deliveries for many stops
go to the receiver in shuffled order with 10 % exact duplicates, some stops
with two events at the same ``actionDate`` instant, while on one timeline the
run:

- SIGKILLs whole worker process groups, half of them while that worker is in a
  sink call (during fan-out; that sink write is held a few seconds to catch it);
- SIGKILLs Redis and starts it again from its append-only file;
- deletes the Celery work queue lists (the broker loses every message in them), with the
  workers frozen (SIGSTOP, as a stopped VM) until a message waits there, so one is lost;
- has Locate2u's stop reads fail during enrich: 503s, bursts of 429 with
  ``Retry-After``, and reads slower than the client's timeout;
- has both sinks fail 20 % of requests with 503, answer bursts of 429 with
  ``Retry-After``, apply some writes and then answer 503, drop the connection
  or answer 200 with a proxy's HTML page,
  and hold some writes past the client's read timeout, applying them after it
  gave up (while the worker retries, or after it was killed).

The sender retries every 503 (after ``Retry-After``) and every connection
error, as Locate2u does. The seed (printed) fixes the events and the timeline;
``--seed N`` replays them.

At the end it checks the guarantees of DESIGN.md and returns the figures and
the list of problems (empty when every guarantee held):

- no delivery lost: every accepted delivery's ledger entry is applied, stale
  or dead-lettered, and a dead letter needs a reason the chaos explains;
- exactly-once effect and ordering: each sink's final state is the one the
  newest event asks for (later ``actionDate`` instant; for equal instants the
  later received, then the greater delivery id), with no duplicate record
  downstream;
- deliveries answered 503 while Redis was down are accepted on retry;
- no secret (webhook secret, URL tokens, API tokens, passwords, issued access
  tokens and JWTs, ``Authorization`` values) in any process's output.
"""
import argparse
import base64
import collections
import contextlib
import dataclasses
import heapq
import itertools
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import redis
import requests

from receiver.webhooks import delivery_id_for
from tests.payloads import PUBLISHED
from tests.processes import BIN, CeleryWorker, Gunicorn, Process, process_env
from workers.celery_config import DELIVER_QUEUE, INGEST_QUEUE
from workers.config import Settings
from workers.locate2u.client import API_TIMEOUT
from workers.locate2u.webhook_auth import url_token
from workers.metrics import COUNTERS
from workers.ops.devstack import EmbeddedRedis
from workers.ops.simulators import b2b, locate2u, storepoint
from workers.ops.simulators.base import SimulatorServer
from workers.resilience.http import DEFAULT_TIMEOUT
from workers.resilience.retries import RetryScheduler
from workers.store.dead_letters import DeadLetterStore
from workers.store.ledger import FINAL_SINK_STATES, FINAL_STATES, Ledger
from workers.store.redis_client import connect

STATUSES = ("Enroute", "Arrived", "Complete", "Failed", "Cancelled")
STOP_RECORD_STATUS = "Pending"  # what a stop.assigned event (no newStatus) leaves: the stop's own status
OFFSETS = (timedelta(0), timedelta(hours=10), timedelta(hours=-5), timedelta(hours=5, minutes=30))
SUBURBS = (("Pyrmont", "NSW", "2009"), ("Sydney", "NSW", "2000"), ("Parramatta", "NSW", "2150"),
           ("Melbourne", "VIC", "3000"), ("Fitzroy", "VIC", "3065"), ("Brisbane", "QLD", "4000"))
STREETS = ("Miller St", "George St", "Smith Rd", "Collins St", "Brunswick St", "Queen St")
FIRST_STOP_ID = 500000
RETRY_SCHEDULE = (0, 1, 1, 2, 3, 5, 8, 13, 21)
VISIBILITY_TIMEOUT = 15  # also the key lock: min(pipeline.LOCK_SECONDS, visibility timeout)
SWEEP_AFTER = 15  # also the processing lease: shorter than a Locate2u read that times out
SLOW_SINK_SECONDS = DEFAULT_TIMEOUT[1] + 5  # a sink write applied after the client gave up on it
LOCATE2U_TIMEOUT_SECONDS = API_TIMEOUT[1] + 2  # a stop read the client gives up on
KILL_HOLD_SECONDS = 8  # a sink write held so that a kill "in a sink call" finds its worker
DROP_WAIT_SECONDS = 10  # a queue drop waits this long at most (workers frozen) for a message to lose
STOPS_PATH = "/v1/Stops"
SINK_WRITE_PATHS = {"storepoint": "/locations", "b2b": "/Location/"}
# A dead letter is acceptable only for a reason the chaos explains; this run's data and schedule leave none.
EXPLAINED_DEAD_LETTERS = ()
ROUTES_YAML = """\
storepoint:
  rate_limit: {rate: 200, burst: 100}
  breaker: {threshold: 5, cooldown: 2}
b2b:
  rate_limit: {rate: 200, burst: 100}
  breaker: {threshold: 5, cooldown: 2}
"""


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    stops: int
    events_per_stop: int
    send_seconds: float
    workers: int
    kills: int
    settle_timeout: float
    concurrency: int = 2
    duplicate_rate: float = 0.10
    fail_rate: float = 0.20
    burst_every: float = 8.0   # seconds between bursts of 429 (alternating sinks)
    burst_size: int = 12
    burst_retry_after: int = 2
    redis_down_seconds: float = 4.0
    sender_threads: int = 6
    tie_rate: float = 0.15          # stops with two events at the same actionDate instant
    l2u_fail_rate: float = 0.05     # Locate2u stop reads answered 503
    l2u_bursts: int = 2             # bursts of 429 on Locate2u stop reads
    l2u_timeouts: int = 2           # stop reads slower than the client's read timeout
    queue_drops: int = 6            # times the work queue lists are deleted
    applied_then_failed: int = 6    # writes per sink applied then answered 503, dropped or garbled
    slow_sink_calls: int = 2        # writes per sink held past the read timeout, applied after it


PROFILES = {
    "ci": Profile("ci", stops=60, events_per_stop=8, send_seconds=40, workers=3, kills=4, settle_timeout=210,
                  queue_drops=1),
    "large": Profile("large", stops=650, events_per_stop=8, send_seconds=300, workers=4, kills=14,
                     settle_timeout=600, l2u_bursts=6, l2u_timeouts=6, applied_then_failed=30,
                     slow_sink_calls=6),
}


# ---------------------------------------------------------------- the events

@dataclasses.dataclass(frozen=True)
class Event:
    stop_id: int
    event_type: str
    status: str          # the status the location gets (newStatus, or the stop's own for stop.assigned)
    instant: datetime    # actionDate as an aware UTC instant
    body: bytes

    @property
    def delivery_id(self):
        return delivery_id_for(self.event_type, self.body)


def action_date(instant, rng, fraction=True):
    """``instant`` written in a random UTC offset, sometimes with Locate2u's 7 fractional digits."""
    local = instant.astimezone(timezone(rng.choice(OFFSETS)))
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction and rng.random() < 0.5:
        text += f".{rng.randrange(10 ** 6):06d}{rng.randrange(10)}"
    return text + local.strftime("%z")[:3] + ":" + local.strftime("%z")[3:]


def make_events(profile, rng):
    """Every stop's events, seconds or minutes apart, in the stop's own order; for ``tie_rate`` of
    the stops the last two share one instant (no fraction) and ask for different statuses."""
    events = []
    base = datetime(2022, 4, 27, 4, 0, tzinfo=timezone.utc)
    for index in range(profile.stops):
        stop_id = FIRST_STOP_ID + index
        moments = sorted(rng.sample(range(1, 6 * 3600), profile.events_per_stop))
        tie = rng.random() < profile.tie_rate
        if tie:
            moments[-1] = moments[-2]
        for n, second in enumerate(moments):
            instant = base + timedelta(seconds=second)
            event = make_event(stop_id, instant, rng, exact=tie and n >= len(moments) - 2)
            while tie and n == len(moments) - 1 and event.status == events[-1].status:
                event = make_event(stop_id, instant, rng, exact=True)  # a tie that decides something
            events.append(event)
    return events


def make_event(stop_id, instant, rng, exact=False):
    """One delivery for ``stop_id`` at ``instant`` (whole seconds: the fraction ``action_date`` may
    add is under a second, so it never reorders events that are seconds apart; ``exact`` adds none)."""
    instant = instant.replace(microsecond=0)
    date = action_date(instant, rng, fraction=not exact)
    if rng.random() < 0.1:
        body = dict(PUBLISHED["stop.assigned"], stopId=stop_id, actionDate=date)
        return Event(stop_id, "stop.assigned", STOP_RECORD_STATUS, instant, json.dumps(body).encode())
    status = rng.choices(STATUSES, weights=(3, 3, 3, 1, 2))[0]
    body = dict(PUBLISHED["stop.status-changed"], stopId=stop_id, newStatus=status, oldStatus="Enroute",
                actionDate=date)
    return Event(stop_id, "stop.status-changed", status, instant, json.dumps(body).encode())


def add_stops(state, profile, rng):
    """Every stop in the Locate2u simulator, with an address B2B can split and coordinates."""
    for index in range(profile.stops):
        suburb, region, postcode = rng.choice(SUBURBS)
        state.add_stop(stopId=FIRST_STOP_ID + index, name=f"Chaos stop {index}", status=STOP_RECORD_STATUS,
                       address=f"{rng.randrange(1, 300)} {rng.choice(STREETS)}, {suburb} {region} {postcode}, "
                               "Australia",
                       location={"latitude": round(-33 - rng.random(), 6), "longitude": round(151 + rng.random(), 6)},
                       contact={"name": f"Contact {index}", "phone": "0123456789",
                                "email": f"stop{index}@example.com"})


def expected_final(events, received_at=None):
    """``{stop_id: newest status}``: the later actionDate instant decides; for equal instants the
    later received (``received_at``: ``{delivery id: ledger receipt time}``), then the greater id."""
    received_at = received_at or {}

    def order(event):
        return event.instant, received_at.get(event.delivery_id, 0.0), event.delivery_id

    newest = {}
    for event in events:
        if event.stop_id not in newest or order(event) > order(newest[event.stop_id]):
            newest[event.stop_id] = event
    return {stop_id: event.status for stop_id, event in newest.items()}


# ------------------------------------------------------------ faults and sims

def start_simulators(profile, rng, tokens):
    l2u_state = locate2u.Locate2uState(client_id="chaos-client", client_secret=tokens["locate2u_client_secret"])
    add_stops(l2u_state, profile, rng)
    sp_state = storepoint.StorepointState(token=tokens["storepoint"])
    b2b_state = b2b.B2BState(token=tokens["b2b_static"], username="chaos-relay", password=tokens["b2b_password"],
                             business_partners=("BP-CHAOS",), countries=("AU",))
    apps = {"locate2u": locate2u.create_app(l2u_state), "storepoint": storepoint.create_app(sp_state),
            "b2b": b2b.create_app(b2b_state)}
    for name in ("storepoint", "b2b"):
        apps[name].config["FAULTS"].fail_rate(profile.fail_rate, 503)
    apps["locate2u"].config["FAULTS"].fail_rate(profile.l2u_fail_rate, 503, path_prefix=STOPS_PATH)
    return {name: SimulatorServer(app).start() for name, app in apps.items()}


# --------------------------------------------------------------- processes

class Beat(Process):
    """``celery -A workers.app beat``: sweeper and due retries; never killed here."""

    def __init__(self, env):
        super().__init__("beat", [str(BIN / "celery"), "-A", "workers.app", "beat", "-l", "info"], env)
        self.wait_for_output("beat: Starting", timeout=60)


class Stack:
    """Redis (append-only), the simulators, gunicorn, beat and the Celery workers of one run."""

    def __init__(self, profile, workdir, rng):
        self.profile, self.workdir, self.rng = profile, Path(workdir), rng
        self.tokens = {name: secrets.token_urlsafe(24) for name in
                       ("webhook", "storepoint", "b2b_static", "b2b_password", "locate2u_client_secret")}
        self.processes, self.workers, self.sims = [], [], {}
        self.redis_server = self.settings = self.env = self._client = None

    def start(self):
        self.redis_server = EmbeddedRedis(self.workdir / "redis", appendonly=True).start()
        self.sims = start_simulators(self.profile, self.rng, self.tokens)
        routes = self.workdir / "routes.yaml"
        routes.write_text(ROUTES_YAML)
        self.settings = Settings(
            webhook_secret=self.tokens["webhook"], redis_url=self.redis_server.url,
            data_dir=str(self.workdir / "data"), routes_file=str(routes), retry_schedule=RETRY_SCHEDULE,
            visibility_timeout=VISIBILITY_TIMEOUT, sweep_after=SWEEP_AFTER,
            locate2u_client_id="chaos-client", locate2u_client_secret=self.tokens["locate2u_client_secret"],
            locate2u_api_url=self.sims["locate2u"].url, locate2u_id_url=self.sims["locate2u"].url,
            storepoint_api_url=self.sims["storepoint"].url, storepoint_api_token=self.tokens["storepoint"],
            b2b_api_url=self.sims["b2b"].url, b2b_username="chaos-relay", b2b_password=self.tokens["b2b_password"],
            b2b_business_partner_id="BP-CHAOS", b2b_country_id="AU")
        self.env = process_env(self.settings, WEB_CONCURRENCY=2)
        self.web = self._add(Gunicorn(self.env))
        self.beat = self._add(Beat(self.env))
        starters = [threading.Thread(target=self.start_worker) for _ in range(self.profile.workers)]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        if len(self.workers) != self.profile.workers:
            raise RuntimeError("not every Celery worker started")
        return self

    def _add(self, process):
        self.processes.append(process)
        return process

    def start_worker(self):
        worker = CeleryWorker(self.env, concurrency=self.profile.concurrency, name="worker")
        self.processes.append(worker)
        self.workers.append(worker)
        return worker

    @contextlib.contextmanager
    def workers_frozen(self):
        """SIGSTOP every live worker's process group (a stopped VM, a long pause) until the body ends."""
        frozen = [worker for worker in self.workers if worker.signal(signal.SIGSTOP)]
        try:
            yield
        finally:
            for worker in frozen:
                worker.signal(signal.SIGCONT)

    def kill_redis(self):
        """SIGKILL redis-server: no shutdown, no final flush."""
        self.redis_server.process.kill()
        self.redis_server.process.wait(10)

    def kill_worker(self, in_sink_call=False):
        """SIGKILL a live worker's whole process group (with ``in_sink_call``, one that is in a sink
        call: the next write to a sink is held 8 s so there is one to find) and start a replacement;
        return True if it was in a sink call."""
        victim = None
        if in_sink_call:
            sink = self.rng.choice(sorted(SINK_WRITE_PATHS))
            self.sims[sink].app.config["FAULTS"].slow(KILL_HOLD_SECONDS, path_prefix=SINK_WRITE_PATHS[sink],
                                                      kind="held for a kill")
            victim = self.worker_in_sink_call(timeout=KILL_HOLD_SECONDS + 10)
        caught = victim is not None
        victim = victim or self.rng.choice([worker for worker in self.workers if worker.proc.poll() is None])
        victim.kill()
        self.workers.remove(victim)
        self.start_worker()
        return caught

    def worker_in_sink_call(self, timeout=5.0):
        """The worker whose process (a pool child) has a request open at Storepoint or B2B, or None."""
        deadline = time.monotonic() + timeout
        groups = {worker.proc.pid: worker for worker in self.workers if worker.proc.poll() is None}
        while time.monotonic() < deadline:
            ports = {port for name in SINK_WRITE_PATHS for port in self.sims[name].app.config["FAULTS"].in_progress}
            if ports:
                for conn in psutil.net_connections(kind="tcp"):
                    if conn.pid and conn.laddr and conn.laddr.port in ports:
                        try:
                            worker = groups.get(os.getpgid(conn.pid))
                        except ProcessLookupError:
                            continue
                        if worker is not None:
                            return worker
            time.sleep(0.05)
        return None

    def client(self):
        """One Redis client for the orchestrator (it reconnects by itself after the restart)."""
        if self._client is None:
            self._client = connect(self.redis_server.url)
        return self._client

    def stop(self):
        if self._client is not None:
            self._client.close()
        for process in reversed(self.processes):
            process.stop()
        for server in self.sims.values():
            server.stop()
        if self.redis_server:
            self.redis_server.stop()

    def outputs(self):
        """``{log name: text}`` of every process started, killed ones included."""
        names = collections.Counter()
        result = {}
        for process in self.processes:
            names[process.name] += 1
            result[f"{process.name}-{names[process.name]}"] = process.output()
        return result

    def remove_logs(self):
        for process in self.processes:
            Path(process.log.name).unlink(missing_ok=True)


# ------------------------------------------------------------------ sender

@dataclasses.dataclass
class Post:
    event: Event
    copy: bool                     # an exact duplicate of another post's body
    answers: list = dataclasses.field(default_factory=list)  # (time, HTTP status or error, answer status)


class Sender:
    """Posts every delivery at a steady pace; a 503 or lost connection is retried, as Locate2u retries."""

    MAX_ATTEMPTS = 40

    def __init__(self, base_url, secret, posts, profile):
        self.base_url, self.posts, self.profile = base_url, posts, profile
        self.tokens = {event_type: url_token(secret, event_type) for event_type in PUBLISHED}
        self.lock = threading.Lock()
        self.heap = []
        self.open = len(posts)
        self.done = threading.Event()

    def run(self, deadline):
        start = time.monotonic()
        spacing = self.profile.send_seconds / max(1, len(self.posts))
        self.heap = [(start + i * spacing, i, post) for i, post in enumerate(self.posts)]
        heapq.heapify(self.heap)
        threads = [threading.Thread(target=self._work, args=(deadline,), daemon=True)
                   for _ in range(self.profile.sender_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()) + 15)

    def _work(self, deadline):
        session = requests.Session()
        session.trust_env = False
        while time.monotonic() < deadline:
            with self.lock:
                if not self.heap:
                    if self.open == 0:
                        return
                    item = None
                else:
                    item = heapq.heappop(self.heap) if self.heap[0][0] <= time.monotonic() else None
            if item is None:
                time.sleep(0.01)
                continue
            self._send(session, *item)

    def _send(self, session, due, seq, post):
        event = post.event
        url = f"{self.base_url}/webhooks/locate2u/{event.event_type}/{self.tokens[event.event_type]}"
        try:
            response = session.post(url, data=event.body, headers={"Content-Type": "application/json"}, timeout=10)
            code, status = response.status_code, (response.json().get("status") if response.ok else None)
            wait = float(response.headers.get("Retry-After") or 1)
        except requests.RequestException as exc:
            code, status, wait = type(exc).__name__, None, 1.0
        post.answers.append((time.time(), code, status))
        with self.lock:
            if code == 200 or len(post.answers) >= self.MAX_ATTEMPTS or (isinstance(code, int) and code != 503):
                self.open -= 1
            else:
                heapq.heappush(self.heap, (time.monotonic() + wait, seq, post))


def plan_posts(events, profile, rng):
    """The events plus ``duplicate_rate`` exact copies, all shuffled."""
    copies = rng.sample(events, round(len(events) * profile.duplicate_rate))
    posts = [Post(event, False) for event in events] + [Post(event, True) for event in copies]
    rng.shuffle(posts)
    return posts


# ---------------------------------------------------------------- the chaos

class Chaos(threading.Thread):
    """Every fault of the run on one timeline drawn from the seed (see the module docstring)."""

    def __init__(self, stack, profile, rng):
        super().__init__(daemon=True)
        self.stack, self.profile, self.rng = stack, profile, rng
        self.kills = 0
        self.kills_in_sink_call = 0
        self.redis_restarts = 0
        self.redis_window = None     # (down at, up at), epoch seconds
        self.dropped = []            # (epoch seconds, [unsettled delivery ids whose message was in a deleted list])
        self.dropped_messages = 0
        self.dropped_of_settled = 0  # deleted messages' deliveries already settled (an extra copy): nothing to move
        self.bursts = collections.Counter()
        self.errors = []
        self.crashes = []   # last output of each worker that exited without being killed
        self.history = []   # (seconds, what, sink) of what was done
        self.timeline_done = threading.Event()
        self.max_queued = 0  # most tasks waiting in the ingest and deliver queues at once
        self.stopping = threading.Event()

    def timeline(self):
        """``[(seconds from start, what, detail)]``, sorted; nothing else happens within a few seconds
        of the Redis kill, so every fault is applied and counted."""
        profile, rng = self.profile, self.rng
        span = profile.send_seconds
        restart = span * rng.uniform(0.4, 0.6)

        def moments(count, what, details=(None,), latest=0.95):
            chosen = []
            while len(chosen) < count:
                moment = span * rng.uniform(0.05, latest)
                if abs(moment - restart) > profile.redis_down_seconds + 3:
                    chosen.append((moment, what, details[len(chosen) % len(details)]))
            return chosen

        sinks = ("storepoint", "b2b")
        bursts = [(span * 0.1 + i * profile.burst_every, "burst", sinks[i % 2])
                  for i in range(int(span * 0.9 // profile.burst_every))]
        bursts = [event for event in bursts if abs(event[0] - restart) > profile.redis_down_seconds + 3]
        events = (moments(profile.kills, "kill", ("in sink call", "anywhere")) + [(restart, "redis", None)] + bursts
                  # early enough that deliveries still arrive while it waits for one to lose
                  + moments(profile.queue_drops, "drop queues", latest=0.75)
                  + moments(profile.l2u_bursts, "locate2u burst") + moments(profile.l2u_timeouts, "locate2u timeout")
                  + moments(profile.applied_then_failed * 2, "applied then failed",
                            [(sink, how) for sink in sinks for how in (503, "drop", "garbled")])
                  + moments(profile.slow_sink_calls * 2, "slow sink call", sinks))
        return sorted(events, key=lambda event: event[0])

    def run(self):
        start = time.monotonic()
        timeline = self.timeline()
        while not self.stopping.wait(0.2):
            self._supervise()
            self._sample_backlog()
            if not timeline:
                self.timeline_done.set()
            while timeline and start + timeline[0][0] <= time.monotonic():
                moment, what, sink = timeline.pop(0)
                try:
                    {"kill": self._kill, "redis": self._restart_redis, "burst": self._burst,
                     "drop queues": self._drop_queues, "locate2u burst": self._locate2u_burst,
                     "locate2u timeout": self._locate2u_timeout, "applied then failed": self._applied_then_failed,
                     "slow sink call": self._slow_sink_call}[what](sink)
                    self.history.append((round(time.monotonic() - start, 1), what, sink))
                except Exception as exc:  # noqa: BLE001 - the run reports it as a problem instead of dying
                    self.errors.append(f"{what} at {moment:.0f}s failed: {type(exc).__name__}: {exc}")

    def _sample_backlog(self):
        try:
            client = self.stack.client()
            queued = client.llen("ingest") + client.llen("deliver")
        except redis.RedisError:
            return
        self.max_queued = max(self.max_queued, queued)

    def _supervise(self):
        """Restart a worker that exited on its own, as the platform (Procfile) would; count it."""
        for worker in list(self.stack.workers):
            if worker.proc.poll() is not None:
                self.stack.workers.remove(worker)
                self.crashes.append(crash_reason(worker.output()))
                self.stack.start_worker()

    def _kill(self, where):
        self.kills_in_sink_call += self.stack.kill_worker(in_sink_call=where == "in sink call")
        self.kills += 1

    def _restart_redis(self, _):
        down_at = time.time()
        self.stack.kill_redis()
        time.sleep(self.profile.redis_down_seconds)
        self.stack.redis_server.start()
        self.redis_window = (down_at, time.time())
        self.redis_restarts += 1

    def _drop_queues(self, _):
        """Delete both work queue lists at once: every message in them is lost. The workers are frozen
        until a message waits there (up to ``DROP_WAIT_SECONDS``): on a fast machine they take each one
        at once, and a drop that loses nothing tests nothing."""
        client, deadline = self.stack.client(), time.monotonic() + DROP_WAIT_SECONDS
        with self.stack.workers_frozen():
            while not (client.llen(INGEST_QUEUE) or client.llen(DELIVER_QUEUE)) and time.monotonic() < deadline:
                time.sleep(0.05)
            with client.pipeline() as pipe:
                for queue in (INGEST_QUEUE, DELIVER_QUEUE):
                    pipe.lrange(queue, 0, -1)
                pipe.delete(INGEST_QUEUE, DELIVER_QUEUE)
                *lists, _deleted = pipe.execute()
        at = time.time()
        messages = [raw for queue in lists for raw in queue]
        self.dropped_messages += len(messages)
        ids = sorted({delivery_of(raw) for raw in messages} - {None})
        entries = Ledger(client).get_many(ids)
        unsettled = [one for one in ids if entries.get(one, {}).get("status") not in FINAL_STATES]
        self.dropped_of_settled += len(ids) - len(unsettled)
        self.dropped.append((at, unsettled))

    def _locate2u_burst(self, _):
        self.stack.sims["locate2u"].app.config["FAULTS"].inject(
            429, self.profile.burst_size, self.profile.burst_retry_after,
            {"message": "Too Many Requests"}, path_prefix=STOPS_PATH)

    def _locate2u_timeout(self, _):
        self.stack.sims["locate2u"].app.config["FAULTS"].slow(LOCATE2U_TIMEOUT_SECONDS, path_prefix=STOPS_PATH)

    def _applied_then_failed(self, detail):
        sink, how = detail
        self.stack.sims[sink].app.config["FAULTS"].fail_after_apply(how, path_prefix=SINK_WRITE_PATHS[sink])

    def _slow_sink_call(self, sink):
        self.stack.sims[sink].app.config["FAULTS"].slow(SLOW_SINK_SECONDS, path_prefix=SINK_WRITE_PATHS[sink])

    def _burst(self, sink):
        faults = self.stack.sims[sink].app.config["FAULTS"]
        body = b2b.ERROR_BODIES[429] if sink == "b2b" else {"error": "rate_limited", "message": "Too Many Requests"}
        faults.inject(429, self.profile.burst_size, self.profile.burst_retry_after, body)
        self.bursts[sink] += 1


def delivery_of(raw):
    """The delivery id a raw Celery message (as kombu keeps it in Redis) is about, or None."""
    try:
        message = json.loads(raw)
        return json.loads(base64.b64decode(message["body"]))[0][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


# ------------------------------------------------------------ settle, check

def in_flight(client):
    """Work not finished yet: queued, held by a worker, or waiting for its retry time."""
    queued = client.llen("ingest") + client.llen("deliver")
    held = 0
    for raw in client.hvals("unacked"):
        try:
            task = json.loads(raw)[0]["headers"]["task"]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        held += task != "l2u.release_due_retries" and task != "l2u.sweep_received"
    return queued + held + client.zcard(RetryScheduler.KEY) + client.zcard(RetryScheduler.CLAIMED)


def unsettled(client, delivery_ids):
    ledger = Ledger(client)
    open_ids = []
    for delivery_id in delivery_ids:
        entry = ledger.get(delivery_id)
        if (entry is None or entry["status"] not in FINAL_STATES
                or any(sink["state"] not in FINAL_SINK_STATES for sink in entry["sinks"].values())):
            open_ids.append(delivery_id)
    return open_ids


def settle(stack, delivery_ids, timeout):
    """Wait until every delivery is final and nothing is in flight twice in a row; return seconds waited."""
    start = deadline = time.monotonic()
    deadline += timeout
    quiet = 0
    while time.monotonic() < deadline:
        try:
            client = stack.client()
            done = not unsettled(client, delivery_ids) and in_flight(client) == 0
        except redis.RedisError:
            done = False
        quiet = quiet + 1 if done else 0
        if quiet >= 2:
            break
        time.sleep(1.0)
    return time.monotonic() - start


def check_answers(posts, window):
    """Problems with what the receiver answered, and the counts for the report."""
    problems, figures = [], collections.Counter()
    by_body = collections.defaultdict(list)
    for post in posts:
        by_body[post.event.delivery_id].append(post)
        figures["posts"] += len(post.answers)
        statuses = [status for _, code, status in post.answers if code == 200]
        if not statuses:
            problems.append(f"delivery {post.event.delivery_id[:12]} never answered 200: {post.answers[-3:]}")
        figures["accepted_answers"] += statuses.count("accepted")
        figures["duplicate_answers"] += statuses.count("duplicate")
        codes = [code for _, code, _ in post.answers]
        figures["answered_503"] += codes.count(503)
        figures["connection_errors"] += sum(not isinstance(code, int) for code in codes)
        in_window = [at for at, code, _ in post.answers if code == 503 and window
                     and window[0] - 1 <= at <= window[1] + 15]
        figures["answered_503_in_restart"] += len(in_window)
        if in_window:
            figures["deliveries_503_in_restart"] += 1
            figures["deliveries_503_in_restart_then_accepted"] += bool(statuses)
    for delivery_id, group in by_body.items():
        answers = [status for post in group for _, code, status in post.answers if code == 200]
        if answers.count("accepted") != 1:
            problems.append(f"delivery {delivery_id[:12]} answered accepted {answers.count('accepted')} times "
                            f"(answers {answers}); a 503 must leave nothing recorded, a duplicate must be recognised")
    return problems, figures


def check_ledger(client, events):
    problems, figures = [], collections.Counter()
    ledger = Ledger(client)
    for event in events:
        entry = ledger.get(event.delivery_id)
        if entry is None:
            problems.append(f"lost: {event.delivery_id[:12]} ({event.event_type} stop {event.stop_id}) "
                            "is not in the ledger")
            figures["lost"] += 1
            continue
        figures[f"ledger_{entry['status']}"] += 1
        figures["fan_outs_resumed"] += any(line["what"] == "resumed" for line in ledger.history(event.delivery_id))
        open_sinks = {name: sink["state"] for name, sink in entry["sinks"].items()
                      if sink["state"] not in FINAL_SINK_STATES}
        if entry["status"] not in ("applied", "stale", "dead_lettered") or open_sinks:
            figures["lost"] += 1
            problems.append(f"lost: {event.delivery_id[:12]} stuck {entry['status']} {open_sinks}; "
                            f"history {ledger.history(event.delivery_id)[-4:]}")
    extra = set(ledger.ids()) - {event.delivery_id for event in events}
    if extra:
        problems.append(f"the ledger holds {len(extra)} entries for deliveries never sent")
    for entry in DeadLetterStore(client).list():
        figures["dead_letters"] += 1
        if not any(reason in entry["reason"] for reason in EXPLAINED_DEAD_LETTERS):
            problems.append(f"dead letter not explained by the chaos: {entry['sink']} {entry['reason']}")
    return problems, figures


def receipt_times(client, events):
    """``{delivery id: the ledger's received_at}`` (the tie-break for equal instants)."""
    ledger = Ledger(client)
    times = {}
    for event in events:
        entry = ledger.get(event.delivery_id)
        if entry is not None and entry.get("received_at"):
            times[event.delivery_id] = float(entry["received_at"])
    return times


def recovery_after_drops(client, dropped):
    """Seconds from each deleted list to the next trace line (the sweeper's "swept", or progress)
    of each delivery whose message it held: ``(count, longest)``, or ``(count, None)`` if one never
    moved again."""
    ledger, longest, count = Ledger(client), 0.0, 0
    for at, delivery_ids in dropped:
        for delivery_id in delivery_ids:
            later = [line["at"] for line in ledger.history(delivery_id) if line["at"] > at]
            count += 1
            if not later:
                return count, None
            longest = max(longest, min(later) - at)
    return count, round(longest, 1)


def check_sinks(sims, events, received_at):
    """Each stop's final state in Storepoint and B2B against the newest event; duplicates downstream."""
    problems, figures = [], collections.Counter()
    sp_state, b2b_state = sims["storepoint"].app.config["STATE"], sims["b2b"].app.config["STATE"]
    with sp_state.lock, b2b_state.lock:
        sp_locations = [json.loads(json.dumps(loc)) for loc in sp_state.locations.values()]
        b2b_locations = [dict(loc) for loc in b2b_state.locations.values()]
    sp_by_key, b2b_by_key = collections.defaultdict(list), collections.defaultdict(list)
    for loc in sp_locations:
        key = storepoint_key(loc)
        if key is None:
            problems.append(f"storepoint location {loc['id']} carries no l2u: key tag")
        sp_by_key[key].append(loc)
    for loc in b2b_locations:
        b2b_by_key[loc["idRemote"]].append(loc)
    for stop_id, status in sorted(expected_final(events, received_at).items()):
        key = f"l2u-stop-{stop_id}"
        figures["stops"] += 1
        figures["stops_cancelled"] += status == "Cancelled"
        sp, b2 = sp_by_key.pop(key, []), b2b_by_key.pop(key, [])
        figures["duplicates_downstream"] += max(0, len(sp) - 1) + max(0, len(b2) - 1)
        expect_sp = 0 if status == "Cancelled" else 1
        if len(sp) != expect_sp or (sp and status.lower() not in sp[0]["tags"]):
            figures["wrong_final_state"] += 1
            problems.append(f"storepoint {key}: newest status {status}, found "
                            f"{[(loc['id'], loc['tags']) for loc in sp]}")
        if len(b2) != 1 or b2[0]["active"] != (status != "Cancelled"):
            figures["wrong_final_state"] += 1
            problems.append(f"b2b {key}: newest status {status}, found "
                            f"{[(loc['id'], loc['active']) for loc in b2]}")
    for key, found in list(sp_by_key.items()) + list(b2b_by_key.items()):
        problems.append(f"records for a key no event produced: {key}: {len(found)}")
    return problems, figures


def storepoint_key(location):
    return next((tag[4:] for tag in location.get("tags") or () if tag.startswith("l2u:")), None)


def known_secrets(stack):
    """Every secret of the run: configured ones, URL tokens, and the tokens the simulators issued."""
    values = dict(stack.tokens)
    for event_type in PUBLISHED:
        values[f"url token {event_type}"] = url_token(stack.tokens["webhook"], event_type)
    l2u_state = stack.sims["locate2u"].app.config["STATE"]
    b2b_state = stack.sims["b2b"].app.config["STATE"]
    for index, token in enumerate(list(l2u_state._access) + list(l2u_state._refresh)):
        values[f"locate2u issued token {index}"] = token
    for index, token in enumerate(b2b_state._jwts):
        values[f"b2b issued JWT {index}"] = token
    for name, value in list(values.items()):
        values[f"Authorization: Bearer ({name})"] = f"Bearer {value}"
    return values


def check_logs(outputs, secret_values):
    problems, figures = [], collections.Counter()
    figures["log_lines"] = sum(text.count("\n") for text in outputs.values())
    figures["logs_scanned"] = len(outputs)
    for log_name, text in outputs.items():
        for name, value in secret_values.items():
            hits = text.count(value)
            if hits:
                figures["secrets_leaked"] += hits
                problems.append(f"secret {name} appears {hits} times in the {log_name} log")
    return problems, figures


def sweeper_counts(outputs):
    """What the sweeper did, from its log lines: deliveries re-queued and fan-outs resumed."""
    counts = collections.Counter()
    for text in outputs.values():
        counts["sweeper_requeued"] += sum(int(n) for n in re.findall(r"sweeper re-queued (\d+) deliveries", text))
        counts["sweeper_resumed"] += sum(int(n) for n in re.findall(r"sweeper resumed (\d+) stalled", text))
    return counts


def worker_counters(client):
    counts = collections.Counter()
    for field, value in client.hgetall(COUNTERS).items():
        name, labels = json.loads(field)
        labels = dict(labels)
        if name == "l2u_worker_retries":
            counts["retries"] += int(value)
        elif name == "l2u_worker_deliveries":
            counts[f"sink_{labels['outcome']}"] += int(value)
    return counts


# --------------------------------------------------------------------- run

@dataclasses.dataclass
class Report:
    profile: str
    seed: int
    figures: dict
    problems: list
    notes: list = dataclasses.field(default_factory=list)

    def summary(self):
        lines = [f"chaos profile {self.profile} (seed {self.seed})"]
        lines += [f"  {name}: {value}" for name, value in self.figures.items()]
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"PROBLEM: {problem}" for problem in self.problems[:60]]
        if len(self.problems) > 60:
            lines.append(f"... and {len(self.problems) - 60} more problems")
        return "\n".join(lines)


def run(profile, seed=None, workdir=None, keep_logs=None):
    """One chaos run; return its Report (``problems`` empty when every guarantee held)."""
    seed = random.randrange(2 ** 31) if seed is None else seed
    rng = random.Random(seed)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="l2u-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    events = make_events(profile, rng)
    posts = plan_posts(events, profile, rng)
    stack = Stack(profile, workdir, rng)
    sim_log = workdir / "simulators.log"
    capture_simulator_logs(sim_log)
    try:
        stack.start()
        chaos = Chaos(stack, profile, rng)
        sender = Sender(stack.web.url, stack.tokens["webhook"], posts, profile)
        chaos.start()
        sender.run(deadline=time.monotonic() + profile.send_seconds + 90)
        chaos.timeline_done.wait(timeout=120)
        send_done = time.monotonic() - started
        settle_seconds = settle(stack, [event.delivery_id for event in events], profile.settle_timeout)
        chaos.stopping.set()
        chaos.join(timeout=60)
        report = verify(stack, chaos, posts, events)
        report.figures.update(seed=seed, seconds_sending=round(send_done), seconds_settling=round(settle_seconds))
    finally:
        chaos_stop(stack)
    outputs = {**stack.outputs(), "simulators": sim_log.read_text(errors="replace") if sim_log.exists() else ""}
    problems, figures = check_logs(outputs, known_secrets(stack))
    report.problems += problems
    report.figures.update(figures)
    report.figures.update(sweeper_counts(outputs))
    report.figures["seconds_total"] = round(time.monotonic() - started)
    report.seed, report.profile = seed, profile.name
    if keep_logs:
        save_logs(outputs, Path(keep_logs))
    stack.remove_logs()
    shutil.rmtree(workdir, ignore_errors=True)
    return report


def chaos_stop(stack):
    try:
        stack.stop()
    finally:
        for handler in logging.getLogger("werkzeug").handlers:
            handler.close()
        logging.getLogger("werkzeug").handlers.clear()


def verify(stack, chaos, posts, events):
    client = stack.client()
    problems = list(chaos.errors)
    figures = collections.Counter()
    received_at = receipt_times(client, events)
    for check in (lambda: check_answers(posts, chaos.redis_window), lambda: check_ledger(client, events),
                  lambda: check_sinks(stack.sims, events, received_at)):
        found, counts = check()
        problems += found
        figures.update(counts)
    recovered, recovery_seconds = recovery_after_drops(client, chaos.dropped)
    if recovery_seconds is None:
        problems.append("a delivery whose message was in a deleted queue never progressed again")
    if stack.beat.proc.poll() is not None:
        problems.append("beat died during the run")
    figures.update(worker_counters(client))
    sink_faults = (stack.sims["storepoint"].app.config["FAULTS"].counts
                   + stack.sims["b2b"].app.config["FAULTS"].counts)
    l2u_faults = stack.sims["locate2u"].app.config["FAULTS"].counts
    ties = sum(1 for stop, group in itertools.groupby(sorted(events, key=lambda e: (e.stop_id, e.instant)),
                                                       key=lambda e: (e.stop_id, e.instant)) if len(list(group)) > 1)
    figures = {
        "deliveries_sent": len(posts), "unique_deliveries": len(events),
        "exact_duplicates_sent": sum(post.copy for post in posts), "http_posts": figures["posts"],
        "accepted": figures["accepted_answers"], "duplicates_recognised": figures["duplicate_answers"],
        "answered_503": figures["answered_503"], "answered_503_in_redis_restart": figures["answered_503_in_restart"],
        "deliveries_503_in_redis_restart": figures["deliveries_503_in_restart"],
        "deliveries_503_in_redis_restart_accepted_on_retry": figures["deliveries_503_in_restart_then_accepted"],
        "sender_connection_errors": figures["connection_errors"],
        "worker_kills_survived": chaos.kills, "worker_kills_in_sink_call": chaos.kills_in_sink_call,
        "redis_sigkills_survived": chaos.redis_restarts,
        "worker_crashes_restarted": len(chaos.crashes), "fan_outs_resumed": figures["fan_outs_resumed"],
        "max_tasks_queued": chaos.max_queued,
        "queue_deletions": len(chaos.dropped), "messages_deleted": chaos.dropped_messages,
        "deliveries_hit_by_deletions": recovered + chaos.dropped_of_settled,
        "longest_recovery_after_deletion_s": recovery_seconds,
        "settled_deliveries_hit_by_deletions": chaos.dropped_of_settled,
        "stops_with_equal_instants": ties,
        "locate2u_503_injected": l2u_faults["503"], "locate2u_429_injected": l2u_faults["429"],
        "locate2u_timeouts_injected": l2u_faults["slow"],
        "sink_503_injected": sink_faults["503"], "sink_429_injected": sink_faults["429"],
        "sink_applied_then_503": sink_faults["applied then 503"],
        "sink_applied_then_dropped": sink_faults["applied then drop"],
        "sink_applied_then_garbled": sink_faults["applied then garbled"],
        "sink_writes_applied_after_timeout": sink_faults["slow"],
        "retries": figures["retries"], "sink_writes_applied": figures["sink_applied"],
        "sink_writes_stale": figures["sink_stale"],
        "ledger_applied": figures["ledger_applied"], "ledger_stale": figures["ledger_stale"],
        "ledger_dead_lettered": figures["ledger_dead_lettered"], "dead_letters": figures["dead_letters"],
        "lost": figures["lost"], "stops": figures["stops"], "stops_newest_cancelled": figures["stops_cancelled"],
        "wrong_final_state": figures["wrong_final_state"], "duplicates_downstream": figures["duplicates_downstream"],
        "storepoint_requests": len(stack.sims["storepoint"].app.config["STATE"].requests_log),
        "b2b_requests": len(stack.sims["b2b"].app.config["STATE"].requests_log),
    }
    notes = [f"chaos timeline (s, what): {chaos.history}"]
    notes += [f"worker exited by itself and was restarted: {reason}" for reason in chaos.crashes]
    return Report("", 0, figures, problems, notes)


def crash_reason(output):
    """The line saying why a worker exited: Celery's "Unrecoverable error" message, else the last line."""
    for line in reversed(output.splitlines()):
        if "Unrecoverable error" in line:
            try:
                return json.loads(line)["message"][:300]
            except (ValueError, KeyError, TypeError):
                return line[:300]
    return (output.strip().splitlines() or [""])[-1][:300]


def capture_simulator_logs(path):
    """The simulators' request lines go to a file (scanned for secrets), not the console."""
    logger = logging.getLogger("werkzeug")
    logger.handlers.clear()
    logger.addHandler(logging.FileHandler(path))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def save_logs(outputs, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in outputs.items():
        (folder / f"{name}.log").write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="ci")
    parser.add_argument("--seed", type=int, default=None, help="seed for events and the chaos timeline")
    parser.add_argument("--keep-logs", metavar="DIR", help="write every process's output to DIR")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    seed = random.randrange(2 ** 31) if args.seed is None else args.seed
    print(f"chaos profile {args.profile}, seed {seed} (--seed {seed} replays it)", file=sys.stderr, flush=True)
    report = run(PROFILES[args.profile], seed, keep_logs=args.keep_logs)
    if args.json:
        print(json.dumps({"profile": report.profile, "seed": report.seed, "figures": report.figures,
                          "problems": report.problems, "notes": report.notes}, indent=2))
    else:
        print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
