"""The one reader of the environment.

``Settings.from_env()`` reads every variable once, validates it with a
marshmallow schema and raises ``ConfigError`` listing every problem at once.
Everything else receives a ``Settings`` object, so tests pass values directly.

The schema is the one declaration of every setting: the relay's own are below,
each sink's come from its class (``settings``, ``enabled_by``, ``requires``,
``together``; see ``workers.sinks``), and ``Settings`` has one attribute per
field of the schema.
"""
import base64
import binascii
import dataclasses
import functools
import os
import ssl

from marshmallow import EXCLUDE, Schema, ValidationError, fields, missing, validate, validates_schema

from workers.domain.events import EVENT_TYPES
from workers.resilience.errors import ConfigError
from workers.resilience.retries import longest_wait
from workers.settings_fields import CommaList, HttpUrl, ServiceUrl
from workers.sinks import SINKS
from workers.store.ledger import LEDGER_RETENTION
from workers.store.redis_tls import uses_tls

MIB = 1024 * 1024
SVIX_RETRY_SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
CONSOLE_HASH_METHODS = ("scrypt:", "pbkdf2:")  # werkzeug.security password hash methods


class Seconds(CommaList):
    """A comma list of whole seconds, as a tuple of ints."""

    def _deserialize(self, value, attr, data, **kwargs):
        values = super()._deserialize(value, attr, data, **kwargs)
        wrong = [value for value in values if not value.isdigit()]
        if wrong:
            raise ValidationError(f"{wrong[-1]!r} is not a whole number of seconds")
        if not values:
            raise ValidationError("names no number of seconds; leave it unset for the default")
        return tuple(int(value) for value in values)


def _retry_schedule_problem(schedule):
    """Why ``schedule`` could have a delivery wait past its ledger entry (each retry may wait up to
    ``longest_wait``, as ``retry_delay`` lets it for a Retry-After), or None."""
    retries, each = len(schedule) - 1, longest_wait(schedule)
    if retries * each <= LEDGER_RETENTION:
        return None
    each_text = "a day" if each == 86400 else f"{each / 86400:g} days"
    return (f"its {retries} retries, each waiting up to {each_text} for a Retry-After, could take "
            f"{retries * each / 86400:g} days, past the {LEDGER_RETENTION / 86400:g} days a delivery is kept: use "
            "fewer or shorter steps")


def _env(name, field, secret=False):
    """``field`` read from the variable ``name``; a ``secret`` one is redacted from the logs."""
    field.data_key = name
    field.metadata["secret"] = secret
    return field


