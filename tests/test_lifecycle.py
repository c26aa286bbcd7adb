"""Dyno restarts: SIGTERM to every process of a dyno, SIGKILL 30 s later (deploy-facts).

SIGTERM goes to the whole process group, as Heroku sends it (the worker also gets it
on its main process only, as hosts that signal PID 1 do), while work is in flight:
the web process still answers and records the request it was reading; the worker
stops within 30 s although a sink call is blocked, and a new worker then applies
that delivery exactly once downstream.
"""
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import requests

from tests.fixtures import STOP_ID, storepoint_locations
from tests.helpers import TEST_SECRET, post, settled, wait_for
from tests.payloads import status_change
from tests.processes import BIN, Process, process_env
from workers.locate2u.webhook_auth import url_token
from workers.ops.devstack import free_port
from workers.store.ledger import Ledger

HEROKU_KILL_AFTER = 30  # seconds from SIGTERM to SIGKILL on a dyno
EVENT = "stop.status-changed"


def stop_dyno(process, every_process=True, timeout=HEROKU_KILL_AFTER):
    """SIGTERM the process group (Heroku), or only its main process (hosts that signal PID 1 only);
    fail if it is still running when the host would SIGKILL it."""
    if every_process:
        os.killpg(process.proc.pid, signal.SIGTERM)
    else:
        process.proc.terminate()
    try:
        return process.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{process.name} still running {timeout}s after SIGTERM (Heroku SIGKILLs it then):\n"
                    f"{process.output()[-3000:]}")


def start_web(settings):
    """``gunicorn receiver.wsgi:app`` as the Procfile runs it (the project's gunicorn.conf.py), on loopback."""
    port = free_port()
    web = Process("web", [str(BIN / "gunicorn"), "receiver.wsgi:app", "-b", f"127.0.0.1:{port}"],
                  process_env(settings))
    web.url = f"http://127.0.0.1:{port}"

    def ready():
        assert web.proc.poll() is None, web.output()[-3000:]
        try:
            return requests.get(web.url + "/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    wait_for(ready, timeout=60)
    return web


def read_response(sock):
    """``(status, body)`` of the answer (gunicorn's sync workers close the connection after it)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_sigterm_lets_the_web_process_answer_and_record_the_request_it_is_reading(settings, redis_client):
    web = start_web(settings)
    try:
        body = json.dumps(status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00")).encode()
        path = f"/webhooks/locate2u/{EVENT}/{url_token(TEST_SECRET, EVENT)}"
        with socket.create_connection(("127.0.0.1", int(web.url.rsplit(":", 1)[1])), timeout=30) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 100")  # a gunicorn worker has the request
            os.killpg(web.proc.pid, signal.SIGTERM)
            time.sleep(1)  # the restart is under way while the body is still arriving
            sock.sendall(body)
            status, answer = read_response(sock)
        assert status == 200 and json.loads(answer)["status"] == "accepted", answer
        delivery_id = json.loads(answer)["delivery_id"]
        assert Ledger(redis_client).get(delivery_id)["status"] == "received"
        web.proc.wait(HEROKU_KILL_AFTER)
    finally:
        web.stop()


@pytest.mark.parametrize("every_process", [True, False], ids=["every-process", "main-process-only"])
def test_sigterm_mid_delivery_stops_the_worker_in_time_and_a_new_worker_applies_it_once(
        every_process, stack_settings, start_process, sims, redis_client):
    web = start_process("gunicorn", stack_settings)
    faults = sims["storepoint"].app.config["FAULTS"]
    faults.latency(HEROKU_KILL_AFTER + 15)  # the sink call outlasts the dyno's grace period
    victim = start_process("worker", stack_settings, beat=True, name="victim")
    delivery_id = post(web.url, EVENT, status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00")
                       ).json()["delivery_id"]
    sp_state = sims["storepoint"].app.config["STATE"]
    wait_for(lambda: any(path == "/locations" for _, path, _ in sp_state.requests_log), timeout=60, interval=0.05)

    stop_dyno(victim, every_process)
    assert Ledger(redis_client).get(delivery_id)["status"] != "applied"
    faults.latency(0)
    # The interrupted call still lands in Storepoint: the new worker must find it, not create another.
    wait_for(lambda: storepoint_locations(sims), timeout=HEROKU_KILL_AFTER + 30)
    start_process("worker", stack_settings, beat=True, name="successor")
    entry = wait_for(lambda: settled(redis_client, delivery_id), timeout=120)
    assert entry["status"] == "applied", entry
    time.sleep(2)  # nothing else arrives late
    assert len(storepoint_locations(sims)) == 1
