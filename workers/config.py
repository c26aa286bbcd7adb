"""The one reader of the environment.

``Settings.from_env()`` reads every variable once, validates it with a
marshmallow schema and raises ``ConfigError`` listing every problem at once.
Everything else receives a ``Settings`` object, so tests pass values directly.
"""
import base64
import binascii
import dataclasses
import os
import ssl
from urllib.parse import urlsplit

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from workers.events import EVENT_TYPES
from workers.redis_tls import uses_tls

MIB = 1024 * 1024
SVIX_RETRY_SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
CONSOLE_HASH_METHODS = ("scrypt:", "pbkdf2:")  # werkzeug.security password hash methods


class ConfigError(Exception):
    """Invalid configuration; ``problems`` maps variable name to message."""

    def __init__(self, problems):
        self.problems = problems
        lines = [f"  - {name}: {message}" for name, message in sorted(problems.items())]
        super().__init__("invalid configuration:\n" + "\n".join(lines))


class CommaList(fields.Field):
    """A comma-separated environment value as a tuple of stripped strings."""

    def _deserialize(self, value, attr, data, **kwargs):
        return tuple(part.strip() for part in str(value).split(",") if part.strip())


class HttpUrl(fields.Url):
    """An http(s) URL; loopback hosts allowed so tests can use simulators."""

    def __init__(self, **kwargs):
        super().__init__(schemes={"http", "https"}, require_tld=False, **kwargs)


def _env(name, field):
    field.data_key = name
    return field


