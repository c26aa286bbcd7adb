"""The web process as the Procfile runs it: gunicorn with this repository's settings."""
import os
import subprocess

import pytest
import requests

from tests.processes import BIN, Process, process_env
from workers.ops.devstack import REPO_ROOT, free_port


def test_a_gunicorn_worker_keeps_what_it_loaded_out_of_the_collectors_walks():
    """Each full garbage collection walked the whole loaded app again (~7 % of a webhook request's
    CPU under load); a worker now freezes what it loaded once its app is in (``post_worker_init``)."""
    port = free_port()
    web = Process("gunicorn", [str(BIN / "gunicorn"), "-b", f"127.0.0.1:{port}", "-w", "1", "tests.gc_probe:app"],
                  dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"))
    try:
        url = f"http://127.0.0.1:{port}/"
        web.wait_for_http(url)
        assert int(requests.get(url, timeout=5).text) > 1000  # every module gunicorn and the app loaded
    finally:
        web.stop()


@pytest.mark.parametrize("variable, value, said", [
    ("RELAY_MAX_BODY_BYTES", "abc", "RELAY_MAX_BODY_BYTES: Not a valid integer."),
    ("RELAY_ROUTES_FILE", "/nonexistent/routes.yaml", "/nonexistent/routes.yaml: cannot read it: No such file"),
])
def test_the_web_process_refuses_a_bad_configuration_with_one_message(settings, variable, value, said):
    """The README promises one message listing every problem. gunicorn booted each worker, each logged
    the ConfigError inside "Exception in worker process" with its traceback, and gunicorn exited 3
    ("Worker failed to boot"). The configuration is now checked once before any worker starts."""
    env = {**process_env(settings), variable: value}
    done = subprocess.run([str(BIN / "gunicorn"), "receiver.wsgi:app", "-b", f"127.0.0.1:{free_port()}"],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "invalid configuration:" in done.stderr and said in done.stderr
    assert "Traceback" not in output and "Booting worker" not in output
