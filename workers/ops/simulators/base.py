"""Shared plumbing for the loopback simulators of external systems.

Every simulator is a Flask app built by a ``create_app()`` function around a
state object. This module gives them:

- ``FaultPlan``: fault injection (a number of forced answers such as 503 or
  429 with ``Retry-After``, a failure rate, a vendor's rate limit, added latency,
  single slow requests, and requests that are applied and then answered 503,
  answered 200 with a proxy's HTML page or have their connection dropped), applied around
  the simulator's own routes and also settable over HTTP at ``/_sim/faults``; it counts what it injected by kind
  and knows which client ports have a request in progress;
- ``SimulatorServer``: serve an app on a free loopback port in a thread;
- ``run_main()``: run one simulator as a standalone process.
"""
import argparse
import collections
import random
import socket
import threading
import time

from flask import Flask, Response, g, jsonify, request
from werkzeug.serving import make_server

# What a load balancer or proxy in front of an API may answer in its place (``fail_after_apply("garbled")``).
GARBLED_PAGE = "<html><body><h1>Service temporarily unavailable</h1></body></html>"
TRICKLE_SECONDS = 0.5  # between the bytes of a trickled answer (``FaultPlan.fail_after_apply``)


class FaultPlan:
    """Faults a simulator applies to incoming requests (thread-safe)."""

    def __init__(self, seed=None):
        self._lock = threading.Lock()
        self._queued = []
        self._slow = []         # (seconds, path prefix, kind counted)
        self._after_apply = []  # (503 or "drop", path prefix, methods)
        self._rate = 0.0
        self._rate_status = 503
        self._rate_prefix = ""
        self._latency = 0.0
        self._limit = None      # the rate limit's token bucket (``rate_limit``)
        self._random = random.Random(seed)
        self.injected = 0
        self.counts = collections.Counter()  # what was injected, by kind: "503", "429", "slow", "applied then 503"...
        self.in_progress = {}  # client port -> path, of requests being answered now

    def inject(self, status, times=1, retry_after=None, body=None, path_prefix=""):
        """Answer the next ``times`` matching requests with ``status``."""
        with self._lock:
            for _ in range(times):
                self._queued.append((status, retry_after, body, path_prefix))

    def fail_rate(self, rate, status=503, path_prefix=""):
        """Answer a random ``rate`` fraction of requests (under ``path_prefix``) with ``status``."""
        with self._lock:
            self._rate, self._rate_status, self._rate_prefix = rate, status, path_prefix

    def slow(self, seconds, times=1, path_prefix="", kind="slow"):
        """Hold the next ``times`` matching requests ``seconds`` before answering them normally
        (longer than a client's read timeout, it is a timeout; longer than a lock, a lapsed lock);
        counted under ``kind``."""
        with self._lock:
            self._slow += [(seconds, path_prefix, kind)] * times

    def fail_after_apply(self, how, times=1, path_prefix="", methods=("POST", "PUT", "PATCH", "DELETE")):
        """Let the next ``times`` matching writes take effect, then answer 503 (``how=503``), drop
        the connection without an answer (``how="drop"``), answer 200 with a proxy's HTML page
        (``how="garbled"``) or send the answer a byte every ``TRICKLE_SECONDS`` (``how="trickle"``,
        a crawling link): the client cannot tell it was applied."""
        with self._lock:
            self._after_apply += [(how, path_prefix, tuple(methods))] * times

    def rate_limit(self, rate, burst, path_prefix="", methods=("POST", "PUT", "PATCH", "DELETE")):
        """Enforce a rate limit, as a vendor's gateway does: matching requests beyond a token bucket
        of ``rate`` a second holding at most ``burst`` are answered 429 with ``Retry-After: 1``
        (counted as "429 over the rate limit")."""
        with self._lock:
            self._limit = {"rate": rate, "burst": burst, "prefix": path_prefix, "methods": tuple(methods),
                           "tokens": float(burst), "at": time.monotonic()}

    def _over_limit(self, path, method):
        with self._lock:
            limit = self._limit
            if limit is None or not path.startswith(limit["prefix"]) or method not in limit["methods"]:
                return False
            now = time.monotonic()
            limit["tokens"] = min(limit["burst"], limit["tokens"] + (now - limit["at"]) * limit["rate"])
            limit["at"] = now
            if limit["tokens"] >= 1:
                limit["tokens"] -= 1
                return False
            self.injected += 1
            self.counts["429 over the rate limit"] += 1
            return True

    def latency(self, seconds):
        """Delay every request by ``seconds``."""
        with self._lock:
            self._latency = seconds

    def clear(self):
        with self._lock:
            self._queued.clear()
            self._slow.clear()
            self._after_apply.clear()
            self._rate, self._latency, self._limit = 0.0, 0.0, None

    def _next(self, path):
        with self._lock:
            for i, fault in enumerate(self._queued):
                if path.startswith(fault[3]):
                    del self._queued[i]
                    return fault[:3]
            if self._rate and path.startswith(self._rate_prefix) and self._random.random() < self._rate:
                return self._rate_status, None, None
        return None

    def _take(self, faults, matches):
        """Remove and return the first of ``faults`` that ``matches``, counted; or None."""
        with self._lock:
            for i, fault in enumerate(faults):
                if matches(fault):
                    del faults[i]
                    self.injected += 1
                    return fault
        return None

    def apply(self, path, method="GET"):
        """Return a Flask response for a fault to inject, or None (after any delay it injects)."""
        if self._latency:
            time.sleep(self._latency)
        if self._over_limit(path, method):
            return _fault_response(429, 1, {"error": "rate limited", "status": 429})
        slow = self._take(self._slow, lambda fault: path.startswith(fault[1]))
        if slow:
            self.counts[slow[2]] += 1
            time.sleep(slow[0])
        fault = self._next(path)
        if fault is None:
            after = self._take(self._after_apply, lambda fault: path.startswith(fault[1]) and method in fault[2])
            if after:
                g.fail_after_apply = after[0]
            return None
        status, retry_after, body = fault
        with self._lock:
            self.injected += 1
            self.counts[str(status)] += 1
        return _fault_response(status, retry_after, body if body is not None else {"error": "injected fault",
                                                                                   "status": status})


