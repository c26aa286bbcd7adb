"""A sink added in one module, with no other change to the relay: configured, routed, redacted, delivered.

``ThrowawaySink`` is the smallest sink: it describes itself (two settings, one
of them secret; what enables it and what that requires; its default route)
and PUTs/DELETEs ``/records/<key>`` on the loopback recorder
(``workers/ops/simulators/recorder.py``). It is registered for each test and
removed again afterwards; it passes the contract every sink honours
(tests/sink_contract.py). docs/sinks/README.md walks through it.
"""
import io
import json
import logging

import pytest
from marshmallow import fields

from tests.payloads import status_change
from tests.sink_contract import SinkContract, sample_location
from tests.fixtures import Driver
from workers import tasks
from workers.celery_config import PROCESS_DELIVERY
from workers.config import ConfigError, Settings
from workers.domain.events import parse_event
from workers.resilience.http import HttpClient
from workers.logs import json_handler, settings_secrets
from workers.ops.simulators import locate2u, recorder
from workers.ops.simulators.base import SimulatorServer
from workers.pipeline.routes import load_routes
from workers.runtime import Runtime
from workers.settings_fields import HttpUrl, SinkSetting
from workers.sinks import SINKS, configured_sink_names, register, unregister
from workers.sinks.base import Sink

STOP_ID = 164557
TOKEN = "throwaway-token-5f2c9e81"


class ThrowawaySink(Sink):
    """Records on the recorder: PUT ``/records/<key>`` (upsert), DELETE ``/records/<key>``."""

    name = "throwaway"
    settings = (
        SinkSetting("THROWAWAY_API_URL", HttpUrl(load_default=None), "Recorder base URL."),
        SinkSetting("THROWAWAY_API_TOKEN", fields.String(load_default=None),
                    "Recorder token (enables the throwaway sink).", secret=True),
    )
    enabled_by = ("THROWAWAY_API_TOKEN",)
    requires = ("THROWAWAY_API_URL",)
    default_route = {"on_status": {"Cancelled": "delete"}}

    @classmethod
    def from_settings(cls, settings, mappings):
        token = settings.throwaway_api_token
        client = HttpClient(settings.throwaway_api_url, headers={"Authorization": f"Bearer {token}"}, redact=(token,))
        return cls(client, mappings)

    def upsert(self, location, options):
        """PUT the record; return the recorder's id."""
        body = {"name": location.name, "status": location.status, "version": location.version}
        return self.client.answer(self.call("PUT", f"records/{location.key}", json=body), "id")

    def delete(self, location, options):
        """DELETE the record (gone already is fine: the recorder answers 204 either way)."""
        self.call("DELETE", f"records/{location.key}")


@pytest.fixture(autouse=True)
def throwaway():
    register(ThrowawaySink)
    yield ThrowawaySink
    unregister(ThrowawaySink.name)


@pytest.fixture
def sim():
    with SimulatorServer(recorder.create_app()) as server:
        yield server


class TestThrowawayContract(SinkContract):
    """The behaviour every sink honours, against the recorder."""

    def make_sink(self, sim, mappings):
        settings = Settings(webhook_secret="s" * 20, throwaway_api_url=sim.url, throwaway_api_token=TOKEN)
        return ThrowawaySink.from_settings(settings, mappings)

    def remote(self, sim, key):
        record = sim.app.config["STATE"].records.get(key)
        return [record] if record else []

    def remote_name(self, record):
        return record["name"]

    def is_active(self, record):
        return True  # the recorder has no active flag: a deleted record is gone

    def invalid_location(self):
        return sample_location(name="")  # the recorder answers 400 without a name


def environment(**variables):
    return {"RELAY_WEBHOOK_SECRET": "s" * 20, **variables}


