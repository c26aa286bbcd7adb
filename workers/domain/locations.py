"""The canonical location a stop becomes, as every location sink receives it."""
import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Location:
    """One stop as a location, keyed by a stable external key, versioned by ``actionDate``.

    ``fields`` holds per-route field overrides already rendered (sink-specific
    names such as Storepoint custom field ids); ``event`` is the normalized
    event (JSON) that produced this version.
    """

    key: str
    version: str
    stop_id: int | None = None
    name: str | None = None
    address: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    contact_name: str | None = None
    contact_phone: str | None = None
    contact_email: str | None = None
    status: str | None = None
    notes: str | None = None
    fields: dict = dataclasses.field(default_factory=dict)
    event: dict = dataclasses.field(default_factory=dict)

    @property
    def cancelled(self):
        return (self.status or "").lower() == "cancelled"

    @property
    def has_coordinates(self):
        return self.latitude is not None and self.longitude is not None

    def to_json(self):
        """A dict of every attribute, ``fields`` and ``event`` copied one level deep (all a caller
        changes); ``dataclasses.asdict``'s deep copy took 40 times as long in a cProfile of the worker."""
        data = {name: getattr(self, name) for name in _ATTRIBUTES}
        data.update(fields=dict(self.fields), event=dict(self.event))
        return data

    @classmethod
    def from_json(cls, data):
        return cls(**data)


_ATTRIBUTES = tuple(field.name for field in dataclasses.fields(Location))


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The fields of a stop record a location is built from: (path, check, what it must be).
_TEXT = (lambda value: isinstance(value, str), "text")
_OBJECT = (lambda value: isinstance(value, dict), "an object")
_NUMBER = (_is_number, "a number")
_STOP_FIELDS = (("name", _TEXT), ("address", _TEXT), ("notes", _TEXT), ("status", _TEXT), ("contact", _OBJECT),
                ("contact.name", _TEXT), ("contact.phone", _TEXT), ("contact.email", _TEXT), ("location", _OBJECT),
                ("location.latitude", _NUMBER), ("location.longitude", _NUMBER))


def stop_record_problem(stop):
    """What in a ``GET /v1/Stops/{id}`` record a location cannot be built from (naming the field), or
    None. Only the fields read are checked (a null is fine); every other field is kept as it came."""
    for path, (check, rule) in _STOP_FIELDS:
        parent, _, name = path.rpartition(".")
        holder = stop.get(parent) if parent else stop
        value = holder.get(name) if isinstance(holder, dict) else None
        if value is not None and not check(value):
            shown = repr(value)
            return f"{path} is {shown[:80] + '…' if len(shown) > 80 else shown}, not {rule}"
    return None


def location_from_stop(stop, event, key, fields=None):
    """Build the canonical location from a ``GET /v1/Stops/{id}`` record and the event.

    The event's own status (``newStatus``) wins over the fetched stop's, since
    the stop may already have moved on; the version is always the event's.
    """
    contact = stop.get("contact") or {}
    point = stop.get("location") or {}
    return Location(
        key=key, version=event["action_date"], stop_id=stop.get("stopId"), name=stop.get("name"),
        address=stop.get("address"), latitude=point.get("latitude"), longitude=point.get("longitude"),
        contact_name=contact.get("name"), contact_phone=contact.get("phone"), contact_email=contact.get("email"),
        status=event.get("status") or stop.get("status"), notes=stop.get("notes"), fields=dict(fields or {}),
        event=event,
    )
