"""One loopback simulator per process for the end-to-end benchmark: ``python -m bench.sims NAME``.

The simulators are the test suite's (``workers/ops/simulators``), served by werkzeug's
threaded server without per-request log lines. werkzeug answers every request with
``Connection: close`` whatever the protocol version, so the relay, the naive consumer and
the plain loop alike open a connection (and the simulator a thread) per call; a vendor
that keeps connections alive would cost all of them less. Each runs in its own process so
the sinks are not one GIL. Prints its URL on the first line; ``GET /_bench/count``
answers how many requests it served, by method.
"""
import argparse
import collections
import json
import logging
import threading
from pathlib import Path

from werkzeug.serving import WSGIRequestHandler, make_server

from workers.ops.simulators import b2b, locate2u, storepoint

SP_TOKEN = "bench-storepoint-token"
B2B_TOKEN = "bench-b2b-token"
B2B_PARTNER, B2B_COUNTRY = "BP-1", "AU"
L2U_CLIENT, L2U_SECRET = "bench-client", "bench-client-secret"
ROUTES = """\
storepoint: {rate_limit: {rate: 100000, burst: 100000}}
b2b: {rate_limit: {rate: 100000, burst: 100000}}
"""


def relay_settings(settings, urls, workdir):
    """``settings`` pointed at the simulators ``urls`` (Locate2u, Storepoint, B2B), no rate limits."""
    routes = Path(workdir) / "routes.yaml"
    routes.write_text(ROUTES)
    return settings.replace(
        routes_file=str(routes), locate2u_client_id=L2U_CLIENT, locate2u_client_secret=L2U_SECRET,
        locate2u_api_url=urls["locate2u"], locate2u_id_url=urls["locate2u"],
        storepoint_api_url=urls["storepoint"], storepoint_api_token=SP_TOKEN,
        b2b_api_url=urls["b2b"], b2b_api_token=B2B_TOKEN, b2b_business_partner_id=B2B_PARTNER,
        b2b_country_id=B2B_COUNTRY)


class Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


def counting(app):
    """Wrap ``app``: count requests by method, answer the counts at ``/_bench/count``."""
    counts, lock = collections.Counter(), threading.Lock()

    def wsgi(environ, start_response):
        if environ["PATH_INFO"] == "/_bench/count":
            body = json.dumps(counts).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        with lock:
            counts[environ["REQUEST_METHOD"]] += 1
        return app(environ, start_response)

    return wsgi


def build(name, stops, first_stop):
    if name == "locate2u":
        state = locate2u.Locate2uState(client_id=L2U_CLIENT, client_secret=L2U_SECRET)
        for stop_id in range(first_stop, first_stop + stops):
            state.add_stop(stopId=stop_id, name=f"Stop {stop_id}",
                           location={"latitude": -33.87 + stop_id % 1000 / 10000, "longitude": 151.19})
        return locate2u.create_app(state)
    if name == "storepoint":
        return storepoint.create_app(storepoint.StorepointState(token=SP_TOKEN))
    return b2b.create_app(b2b.B2BState(token=B2B_TOKEN, business_partners=(B2B_PARTNER,)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=("locate2u", "storepoint", "b2b"))
    parser.add_argument("--stops", type=int, default=500)
    parser.add_argument("--first-stop", type=int, default=100000)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = make_server("127.0.0.1", 0, counting(build(args.name, args.stops, args.first_stop)), threaded=True,
                         request_handler=Quiet)
    print(f"http://127.0.0.1:{server.server_port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
