"""The fixtures every test module shares (registered by conftest.py's ``pytest_plugins``), and their helpers.

- Redis and settings: ``redis_server`` (the suite's Redis), ``redis_client`` (flushed), ``settings``.
- Processes: ``start_process`` (gunicorn or a Celery worker), ``start_stack`` (gunicorn plus a worker with
  beat) and ``stack`` (that stack on ``stack_settings``); ``kill_worker_mid_write``; outside servers of a
  module's own: ``rabbitmq``, ``tls_redis``.
- Simulators on loopback ports, stopped after the test: ``simulator(kind, **options)`` starts any of
  ``SIMULATORS``; ``sim`` is the Locate2u simulator (modules about another system override ``sim``);
  ``code_settings`` is the authorization-code grant against it; ``sims`` is Locate2u (knowing
  ``STOP_ID``), Storepoint and B2B, and ``stack_settings`` points
  ``settings`` at them; ``simulators(...)`` starts other such sets. ``sims_settings`` points any
  settings at a set; ``sim_state``/``sim_faults`` read a simulator's state and fault plan.
- In-process simulator apps: ``app``/``client``, the Flask app and test client of the simulator whose
  state the module's ``state`` fixture gives.
- Stores: ``mappings``, the MappingStore of the sink the module's ``sim`` stands in for.
- The in-process pipeline: ``l2u``, ``sink_server`` (the recorder), ``driver`` (a Runtime whose tasks the
  test runs, see ``Driver``) and ``driver_mappings``; ``died_in_first_write`` (a fan-out whose worker
  dies in its first sink call, SIGKILLed in a forked process), ``kill_when_reached`` and
  ``in_worker_process`` (work in a forked process, to kill) and ``fan_out_job`` (a fan-out stopped before its write).
"""
import base64
import contextlib
import json
import multiprocessing
import os
import signal
import time

import pytest

from tests.helpers import TEST_SECRET, settled, wait_for
from tests.processes import CeleryWorker, Gunicorn, RabbitMQ, TlsRedis, process_env
from tests.tools import require_binary
from workers import tasks
from workers.celery_config import DELIVER, PROCESS_DELIVERY
from workers.config import Settings
from workers.ops.devstack import EmbeddedRedis
from workers.ops.simulators import b2b, deliverycom, locate, locate2u, recorder, storepoint
from workers.ops.simulators.base import SimulatorServer
from workers.ops.simulators.forward_receiver import create_receiver
from workers.pipeline import deliver, fan_out
from workers.pipeline.routes import DEFAULT_ROUTES, Route
from workers.resilience.http import HttpClient
from workers.runtime import Runtime
from workers.sinks.base import Sink
from workers.store.ledger import Ledger
from workers.store.mappings import MappingStore
from workers.store.redis_client import connect

STOP_ID = 164557
KEY = f"l2u-stop-{STOP_ID}"
SP_TOKEN, B2B_TOKEN = "sp-e2e-token-123", "b2b-e2e-token-123"
PUBLIC_URL = "https://relay.example"  # the relay's public URL where a test needs one
FORWARD_SECRET = "whsec_" + base64.b64encode(b"forward-test-secret-0123456789ab").decode()

# kind -> (its module's create_app, its state class); "forward" (the signed forward's receiver) is apart.
SIMULATORS = {"locate2u": (locate2u.create_app, locate2u.Locate2uState),
              "storepoint": (storepoint.create_app, storepoint.StorepointState),
              "b2b": (b2b.create_app, b2b.B2BState),
              "locate": (locate.create_app, locate.LocateState),
              "deliverycom": (deliverycom.create_app, deliverycom.DeliverycomState),
              "recorder": (recorder.create_app, recorder.RecorderState)}


# --- Redis, settings, processes -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False) as server:
        yield server


@contextlib.contextmanager
def flushed_redis(url):
    """A client of the Redis at ``url``, flushed first; closed after."""
    client = connect(url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_server):
    with flushed_redis(redis_server.url) as client:
        yield client


@pytest.fixture
def settings(redis_server, redis_client, tmp_path):
    return Settings(webhook_secret=TEST_SECRET, redis_url=redis_server.url, data_dir=str(tmp_path / "data"),
                    sweep_after=1, visibility_timeout=30)


