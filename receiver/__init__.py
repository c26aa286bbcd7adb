"""The web process: receives Locate2u webhooks, records them and hands them on."""
import logging

from flask import Flask

from receiver import console, errors, health, metrics, oauth, openapi, webhooks
from receiver.handoff import Handoff
from workers.store import redis_health
from workers.config import ConfigError, Settings
from workers.logs import configure_logging
from workers.pipeline.routes import load_routes


def create_app(settings=None):
    """Build the receiver app from ``settings`` (default: the environment)."""
    settings = settings or Settings.from_env()
    if not settings.redis_url:
        raise ConfigError({"REDIS_URL": "required for the web process ('l2u-relay run' starts an embedded Redis)"})
    load_routes(settings.routes_file)  # every process refuses a bad routes file at start-up
    configure_logging(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["l2u.settings"] = settings
    handoff = app.extensions["l2u.handoff"] = Handoff.from_settings(settings)
    redis_health.log_report(handoff.ledger.redis, logging.getLogger("receiver"))
    errors.init_app(app)
    metrics.init_app(app, handoff.ledger.redis, settings)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    oauth.init_app(app)
    console.init_app(app, settings, handoff.producer.send_task)
    return app
