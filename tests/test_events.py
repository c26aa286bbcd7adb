from datetime import datetime, timedelta, timezone

import pytest
from marshmallow import ValidationError

from tests.payloads import PUBLISHED
from workers.domain.events import EVENT_TYPES, missing_key_field, parse_event


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_published_payload_parses(event_type):
    body = PUBLISHED[event_type]
    event = parse_event("d1", event_type, body)
    assert event.event_type == event_type
    assert event.entity == EVENT_TYPES[event_type].entity
    assert event.action_date.tzinfo is not None
    assert event.payload is body
    assert missing_key_field(event_type, body) is None


def test_action_dates_compare_as_instants_not_strings():
    later_in_sydney = parse_event("a", "stop.status-changed", PUBLISHED["stop.status-changed"])
    earlier_utc = parse_event("b", "stop.assigned", PUBLISHED["stop.assigned"])
    # 14:16+10:00 is 04:16 UTC, before 04:35 UTC although the string sorts after it.
    assert later_in_sydney.action_date < earlier_utc.action_date
    assert later_in_sydney.action_date == datetime(2022, 4, 27, 4, 16, 40, 945098, tzinfo=timezone.utc)
    assert later_in_sydney.action_date.utcoffset() == timedelta(hours=10)


def test_keys_and_status_are_normalized():
    event = parse_event("d", "shipment.assigned", PUBLISHED["shipment.assigned"])
    assert event.keys == {"stopId": 987938, "shipmentId": 28710}
    assert event.stop_id == 987938
    assert parse_event("d", "stop.status-changed", PUBLISHED["stop.status-changed"]).status == "Arrived"


def test_unknown_fields_are_kept():
    body = dict(PUBLISHED["stop.assigned"], brandNewField={"x": 1})
    event = parse_event("d", "stop.assigned", body)
    assert event.payload["brandNewField"] == {"x": 1}


@pytest.mark.parametrize("event_type, change, field, message", [
    ("stop.assigned", {"actionDate": None}, "actionDate", "Field may not be null."),
    ("stop.assigned", {"actionDate": "2022-04-27T04:35:56"}, "actionDate", "Not a valid aware datetime."),
    ("stop.assigned", {"actionDate": "yesterday"}, "actionDate", "Not a valid"),
    ("stop.assigned", {"stopId": "abc"}, "stopId", "Not a valid integer."),
    ("stop.status-changed", {"newStatus": None}, "newStatus", "Field may not be null."),
    ("shipment.assigned", {"shipmentId": None}, "shipmentId", "Field may not be null."),
    ("trip.assigned", {"tripDate": "27/04/2022"}, "tripDate", "Not a valid date."),
    ("trip.assigned", {"assignedTo": "Mark"}, "assignedTo", "Invalid input type."),
])
def test_malformed_variants_name_the_field(event_type, change, field, message):
    body = dict(PUBLISHED[event_type], **change)
    with pytest.raises(ValidationError) as caught:
        parse_event("d", event_type, body)
    assert message in str(caught.value.messages[field])


def test_missing_required_fields():
    body = {k: v for k, v in PUBLISHED["stop.status-changed"].items() if k not in ("actionDate", "newStatus")}
    with pytest.raises(ValidationError) as caught:
        parse_event("d", "stop.status-changed", body)
    assert set(caught.value.messages) == {"actionDate", "newStatus"}


def test_note_must_belong_to_a_stop_shipment_or_trip():
    body = {"actionDate": "2022-04-27T06:10:00+00:00", "text": "orphan"}
    assert missing_key_field("note.created", body) == "stopId or shipmentId or tripId"
    with pytest.raises(ValidationError) as caught:
        parse_event("d", "note.created", body)
    assert "one of stopId, shipmentId, tripId is required" in caught.value.messages["stopId"]


@pytest.mark.parametrize("event_type, field", [("stop.assigned", "stopId"), ("shipment.assigned", "shipmentId"),
                                               ("shipment.status-changed", "shipmentId"), ("trip.created", "tripId")])
def test_missing_key_field_is_named(event_type, field):
    body = dict(PUBLISHED[event_type], **{field: None})
    assert missing_key_field(event_type, body) == field
