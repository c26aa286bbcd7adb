"""Which events go to which sink, with which action: built-in defaults and a YAML file.

A routes file maps sink names to a route; every key is optional and falls
back to the default route of that sink::

    storepoint:
      events: [stop.assigned, stop.status-changed, shipment.assigned]
      statuses: []                 # only these statuses (empty: all)
      action: upsert               # upsert | deactivate | delete | skip
      on_status: {Cancelled: delete}
      on_event: {}                 # event type -> action
      key: "l2u-stop-{stopId}"
      fields: {name: "{stopRef} {name}", cf_abc: "{stopId}"}
      options: {require_coordinates: true}
      ordered: true                # skip events older than the last applied one
      rate_limit: {rate: 50, burst: 100}
      breaker: {threshold: 5, cooldown: 30}

A mistake stops start-up with the file, line and field at fault. A sink's
default route, and whether it needs the stop, are declared by its class.
"""
import collections.abc
import dataclasses
import string

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from workers.config import ConfigError
from workers.domain.events import EVENT_TYPES
from workers.sinks import SINKS
from workers.sinks.base import ACTIONS

ROUTE_ACTIONS = ACTIONS + ("skip",)
STOP_EVENTS = ("stop.assigned", "stop.status-changed", "shipment.assigned")


@dataclasses.dataclass(frozen=True)
class Route:
    """How one sink takes events."""

    sink: str
    events: tuple = STOP_EVENTS
    statuses: tuple = ()
    action: str = "upsert"
    on_status: dict = dataclasses.field(default_factory=dict)
    on_event: dict = dataclasses.field(default_factory=dict)
    key: str = "l2u-stop-{stopId}"
    fields: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)
    ordered: bool = True
    rate_limit: dict = dataclasses.field(default_factory=lambda: {"rate": 50.0, "burst": 100})
    breaker: dict = dataclasses.field(default_factory=lambda: {"threshold": 5, "cooldown": 30.0})

    @property
    def needs_stop(self):
        """Location sinks need the stop record fetched from Locate2u (the sink class's ``needs_stop``)."""
        return self.sink in SINKS and SINKS[self.sink].needs_stop

    def action_for(self, event):
        """The action for ``event``, or None when this route does not take it."""
        if event.event_type not in self.events:
            return None
        if self.statuses and event.status not in self.statuses:
            return None
        action = self.on_status.get(event.status) or self.on_event.get(event.event_type) or self.action
        return None if action == "skip" else action


class _DefaultRoutes(collections.abc.Mapping):
    """``{name: Route}`` of every registered sink, from its class's ``default_route``."""

    def __getitem__(self, name):
        return Route(name, **SINKS[name].default_route)

    def __iter__(self):
        return iter(SINKS)

    def __len__(self):
        return len(SINKS)


DEFAULT_ROUTES = _DefaultRoutes()


def _template(value):
    """Reject at load time what ``render`` could not fill for every event: a malformed format string,
    and any replacement field other than a bare ``{name}`` (``{}``, ``{0}``, ``{name.attr}``,
    ``{name[0]}``, ``{name!x}``, ``{name:d}``: each raised for events without such a value)."""
    try:
        names = [(name, conversion, spec) for _, name, spec, conversion in string.Formatter().parse(value)
                 if name is not None]
    except ValueError as exc:
        raise ValidationError(f"bad template {value!r}: {exc}") from None
    for name, conversion, spec in names:
        if not name.isidentifier() or conversion or spec:
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValidationError(f"bad template {value!r}: {field} is not a field name in braces, e.g. {{stopId}}")


class RateLimitSchema(Schema):
    class Meta:
        unknown = RAISE

    rate = fields.Float(required=True, validate=validate.Range(min=0.01))
    burst = fields.Integer(required=True, validate=validate.Range(min=1))


class BreakerSchema(Schema):
    class Meta:
        unknown = RAISE

    threshold = fields.Integer(required=True, validate=validate.Range(min=1))
    cooldown = fields.Float(required=True, validate=validate.Range(min=0.1))


