"""B2B location API (B2Market): a stop becomes a location of a business partner.

Our key is the location's ``idRemote``, which update and delete accept as
the id, so no lookup is ever needed; the mapping store keeps key → B2B id to
choose update before create and for reconcile. A location tied to a business
partner cannot be deleted: ``delete`` then deactivates it.
"""
import logging
import re
from datetime import datetime, timezone
from urllib.parse import quote

import requests
from marshmallow import fields

from workers.domain.addresses import locality_parts
from workers.resilience.errors import ConfigError, RelayError, RetriableError
from workers.resilience.http import HttpClient
from workers.settings_fields import HttpUrl, SinkSetting
from workers.sinks.base import Sink, sink_fields

log = logging.getLogger(__name__)

KEY_PREFIX = "l2u-"  # an idRemote starting so is one of our keys
FULL_HISTORY = "1999-01-01"  # updatedFrom's documented default date: every location
PAGE_SIZE = 100
PARTNER_REFUSAL = re.compile(r"business\s*partner", re.IGNORECASE)
NO_ENTITY = "No entity found"  # how B2B's own 404 begins: "No entity found for Location with <id>."
# Route fields that may set a parameter directly (e.g. when the address splits badly).
FIELD_PARAMETERS = ("city", "postalCode", "stateId")
# Route option → create/update parameter; business_partner_id and country_id default to the settings.
OPTION_PARAMETERS = {"country_id": "countryId", "shipping_address": "shippingAddress",
                     "billing_address": "billingAddress", "default": "default"}
DEFAULT_OPTIONS = {"shipping_address": True, "billing_address": False, "default": False}
# Parameters a listed location returns under the same name.
LISTED_PARAMETERS = ("name", "address", "city", "postalCode", "active", "shippingAddress", "billingAddress",
                     "default")


def listed_fields(item):
    """A listed location as the flat parameters we write (``countryId``, ``stateId`` from their objects)."""
    return {**{name: item.get(name) for name in LISTED_PARAMETERS},
            "countryId": (item.get("country") or {}).get("id"), "stateId": (item.get("state") or {}).get("id")}


def create_item(key, fields, options):
    """One element of the ``POST /Location/create`` array: our key, the owning partner, our fields."""
    return {"idRemote": key, "businessPartnerId": options["business_partner_id"], **fields}


def updated_from(since):
    """``since`` (None, a datetime or an ISO 8601 string) as updatedFrom's ``date`` parameter, in UTC."""
    if since is None:
        return FULL_HISTORY
    moment = since if isinstance(since, datetime) else datetime.fromisoformat(str(since))
    if moment.tzinfo:
        moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


def returned_ids(response):
    """``{idRemote: id}`` from an answer's ``data`` list; empty when the answer has another shape."""
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        return {}
    items = data if isinstance(data, list) else []
    return {item["idRemote"]: str(item["id"]) for item in items if isinstance(item, dict) and item.get("id")}


class JwtLogin(requests.auth.AuthBase):
    """``Authorization: Bearer <jwt>``; the sink gets the JWT from ``POST /login`` into ``token``."""

    def __init__(self, username, password):
        self.username, self.password, self.token = username, password, None

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


