"""A consumer of the signed forward: verifies Standard Webhooks signatures with the reference library."""
import threading

from flask import Flask, jsonify, request
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from workers.ops.simulators.base import FaultPlan, install_faults


class ReceiverState:
    """What the receiver saw: the latest message per endpoint and location key, and every accepted request."""

    def __init__(self, secrets):
        self.webhooks = {name: Webhook(secret) for name, secret in secrets.items()}
        self.messages = {name: {} for name in secrets}
        self.log = []
        self.lock = threading.Lock()


def create_receiver(secrets):
    """``POST /hooks/<name>`` verified with ``secrets[name]``; 422 when a location has no name."""
    state = ReceiverState(secrets)
    faults = FaultPlan()
    app = Flask(__name__)
    app.config["STATE"], app.config["FAULTS"] = state, faults
    install_faults(app, faults)

    @app.post("/hooks/<name>")
    def receive(name):
        try:
            message = state.webhooks[name].verify(request.get_data(as_text=True), dict(request.headers))
        except WebhookVerificationError as exc:
            return jsonify({"error": str(exc)}), 401
        location = message.get("location")
        if location is not None and not location.get("name"):
            return jsonify({"error": "validation", "fields": {"location.name": "required"}}), 422
        key = location["key"] if location else message["delivery_id"]
        with state.lock:
            state.messages[name][key] = message
            state.log.append((name, dict(request.headers)))
        return "", 204

    return app

