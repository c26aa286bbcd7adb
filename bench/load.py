"""HTTP load for the benchmark: wrk when it is installed, else a pure-Python generator.

Every request POSTs a distinct, realistic ``stop.status-changed`` body (distinct so
none is a duplicate). ``drive()`` runs for a fixed time at full speed and returns
requests/s and latency percentiles; ``post_all()`` posts a given list of bodies,
optionally paced at a fixed rate, and returns when every one was answered.
"""
import http.client
import json
import multiprocessing
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

WRK_SCRIPT = Path(__file__).with_name("post.lua")
STOP_BASE = 100000


def status_change(n, tag, stops=5000, base_epoch=1651000000):
    """The n-th distinct stop.status-changed body (as the wrk script builds them)."""
    seconds = base_epoch + n
    return {"stopId": STOP_BASE + n % stops, "stopRef": f"L2022{tag}{n:07d}", "tripDate": "2022-04-27",
            "shipmentId": None,
            "actionDate": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{n % 10**7:07d}+00:00",
            "oldStatus": "Enroute", "newStatus": "Arrived", "notes": None, "location": None,
            "assignedTo": {"name": "Filbert Nicholas", "id": "a823361e-9d40-4438-bb28-b2b58cdb957e"},
            "changedByUser": {"name": "Filbert Nicholas", "id": "a823361e-9d40-4438-bb28-b2b58cdb957e"},
            "source": None, "sourceReference": None}


def percentile(values, pct):
    """The ``pct`` percentile (nearest rank) of ``values``, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def have_wrk():
    return shutil.which("wrk") is not None


def drive(url, path, seconds, connections, tag, use_wrk=None):
    """Full-speed POSTs for ``seconds``: ``{"rate", "p50", "p99", "requests", "errors", "tool"}`` (ms)."""
    use_wrk = have_wrk() if use_wrk is None else use_wrk
    return _wrk(url, path, seconds, connections, tag) if use_wrk else _python(url, path, seconds, connections, tag)


def _wrk(url, path, seconds, connections, tag):
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(WRK_SCRIPT),
               url, "--", path, tag]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((line for line in out.stdout.splitlines() if line.startswith("BENCH_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    result = json.loads(line.split(" ", 1)[1])
    errors = result["non2xx"] + result["connect"] + result["read"] + result["write"] + result["timeout"]
    ok = result["requests"] - result["non2xx"]
    return {"rate": ok / (result["duration_us"] / 1e6), "p50": result["p50_us"] / 1000,
            "p99": result["p99_us"] / 1000, "requests": result["requests"], "errors": errors, "tool": "wrk"}


# ------------------------------------------------------------------ pure Python

def _post(conn_target, path, body):
    """One POST on a new connection (gunicorn's sync workers close every connection); the status."""
    host, port = conn_target
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _python_worker(target, path, deadline, tag, threads, results):
    latencies, counts = [], {"ok": 0, "errors": 0}
    lock = threading.Lock()
    serial = iter(range(10**9))

    def loop():
        while time.monotonic() < deadline:
            with lock:
                n = next(serial)
            body = json.dumps(status_change(n, tag)).encode()
            started = time.perf_counter()
            try:
                status = _post(target, path, body)
            except OSError:
                status = 0
            elapsed = time.perf_counter() - started
            with lock:
                if 200 <= status < 300:
                    counts["ok"] += 1
                    latencies.append(elapsed)
                else:
                    counts["errors"] += 1

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    results.put((counts, latencies))


def _python(url, path, seconds, connections, tag, processes=2):
    """The same load from ``processes`` Python processes with threads (when wrk is missing)."""
    parts = urlsplit(url)
    target = (parts.hostname, parts.port)
    results = multiprocessing.get_context("fork").Queue()
    started = time.monotonic()
    deadline = started + seconds
    per_process = max(1, connections // processes)
    procs = [multiprocessing.get_context("fork").Process(
        target=_python_worker, args=(target, path, deadline, f"{tag}P{i}", per_process, results))
        for i in range(processes)]
    for proc in procs:
        proc.start()
    gathered = [results.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join()
    elapsed = time.monotonic() - started
    ok = sum(counts["ok"] for counts, _ in gathered)
    latencies = [value for _, values in gathered for value in values]
    return {"rate": ok / elapsed, "p50": percentile(latencies, 50) * 1000, "p99": percentile(latencies, 99) * 1000,
            "requests": ok + sum(counts["errors"] for counts, _ in gathered),
            "errors": sum(counts["errors"] for counts, _ in gathered), "tool": "python"}


def post_all(url, path, bodies, concurrency=16, rate=None):
    """POST every body (bytes), ``rate`` a second if given (open loop), else as fast as ``concurrency`` allows.

    Returns ``{"seconds", "ok", "errors", "p50", "p99"}`` (latencies in ms).
    """
    parts = urlsplit(url)
    target = (parts.hostname, parts.port)
    work = queue.Queue()
    for index, body in enumerate(bodies):
        work.put((index, body))
    latencies, errors, lock = [], [], threading.Lock()
    started = time.monotonic()

    def loop():
        while True:
            try:
                index, body = work.get_nowait()
            except queue.Empty:
                return
            if rate:
                delay = started + index / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            began = time.perf_counter()
            try:
                status = _post(target, path, body)
            except OSError as exc:
                status = repr(exc)
            with lock:
                if status == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors.append(status)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"seconds": time.monotonic() - started, "ok": len(latencies), "errors": errors,
            "p50": (percentile(latencies, 50) or 0) * 1000, "p99": (percentile(latencies, 99) or 0) * 1000}
