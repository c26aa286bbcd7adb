"""What a setting is: its marshmallow field types and a sink's declaration of one.

No imports from the rest of the relay, so a sink module declares its settings
without importing ``workers.config`` (which reads every sink's declarations).
"""
import dataclasses
from collections.abc import Callable

from marshmallow import fields


class CommaList(fields.Field):
    """A comma-separated environment value as a tuple of stripped strings."""

    def _deserialize(self, value, attr, data, **kwargs):
        return tuple(part.strip() for part in str(value).split(",") if part.strip())


class HttpUrl(fields.Url):
    """An http(s) URL; loopback hosts allowed so tests can use simulators."""

    def __init__(self, **kwargs):
        super().__init__(schemes={"http", "https"}, require_tld=False, **kwargs)


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
