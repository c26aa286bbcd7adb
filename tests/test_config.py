import pytest

from workers.config import MIB, ConfigError, Settings
from workers.domain.events import EVENT_TYPES

SECRET = "s" * 20


def test_defaults_from_a_minimal_environment():
    settings = Settings.from_env({"RELAY_WEBHOOK_SECRET": SECRET})
    assert settings.max_body_bytes == MIB
    assert settings.event_types == tuple(EVENT_TYPES)
    assert settings.locate2u_grant == "client_credentials"
    assert settings.locate2u_api_url == "https://integration.locate2u.com"
    assert settings.storepoint_api_url == "https://api.storepoint.co/admin/v1"
    assert settings.retry_schedule == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)


def test_broker_defaults_to_redis_url():
    settings = Settings.from_env({"RELAY_WEBHOOK_SECRET": SECRET, "REDIS_URL": "redis://r:6379/0"})
    assert settings.broker == "redis://r:6379/0"
    other = Settings.from_env({"RELAY_WEBHOOK_SECRET": SECRET, "REDIS_URL": "redis://r/0",
                               "CELERY_BROKER_URL": "amqp://guest@mq//"})
    assert other.broker == "amqp://guest@mq//"


def test_every_problem_is_listed_in_one_message():
    environ = {"RELAY_MAX_BODY_BYTES": "lots", "RELAY_EVENT_TYPES": "stop.assigned,stop.teleported",
               "LOCATE2U_GRANT": "password", "B2B_USERNAME": "u", "FORWARD_URLS": "ftp://x",
               "STOREPOINT_API_URL": "not a url", "PORT": "0"}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ)
    problems = caught.value.problems
    assert set(problems) == {"RELAY_WEBHOOK_SECRET", "RELAY_MAX_BODY_BYTES", "RELAY_EVENT_TYPES", "LOCATE2U_GRANT",
                             "B2B_PASSWORD", "B2B_API_URL", "B2B_BUSINESS_PARTNER_ID", "B2B_COUNTRY_ID",
                             "FORWARD_URLS", "FORWARD_SECRET", "STOREPOINT_API_URL", "PORT"}
    message = str(caught.value)
    assert message.startswith("invalid configuration:")
    assert "stop.teleported" in message and "Missing data for required field" in message
    assert message.count("\n  - ") == len(problems)


def test_values_are_never_echoed_for_secrets():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_WEBHOOK_SECRET": "tooshort-secret"})
    assert "tooshort-secret" not in str(caught.value)


def test_to_env_round_trips():
    settings = Settings.from_env({"RELAY_WEBHOOK_SECRET": SECRET, "REDIS_URL": "redis://h/1",
                                  "FORWARD_URLS": "http://a/x,http://b/y", "FORWARD_SECRET": "whsec_abc",
                                  "RELAY_RETRY_SCHEDULE": "0,1,2"})
    assert Settings.from_env(settings.to_env()) == settings


def test_a_retry_schedule_that_could_outlast_the_ledger_is_refused_with_why():
    """A delivery is kept 14 days; each retry may wait up to a day for a Retry-After. Fifteen retries
    could outlast its ledger entry, which would be forgotten while its write waits."""
    fifteen = ",".join(["0"] + ["60"] * 15)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_WEBHOOK_SECRET": SECRET, "RELAY_RETRY_SCHEDULE": fifteen})
    problem = caught.value.problems["RELAY_RETRY_SCHEDULE"]
    assert problem == ("its 15 retries, each waiting up to a day for a Retry-After, could take 15 days, past the "
                       "14 days a delivery is kept: use fewer or shorter steps")
    assert Settings.from_env({"RELAY_WEBHOOK_SECRET": SECRET, "RELAY_RETRY_SCHEDULE": ",".join(["0"] + ["60"] * 14)})


@pytest.mark.parametrize("value", ["-1", "0,abc", ",", " "])
def test_a_retry_schedule_that_is_not_seconds_is_named_not_a_type_error(value):
    """Each of these ended every process (CLI, worker, gunicorn) in ``TypeError: 'int' object is not
    iterable``, hiding every other problem."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_WEBHOOK_SECRET": SECRET, "RELAY_RETRY_SCHEDULE": value, "PORT": "0"})
    assert set(caught.value.problems) == {"RELAY_RETRY_SCHEDULE", "PORT"}


@pytest.mark.parametrize("value", [",", " , "])
def test_event_types_that_name_none_are_refused_not_taken_for_no_subscriptions(value):
    """A stray comma was read as no event type at all, and the release phase's sync then deleted every
    subscription: the relay received nothing more."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_WEBHOOK_SECRET": SECRET, "RELAY_EVENT_TYPES": value})
    assert "names no event type" in caught.value.problems["RELAY_EVENT_TYPES"]


@pytest.mark.parametrize("variable, value, said", [
    ("REDIS_URL", "redis://u:pw-secret@127.0.0.1:99999/0", "Port out of range 0-65535"),
    ("REDIS_URL", "redis://[::1/0", "Invalid IPv6 URL"),
    ("REDIS_URL", "http://u:pw-secret@host/0", "must start with redis://, rediss:// or unix://, not http://"),
    ("CELERY_BROKER_URL", "foo://u:pw-secret@x", "must start with redis://, rediss://, amqp://, amqps:// or "
                                                 "pyamqp://, not foo://"),
])
def test_a_redis_or_broker_url_no_client_can_use_is_named_without_its_password(variable, value, said):
    """A port out of range, a host that cannot be read or a scheme of no transport passed the settings
    and ended the worker and gunicorn in a kombu or urllib traceback."""
    environ = {"RELAY_WEBHOOK_SECRET": SECRET, "REDIS_URL": "redis://127.0.0.1:6379/0", variable: value}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ)
    assert said in caught.value.problems[variable] and "pw-secret" not in str(caught.value)
