"""The web process as the Procfile runs it: gunicorn with this repository's settings."""
import os

import requests

from tests.processes import BIN, Process
from workers.ops.devstack import free_port


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