def _trickled(body):
    for byte in body:
        time.sleep(TRICKLE_SECONDS)
        yield bytes([byte])


def _fault_response(status, retry_after, body):
    response = jsonify(body)
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
        port = request.environ.get("REMOTE_PORT")
        faults.in_progress[port] = request.path
        return faults.apply(request.path, request.method)

    @app.after_request
    def _fail_after_apply(response):
        how = g.pop("fail_after_apply", None)
        if how is None or response.status_code >= 400:
            return response
        faults.counts[f"applied then {how}"] += 1
        if how == "drop":  # the write took effect; the client gets no answer at all
            request.environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
            return response
        if how == "garbled":  # something between replaced the API's answer with its own page
            return Response(GARBLED_PAGE, 200, mimetype="text/html")
        if how == "trickle":  # the whole answer, at a crawl (each byte well within a read timeout)
            response.direct_passthrough = False
            body = response.get_data()
            response.response = _trickled(body)
            response.headers["Content-Length"] = str(len(body))
            return response
        failed = jsonify({"error": "injected fault", "status": how})
        failed.status_code = how
        return failed

    @app.teardown_request
    def _done(_exc):
        faults.in_progress.pop(request.environ.get("REMOTE_PORT"), None)

    @app.post("/_sim/faults")
    def _set_faults():
        spec = request.get_json(force=True)
        if "status" in spec:
            faults.inject(spec["status"], spec.get("times", 1), spec.get("retry_after"),
                          spec.get("body"), spec.get("path_prefix", ""))
        if "rate" in spec:
            faults.fail_rate(spec["rate"], spec.get("rate_status", 503), spec.get("rate_path_prefix", ""))
        if "slow" in spec:
            faults.slow(spec["slow"], spec.get("times", 1), spec.get("path_prefix", ""))
        if "fail_after_apply" in spec:
            faults.fail_after_apply(spec["fail_after_apply"], spec.get("times", 1), spec.get("path_prefix", ""))
        if "latency" in spec:
            faults.latency(spec["latency"])
        if "rate_limit" in spec:
            faults.rate_limit(spec["rate_limit"]["rate"], spec["rate_limit"]["burst"], spec.get("path_prefix", ""))
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
