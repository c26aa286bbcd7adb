"""Locate2u event types, their marshmallow schemas, and the normalized event.

The webhook body carries no event type: it comes from the URL. Each type has
a mapping row (entity kind, key fields) and a schema; unknown fields are kept,
dates become aware datetimes, and only what breaks processing is rejected.
"""
import dataclasses
import functools
from datetime import datetime

from marshmallow import INCLUDE, Schema, ValidationError, fields, validates_schema

from workers.domain.instants import exact_text


@dataclasses.dataclass(frozen=True)
class EventType:
    entity: str
    key_fields: tuple  # all required; an empty tuple means "any one of ANY_ENTITY_KEYS"


ANY_ENTITY_KEYS = ("stopId", "shipmentId", "tripId")

EVENT_TYPES = {
    "stop.assigned": EventType("stop", ("stopId",)),
    "stop.status-changed": EventType("stop", ("stopId",)),
    "shipment.assigned": EventType("shipment", ("stopId", "shipmentId")),
    "shipment.status-changed": EventType("shipment", ("shipmentId",)),
    "trip.status-changed": EventType("trip", ("tripId",)),
    "trip.created": EventType("trip", ("tripId",)),
    "trip.assigned": EventType("trip", ("tripId",)),
    "note.created": EventType("note", ()),
}


def missing_key_field(event_type, body):
    """Name the key field ``body`` lacks for ``event_type``, or return None."""
    key_fields = EVENT_TYPES[event_type].key_fields
    if not key_fields:
        present = [name for name in ANY_ENTITY_KEYS if body.get(name) is not None]
        return None if present else " or ".join(ANY_ENTITY_KEYS)
    for name in key_fields:
        if body.get(name) is None:
            return name
    return None


class Person(Schema):
    class Meta:
        unknown = INCLUDE

    name = fields.String(allow_none=True)
    id = fields.String(allow_none=True)


class EventSchema(Schema):
    """Fields every delivery has; subclasses add their keys."""

    class Meta:
        unknown = INCLUDE

    actionDate = fields.AwareDateTime(required=True)
    tripDate = fields.Date(allow_none=True)
    source = fields.String(allow_none=True)
    sourceReference = fields.String(allow_none=True)
    assignedTo = fields.Nested(Person, allow_none=True)


class EntityId(fields.Integer):
    """An id as a JSON integer or a string of one ("42"); 4.2 is refused, never truncated to entity 4."""

    def _validated(self, value):
        if isinstance(value, float) and not value.is_integer():
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


def _id(required=True):
    return EntityId(required=required, allow_none=not required, strict=False)


class StatusChange(Schema):
    class Meta:
        unknown = INCLUDE

    oldStatus = fields.String(allow_none=True)
    newStatus = fields.String(required=True)
    notes = fields.String(allow_none=True)
    location = fields.Raw(allow_none=True)


class StopAssigned(EventSchema):
    stopId = _id()
    stopRef = fields.String(allow_none=True)
    shipmentId = _id(required=False)


class StopStatusChanged(StopAssigned, StatusChange):
    changedByUser = fields.Nested(Person, allow_none=True)


class ShipmentAssigned(EventSchema):
    stopId = _id()
    shipmentId = _id()
    stopRef = fields.String(allow_none=True)


class ShipmentStatusChanged(EventSchema, StatusChange):
    shipmentId = _id()
    shipmentRef = fields.String(allow_none=True)


class TripEvent(EventSchema):
    tripId = _id()
    assignedFrom = fields.Nested(Person, allow_none=True)


class TripStatusChanged(TripEvent, StatusChange):
    pass


class NoteCreated(EventSchema):
    stopId = _id(required=False)
    shipmentId = _id(required=False)
    tripId = _id(required=False)

    @validates_schema
    def _belongs_somewhere(self, data, **kwargs):
        if all(data.get(name) is None for name in ANY_ENTITY_KEYS):
            raise ValidationError(f"one of {', '.join(ANY_ENTITY_KEYS)} is required", "stopId")


SCHEMAS = {
    "stop.assigned": StopAssigned,
    "stop.status-changed": StopStatusChanged,
    "shipment.assigned": ShipmentAssigned,
    "shipment.status-changed": ShipmentStatusChanged,
    "trip.status-changed": TripStatusChanged,
    "trip.created": TripEvent,
    "trip.assigned": TripEvent,
    "note.created": NoteCreated,
}


@dataclasses.dataclass(frozen=True)
class Event:
    """One normalized delivery: type, entity keys, aware action date, raw payload."""

    delivery_id: str
    event_type: str
    entity: str
    keys: dict
    action_date: datetime
    status: str | None
    payload: dict

    @property
    def stop_id(self):
        return self.keys.get("stopId")

    @property
    def version(self):
        """``action_date`` in ISO 8601 with every fractional digit the body gave (up to nanoseconds)."""
        return exact_text(self.action_date, self.payload.get("actionDate"))

    def to_json(self):
        """A JSON-safe dict (for forwarding and task arguments)."""
        return {"delivery_id": self.delivery_id, "event_type": self.event_type, "entity": self.entity,
                "keys": self.keys, "action_date": self.version, "status": self.status,
                "payload": self.payload}


@functools.cache
def _schema(event_type):
    """One instance per event type: building a schema deep-copies its declared fields, which took as
    long as the ``load`` itself in a cProfile of the worker; ``load`` keeps no state in it."""
    return SCHEMAS[event_type]()


def parse_event(delivery_id, event_type, body):
    """Validate ``body`` with its type's schema; raise ValidationError naming fields."""
    data = _schema(event_type).load(body)
    keys = {name: data[name] for name in ANY_ENTITY_KEYS if data.get(name) is not None}
    return Event(delivery_id=delivery_id, event_type=event_type, entity=EVENT_TYPES[event_type].entity,
                 keys=keys, action_date=data["actionDate"], status=data.get("newStatus"), payload=body)
