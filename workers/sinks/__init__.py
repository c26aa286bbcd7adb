"""Registry of sinks: name → class, and the ones enabled by configuration."""
import importlib

from workers.stores import MappingStore

SINK_CLASSES = {
    "storepoint": "workers.sinks.storepoint:StorepointSink",
    "b2b": "workers.sinks.b2b:B2BSink",
    "locate": "workers.sinks.locate:LocateSink",
    "deliverycom": "workers.sinks.deliverycom:DeliverycomSink",
    "forward": "workers.sinks.forward:ForwardSink",
}
SINK_NAMES = tuple(SINK_CLASSES)


def sink_class(name):
    module, _, attr = SINK_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def enabled_sinks(settings, redis):
    """``{name: Sink}`` for every sink whose credentials are configured."""
    sinks = {}
    for name in SINK_NAMES:
        try:
            cls = sink_class(name)
        except ModuleNotFoundError:
            continue
        if cls.enabled(settings):
            sinks[name] = cls.from_settings(settings, MappingStore(redis, name))
    return sinks