class B2BSink(Sink):
    """Locations by ``idRemote``: ``POST /Location/create``, ``PUT …/update/{id}``, ``DELETE …/delete/{id}``."""

    name = "b2b"
    supports_deactivate = True
    deactivates_by_key = True  # a partial update by idRemote
    settings = (
        SinkSetting("B2B_API_URL", HttpUrl(load_default=None), "B2B location API (B2Market) base URL."),
        SinkSetting("B2B_API_TOKEN", fields.String(load_default=None),
                    "B2B static bearer token (or use B2B_USERNAME/B2B_PASSWORD); enables the B2B sink.", secret=True),
        SinkSetting("B2B_USERNAME", fields.String(load_default=None),
                    "B2B login user (JWT login instead of a static token)."),
        SinkSetting("B2B_PASSWORD", fields.String(load_default=None), "B2B login password.", secret=True),
        SinkSetting("B2B_BUSINESS_PARTNER_ID", fields.String(load_default=None),
                    "B2B business partner that owns the locations."),
        SinkSetting("B2B_COUNTRY_ID", fields.String(load_default=None), "B2B country id of the locations."),
    )
    enabled_by = ("B2B_API_TOKEN", "B2B_USERNAME")
    requires = ("B2B_API_URL", "B2B_BUSINESS_PARTNER_ID", "B2B_COUNTRY_ID")
    together = (("B2B_USERNAME", "B2B_PASSWORD"),)
    default_route = {"on_status": {"Cancelled": "deactivate"}}

    def __init__(self, client, mappings, options=None, login=None):
        super().__init__(client, mappings, {**DEFAULT_OPTIONS, **(options or {})})
        self.login = login

    @classmethod
    def from_settings(cls, settings, mappings):
        """A static token when ``B2B_API_TOKEN`` is set, else a JWT from ``B2B_USERNAME``/``B2B_PASSWORD``."""
        token = settings.b2b_api_token
        login = None if token else JwtLogin(settings.b2b_username, settings.b2b_password)
        client = HttpClient(settings.b2b_api_url, headers={"Authorization": f"Bearer {token}"} if token else {},
                            auth=login, redact=(token, settings.b2b_password))
        options = {"business_partner_id": settings.b2b_business_partner_id, "country_id": settings.b2b_country_id}
        return cls(client, mappings, options, login)

    def upsert(self, location, options):
        """Update by idRemote when mapped (creating it again if gone), else create (409: update); return the id."""
        return self._upsert(location.key, self.fields(location, options), options)

    def _upsert(self, key, fields, options):
        mapped, before = self.known(key)
        if mapped:
            remote_id = self._update(key, fields, before)
            if remote_id is not None:
                return remote_id
            before = {}
        response = self.call("POST", "Location/create", accept=(409,), json=[create_item(key, fields, options)])
        if response.status_code != 409:
            return self._remember(key, fields, response, before)
        log.info("b2b: %s exists already (409); updating it", key)
        remote_id = self._update(key, fields)
        if remote_id is None:  # deleted there between the two calls: the next try creates it
            raise RetriableError(f"creating {key} answered 409 Duplicate entry, yet no location has that idRemote "
                                 "to update", status=409, method="POST", url=self.client.url("Location/create"))
        return remote_id

    def deactivate(self, location, options):
        """Upsert with ``active: false``: a location that is not there is created inactive.

        So a cancellation that arrives before the stop's first event (events come in any
        order) ends as it would after it: one inactive location, not none. Without the stop
        (deleted in Locate2u since: ``location.stop_id`` is None) only ``active: false`` is
        written, to the location if there is one.
        """
        if location.stop_id is None:
            return self._update(location.key, {"active": False})
        return self._upsert(location.key, {**self.fields(location, options), "active": False}, options)

    def delete(self, location, options):
        """Delete by idRemote (gone already is a success); refused for its business partner: deactivate."""
        try:
            self.gone(self.call("DELETE", f"Location/delete/{quote(location.key, safe='')}", accept=(404,)))
        except RelayError as error:
            if not PARTNER_REFUSAL.search(error.body or ""):
                raise
            log.info("b2b: %s cannot be deleted (business partner); deactivating it", location.key)
            return self.deactivate(location, options)
        self.forget(location.key)
        return None

    def reconcile(self, since=None):
        """Page through ``GET /Location/updatedFrom``; ours missing there is reported only when ``since`` is None."""
        records = ((item["idRemote"] if str(item.get("idRemote") or "").startswith(KEY_PREFIX) else None,
                    str(item["id"]), listed_fields(item)) for item in self._listing(updated_from(since)))
        return self.compare_listing(records, complete=since is None)

    def fields(self, location, options):
        """The parameters we write, empty ones left out (a partial update then keeps them)."""
        city, postal_code = locality_parts(location.address)
        values = {"name": location.name, "address": location.address, "city": city, "postalCode": postal_code,
                  "active": not location.cancelled,
                  **{parameter: options[option] for option, parameter in OPTION_PARAMETERS.items()}}
        own = sink_fields(location)
        unknown = sorted(set(own) - set(FIELD_PARAMETERS))
        if unknown:
            raise ConfigError({"RELAY_ROUTES_FILE": f"b2b fields: {', '.join(unknown)} are not B2B parameters; "
                                                    f"fields may set {', '.join(FIELD_PARAMETERS)}"})
        values.update(own)
        return {name: value for name, value in values.items() if value not in (None, "")}

    def call(self, method, path, accept=(), **kwargs):
        """``Sink.call``; with a username, log in first and once more when the JWT is refused (401)."""
        if self.login is None:
            return super().call(method, path, accept, **kwargs)
        if self.login.token is None:
            self._log_in()
        response = super().call(method, path, (*accept, 401), **kwargs)
        if response.status_code == 401:
            log.info("b2b: JWT refused; logging in again")
            self._log_in()
            response = super().call(method, path, accept, **kwargs)
        return response

    def error_detail(self, body):
        """The ``error`` of ``{"code": N, "error": "Parameter city is required"}``."""
        return body.get("error")

    def failure_status(self, body):
        """B2B's error bodies carry their own ``code``: one of 400 or more with an ``error`` is that
        failure, also when answered with HTTP 200."""
        code = body.get("code")
        return code if isinstance(code, int) and 400 <= code <= 599 and body.get("error") else None

    def _log_in(self):
        credentials = {"_username": self.login.username, "_password": self.login.password}
        response = super().call("POST", "login", json=credentials, auth=None)
        self.login.token = self.client.answer(response, "token")
        self.client.redact = (self.login.password, self.login.token)

    def _update(self, key, fields, before=None):
        """PUT ``fields`` by idRemote; the B2B id, or None (mapping dropped) when there is no such location."""
        response = self.call("PUT", f"Location/update/{quote(key, safe='')}", accept=(404,), json=fields)
        if self.gone(response):
            self.forget(key)
            return None
        return self._remember(key, fields, response, before)

    NOT_FOUND = "B2B's No entity found"

    def not_found_answer(self, body):
        """B2B's own 404 says "No entity found for Location with <id>."."""
        return str(body.get("error", "")).startswith(NO_ENTITY)

    def _remember(self, key, fields, response, before=None):
        """Map ``key`` to the B2B id the answer gives (else to ``key``, which the API accepts as id);
        ``before``: the fields written before, when known (``Sink.remember``)."""
        remote_id = returned_ids(response).get(key, key)
        self.remember(key, remote_id, fields, before)
        return remote_id

    def _listing(self, date):
        page = 1
        while True:
            answer = self.client.answer(self.call("GET", "Location/updatedFrom",
                                                  params={"date": date, "page": page, "pageSize": PAGE_SIZE}),
                                        needs=("data", "pagination"))
            yield from answer["data"]
            if not answer["data"] or page >= answer["pagination"]["totalPages"]:
                return
            page += 1