def test_configured_from_its_environment_variables():
    settings = Settings.from_env(environment(THROWAWAY_API_TOKEN=TOKEN, THROWAWAY_API_URL="http://127.0.0.1:9/"))
    assert (settings.throwaway_api_token, settings.throwaway_api_url) == (TOKEN, "http://127.0.0.1:9/")
    assert configured_sink_names(settings) == ["throwaway"]
    assert Settings.from_env(settings.to_env()) == settings
    assert configured_sink_names(Settings.from_env(environment())) == []


def test_its_credential_requires_its_url():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environment(THROWAWAY_API_TOKEN=TOKEN))
    assert caught.value.problems == {"THROWAWAY_API_URL": "required when THROWAWAY_API_TOKEN is set"}
    assert TOKEN not in str(caught.value)


def test_its_default_route_takes_stop_events(tmp_path):
    route = load_routes()["throwaway"]
    event = parse_event("d-1", "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00Z"))
    cancelled = parse_event("d-2", "stop.status-changed", status_change(STOP_ID, "Cancelled", "2022-04-27T05:01:00Z"))
    assert (route.action_for(event), route.action_for(cancelled), route.needs_stop) == ("upsert", "delete", True)
    routes_file = tmp_path / "routes.yaml"
    routes_file.write_text("throwaway:\n  on_status: {Cancelled: skip}\n")
    assert load_routes(str(routes_file))["throwaway"].action_for(cancelled) is None


def test_its_secret_never_reaches_the_log():
    settings = Settings(webhook_secret="s" * 20, throwaway_api_url="http://127.0.0.1:9/", throwaway_api_token=TOKEN)
    handler = json_handler(settings_secrets(settings))
    handler.setStream(io.StringIO())
    logger = logging.getLogger("tests.throwaway")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"refused token {TOKEN}")
        except RuntimeError:
            logger.exception("sent %s", TOKEN, extra={"sent": {"header": f"X-Token {TOKEN}"}})
    finally:
        logger.removeHandler(handler)
    written = handler.stream.getvalue()
    assert "sent [redacted]" in written and TOKEN not in written


def test_a_stop_event_is_delivered_through_the_pipeline(settings, monkeypatch):
    l2u_state = locate2u.Locate2uState()
    l2u_state.add_stop(stopId=STOP_ID)
    with SimulatorServer(locate2u.create_app(l2u_state)) as l2u, SimulatorServer(recorder.create_app()) as sim:
        settings = settings.replace(locate2u_client_id=l2u_state.client_id, locate2u_api_url=l2u.url,
                                    locate2u_client_secret=l2u_state.client_secret, locate2u_id_url=l2u.url,
                                    throwaway_api_url=sim.url, throwaway_api_token=TOKEN)
        driver = Driver()  # runs the tasks the pipeline sends in-process
        driver.rt = rt = Runtime(settings, driver.send_task)
        monkeypatch.setattr(tasks, "runtime", lambda: rt)
        assert set(rt.sinks) == {"throwaway"} and isinstance(rt.sinks["throwaway"], SINKS["throwaway"])
        deliver_two_events(rt, driver)
        writes = sim.app.config["STATE"].writes
    key = f"l2u-stop-{STOP_ID}"
    assert [(method, written_key) for method, written_key, _ in writes] == [("PUT", key), ("DELETE", key)]
    assert writes[0][2]["status"] == "Arrived"
    assert rt.ledger.get("d-arrived")["sinks"]["throwaway"]["remote_id"] == f"rec-{key}"


def deliver_two_events(rt, driver):
    """An Arrived then a Cancelled event for the stop, each recorded, processed and applied."""
    for delivery_id, status, action_date in (("d-arrived", "Arrived", "2022-04-27T05:00:00+00:00"),
                                             ("d-cancelled", "Cancelled", "2022-04-27T05:10:00+00:00")):
        body = status_change(STOP_ID, status, action_date)
        assert rt.ledger.record(delivery_id, "stop.status-changed", json.dumps(body), 3600)
        rt.scheduler.send_task(PROCESS_DELIVERY, args=[delivery_id, "stop.status-changed"])
        driver.run()
        assert rt.ledger.get(delivery_id)["sinks"]["throwaway"]["state"] == "applied"
