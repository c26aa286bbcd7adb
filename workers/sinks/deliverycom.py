"""Delivery.com customer locations: a stop's address on the customer's account.

The one-line stop address is split with ``workers.domain.addresses`` (usaddress) and
checked against every rule of the create endpoint before anything is sent;
Delivery.com verifies addresses against USPS, so only US addresses map.
Delivery.com has no field for our key: the ``location_id`` is kept in the
mapping store, and before creating we look for the same address already on
the account (``GET /customer/location?latitude&longitude``). A create whose
answer was lost (``CreateGuard``) is looked for in the account's list by the
address we sent, so its retry does not add it a second time.
"""
import json
import logging
import re

from marshmallow import fields

from workers.domain.addresses import split_us_address, street_door
from workers.resilience.errors import PermanentError
from workers.resilience.http import HttpClient
from workers.settings_fields import HttpUrl, SinkSetting
from workers.sinks.base import Sink, sink_fields
from workers.sinks.create_guard import GuardedCreates

log = logging.getLogger(__name__)

PATH = "customer/location"

# The seed's create rules: field -> (least, most) characters.
RULES = {"street": (5, None), "city": (2, None), "state": (2, 2), "zip_code": (5, 5), "phone": (10, 12)}
# Delivery.com field -> Location attribute, besides the parsed address parts.
LOCATION_FIELDS = {"company": "name", "phone": "contact_phone"}
# What Delivery.com stores per location, compared by reconcile.
STORED_FIELDS = ("street", "unit_number", "city", "state", "zip_code", "phone", "company", "cross_streets")

DEFAULT_OPTIONS = {
    # Phone sent when the stop has no contact phone (Delivery.com requires one).
    "default_phone": None,
    # Look for the same address on the account (by coordinates) before creating one.
    "match_existing": True,
}


def rule_violations(body):
    """``{field: reason}`` for every seed rule that ``body`` breaks."""
    problems = {}
    for field, (least, most) in RULES.items():
        value = body.get(field)
        size = len(value.strip()) if isinstance(value, str) else 0
        if least <= size <= (most or size):
            continue
        wanted = f"exactly {least}" if least == most else f"{least}-{most}" if most else f"at least {least}"
        found = f"has {size}" if size else "is missing"
        problems[field] = f"{field} {found} characters; Delivery.com requires {wanted}"
    return problems


def normalize_phone(text):
    """The digits of a phone number, without a leading US country code (``+1 212-555-0123`` → ``2125550123``)."""
    digits = re.sub(r"\D", "", text or "")
    return digits[1:] if len(digits) == 11 and digits.startswith("1") else digits


def stored(location):
    """A Delivery.com location as flat comparable fields (absent optional fields as "")."""
    return {field: location.get(field) or "" for field in STORED_FIELDS}


def codes(body):
    """The ``code`` of every message in a Delivery.com answer body (text or dict)."""
    try:
        body = json.loads(body) if isinstance(body, str) else body
    except ValueError:
        return set()
    messages = body.get("message") if isinstance(body, dict) else None
    return {message.get("code") for message in messages if isinstance(message, dict)} \
        if isinstance(messages, list) else set()


