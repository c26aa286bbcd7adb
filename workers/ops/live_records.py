"""What a sink holds now for one of our keys, read live through the sink's own client, against what we wrote.

A live read runs in a web request (the console's stop page), so it gets ``PAGE_TIMEOUT``, not the sink's own.

The fields are flattened the way each sink's ``reconcile`` flattens its listing, so
the comparison with the snapshot ``Sink.remember`` kept is the same drift check.
"""
import json

from workers.resilience.errors import RelayError
from workers.resilience.http import PAGE_TIMEOUT
from workers.sinks.b2b import listed_fields
from workers.sinks.storepoint import flatten
from workers.store.mappings import MappingStore


def _storepoint(sink, remote_id):
    response = sink.call("GET", f"locations/{remote_id}", accept=(404,), timeout=PAGE_TIMEOUT)
    return None if response.status_code == 404 else flatten(sink.client.answer(response, "location"))


def _b2b(sink, remote_id):
    response = sink.call("GET", "Location/getLocation", params={"id": remote_id}, accept=(404,), timeout=PAGE_TIMEOUT)
    data = [] if response.status_code == 404 else sink.client.answer(response, needs=("data",))["data"] or []
    return listed_fields(data[0]) if data else None


READERS = {"storepoint": _storepoint, "b2b": _b2b}


def written(client, sink_name, key):
    """The flat fields we last wrote to ``sink_name`` for ``key`` (kept by ``Sink.remember``), or {}."""
    return json.loads(MappingStore(client, f"{sink_name}:written").get(key) or "{}")


def compare(sink, key):
    """``{"remote_id", "written", "live", "drift", "error"}`` for one key of one sink.

    ``live`` is None when the record is gone there (or the sink cannot be read live:
    ``error`` says which); ``drift`` lists the fields whose live value differs from ours.
    """
    remote_id = sink.mappings.get(key)
    ours = written(sink.mappings.redis, sink.name, key)
    result = {"remote_id": remote_id, "written": ours, "live": None, "drift": [], "error": None}
    reader = READERS.get(sink.name)
    if reader is None:
        result["error"] = f"{sink.name} cannot be read back one record at a time"
    elif remote_id is None:
        result["error"] = "no mapping: nothing written there for this key"
    else:
        try:
            result["live"] = reader(sink, remote_id)
        except RelayError as exc:
            result["error"] = exc.message
        else:
            if result["live"] is None:
                result["error"] = "gone there"
    if result["live"] is not None:
        result["drift"] = sorted(name for name, value in ours.items() if result["live"].get(name) != value)
    return result