class RelaySettingsSchema(Schema):
    """The relay's own environment variables (``data_key``) and their rules, with every sink's rules."""

    class Meta:
        unknown = EXCLUDE
        register = False  # a schema per set of sinks (settings_schema), none looked up by name

    sinks = ()  # the sink classes whose settings settings_schema() added

    redis_url = _env("REDIS_URL", ServiceUrl(("redis", "rediss", "unix"), load_default=None))
    broker_url = _env("CELERY_BROKER_URL",
                      ServiceUrl(("redis", "rediss", "amqp", "amqps", "pyamqp"), load_default=None))
    redis_ca_file = _env("RELAY_REDIS_CA_FILE", fields.String(load_default=None))
    redis_max_connections = _env("RELAY_REDIS_MAX_CONNECTIONS",
                                 fields.Integer(load_default=1, validate=validate.Range(1, 1000)))
    broker_pool_limit = _env("RELAY_BROKER_POOL_LIMIT", fields.Integer(load_default=10, validate=validate.Range(2, 1000)))
    worker_remote_control = _env("RELAY_WORKER_REMOTE_CONTROL", fields.Boolean(load_default=False))
    port = _env("PORT", fields.Integer(load_default=8000, validate=validate.Range(1, 65535)))
    public_url = _env("RELAY_PUBLIC_URL", HttpUrl(load_default=None))
    webhook_secret = _env("RELAY_WEBHOOK_SECRET", fields.String(required=True, validate=validate.Length(min=16)),
                          secret=True)
    webhook_secret_previous = _env("RELAY_WEBHOOK_SECRET_PREVIOUS",
                                   fields.String(load_default=None, validate=validate.Length(min=16)), secret=True)
    max_body_bytes = _env("RELAY_MAX_BODY_BYTES",
                          fields.Integer(load_default=MIB, validate=validate.Range(1024, 64 * MIB)))
    event_types = _env("RELAY_EVENT_TYPES", CommaList(load_default=tuple(EVENT_TYPES)))
    routes_file = _env("RELAY_ROUTES_FILE", fields.String(load_default=None))
    dedup_window = _env("RELAY_DEDUP_WINDOW", fields.Integer(load_default=86400, validate=validate.Range(60)))
    # Redis memory bounds (workers/store/housekeeping.py); 14 days is as long as a ledger entry lives.
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
    retry_schedule = _env("RELAY_RETRY_SCHEDULE", Seconds(load_default=SVIX_RETRY_SCHEDULE))
    data_dir = _env("RELAY_DATA_DIR", fields.String(load_default=".l2u-relay"))
    log_level = _env("LOG_LEVEL", fields.String(load_default="INFO",
                                                validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR"])))
    console_password = _env("RELAY_CONSOLE_PASSWORD",
                            fields.String(load_default=None, validate=validate.Length(min=12)), secret=True)
    console_operators = _env("RELAY_CONSOLE_OPERATORS", CommaList(load_default=()))
    console_secret_key = _env("RELAY_CONSOLE_SECRET_KEY",
                              fields.String(load_default=None, validate=validate.Length(min=32)), secret=True)
    console_session_minutes = _env("RELAY_CONSOLE_SESSION_MINUTES",
                                   fields.Integer(load_default=60, validate=validate.Range(5, 1440)))

    locate2u_client_id = _env("LOCATE2U_CLIENT_ID", fields.String(load_default=None))
    locate2u_client_secret = _env("LOCATE2U_CLIENT_SECRET", fields.String(load_default=None), secret=True)
    locate2u_grant = _env("LOCATE2U_GRANT", fields.String(
        load_default="client_credentials", validate=validate.OneOf(["client_credentials", "authorization_code"])))
    locate2u_scope = _env("LOCATE2U_SCOPE", fields.String(load_default="integrations-api"))
    locate2u_api_url = _env("LOCATE2U_API_URL", HttpUrl(load_default="https://integration.locate2u.com"))
    locate2u_id_url = _env("LOCATE2U_ID_URL", HttpUrl(load_default="https://id.locate2u.com"))

    # The sinks' settings are added by settings_schema().
    flower_basic_auth = _env("FLOWER_BASIC_AUTH", fields.String(load_default=None), secret=True)
    token_keys = _env("RELAY_TOKEN_KEYS", CommaList(load_default=()), secret=True)
    metrics_token = _env("RELAY_METRICS_TOKEN", fields.String(load_default=None, validate=validate.Length(min=16)),
                         secret=True)
    metrics_basic_auth = _env("RELAY_METRICS_BASIC_AUTH", fields.String(load_default=None), secret=True)

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
        if "event_types" in data and not data["event_types"]:  # a subscriptions sync would delete every one
            problems["RELAY_EVENT_TYPES"] = ["names no event type; leave it unset for all eight"]
        for name in data.get("event_types", ()):
            if name not in EVENT_TYPES:
                problems["RELAY_EVENT_TYPES"] = [f"unknown event type {name!r}; known: {', '.join(EVENT_TYPES)}"]
        for sink in self.sinks:
            problems.update(_sink_problems(sink, data))
        if data.get("locate2u_client_id") and not data.get("locate2u_client_secret"):
            problems["LOCATE2U_CLIENT_SECRET"] = ["required when LOCATE2U_CLIENT_ID is set"]
        if data.get("redis_ca_file"):
            problem = _ca_file_problem(data)
            if problem:
                problems["RELAY_REDIS_CA_FILE"] = [problem]
        if data.get("flower_basic_auth") and ":" not in data["flower_basic_auth"]:
            problems["FLOWER_BASIC_AUTH"] = ["must be user:password"]
        if data.get("metrics_basic_auth") and ":" not in data["metrics_basic_auth"]:
            problems["RELAY_METRICS_BASIC_AUTH"] = ["must be user:password"]
        problem = "retry_schedule" in data and _retry_schedule_problem(data["retry_schedule"])
        if problem:
            problems["RELAY_RETRY_SCHEDULE"] = [problem]
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



def _sink_problems(sink, data):
    """``{variable: [message]}`` for the declared rules of ``sink`` that ``data`` breaks."""
    problems = {}
    for setting in sink.settings:
        problem = setting.check(data[setting.name]) if setting.check and data.get(setting.name) else None
        if problem:
            problems[setting.env] = [problem]
    for enabling in sink.enabled_by:
        if data.get(enabling.lower()):
            for required in sink.requires:
                if not data.get(required.lower()):
                    problems[required] = [f"required when {enabling} is set"]
    for first, second in sink.together:
        if bool(data.get(first.lower())) != bool(data.get(second.lower())):
            problems[second] = [f"{first} and {second} go together"]
    return problems


@functools.cache
def _schema_for(sinks):
    declared = {setting.name: _env(setting.env, setting.field, setting.secret)
                for sink in sinks for setting in sink.settings}
    return type("SettingsSchema", (RelaySettingsSchema,), {**declared, "sinks": sinks})


def settings_schema():
    """The schema class of every setting: the relay's own and those of the sinks registered now."""
    return _schema_for(tuple(SINKS.values()))


SettingsSchema = settings_schema()  # with the built-in sinks


@functools.cache
def _defaults(schema):
    """``{attribute: default}`` of ``schema``'s settings; ``missing`` for a required one."""
    return {name: field.load_default for name, field in schema().fields.items()}


def secret_settings():
    """Attributes of ``Settings`` whose values are secrets (to redact from the logs)."""
    return [name for name, field in settings_schema()().fields.items() if field.metadata.get("secret")]


class Settings:
    """Validated configuration, read-only. Build with ``from_env()`` or with keywords in tests.

    One attribute per field of ``settings_schema()`` (its name; the default when not given). Not a
    dataclass, whose fields are fixed when it is made: this schema grows when a sink registers.
    """

    def __init__(self, **values):
        defaults = _defaults(settings_schema())
        unknown = sorted(set(values) - set(defaults))
        absent = sorted(name for name, default in defaults.items() if default is missing and name not in values)
        if unknown or absent:
            raise TypeError(f"Settings(): unknown settings {unknown}, required settings missing {absent}")
        vars(self).update({**defaults, **values})

    def __getattr__(self, name):  # a setting of a sink registered after this object was made: its default
        default = _defaults(settings_schema()).get(name, missing)
        if default is missing:
            raise AttributeError(f"'Settings' object has no attribute {name!r}")
        return default

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    __delattr__ = __setattr__

    def __eq__(self, other):
        return vars(self) == vars(other) if isinstance(other, Settings) else NotImplemented

    def __hash__(self):
        return hash(tuple(sorted(vars(self).items())))

    def __repr__(self):
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in vars(self).items())})"

    @classmethod
    def from_env(cls, environ=None):
        """Read and validate the environment; raise ConfigError listing every problem."""
        environ = os.environ if environ is None else environ
        schema = settings_schema()()
        names = {field.data_key for field in schema.fields.values()}
        raw = {name: value for name, value in environ.items() if name in names and value != ""}
        try:
            data = schema.load(raw)
        except ValidationError as error:
            raise ConfigError({name: "; ".join(_flatten(messages))
                               for name, messages in error.normalized_messages().items()}) from None
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
        for name, field in settings_schema()().fields.items():
            value = getattr(self, name)
            if value is None or value == ():
                continue
            env[field.data_key] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        return env

    def replace(self, **changes):
        """A copy with ``changes``."""
        return type(self)(**{**vars(self), **changes})


def _flatten(messages):
    if isinstance(messages, dict):
        return [m for value in messages.values() for m in _flatten(value)]
    if isinstance(messages, list):
        return [m for value in messages for m in _flatten(value)]
    return [str(messages)]