class DeliverycomSink(GuardedCreates, Sink):
    """Customer locations: create, update (PUT) and delete (DELETE) by ``location_id``."""

    name = "deliverycom"
    settings = (
        SinkSetting("DELIVERYCOM_API_URL", HttpUrl(load_default="https://api.delivery.com"),
                    "Delivery.com API base URL."),
        SinkSetting("DELIVERYCOM_ACCESS_TOKEN", fields.String(load_default=None),
                    "Delivery.com OAuth access token (enables the Delivery.com sink).", secret=True),
    )
    enabled_by = ("DELIVERYCOM_ACCESS_TOKEN",)
    default_route = {"on_status": {"Cancelled": "skip"}}

    @classmethod
    def from_settings(cls, settings, mappings):
        token = settings.deliverycom_access_token
        client = HttpClient(settings.deliverycom_api_url, redact=(token,),
                            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
        return cls(client, mappings)

    def upsert(self, location, options):
        """Update the mapped (or an equal existing) address, else create it; return its ``location_id``."""
        options = {**DEFAULT_OPTIONS, **options}
        body = self.payload(location, options)
        location_id = self.mappings.get(location.key)
        # what an earlier create of ours left comes before an address already there (``_create``)
        if location_id is None and options["match_existing"] and not self._guard.pending(location.key):
            location_id = self._existing(location, body)
        creating = location_id is None
        answer = self._create(location.key, body) if creating else self._update(location.key, location_id, body)
        location_id = str(answer["location_id"])
        self.remember(location.key, location_id, stored(answer))
        if creating:  # only once the mapping is saved: a worker killed before it leaves the mark to the retry
            self._guard.done(location.key)
        return location_id

    def _create(self, key, body):
        """Create the address, unless an earlier attempt left it (``CreateGuard``): then update that one."""
        answer, created = self._guard.create(
            key, lambda: self.client.answer(self.call("POST", PATH, json=body), "location", needs=("location_id",)),
            lambda _key: self._same_address(body))
        if not created:
            log.info("deliverycom: %s was created by an interrupted attempt (%s); updating it", key,
                     answer["location_id"])
            answer = self._update(key, str(answer["location_id"]), body)
        return answer

    def delete(self, location, options):
        """Delete the address we mapped for ``location``; one unmapped or already gone is a success."""
        location_id = self.mappings.get(location.key)
        intent = None if location_id else self._guard.pending(location.key)
        if intent:
            body = self.payload(location, {**DEFAULT_OPTIONS, **options})
            left = self._guard.left_by(location.key, intent, lambda _key: self._same_address(body))
            location_id = left and str(left["location_id"])
        if location_id is None:
            log.info("deliverycom: no address mapped for %s; nothing to delete", location.key)
        else:
            try:
                self.call("DELETE", f"{PATH}/{location_id}")
            except PermanentError as error:
                if "bad_loc_id" not in codes(error.body):
                    raise
            self.forget(location.key)
        if intent:  # only once the address it may have left is gone
            self._guard.done(location.key)
        return location_id

    def reconcile(self, since=None):
        """Compare the account's addresses with our mappings (no marker there: unmapped ones are unknown)."""
        keys = {location_id: key for key, location_id in self.mappings.all().items()}
        return self.compare_listing((keys.get(str(item["location_id"])), str(item["location_id"]), stored(item))
                                    for item in self._account_addresses())

    def payload(self, location, options):
        """The create/update body for ``location``; PermanentError naming each field that cannot be sent."""
        parts = split_us_address(location.address)
        if not parts.us:
            raise PermanentError(f"cannot send {location.key} to Delivery.com, which takes US addresses only: "
                                 f"{parts.problem}")
        body = {"street": parts.street, "unit_number": parts.unit or None, "city": parts.city,
                "state": parts.state, "zip_code": parts.zip_code}
        body.update({field: getattr(location, attribute) for field, attribute in LOCATION_FIELDS.items()})
        body["phone"] = normalize_phone(body["phone"] or options["default_phone"])
        body.update(sink_fields(location))
        problems = rule_violations(body)
        if problems:
            raise PermanentError(f"cannot send {location.key} to Delivery.com: " + "; ".join(problems.values()))
        return body

    def failure_status(self, body):
        """A ``bad_*`` message is a refusal (400) whatever the HTTP status: a 200 carrying one, with the
        location as it was, was recorded as applied."""
        return 400 if any(str(code).startswith("bad_") for code in codes(body)) else None

    def error_detail(self, body):
        """``bad_street (street): <user_msg> [<dev_msg>]`` for each message of a 400."""
        messages = body.get("message") if isinstance(body.get("message"), list) else []
        return "; ".join(f"{message.get('code')}{' (' + message['field'] + ')' if message.get('field') else ''}: "
                         f"{message.get('user_msg')} [{message.get('dev_msg')}]"
                         for message in messages if isinstance(message, dict)) or None

    def _same_address(self, body):
        """The listed address at ``body``'s door (``_door_of``) that no other key of ours is mapped to, or
        None: what a create whose answer was lost left on the account (the retry may carry a changed
        name or phone, so only the address is compared)."""
        return self._door_of(body, self._account_addresses())

    def _door_of(self, body, listed):
        """The first of ``listed`` at the same door as ``body`` (ZIP, house number, street name and
        directionals, unit: ``street_door``) and not mapped to another key of ours, or None."""
        door = street_door(body["street"], body["unit_number"])
        doors = [item for item in listed if item.get("zip_code") == body["zip_code"]
                 and street_door(item.get("street"), item.get("unit_number")) == door]
        if door is None or not doors:
            return None
        ours = set(self.mappings.all().values())  # read only when there is a door to tell
        return next((item for item in doors if str(item["location_id"]) not in ours), None)

    def _account_addresses(self):
        """Every address on the account (``GET /customer/location/``)."""
        return self.client.answer(self.call("GET", f"{PATH}/"), "locations")

    def _existing(self, location, body):
        """The ``location_id`` of the same door already on the account (``_door_of``), or None."""
        if not location.has_coordinates:
            return None
        listed = self.client.answer(self.call("GET", PATH, params={"latitude": location.latitude,
                                                                   "longitude": location.longitude}), "locations")
        item = self._door_of(body, listed)
        if item is None:
            return None
        log.info("deliverycom: %s matches address %s already on the account", location.key, item["location_id"])
        return str(item["location_id"])

    def _update(self, key, location_id, body):
        """PUT ``body``; a ``bad_loc_id`` drops the stale mapping (the next change creates it) and is permanent."""
        try:
            return self.client.answer(self.call("PUT", f"{PATH}/{location_id}", json=body), "location",
                                      needs=("location_id",))
        except PermanentError as error:
            if "bad_loc_id" in codes(error.body):
                self.forget(key)
            raise
