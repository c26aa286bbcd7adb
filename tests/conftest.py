"""Shared fixtures: a real Redis server, settings pointing at it, process starters."""
import pytest

from tests.processes import CeleryWorker, Gunicorn, process_env
from workers.config import Settings
from workers.devstack import EmbeddedRedis
from workers.stores import connect

TEST_SECRET = "test-webhook-secret-0123456789"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False) as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = connect(redis_server.url)
    client.flushall()
    yield client
    client.close()


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