class SettingsSchema(Schema):
    """Environment variables (``data_key``) and their rules."""

    class Meta:
        unknown = EXCLUDE

    redis_url = _env("REDIS_URL", fields.String(load_default=None))
    broker_url = _env("CELERY_BROKER_URL", fields.String(load_default=None))
    redis_ca_file = _env("RELAY_REDIS_CA_FILE", fields.String(load_default=None))
    redis_max_connections = _env("RELAY_REDIS_MAX_CONNECTIONS",
                                 fields.Integer(load_default=1, validate=validate.Range(1, 1000)))
    broker_pool_limit = _env("RELAY_BROKER_POOL_LIMIT", fields.Integer(load_default=10, validate=validate.Range(2, 1000)))
    worker_remote_control = _env("RELAY_WORKER_REMOTE_CONTROL", fields.Boolean(load_default=False))
    port = _env("PORT", fields.Integer(load_default=8000, validate=validate.Range(1, 65535)))
    public_url = _env("RELAY_PUBLIC_URL", HttpUrl(load_default=None))
    webhook_secret = _env("RELAY_WEBHOOK_SECRET", fields.String(required=True, validate=validate.Length(min=16)))
    webhook_secret_previous = _env("RELAY_WEBHOOK_SECRET_PREVIOUS",
                                   fields.String(load_default=None, validate=validate.Length(min=16)))
    max_body_bytes = _env("RELAY_MAX_BODY_BYTES",
                          fields.Integer(load_default=MIB, validate=validate.Range(1024, 64 * MIB)))
    event_types = _env("RELAY_EVENT_TYPES", CommaList(load_default=tuple(EVENT_TYPES)))
    routes_file = _env("RELAY_ROUTES_FILE", fields.String(load_default=None))
    dedup_window = _env("RELAY_DEDUP_WINDOW", fields.Integer(load_default=86400, validate=validate.Range(60)))
    # Redis memory bounds (workers/housekeeping.py); 14 days is as long as a ledger entry lives.
    history_days = _env("RELAY_HISTORY_DAYS", fields.Integer(load_default=14, validate=validate.Range(1, 14)))
    history_trim_percent = _env("RELAY_HISTORY_TRIM_PERCENT",
                                fields.Integer(load_default=70, validate=validate.Range(10, 95)))
    dead_letter_days = _env("RELAY_DEAD_LETTER_DAYS", fields.Integer(load_default=14, validate=validate.Range(1, 14)))
    dead_letter_limit = _env("RELAY_DEAD_LETTER_LIMIT",
                             fields.Integer(load_default=10000, validate=validate.Range(1, 1000000)))
    quarantine_limit = _env("RELAY_QUARANTINE_LIMIT",
                            fields.Integer(load_default=1000, validate=validate.Range(1, 100000)))
    location_days = _env("RELAY_LOCATION_DAYS", fields.Integer(load_default=30, validate=validate.Range(1, 3650)))
    sweep_after = _env("RELAY_SWEEP_AFTER", fields.Integer(load_default=120, validate=validate.Range(1)))
    subscription_sync_interval = _env("RELAY_SUBSCRIPTION_SYNC_INTERVAL",
                                      fields.Integer(load_default=900, validate=validate.Range(60)))
    visibility_timeout = _env("RELAY_VISIBILITY_TIMEOUT",
                              fields.Integer(load_default=240, validate=validate.Range(10, 3600)))
    retry_schedule = _env("RELAY_RETRY_SCHEDULE", CommaList(load_default=tuple(map(str, SVIX_RETRY_SCHEDULE))))
    data_dir = _env("RELAY_DATA_DIR", fields.String(load_default=".l2u-relay"))
    log_level = _env("LOG_LEVEL", fields.String(load_default="INFO",
                                                validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR"])))
    console_password = _env("RELAY_CONSOLE_PASSWORD",
                            fields.String(load_default=None, validate=validate.Length(min=12)))
    console_operators = _env("RELAY_CONSOLE_OPERATORS", CommaList(load_default=()))
    console_secret_key = _env("RELAY_CONSOLE_SECRET_KEY",
                              fields.String(load_default=None, validate=validate.Length(min=32)))
    console_session_minutes = _env("RELAY_CONSOLE_SESSION_MINUTES",
                                   fields.Integer(load_default=60, validate=validate.Range(5, 1440)))

    locate2u_client_id = _env("LOCATE2U_CLIENT_ID", fields.String(load_default=None))
    locate2u_client_secret = _env("LOCATE2U_CLIENT_SECRET", fields.String(load_default=None))
    locate2u_grant = _env("LOCATE2U_GRANT", fields.String(
        load_default="client_credentials", validate=validate.OneOf(["client_credentials", "authorization_code"])))
    locate2u_scope = _env("LOCATE2U_SCOPE", fields.String(load_default="integrations-api"))
    locate2u_api_url = _env("LOCATE2U_API_URL", HttpUrl(load_default="https://integration.locate2u.com"))
    locate2u_id_url = _env("LOCATE2U_ID_URL", HttpUrl(load_default="https://id.locate2u.com"))

    storepoint_api_url = _env("STOREPOINT_API_URL", HttpUrl(load_default="https://api.storepoint.co/admin/v1"))
    storepoint_api_token = _env("STOREPOINT_API_TOKEN", fields.String(load_default=None))
    b2b_api_url = _env("B2B_API_URL", HttpUrl(load_default=None))
    b2b_api_token = _env("B2B_API_TOKEN", fields.String(load_default=None))
    b2b_username = _env("B2B_USERNAME", fields.String(load_default=None))
    b2b_password = _env("B2B_PASSWORD", fields.String(load_default=None))
    b2b_business_partner_id = _env("B2B_BUSINESS_PARTNER_ID", fields.String(load_default=None))
    b2b_country_id = _env("B2B_COUNTRY_ID", fields.String(load_default=None))
    locate_api_url = _env("LOCATE_API_URL", HttpUrl(load_default=None))
    locate_api_token = _env("LOCATE_API_TOKEN", fields.String(load_default=None))
    deliverycom_api_url = _env("DELIVERYCOM_API_URL", HttpUrl(load_default="https://api.delivery.com"))
    deliverycom_access_token = _env("DELIVERYCOM_ACCESS_TOKEN", fields.String(load_default=None))
    forward_urls = _env("FORWARD_URLS", CommaList(load_default=()))
    forward_secret = _env("FORWARD_SECRET", CommaList(load_default=()))
    flower_basic_auth = _env("FLOWER_BASIC_AUTH", fields.String(load_default=None))
    token_keys = _env("RELAY_TOKEN_KEYS", CommaList(load_default=()))
    metrics_token = _env("RELAY_METRICS_TOKEN", fields.String(load_default=None, validate=validate.Length(min=16)))
    metrics_basic_auth = _env("RELAY_METRICS_BASIC_AUTH", fields.String(load_default=None))

    @validates_schema(skip_on_field_errors=False)
    def _cross_checks(self, data, **kwargs):
        problems = {}
        for entry in data.get("console_operators", ()):
            name, _, password_hash = entry.partition(":")
            if not name.strip() or not (password_hash.startswith(CONSOLE_HASH_METHODS)
                                        and password_hash.count("$") == 2):
                problems["RELAY_CONSOLE_OPERATORS"] = [
                    f"{name!r}: each entry is name:hash, the hash from werkzeug's generate_password_hash "
                    "(scrypt:… or pbkdf2:…)"]
        for name in data.get("event_types", ()):
            if name not in EVENT_TYPES:
                problems["RELAY_EVENT_TYPES"] = [f"unknown event type {name!r}; known: {', '.join(EVENT_TYPES)}"]
        for value in data.get("retry_schedule", ()):
            if not value.isdigit():
                problems["RELAY_RETRY_SCHEDULE"] = [f"{value!r} is not a whole number of seconds"]
        for url in data.get("forward_urls", ()):
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
                problems["FORWARD_URLS"] = [f"{url!r} is not an http(s) URL"]
        for needed_by, requirement in _SINK_REQUIREMENTS.items():
            if data.get(needed_by):
                for name, key in requirement:
                    if not data.get(key):
                        problems[name] = [f"required when {self.fields[needed_by].data_key} is set"]
        if bool(data.get("b2b_username")) != bool(data.get("b2b_password")):
            problems["B2B_PASSWORD"] = ["B2B_USERNAME and B2B_PASSWORD go together"]
        if data.get("redis_ca_file"):
            problem = _ca_file_problem(data)
            if problem:
                problems["RELAY_REDIS_CA_FILE"] = [problem]
        if data.get("flower_basic_auth") and ":" not in data["flower_basic_auth"]:
            problems["FLOWER_BASIC_AUTH"] = ["must be user:password"]
        if data.get("metrics_basic_auth") and ":" not in data["metrics_basic_auth"]:
            problems["RELAY_METRICS_BASIC_AUTH"] = ["must be user:password"]
        for position, key in enumerate(data.get("token_keys", ()), 1):
            if not (is_fernet_key(key) or len(key) >= 32):
                problems["RELAY_TOKEN_KEYS"] = [f"key {position} is neither a Fernet key nor a secret of at least "
                                                "32 characters (l2u-relay oauth new-key makes a key)"]
        if problems:
            raise ValidationError(problems)


def is_fernet_key(key):
    """True for a Fernet key: 32 bytes in URL-safe base64 (44 characters)."""
    try:
        return len(base64.urlsafe_b64decode(key.encode())) == 32 and len(key) == 44
    except (ValueError, binascii.Error):
        return False


def _ca_file_problem(data):
    path = data["redis_ca_file"]
    if not any(uses_tls(data.get(name)) for name in ("redis_url", "broker_url")):
        return "only used with a rediss:// REDIS_URL or CELERY_BROKER_URL (TLS)"
    if not os.path.isfile(path):
        return f"{path}: no such file (give the PEM file of the CA that signed the Redis server's certificate)"
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        return f"{path}: not a readable PEM CA certificate ({exc})"
    return None


# A sink is enabled when its credential is set; then these must be set too.
_SINK_REQUIREMENTS = {
    "b2b_api_token": (("B2B_API_URL", "b2b_api_url"), ("B2B_BUSINESS_PARTNER_ID", "b2b_business_partner_id"),
                      ("B2B_COUNTRY_ID", "b2b_country_id")),
    "b2b_username": (("B2B_API_URL", "b2b_api_url"), ("B2B_BUSINESS_PARTNER_ID", "b2b_business_partner_id"),
                     ("B2B_COUNTRY_ID", "b2b_country_id")),
    "locate_api_token": (("LOCATE_API_URL", "locate_api_url"),),
    "forward_urls": (("FORWARD_SECRET", "forward_secret"),),
    "locate2u_client_id": (("LOCATE2U_CLIENT_SECRET", "locate2u_client_secret"),),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated configuration. Build with ``from_env()`` or directly in tests."""

    webhook_secret: str
    redis_url: str | None = None
    broker_url: str | None = None
    redis_ca_file: str | None = None
    redis_max_connections: int = 1
    broker_pool_limit: int = 10
    worker_remote_control: bool = False
    port: int = 8000
    public_url: str | None = None
    webhook_secret_previous: str | None = None
    max_body_bytes: int = MIB
    event_types: tuple = tuple(EVENT_TYPES)
    routes_file: str | None = None
    dedup_window: int = 86400
    history_days: int = 14
    history_trim_percent: int = 70
    dead_letter_days: int = 14
    dead_letter_limit: int = 10000
    quarantine_limit: int = 1000
    location_days: int = 30
    sweep_after: int = 120
    visibility_timeout: int = 240
    subscription_sync_interval: int = 900
    retry_schedule: tuple = SVIX_RETRY_SCHEDULE
    data_dir: str = ".l2u-relay"
    log_level: str = "INFO"
    console_password: str | None = None
    console_operators: tuple = ()
    console_secret_key: str | None = None
    console_session_minutes: int = 60
    locate2u_client_id: str | None = None
    locate2u_client_secret: str | None = None
    locate2u_grant: str = "client_credentials"
    locate2u_scope: str = "integrations-api"
    locate2u_api_url: str = "https://integration.locate2u.com"
    locate2u_id_url: str = "https://id.locate2u.com"
    storepoint_api_url: str = "https://api.storepoint.co/admin/v1"
    storepoint_api_token: str | None = None
    b2b_api_url: str | None = None
    b2b_api_token: str | None = None
    b2b_username: str | None = None
    b2b_password: str | None = None
    b2b_business_partner_id: str | None = None
    b2b_country_id: str | None = None
    locate_api_url: str | None = None
    locate_api_token: str | None = None
    deliverycom_api_url: str = "https://api.delivery.com"
    deliverycom_access_token: str | None = None
    forward_urls: tuple = ()
    forward_secret: tuple = ()
    flower_basic_auth: str | None = None
    token_keys: tuple = ()
    metrics_token: str | None = None
    metrics_basic_auth: str | None = None

    @classmethod
    def from_env(cls, environ=None):
        """Read and validate the environment; raise ConfigError listing every problem."""
        environ = os.environ if environ is None else environ
        schema = SettingsSchema()
        names = {field.data_key for field in schema.fields.values()}
        raw = {name: value for name, value in environ.items() if name in names and value != ""}
        try:
            data = schema.load(raw)
        except ValidationError as error:
            raise ConfigError({name: "; ".join(_flatten(messages))
                               for name, messages in error.normalized_messages().items()}) from None
        data["retry_schedule"] = tuple(int(value) for value in data["retry_schedule"])
        return cls(**data)

    @property
    def console_enabled(self):
        """The operator console is served only when a console password or operator is configured."""
        return bool(self.console_password or self.console_operators)

    @property
    def broker(self):
        """The Celery broker URL: ``CELERY_BROKER_URL``, else ``REDIS_URL``."""
        return self.broker_url or self.redis_url

    def to_env(self):
        """The environment variables that reproduce these settings (for child processes)."""
        env = {}
        for name, field in SettingsSchema().fields.items():
            value = getattr(self, name)
            if value is None or value == ():
                continue
            env[field.data_key] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        return env

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _flatten(messages):
    if isinstance(messages, dict):
        return [m for value in messages.values() for m in _flatten(value)]
    if isinstance(messages, list):
        return [m for value in messages for m in _flatten(value)]
    return [str(messages)]
