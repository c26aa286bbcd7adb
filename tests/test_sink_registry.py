import json

import pytest

from workers.config import ConfigError, Settings
from workers.sinks import SINK_NAMES, SINKS, configured_sink_names, enabled_sinks, register, sink_class
from workers.sinks.app_json import APP_JSON, sink_env_entries
from workers.sinks.base import Sink

BASE = dict(webhook_secret="x" * 16, redis_url="redis://unused/0")
CREDENTIALS = {
    "storepoint": dict(storepoint_api_token="t"),
    "b2b": dict(b2b_api_url="http://b2b.test", b2b_api_token="t", b2b_business_partner_id="BP", b2b_country_id="AU"),
    "locate": dict(locate_api_url="http://locate.test", locate_api_token="t"),
    "deliverycom": dict(deliverycom_access_token="t"),
    "forward": dict(forward_urls=("http://forward.test/hook",), forward_secret=("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",)),
}


def test_no_credentials_no_sinks():
    assert configured_sink_names(Settings(**BASE)) == []


def test_each_sink_is_enabled_by_its_own_credentials(redis_client):
    for name, credentials in CREDENTIALS.items():
        settings = Settings(**BASE, **credentials)
        assert configured_sink_names(settings) == [name]
        [(built_name, sink)] = enabled_sinks(settings, redis_client).items()
        assert built_name == name and isinstance(sink, sink_class(name)) and sink.name == name


def test_b2b_by_username_and_password_too():
    settings = Settings(**BASE, b2b_api_url="http://b2b.test", b2b_username="u", b2b_password="p",
                        b2b_business_partner_id="BP", b2b_country_id="AU")
    assert configured_sink_names(settings) == ["b2b"]


def test_every_registered_sink_has_credentials_listed():
    assert sorted(CREDENTIALS) == sorted(SINK_NAMES)


def test_app_json_has_every_sink_setting_as_declared():
    """app.json is committed (Heroku reads it); ``python -m workers.sinks.app_json`` rewrites these entries."""
    env = json.loads(APP_JSON.read_text(encoding="utf-8"))["env"]
    entries = sink_env_entries()
    assert {name: env.get(name) for name in entries} == entries, "run: python -m workers.sinks.app_json"


def test_the_declared_rules_give_the_configuration_errors():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_WEBHOOK_SECRET": "x" * 16, "B2B_API_TOKEN": "t", "B2B_USERNAME": "u",
                           "LOCATE_API_TOKEN": "t", "FORWARD_URLS": "http://a/x,ftp://b,mailto:c"})
    assert caught.value.problems == {
        "B2B_API_URL": "required when B2B_USERNAME is set", "B2B_BUSINESS_PARTNER_ID": "required when B2B_USERNAME is set",
        "B2B_COUNTRY_ID": "required when B2B_USERNAME is set", "B2B_PASSWORD": "B2B_USERNAME and B2B_PASSWORD go together",
        "LOCATE_API_URL": "required when LOCATE_API_TOKEN is set", "FORWARD_SECRET": "required when FORWARD_URLS is set",
        "FORWARD_URLS": "'mailto:c' is not an http(s) URL"}


def test_only_forward_goes_without_the_stop():
    assert [name for name, sink in SINKS.items() if not sink.needs_stop] == ["forward"]


def test_a_sink_names_only_settings_it_declares():
    class Careless(Sink):
        name = "careless"
        enabled_by = ("CARELESS_TOKEN",)

    with pytest.raises(ValueError, match="CARELESS_TOKEN"):
        register(Careless)
    assert "careless" not in SINKS
