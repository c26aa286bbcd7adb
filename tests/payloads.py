"""The published Locate2u webhook payloads (../shared/spec/locate2u-webhook-events.md) and test builders."""
PUBLISHED = {
    "stop.assigned": {
        "stopId": 987786, "stopRef": "L20222704I1H4ZE", "tripDate": "2022-04-27", "shipmentId": None,
        "actionDate": "2022-04-27T04:35:56.1148299+00:00",
        "assignedTo": {"name": "John Doe", "id": "a2e3014b-f5a2-418b-9bed-38eb5c9b5217"},
        "source": None, "sourceReference": None},
    "stop.status-changed": {
        "stopId": 987786, "stopRef": "L20222704I1H4ZE", "tripDate": "2022-04-27", "shipmentId": None,
        "actionDate": "2022-04-27T14:16:40.9450989+10:00", "oldStatus": "Enroute", "newStatus": "Arrived",
        "notes": None, "location": None,
        "assignedTo": {"name": "Filbert Nicholas", "id": "a823361e-9d40-4438-bb28-b2b58cdb957e"},
        "changedByUser": {"name": "Filbert Nicholas", "id": "a823361e-9d40-4438-bb28-b2b58cdb957e"},
        "source": None, "sourceReference": None},
    "shipment.assigned": {
        "stopId": 987938, "stopRef": "LSS202227045MN8J8-P", "tripDate": "2022-04-27", "shipmentId": 28710,
        "actionDate": "2022-04-27T04:38:35.3001748+00:00",
        "assignedTo": {"name": "Filbert Nicholas", "id": "a823361e-9d40-4438-bb28-b2b58cdb957e"},
        "source": None, "sourceReference": None},
    "shipment.status-changed": {
        "shipmentId": 28710, "shipmentRef": "LSS202227045MN8J8", "tripDate": "2022-04-27",
        "actionDate": "2022-04-27T14:42:12.6568123+10:00", "oldStatus": "On Hold",
        "newStatus": "Enroute to Pickup", "notes": None, "location": None},
    "trip.assigned": {
        "tripId": 46659, "tripDate": "2022-04-27", "actionDate": "2022-04-27T04:46:36.907+00:00",
        "assignedTo": {"name": "Mark Dean", "id": "a6dd0d67-60d2-41e3-8507-36200ddbe975"},
        "assignedFrom": {"name": "Mark Dean", "id": "a6dd0d67-60d2-41e3-8507-36200ddbe975"}},
    # Not published: shaped as the spec says to expect.
    "trip.status-changed": {"tripId": 46659, "tripDate": "2022-04-27",
                            "actionDate": "2022-04-27T05:00:00.0000001+00:00",
                            "oldStatus": "Pending", "newStatus": "Started"},
    "trip.created": {"tripId": 46660, "tripDate": "2022-04-28", "actionDate": "2022-04-27T06:00:00+00:00"},
    "note.created": {"stopId": 987786, "actionDate": "2022-04-27T06:10:00.1234567+10:00",
                     "text": "Left at the back door", "files": ["photo-1.jpg"]},
}


def status_change(stop_id, status, action_date, old="Enroute"):
    """A ``stop.status-changed`` body for ``stop_id``."""
    body = dict(PUBLISHED["stop.status-changed"])
    body.update(stopId=stop_id, newStatus=status, oldStatus=old, actionDate=action_date)
    return body
