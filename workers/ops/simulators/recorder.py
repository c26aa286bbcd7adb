"""A generic recording HTTP sink: keeps the last body per key and every write, with faults."""
import threading

from flask import Flask, jsonify, request

from workers.ops.simulators.base import FaultPlan, install_faults, run_main


class RecorderState:
    def __init__(self):
        self.lock = threading.Lock()
        self.records = {}   # key -> last body written
        self.writes = []    # (method, key, body) in arrival order

    def writes_for(self, key):
        return [write for write in self.writes if write[1] == key]


def create_app(state=None):
    state = state or RecorderState()
    app = Flask(__name__)
    app.config["STATE"], app.config["FAULTS"] = state, FaultPlan()
    install_faults(app, app.config["FAULTS"])

    @app.put("/records/<key>")
    def put(key):
        body = request.get_json()
        if not body or not body.get("name"):
            return jsonify({"error": "validation_error", "details": {"name": ["required"]}}), 400
        with state.lock:
            state.records[key] = body
            state.writes.append(("PUT", key, body))
        return jsonify({"id": f"rec-{key}"})

    @app.delete("/records/<key>")
    def delete(key):
        with state.lock:
            state.records.pop(key, None)
            state.writes.append(("DELETE", key, None))
        return "", 204

    return app


if __name__ == "__main__":
    run_main(create_app, "recording sink")