@pytest.fixture
def start_process():
    """Start gunicorn or Celery with given settings; everything started is stopped after the test."""
    started = []

    def start(kind, settings, **options):
        env = process_env(settings, **options.pop("env", {}))
        proc = {"gunicorn": Gunicorn, "worker": CeleryWorker}[kind](env, **options)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def start_stack(start_process):
    """``start(settings)``: gunicorn and a Celery worker with beat on ``settings``; the gunicorn."""
    def start(settings):
        web = start_process("gunicorn", settings)
        start_process("worker", settings, beat=True)
        return web
    return start


def outside_server(server_class, binary, package, folder):
    """``server_class(path of binary, folder)`` (the Debian ``package`` has the binary) until teardown."""
    server = server_class(require_binary(binary, package), folder)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory):
    """A RabbitMQ node of the module's own."""
    yield from outside_server(RabbitMQ, "rabbitmq-server", "rabbitmq-server", tmp_path_factory.mktemp("rabbitmq"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A redis-server of the module's own that speaks only TLS."""
    yield from outside_server(TlsRedis, "redis-server", "redis-server", tmp_path_factory.mktemp("redis-tls"))


# --- simulators ---------------------------------------------------------------------------------------

def start_simulator(kind, **options):
    """Serve simulator ``kind`` on a free loopback port; ``server.kind`` is ``kind``.

    ``options`` go to its state class; besides, ``stops`` for Locate2u (stop ids, or dicts of
    ``add_stop`` fields) and ``secrets`` ({endpoint name: secret}) for the forward receiver.
    """
    if kind == "forward":
        secrets = options.pop("secrets")
        server = SimulatorServer(create_receiver(secrets))
        server.secrets = secrets
    elif kind == "locate2u":
        stops = options.pop("stops", ())
        server = locate2u.Locate2uServer(locate2u.Locate2uState(**options))
        for stop in stops:
            server.state.add_stop(**(stop if isinstance(stop, dict) else {"stopId": stop}))
    else:
        create_app, state_class = SIMULATORS[kind]
        server = SimulatorServer(create_app(state_class(**options)))
    server.kind = kind
    return server.start()


def sim_state(server):
    return server.app.config["STATE"]


def sim_faults(server):
    return server.app.config["FAULTS"]


def sims_settings(settings, sims, **changes):
    """``settings`` pointed at each simulator of ``sims`` ({kind: server}) with its credentials, then ``changes``."""
    values = {}
    for kind, server in sims.items():
        state, url = sim_state(server), server.url
        values.update({
            "locate2u": lambda: dict(locate2u_client_id=state.client_id, locate2u_client_secret=state.client_secret,
                                     locate2u_api_url=url, locate2u_id_url=url),
            "storepoint": lambda: dict(storepoint_api_url=url, storepoint_api_token=state.token),
            "b2b": lambda: dict(b2b_api_url=url, b2b_api_token=state.token),
            "locate": lambda: dict(locate_api_url=url, locate_api_token=state.api_key),
            "deliverycom": lambda: dict(deliverycom_api_url=url, deliverycom_access_token=state.access_token),
            "forward": lambda: dict(forward_urls=tuple(f"{url}/hooks/{name}" for name in server.secrets),
                                    forward_secret=tuple(server.secrets.values())),
        }[kind]())
    return settings.replace(**{**values, **changes})


@pytest.fixture
def simulator():
    """``simulator(kind, **options)``: a started simulator (see ``start_simulator``), stopped after the test."""
    started = []

    def start(kind, **options):
        started.append(start_simulator(kind, **options))
        return started[-1]

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def simulators(simulator):
    """``simulators(stops, **kinds)``: {kind: server} of Locate2u knowing ``stops`` and each of ``kinds``
    started with its options (``storepoint={"token": ...}``)."""
    def start(stops=(STOP_ID,), **kinds):
        servers = {"locate2u": simulator("locate2u", stops=stops)}
        servers.update((kind, simulator(kind, **options)) for kind, options in kinds.items())
        return servers
    return start


@pytest.fixture
def sim(simulator):
    """The Locate2u simulator (a module testing another system's simulator or sink overrides ``sim``)."""
    return simulator("locate2u")


@pytest.fixture
def code_settings(sim, settings):
    """The authorization-code grant against ``sim``, the relay public at ``PUBLIC_URL``."""
    return sim.configure(settings, locate2u_grant="authorization_code", public_url=PUBLIC_URL)


@pytest.fixture
def sims(simulators):
    """Locate2u (knowing ``STOP_ID``), Storepoint (``SP_TOKEN``) and B2B (``B2B_TOKEN``)."""
    return simulators(storepoint={"token": SP_TOKEN}, b2b={"token": B2B_TOKEN})


@pytest.fixture
def stack_settings(settings, sims):
    return sims_settings(settings, sims, b2b_business_partner_id="BP-1", b2b_country_id="AU",
                         retry_schedule=(0, 1, 1, 2, 3), visibility_timeout=10)


@pytest.fixture
def stack(stack_settings, start_stack):
    return start_stack(stack_settings)


def kill_worker_mid_write(start_process, settings, sims, redis_client, deliver, write_timeout, settle_timeout):
    """SIGKILL a worker (with beat) while its Storepoint write is in flight, then start another.

    Storepoint answers slowly while the first worker runs; ``deliver()`` posts one delivery and returns its
    id. The delivery must not be applied when the worker dies; returns its entry once settled.
    """
    sim_faults(sims["storepoint"]).latency(2.0)
    victim = start_process("worker", settings, beat=True, name="victim")
    delivery_id = deliver()
    sp_state = sim_state(sims["storepoint"])
    wait_for(lambda: any(path == "/locations" for _, path, _ in sp_state.requests_log), timeout=write_timeout,
             interval=0.05)
    victim.kill()
    assert Ledger(redis_client).get(delivery_id)["status"] != "applied"
    sim_faults(sims["storepoint"]).latency(0)
    start_process("worker", settings, beat=True, name="rescuer")
    return wait_for(lambda: settled(redis_client, delivery_id), timeout=settle_timeout)


def storepoint_locations(sims, key=KEY):
    return sim_state(sims["storepoint"]).find(lambda location: f"l2u:{key}" in location["tags"])


def b2b_locations(sims, key=KEY):
    return [item for item in sim_state(sims["b2b"]).locations.values() if item["idRemote"] == key]


# --- in-process simulator apps ------------------------------------------------------------------------

@pytest.fixture
def app(state):
    """The Flask app of the simulator the module's ``state`` belongs to."""
    [create_app] = [create for create, state_class in SIMULATORS.values() if isinstance(state, state_class)]
    return create_app(state)


@pytest.fixture
def client(app):
    return app.test_client()


# --- stores -------------------------------------------------------------------------------------------

@pytest.fixture
def mappings(sim, redis_client):
    """The MappingStore of the sink ``sim`` stands in for (its kind: storepoint, b2b, forward...)."""
    return MappingStore(redis_client, sim.kind)


# --- the pipeline in process --------------------------------------------------------------------------

class RecordingSink(Sink):
    """A minimal concrete sink: PUT/DELETE /records/<key> on the recorder."""

    name = "recording"

    @classmethod
    def from_settings(cls, settings, mappings):
        raise NotImplementedError

    def upsert(self, location, options):
        body = {"name": location.name, "status": location.status, "version": location.version}
        return self.client.answer(self.client.request("PUT", f"/records/{location.key}", json=body), "id")

    def delete(self, location, options):
        self.client.request("DELETE", f"/records/{location.key}")


class Driver:
    """Captures the tasks the pipeline sends and runs them in-process."""

    def __init__(self):
        self.sent = []

    def send_task(self, name, args):
        self.sent.append((name, args))

    def run(self, release_retries=True, limit=200):
        """Run sent tasks (and due retries, fast-forwarded) until nothing is left."""
        for _ in range(limit):
            if not self.sent and release_retries:
                self.rt.scheduler.release_due(now=time.time() + 10 ** 6)
            if not self.sent:
                return
            name, args = self.sent.pop(0)
            {PROCESS_DELIVERY: tasks.process_delivery, DELIVER: tasks.deliver}[name].run(*args)
        raise AssertionError("tasks kept coming")


def died_in_first_write(process_args, rt):
    """Run ``process_delivery(*process_args)`` in a forked worker process SIGKILLed inside its first
    sink call, after the fan-out marked every sink pending: nothing was written, no deliver message
    exists, its processing lease and the key lock it held (1 s here, not the sink's settle time) are
    left to lapse, and only a redelivery of process_delivery or the sweeper brings the writes back."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(deliver, "lock_seconds", lambda sink: (1.0, 0.5))
        kill_when_reached(lambda: tasks.process_delivery.run(*process_args),
                          [(sink, "apply") for sink in rt.sinks.values()], rt.sinks.values())


def kill_when_reached(work, points, sinks=(), passed=0):
    """Run ``work`` in a forked worker process and SIGKILL it as soon as it calls one of ``points``
    (``(object, attribute name)`` pairs, held there) after ``passed`` calls that went through: the
    worst moment, with no ``finally`` run. ``sinks``: whose HTTP connections the process must not
    share with this one."""
    reached = multiprocessing.get_context("fork").Event()
    calls = []  # counted in the worker process

    def holding(original):
        def hold(*args, **kwargs):
            if len(calls) < passed:
                calls.append(1)
                return original(*args, **kwargs)
            reached.set()
            time.sleep(600)
        return hold

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in points:
            patch.setattr(owner, name, holding(getattr(owner, name)))
        worker = in_worker_process(work, sinks)
        try:
            assert reached.wait(30), "the worker never got there"
        finally:
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)


def in_worker_process(work, sinks=()):
    """Start ``work`` in a forked process, with connections of its own to ``sinks`` (not the
    parent's pooled ones), to be killed mid-way."""
    def run():
        for sink in sinks:
            sink.client.session.close()
        work()

    process = multiprocessing.get_context("fork").Process(target=run, daemon=True)
    process.start()
    return process


def fan_out_job(driver, delivery_id):
    """Run the delivery's queued process_delivery up to its fan-out; return the task arguments of the
    one deliver job it would have run in-process, for the test to run when it chooses."""
    [(name, args)] = [task for task in driver.sent if task[1][0] == delivery_id]
    driver.sent.remove((name, args))
    jobs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fan_out, "deliver_now", lambda rt, job, received_at: jobs.append(list(job)))
        tasks.process_delivery.run(*args)
    [job] = jobs
    return job


def accept(rt, body, event_type="stop.status-changed"):
    """What the receiver does: record, then queue process_delivery."""
    raw = json.dumps(body)
    delivery_id = f"d-{abs(hash(raw))}"
    assert rt.ledger.record(delivery_id, event_type, raw, 3600)
    rt.scheduler.send_task(PROCESS_DELIVERY, args=[delivery_id, event_type])
    return delivery_id


@pytest.fixture
def l2u(simulator):
    """The Locate2u simulator knowing ``STOP_ID``."""
    return simulator("locate2u", stops=[STOP_ID])


@pytest.fixture
def sink_server(simulator):
    """The recording sink's server."""
    return simulator("recorder")


@pytest.fixture
def driver(settings, l2u, sink_server, monkeypatch):
    settings = settings.replace(locate2u_client_id=l2u.app.config["STATE"].client_id,
                                locate2u_client_secret=l2u.app.config["STATE"].client_secret,
                                locate2u_api_url=l2u.url, locate2u_id_url=l2u.url, retry_schedule=(0, 1, 2, 3))
    drv = Driver()
    rt = Runtime(settings, drv.send_task)
    rt.routes = {"storepoint": Route("storepoint", on_status={"Cancelled": "delete"},
                                     breaker={"threshold": 3, "cooldown": 60.0}),
                 "forward": DEFAULT_ROUTES["forward"]}
    rt.sinks = {"storepoint": RecordingSink(HttpClient(sink_server.url), mappings=MappingStore(rt.redis, "storepoint"))}
    drv.rt = rt
    monkeypatch.setattr(tasks, "runtime", lambda: rt)
    return drv


@pytest.fixture
def driver_mappings(driver):
    """The driver's recording sink keeps its mappings under storepoint (``pytest.mark.usefixtures`` it)."""
    driver.rt.sinks["storepoint"].mappings = MappingStore(driver.rt.redis, "storepoint")
