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
# A sink is enabled when any of these settings is set (its credentials).
SINK_CREDENTIALS = {
    "storepoint": ("storepoint_api_token",),
    "b2b": ("b2b_api_token", "b2b_username"),
    "locate": ("locate_api_token",),
    "deliverycom": ("deliverycom_access_token",),
    "forward": ("forward_urls",),
}


def configured_sink_names(settings):
    """Names of the sinks whose credentials are set (without importing connector code)."""
    return [name for name in SINK_NAMES if any(getattr(settings, attr) for attr in SINK_CREDENTIALS[name])]


def sink_class(name):
    module, _, attr = SINK_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def enabled_sinks(settings, redis):
    """``{name: Sink}`` for every sink whose credentials are configured."""
    return {name: sink_class(name).from_settings(settings, MappingStore(redis, name))
            for name in configured_sink_names(settings)}
