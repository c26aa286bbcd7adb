from workers.config import Settings
from workers.sinks import SINK_NAMES, configured_sink_names, enabled_sinks, sink_class

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
