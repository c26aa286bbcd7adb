"""Production mode: every line a stack writes is JSON — gunicorn (with the access log Heroku's buildpack
asks for: one line per request, its URL token redacted), the Celery worker, beat and Flower,
their banners and warnings included; idle control tasks (retry release, sweeper) write nothing; gunicorn removes its metrics
folder on exit; Flower's task list has the arguments column."""
import json
import time

import requests

from tests.fixtures import STOP_ID
from tests.helpers import post, settled, wait_for
from tests.payloads import status_change
from tests.processes import BIN, Process, process_env
from workers.ops.devstack import free_port


def not_json(output):
    bad = []
    for line in output.splitlines():
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    return bad


# What Heroku's Python buildpack exports on every dyno (its vendor/python.gunicorn.sh, a .profile.d
# script): GUNICORN_CMD_ARGS outranks gunicorn.conf.py, and asks for an access log of its own format.
HEROKU_PYTHON_ENV = {"GUNICORN_CMD_ARGS": "--access-logfile -", "FORWARDED_ALLOW_IPS": "*"}


def test_every_line_of_a_stack_is_json_and_idle_control_tasks_are_silent(stack_settings, start_process,
                                                                         redis_client, tmp_path):
    web = start_process("gunicorn", stack_settings, env={"TMPDIR": str(tmp_path), **HEROKU_PYTHON_ENV})
    worker = start_process("worker", stack_settings)
    env = process_env(stack_settings)
    beat = Process("beat", [str(BIN / "celery"), "-A", "workers.app", "beat", "-l", "info"], env)
    flower_port = free_port()
    flower = Process("flower", [str(BIN / "celery"), "-A", "workers.app", "flower"],
                     {**env, "FLOWER_PORT": str(flower_port), "FLOWER_ADDRESS": "127.0.0.1"})
    try:
        beat.wait_for_output("Starting", timeout=60)
        flower.wait_for_output("Visit me", timeout=60)
        delivery = post(web.url, "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
        wait_for(lambda: settled(redis_client, delivery.json()["delivery_id"]))
        page = requests.get(f"http://127.0.0.1:{flower_port}/tasks", timeout=10).text
        idle_since = len(worker.output().splitlines())
        time.sleep(5)  # beat checks for due retries every second; none is due
        idle = worker.output().splitlines()[idle_since:]
    finally:
        for process in (flower, beat):
            process.stop()
        web.stop()
        worker.stop()
    for process in (web, worker, beat, flower):
        output = process.output()
        assert output.strip(), process.name
        assert not_json(output) == [], f"{process.name} wrote lines that are not JSON:\n{output[-3000:]}"
    webhook_lines = [line for line in web.output().splitlines() if "/webhooks/locate2u/" in line]
    assert len(webhook_lines) == 1 and "/stop.status-changed/[redacted] " in webhook_lines[0], webhook_lines
    assert any("starting" in json.loads(line)["message"] for line in worker.output().splitlines())
    assert not [line for line in idle if "release_due_retries" in line or "sweep_received" in line], idle
    assert "release_due_retries" not in beat.output()  # never sent: no retry was ever due
    assert "Sending due task" not in beat.output()  # the sweeps that found nothing leave no line either
    assert "args" in page.lower() and "kwargs" in page.lower()  # Flower's task list shows the arguments
    assert not list(tmp_path.glob("l2u-metrics-*"))  # gunicorn removed its multiprocess metrics folder
