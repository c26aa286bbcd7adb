"""What a setting is: its marshmallow field types and a sink's declaration of one.

No imports from the rest of the relay, so a sink module declares its settings
without importing ``workers.config`` (which reads every sink's declarations).
"""
import dataclasses
from collections.abc import Callable
from urllib.parse import urlsplit

from marshmallow import ValidationError, fields


class CommaList(fields.Field):
    """A comma-separated environment value as a tuple of stripped strings."""

    def _deserialize(self, value, attr, data, **kwargs):
        return tuple(part.strip() for part in str(value).split(",") if part.strip())


class HttpUrl(fields.Url):
    """An http(s) URL; loopback hosts allowed so tests can use simulators."""

    def __init__(self, **kwargs):
        super().__init__(schemes={"http", "https"}, require_tld=False, **kwargs)


class ServiceUrl(fields.String):
    """The URL a client connects to a service with (``REDIS_URL``, ``CELERY_BROKER_URL``): one of
    ``schemes``, a host and port that can be read. A problem never shows the value: it may hold a password."""

    def __init__(self, schemes, **kwargs):
        super().__init__(**kwargs)
        self.schemes = schemes

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - reading it checks it
        except ValueError as exc:
            raise ValidationError(f"not a URL a client can use: {exc}") from None
        if parts.scheme not in self.schemes:
            shown = f"{parts.scheme}://" if parts.scheme else "no scheme"
            allowed = ", ".join(f"{scheme}://" for scheme in self.schemes[:-1]) + f" or {self.schemes[-1]}://"
            raise ValidationError(f"must start with {allowed}, not {shown}")
        return value


@dataclasses.dataclass(frozen=True)
class SinkSetting:
    """One environment variable a sink reads, as ``Settings.<the variable's name in lower case>``.

    ``field`` is its marshmallow field (type, ``load_default``, validation); ``description`` is
    app.json's; a ``secret`` value is redacted from every log line; ``check(value)`` returns a
    problem or None and runs with config's cross-checks, on a value that is set.
    """

    env: str
    field: fields.Field
    description: str
    secret: bool = False
    check: Callable[[object], str | None] | None = None

    @property
    def name(self):
        """The attribute of ``Settings`` holding it."""
        return self.env.lower()
