"""Shared plumbing for the loopback simulators of external systems.

Every simulator is a Flask app built by a ``create_app()`` function around a
state object. This module gives them:

- ``FaultPlan``: fault injection (a number of forced answers such as 503 or
  429 with ``Retry-After``, a failure rate, added latency), applied before the
  simulator's own routes and also settable over HTTP at ``/_sim/faults``;
- ``SimulatorServer``: serve an app on a free loopback port in a thread;
- ``run_main()``: run one simulator as a standalone process.
"""
import argparse
import random
import threading
import time

from flask import Flask, jsonify, request
from werkzeug.serving import make_server


class FaultPlan:
    """Faults a simulator applies to incoming requests (thread-safe)."""

    def __init__(self, seed=None):
        self._lock = threading.Lock()
        self._queued = []
        self._rate = 0.0
        self._rate_status = 503
        self._latency = 0.0
        self._random = random.Random(seed)
        self.injected = 0

    def inject(self, status, times=1, retry_after=None, body=None, path_prefix=""):
        """Answer the next ``times`` matching requests with ``status``."""
        with self._lock:
            for _ in range(times):
                self._queued.append((status, retry_after, body, path_prefix))

    def fail_rate(self, rate, status=503):
        """Answer a random ``rate`` fraction of requests with ``status``."""
        with self._lock:
            self._rate, self._rate_status = rate, status

    def latency(self, seconds):
        """Delay every request by ``seconds``."""
        with self._lock:
            self._latency = seconds

    def clear(self):
        with self._lock:
            self._queued.clear()
            self._rate, self._latency = 0.0, 0.0

    def _next(self, path):
        with self._lock:
            for i, fault in enumerate(self._queued):
                if path.startswith(fault[3]):
                    del self._queued[i]
                    return fault[:3]
            if self._rate and self._random.random() < self._rate:
                return self._rate_status, None, None
        return None

    def apply(self, path):
        """Return a Flask response for a fault to inject, or None."""
        if self._latency:
            time.sleep(self._latency)
        fault = self._next(path)
        if fault is None:
            return None
        status, retry_after, body = fault
        with self._lock:
            self.injected += 1
        response = jsonify(body if body is not None else {"error": "injected fault", "status": status})
        response.status_code = status
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response


def install_faults(app, faults):
    """Apply ``faults`` before every route except ``/_sim/...`` control routes."""

    @app.before_request
    def _inject():
        if request.path.startswith("/_sim/"):
            return None
        return faults.apply(request.path)

    @app.post("/_sim/faults")
    def _set_faults():
        spec = request.get_json(force=True)
        if "status" in spec:
            faults.inject(spec["status"], spec.get("times", 1), spec.get("retry_after"),
                          spec.get("body"), spec.get("path_prefix", ""))
        if "rate" in spec:
            faults.fail_rate(spec["rate"], spec.get("rate_status", 503))
        if "latency" in spec:
            faults.latency(spec["latency"])
        return jsonify({"ok": True})

    @app.delete("/_sim/faults")
    def _clear_faults():
        faults.clear()
        return jsonify({"ok": True})


def simulator_app(import_name, state, log_entry=None, unlogged=("/_sim/",)):
    """A Flask app with ``config["STATE"]``, ``config["FAULTS"]`` and fault injection installed.

    With ``log_entry(request)``, every request outside ``unlogged`` prefixes (faulted ones
    included) is appended to ``state.requests_log`` under ``state.lock``.
    """
    app = Flask(import_name)
    app.config["STATE"], app.config["FAULTS"] = state, FaultPlan()
    if log_entry is not None:
        @app.before_request
        def _log():
            if not request.path.startswith(unlogged):
                with state.lock:
                    state.requests_log.append(log_entry(request))
    install_faults(app, app.config["FAULTS"])
    return app


def method_path_body(req):
    """Log entry ``(method, path with its query string, JSON body or None)``."""
    return req.method, req.full_path if req.query_string else req.path, req.get_json(silent=True)


def method_path_query_body_headers(*header_names):
    """Log entries ``(method, path, query dict, JSON body, {header: value} of ``header_names``)``."""
    def entry(req):
        headers = {name: req.headers[name] for name in header_names if name in req.headers}
        return req.method, req.path, req.args.to_dict(), req.get_json(silent=True), headers
    return entry


class SimulatorServer:
    """Serve a WSGI app on 127.0.0.1 (a free port by default) in a daemon thread."""

    def __init__(self, app, port=0):
        self.app = app
        self._server = make_server("127.0.0.1", port, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run_main(create_app, description):
    """Command-line entry for ``python -m workers.ops.simulators.<name>``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = free port)")
    args = parser.parse_args()
    server = SimulatorServer(create_app(), args.port)
    print(server.url, flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
