"""The baseline web apps of the benchmark, served by the same gunicorn settings as the receiver.

- ``bare()``: Flask, a POST that reads the JSON body and answers 200 with a small JSON object;
- ``one_pipeline()``: the same plus one Redis pipeline per request (``SET NX`` of a dedup key
  and ``LPUSH`` of the body): the least any durable accept path can do;
- ``record_script()``: the same with the receiver's own hand-off (``receiver.handoff.Handoff``: the
  ledger script that records, indexes and queues) in place of the pipeline, and none of the
  receiver's checks, metrics or error handling: what the durable record alone costs (ingest);
- ``naive_receiver()``: the end-to-end phase's naive pair: Flask that reads the JSON body and hands it
  to the naive Celery consumer (``bench/naive.py``) with ``send_task``, with no dedup, record or check.

Served as ``gunicorn -c gunicorn.conf.py 'bench.apps:bare()'`` (``REDIS_URL`` for the second, the
receiver's settings for the third, ``BENCH_NAIVE`` for the last).
"""
import hashlib
import json
import os

import redis
from flask import Flask, jsonify, request

ROUTE = "/webhooks/locate2u/<event_type>/<token>"
BENCH_QUEUE = "bench:queue"


def bare():
    app = Flask(__name__)

    @app.post(ROUTE)
    def receive(event_type, token):
        payload = json.loads(request.get_data(cache=False))
        return jsonify({"status": "accepted", "keys": len(payload)})

    return app


def one_pipeline():
    app = Flask(__name__)
    client = redis.Redis.from_url(os.environ["REDIS_URL"])

    @app.post(ROUTE)
    def receive(event_type, token):
        body = request.get_data(cache=False)
        json.loads(body)
        delivery_id = hashlib.sha256(event_type.encode() + b"\n" + body).hexdigest()
        with client.pipeline(transaction=False) as pipe:
            pipe.set(f"bench:dedup:{delivery_id}", 1, nx=True, ex=86400)
            pipe.lpush(BENCH_QUEUE, body)
            created, _ = pipe.execute()
        return jsonify({"status": "accepted" if created else "duplicate", "delivery_id": delivery_id})

    return app


def record_script():
    from receiver.handoff import Handoff
    from receiver.webhooks import delivery_id_for
    from workers.config import Settings

    app = Flask(__name__)
    handoff = Handoff.from_settings(Settings.from_env())

    @app.post(ROUTE)
    def receive(event_type, token):
        body = request.get_data(cache=False)
        text = body.decode("utf-8-sig")
        json.loads(text)
        delivery_id = delivery_id_for(event_type, body)
        return jsonify({"status": handoff.accept(delivery_id, event_type, text), "delivery_id": delivery_id})

    return app


def naive_receiver():
    from bench import naive

    app = Flask(__name__)

    @app.post(ROUTE)
    def receive(event_type, token):
        naive.app.send_task(naive.TASK, [json.loads(request.get_data(cache=False))])
        return jsonify({"status": "accepted"})

    return app
