"""Registry of sinks: name → class, and the ones enabled by configuration.

Each sink class describes itself (``workers.sinks.base.Sink``: settings, credentials rule,
default route, whether it needs the stop); configuration, routes, log redaction and app.json
read those declarations from here. A sink is added by importing its class below, or at run
time with ``register`` (a test's throwaway sink).
"""
from workers.sinks.b2b import B2BSink
from workers.sinks.deliverycom import DeliverycomSink
from workers.sinks.forward import ForwardSink
from workers.sinks.locate import LocateSink
from workers.sinks.storepoint import StorepointSink
from workers.store.mappings import MappingStore

BUILT_IN = (StorepointSink, B2BSink, LocateSink, DeliverycomSink, ForwardSink)
SINKS = {}  # name -> class, every registered sink
SINK_NAMES = tuple(sink.name for sink in BUILT_IN)


def register(sink):
    """Add the sink class ``sink`` under its ``name``; its rules may name only variables it declares."""
    declared = {setting.env for setting in sink.settings}
    named = {*sink.enabled_by, *sink.requires, *(env for pair in sink.together for env in pair)}
    if not sink.name or sink.name in SINKS:
        raise ValueError(f"a sink needs a name not registered yet: {sink.name!r}")
    if not named <= declared:
        raise ValueError(f"sink {sink.name} names undeclared settings: {', '.join(sorted(named - declared))}")
    SINKS[sink.name] = sink
    return sink


def unregister(name):
    """Remove the sink registered as ``name``."""
    del SINKS[name]


for _sink in BUILT_IN:
    register(_sink)


def sink_class(name):
    return SINKS[name]


def configured_sink_names(settings):
    """Names of the sinks whose credentials (any of ``enabled_by``) are set."""
    return [name for name, sink in SINKS.items() if any(getattr(settings, env.lower()) for env in sink.enabled_by)]


def enabled_sinks(settings, redis):
    """``{name: Sink}`` for every sink whose credentials are configured."""
    return {name: sink_class(name).from_settings(settings, MappingStore(redis, name))
            for name in configured_sink_names(settings)}