class RouteSchema(Schema):
    class Meta:
        unknown = RAISE

    events = fields.List(fields.String(validate=validate.OneOf(EVENT_TYPES)))
    statuses = fields.List(fields.String())
    action = fields.String(validate=validate.OneOf(ROUTE_ACTIONS))
    on_status = fields.Dict(keys=fields.String(), values=fields.String(validate=validate.OneOf(ROUTE_ACTIONS)))
    on_event = fields.Dict(keys=fields.String(validate=validate.OneOf(EVENT_TYPES)),
                           values=fields.String(validate=validate.OneOf(ROUTE_ACTIONS)))
    key = fields.String(validate=_template)
    fields_ = fields.Dict(data_key="fields", keys=fields.String(), values=fields.String(validate=_template))
    options = fields.Dict(keys=fields.String())
    ordered = fields.Boolean()
    rate_limit = fields.Nested(RateLimitSchema)
    breaker = fields.Nested(BreakerSchema)

    @validates("key")
    def _key_not_empty(self, value, **kwargs):
        if not value.strip():
            raise ValidationError("the key template may not be empty")


def routes_file_schema():
    """The schema of a routes file: a route per registered sink name."""
    return Schema.from_dict({name: fields.Nested(RouteSchema, allow_none=True) for name in SINKS})


class _Blank(dict):
    def __missing__(self, key):
        return ""


def render(template, context):
    """Fill ``template`` from ``context``; a name with no value renders empty."""
    return string.Formatter().vformat(template, (), _Blank(context))


def _load_yaml(path):
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError({"RELAY_ROUTES_FILE": f"{path}: cannot read it: {exc.strerror}"}) from None
    except UnicodeDecodeError as exc:
        raise ConfigError({"RELAY_ROUTES_FILE": f"{path}: cannot read it: not UTF-8 (byte {exc.start})"}) from None
    try:
        return yaml.safe_load(text) or {}, yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError({"RELAY_ROUTES_FILE": f"{path}: not valid YAML: {exc}"}) from None


def _line_of(node, path):
    """The 1-based line of the YAML node at ``path`` (keys), as far as it exists."""
    line = node.start_mark.line + 1 if node is not None else 1
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            break
        match = [(k, v) for k, v in node.value if k.value == key]
        if not match:
            break
        key_node, node = match[0]
        line = key_node.start_mark.line + 1
    return line


def _problems(messages, root, path=()):
    for name, value in messages.items():
        if isinstance(value, dict):
            yield from _problems(value, root, path + (name,))
        else:
            where = ".".join(map(str, path + (name,)))
            yield f"line {_line_of(root, [str(p) for p in path + (name,)])}: {where}: {'; '.join(map(str, value))}"


def load_routes(path=None):
    """The routes in force: defaults, overridden per sink by the YAML file at ``path``."""
    if not path:
        return dict(DEFAULT_ROUTES)
    data, root = _load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError({"RELAY_ROUTES_FILE": f"{path}: line 1: the file must map sink names to routes"})
    unknown = sorted(set(data) - set(SINKS), key=str)  # a name YAML read as a number or null too
    problems = [f"line {_line_of(root, [name])}: {name}: unknown sink; known: {', '.join(SINKS)}"
                for name in unknown]
    try:
        loaded = routes_file_schema()().load({name: value for name, value in data.items() if name in SINKS})
    except ValidationError as exc:
        problems += list(_problems(exc.normalized_messages(), root))
        loaded = {}
    if problems:
        raise ConfigError({"RELAY_ROUTES_FILE": f"{path}:\n    " + "\n    ".join(problems)})
    routes = dict(DEFAULT_ROUTES)
    for name, overrides in loaded.items():
        if overrides is None:
            continue
        overrides["fields"] = overrides.pop("fields_", DEFAULT_ROUTES[name].fields)
        for name_of_tuple in ("events", "statuses"):
            if name_of_tuple in overrides:
                overrides[name_of_tuple] = tuple(overrides[name_of_tuple])
        routes[name] = dataclasses.replace(DEFAULT_ROUTES[name], **overrides)
    return routes
