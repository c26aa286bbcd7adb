"""The default formation fits Heroku Key-Value Store mini's 20 connections at peak load.

web (gunicorn, ``WEB_CONCURRENCY`` default 2), one worker at its default concurrency, beat and Flower are
started exactly as the Procfile runs them against one Redis; a burst of deliveries goes through to the
Storepoint simulator while Flower's API and ``/readyz`` are polled, and ``CLIENT LIST`` is sampled the whole
time. The test's own connections carry the name ``budget-test`` and are not counted.
"""
import collections
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from tests.fixtures import sim_faults, sims_settings
from tests.helpers import TEST_SECRET, post, wait_for
from tests.payloads import status_change
from tests.processes import ProcfileProcess, process_env
from workers.config import Settings
from workers.ops.devstack import EmbeddedRedis
from workers.store.ledger import Ledger

MINI_PLAN_CONNECTIONS = 20
DELIVERIES = 120
FIRST_STOP = 500000
SP_TOKEN = "sp-budget-token-123"
FLOWER_AUTH = ("ops", "flower-test-password")
TEST_CLIENT = "budget-test"


class ClientSampler(threading.Thread):
    """Samples ``CLIENT LIST`` until stopped; keeps the largest list seen (the test's own clients excluded)."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, client_name=TEST_CLIENT, single_connection_client=True)
        self.peak = []
        self.samples = 0
        self._done = threading.Event()

    def run(self):
        while not self._done.wait(0.05):
            clients = [c for c in self.client.client_list() if c.get("name") != TEST_CLIENT]
            self.samples += 1
            if len(clients) > len(self.peak):
                self.peak = clients

    def stop(self):
        self._done.set()
        self.join(10)

    def describe(self):
        by_command = collections.Counter(c.get("cmd") for c in self.peak)
        return f"{len(self.peak)} clients at peak ({self.samples} samples), by last command: {dict(by_command)}"


@pytest.fixture
def own_redis(tmp_path):
    with EmbeddedRedis(tmp_path / "redis", appendonly=False) as server:
        yield server


@pytest.fixture
def sims(simulators):
    servers = simulators(range(FIRST_STOP, FIRST_STOP + DELIVERIES), storepoint={"token": SP_TOKEN})
    sim_faults(servers["storepoint"]).latency(0.2)  # writes overlap, so every worker child is busy
    return servers


@pytest.fixture
def formation(own_redis, sims, tmp_path):
    """web, worker, beat and flower from the Procfile with every pool setting at its default."""
    settings = sims_settings(Settings(webhook_secret=TEST_SECRET, redis_url=own_redis.url,
                                      data_dir=str(tmp_path / "data"), flower_basic_auth=":".join(FLOWER_AUTH)), sims)
    env = process_env(settings)
    for name in ("WEB_CONCURRENCY", "CELERY_BROKER_URL", "PORT"):
        env.pop(name, None)
    started = []
    try:
        for name in ("web", "worker", "beat", "flower"):
            started.append(ProcfileProcess(name, env))
        yield dict(zip(("web", "worker", "beat", "flower"), started))
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.mark.timeout(600)
def test_default_formation_stays_within_the_mini_plan_connection_limit(formation, own_redis):
    web, flower = formation["web"], formation["flower"]
    sampler = ClientSampler(own_redis.url)
    sampler.start()
    watching = threading.Event()

    def watch():  # an operator watching: Flower's pages and API, and the readiness probe
        while not watching.is_set():
            for url, auth in ((flower.url + "/api/workers?refresh=1", FLOWER_AUTH), (flower.url + "/tasks", FLOWER_AUTH),
                              (web.url + "/readyz", None)):
                try:
                    requests.get(url, auth=auth, timeout=10)
                except requests.RequestException:
                    pass
            watching.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(
                lambda stop_id: post(web.url, "stop.status-changed",
                                     status_change(stop_id, "Arrived", "2022-04-27T05:00:00+00:00")),
                range(FIRST_STOP, FIRST_STOP + DELIVERIES)))
        assert [r.status_code for r in responses] == [200] * DELIVERIES, [r.text for r in responses if not r.ok]
        ids = [r.json()["delivery_id"] for r in responses]
        ledger = Ledger(redis.Redis.from_url(own_redis.url, client_name=TEST_CLIENT, decode_responses=True))
        wait_for(lambda: all((ledger.get(i) or {}).get("status") == "applied" for i in ids), timeout=400, interval=1)
    finally:
        watching.set()
        watcher.join(15)
        sampler.stop()
    assert sampler.samples > 20
    assert len(sampler.peak) <= MINI_PLAN_CONNECTIONS, sampler.describe()
    print(sampler.describe())  # the figure README's Scale section quotes (pytest -s)
