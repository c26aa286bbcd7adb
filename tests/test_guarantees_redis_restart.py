"""Redis restart (issue 14, item 8): Redis SIGKILLed while a worker holds unacknowledged work, then
started again from its append-only file. The worker must reconnect and go on (or exit promptly,
saying why); it used to die inside kombu (``AttributeError: 'NoneType' object has no attribute
'hostname'`` in ``restore_unacked``).

Also Redis closing idle connections (Heroku Key-Value Store's ``timeout``): the next delivery is
taken at once and applied; and Redis refusing writes (full, a read-only replica): the workers stay
up and go on afterwards.

Real processes: a redis-server with ``appendonly yes``, a Celery worker with beat, the loopback
Locate2u, Storepoint and B2B simulators.
"""
import time

import pytest
import redis

from tests.fixtures import STOP_ID
from tests.helpers import post, wait_for
from tests.payloads import status_change
from workers.ops.devstack import EmbeddedRedis, free_port
from workers.store.ledger import Ledger
from workers.store.redis_client import connect


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own (the suite's is shared), persisted in an append-only file."""
    with EmbeddedRedis(tmp_path / "redis", appendonly=True) as server:
        yield server


def _deliver(web, status, action_date):
    """Post one delivery to the receiver; its id."""
    answer = post(web.url, "stop.status-changed", status_change(STOP_ID, status, action_date))
    assert answer.status_code == 200, answer.text
    return answer.json()["delivery_id"]


def _deliver_when_up(web, status, action_date):
    """The receiver answers 503 until it has reconnected to Redis."""
    answer = post(web.url, "stop.status-changed", status_change(STOP_ID, status, action_date))
    return answer.status_code == 200 and answer.json()["delivery_id"]


def _status(ledger, delivery_id):
    try:
        entry = ledger.get(delivery_id)
    except redis.RedisError:  # still starting
        return None
    return entry and entry["status"] in ("applied", "stale", "dead_lettered") and entry["status"]


def test_worker_goes_on_after_redis_is_killed_and_restarted_from_its_aof(stack_settings, own_redis, sims,
                                                                           start_process):
    settings = stack_settings.replace(redis_url=own_redis.url, visibility_timeout=10, sweep_after=5)
    ledger = Ledger(connect(settings.redis_url))
    sims["storepoint"].app.config["FAULTS"].latency(3)  # a write is in flight (unacknowledged) at the kill
    web = start_process("gunicorn", settings)
    worker = start_process("worker", settings, beat=True, name="survivor")
    first = _deliver(web, "Arrived", "2022-04-27T05:00:00+00:00")
    requests_log = sims["storepoint"].app.config["STATE"].requests_log
    wait_for(lambda: any(path == "/locations" for _, path, _ in requests_log), timeout=60, interval=0.05)
    own_redis.process.kill()  # SIGKILL: no shutdown, no final AOF flush
    own_redis.process.wait(10)
    time.sleep(2)
    own_redis.start()
    sims["storepoint"].app.config["FAULTS"].latency(0)
    second = wait_for(lambda: _deliver_when_up(web, "Complete", "2022-04-27T06:00:00+00:00"), timeout=60)
    try:
        assert wait_for(lambda: _status(ledger, second), timeout=120, interval=0.5) == "applied"
        assert wait_for(lambda: _status(ledger, first), timeout=120, interval=0.5) in ("applied", "stale")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; worker output:\n{worker.output()[-6000:]}") from None
    assert worker.proc.poll() is None, worker.output()[-3000:]  # the same worker went on
    output = worker.output()
    assert "Unrecoverable error" not in output and "'hostname'" not in output, output[-3000:]


def test_connections_redis_closes_while_idle_cost_no_delivery_and_no_503(stack_settings, own_redis, start_process):
    """Heroku Key-Value Store closes a connection idle for its ``timeout`` (300 s by default,
    ``heroku redis:timeout``). Every pool of every process (the receiver's, the worker's, beat's,
    the broker's) goes idle on a quiet relay; the next delivery must be taken at once (no 503
    for the sender to retry) and applied."""
    settings = stack_settings.replace(redis_url=own_redis.url)
    web = start_process("gunicorn", settings)
    worker = start_process("worker", settings, beat=True)
    ledger = Ledger(connect(settings.redis_url))
    first = _deliver(web, "Arrived", "2022-04-27T05:00:00+00:00")  # every pool is warm
    assert wait_for(lambda: _status(ledger, first), timeout=60, interval=0.2) == "applied"
    admin = connect(settings.redis_url)
    admin.config_set("timeout", 1)
    open_before = {client["id"] for client in admin.client_list()} - {str(admin.client_id())}
    time.sleep(4)  # idle past the server's timeout
    still_open = open_before & {client["id"] for client in admin.client_list()}
    assert len(still_open) < len(open_before)  # Redis closed the idle ones (a worker blocked in BRPOP is not idle)
    second = _deliver(web, "Complete", "2022-04-27T06:00:00+00:00")
    try:
        assert wait_for(lambda: _status(ledger, second), timeout=60, interval=0.2) == "applied"
    except AssertionError as exc:
        raise AssertionError(f"{exc}; worker output:\n{worker.output()[-6000:]}") from None


REFUSING_WRITES = {  # how Redis comes to refuse writes for a while: (refuse, accept again)
    "full": (lambda admin: (admin.config_set("maxmemory-policy", "noeviction"), admin.config_set("maxmemory", 1)),
             lambda admin: admin.config_set("maxmemory", 0)),
    "a read-only replica": (lambda admin: admin.replicaof("127.0.0.1", free_port()),  # its primary never answers
                            lambda admin: admin.replicaof("NO", "ONE")),
}


@pytest.mark.parametrize("refusing", sorted(REFUSING_WRITES))
def test_a_redis_refusing_writes_stops_the_work_not_the_worker_and_it_resumes_after(stack_settings, own_redis, sims,
                                                                                    start_process, refusing):
    """Redis full under ``noeviction`` (a plan's memory taken by pending work) refuses every write with
    ``OOM``, and a primary turned replica with ``READONLY``. Kombu's Redis transport then raised out
    of the worker's event loop (taking, putting back, restoring unacknowledged messages; declaring
    the queues at start-up), Celery called it unrecoverable and the worker exited, and one started
    meanwhile exited at once: on Heroku a crashed dyno waits ever longer to be restarted. The
    workers must stay up, and every delivery be applied once writes are taken."""
    refuse, accept_again = REFUSING_WRITES[refusing]
    settings = stack_settings.replace(redis_url=own_redis.url, sweep_after=5)
    web = start_process("gunicorn", settings)
    worker = start_process("worker", settings, beat=True)
    sims["storepoint"].app.config["FAULTS"].latency(2)  # writes in flight when Redis starts refusing
    delivery_ids = [_deliver(web, status, f"2022-04-27T0{hour}:00:00+00:00")
                    for hour, status in ((5, "Arrived"), (6, "Complete"), (7, "Enroute"))]
    admin = connect(settings.redis_url)
    refuse(admin)
    try:
        started_meanwhile = start_process("worker", settings, name="started-meanwhile")
        time.sleep(10)
        for proc in (worker, started_meanwhile):
            assert proc.proc.poll() is None, f"{proc.name} exited:\n{proc.output()[-4000:]}"
    finally:
        accept_again(admin)
    sims["storepoint"].app.config["FAULTS"].latency(0)
    ledger = Ledger(admin)
    for delivery_id in delivery_ids:
        assert wait_for(lambda: _status(ledger, delivery_id), timeout=120, interval=0.5) in ("applied", "stale")


def test_a_worker_whose_redis_is_gone_retries_without_a_limit(stack_settings, own_redis, start_process):
    """Celery gives up on a lost broker after 100 retries (~47 min at kombu's 2-30 s steps) and the
    worker exits; Heroku restarts a crashed dyno only after ever longer cool-offs, so work waited
    after a long Redis outage ended. The retry count the worker logs has no limit."""
    worker = start_process("worker", stack_settings.replace(redis_url=own_redis.url))
    own_redis.stop()
    worker.wait_for_output("Trying again in", timeout=60)
    retries = [line for line in worker.output().splitlines() if "Trying again in" in line]
    assert all("/None)" in line for line in retries), retries[:2]
    assert worker.proc.poll() is None
