"""The B2B sink against the loopback B2B (B2Market) simulator."""
from datetime import datetime, timedelta, timezone

import pytest

from workers.ops.simulators.b2b import documented_fault
from tests.fixtures import sim_state
from tests.sink_contract import SinkContract, sample_location
from workers.config import ConfigError, Settings
from workers.domain.locations import Location
from workers.resilience.errors import BadAnswer, CredentialsRefused, NotFound, PermanentError, RetriableError
from workers.sinks.b2b import B2BSink

TOKEN, USER, PASSWORD = "b2b-static-token", "b2b-user", "b2b-pass"
SYDNEY = "55 Miller St, Pyrmont NSW 2009, Australia"


@pytest.fixture
def sim(simulator):
    return simulator("b2b", token=TOKEN, username=USER, password=PASSWORD)


def settings_for(sim, **credentials):
    return Settings(webhook_secret="x" * 16, b2b_api_url=sim.url, b2b_business_partner_id="BP-1",
                    b2b_country_id="US", **(credentials or {"b2b_api_token": TOKEN}))


def record(sim, key):
    return sim_state(sim).by_remote(key)


def requests(sim, method=None):
    """(method, path) of every request the simulator saw, oldest first."""
    return [(m, path) for m, path, _ in sim_state(sim).requests_log if method in (None, m)]


class TestB2BContract(SinkContract):
    def make_sink(self, sim, mappings):
        return B2BSink.from_settings(settings_for(sim), mappings)

    def remote(self, sim, key):
        return [location for location in sim_state(sim).locations.values() if location["idRemote"] == key]

    def remote_name(self, record):
        return record["name"]

    def is_active(self, record):
        return record["active"]

    def invalid_location(self):
        return sample_location(address="somewhere without a comma")  # no city to send


class TestB2BContractWithLogin(TestB2BContract):
    def make_sink(self, sim, mappings):
        return B2BSink.from_settings(settings_for(sim, b2b_username=USER, b2b_password=PASSWORD), mappings)


@pytest.fixture
def sink(sim, mappings):
    return B2BSink.from_settings(settings_for(sim), mappings)


@pytest.fixture
def jwt_sink(sim, mappings):
    return B2BSink.from_settings(settings_for(sim, b2b_username=USER, b2b_password=PASSWORD), mappings)


def test_create_splits_city_and_postal_code_and_uses_configured_partner_and_country(sim, sink, mappings):
    remote_id = sink.apply("upsert", sample_location())
    created = record(sim, "l2u-stop-164557")
    assert created["id"] == remote_id == mappings.get("l2u-stop-164557")
    assert (created["city"], created["postalCode"]) == ("New York", "10003")
    assert created["businessPartner"]["id"] == "BP-1" and created["country"]["id"] == "US"
    assert (created["active"], created["shippingAddress"], created["billingAddress"], created["default"]) == (
        True, True, False, False)


def test_route_options_and_fields_override_parameters(sim, sink):
    sink.apply("upsert", sample_location(address=SYDNEY, fields={"stateId": "NSW", "name": "Locate2u"}),
               {"country_id": "AU", "billing_address": True})
    created = record(sim, "l2u-stop-164557")
    assert (created["city"], created["postalCode"], created["state"]["id"]) == ("Pyrmont", "2009", "NSW")
    assert created["country"]["id"] == "AU" and created["billingAddress"] is True


def test_unknown_route_field_is_a_configuration_error(sim, sink):
    with pytest.raises(ConfigError, match="colour are not B2B parameters"):
        sink.apply("upsert", sample_location(fields={"colour": "red"}))
    assert requests(sim) == []


def test_login_once_then_again_when_the_jwt_is_refused(sim, jwt_sink):
    jwt_sink.apply("upsert", sample_location())
    jwt_sink.apply("upsert", sample_location(name="Renamed"))
    assert sim_state(sim).login_count == 1
    sim_state(sim).expire_jwts()
    jwt_sink.apply("upsert", sample_location(name="Renamed again"))
    assert sim_state(sim).login_count == 2 and record(sim, "l2u-stop-164557")["name"] == "Renamed again"
    assert [path for _, path in requests(sim)].count("/login") == 2


def test_relogin_only_once_per_call(sim, jwt_sink):
    jwt_sink.apply("upsert", sample_location())
    documented_fault(sim.app.config["FAULTS"], 401, times=2, path_prefix="/Location")
    with pytest.raises(CredentialsRefused) as caught:  # held for B2B's health, never dead-lettered
        jwt_sink.apply("upsert", sample_location())
    assert caught.value.status == 401 and sim_state(sim).login_count == 2


def test_bad_password_fails_without_showing_it(sim, mappings):
    sink = B2BSink.from_settings(settings_for(sim, b2b_username=USER, b2b_password="wrong-password"), mappings)
    with pytest.raises(CredentialsRefused) as caught:
        sink.apply("upsert", sample_location())
    assert caught.value.status == 401 and "/login" in caught.value.url
    assert "wrong-password" not in str(caught.value.to_json())


def test_duplicate_on_create_updates_instead(sim, sink, mappings):
    existing = sim_state(sim).add("l2u-stop-164557", name="Old name", countryId="US")
    assert sink.apply("upsert", sample_location()) == existing["id"]
    assert record(sim, "l2u-stop-164557")["name"] == "Locate2u"
    assert len(sim_state(sim).locations) == 1 and mappings.get("l2u-stop-164557") == existing["id"]


def test_mapped_but_deleted_there_is_created_again(sim, sink, mappings):
    first = sink.apply("upsert", sample_location())
    sim_state(sim).locations.clear()
    second = sink.apply("upsert", sample_location())
    assert second != first and mappings.get("l2u-stop-164557") == second


def test_cancelled_stop_is_written_inactive(sim, sink):
    sink.apply("upsert", sample_location(status="Cancelled"))
    assert record(sim, "l2u-stop-164557")["active"] is False


def test_deactivating_what_is_not_there_creates_it_inactive(sim, sink, mappings):
    """Chaos finding: a cancellation that arrived before the stop's first event left B2B with no
    location (and the older events were then stale), where in order it ends with an inactive one."""
    remote_id = sink.apply("deactivate", sample_location(status="Cancelled"))
    created = record(sim, "l2u-stop-164557")
    assert created["active"] is False and remote_id == created["id"] == mappings.get("l2u-stop-164557")
    assert sink.apply("deactivate", sample_location(status="Cancelled")) == remote_id
    assert len(sim_state(sim).locations) == 1


def test_deactivating_by_key_alone_writes_only_active_false_and_creates_nothing(sim, sink, mappings):
    """The stop is gone from Locate2u (its read answered 404): the Location has the key and status
    only. The location there is deactivated with its fields kept; where none is, none is made."""
    sink.apply("upsert", sample_location())
    assert sink.apply("deactivate", Location(key="l2u-stop-164557", version="v", status="Cancelled"))
    kept = record(sim, "l2u-stop-164557")
    assert (kept["active"], kept["name"], kept["city"]) == (False, "Locate2u", "New York")
    assert sink.apply("deactivate", Location(key="l2u-stop-999", version="v", status="Cancelled")) is None
    assert record(sim, "l2u-stop-999") is None and len(sim_state(sim).locations) == 1


def test_delete_refused_for_the_business_partner_deactivates(sim, sink, mappings):
    sink.apply("upsert", sample_location())
    sink.apply("delete", sample_location())
    assert record(sim, "l2u-stop-164557")["active"] is False
    assert mappings.get("l2u-stop-164557")


def test_delete_when_allowed_deletes_and_forgets(sim, sink, mappings):
    sim_state(sim).allow_delete = True
    sink.apply("upsert", sample_location())
    assert sink.apply("delete", sample_location()) is None
    assert record(sim, "l2u-stop-164557") is None and mappings.get("l2u-stop-164557") is None


@pytest.mark.parametrize("action", ["upsert", "delete"])
def test_a_404_that_is_not_b2bs_no_entity_found_is_retried_not_taken_for_a_missing_location(sim, sink, mappings,
                                                                                             action):
    """A 404 a gateway answers itself was taken for B2B's "No entity found": a delete was recorded as done
    with the location still active there."""
    sim_state(sim).allow_delete = True
    sink.apply("upsert", sample_location())
    sim.app.config["FAULTS"].inject(404, body={"message": "no Route matched with those values"},
                                    path_prefix="/Location/")
    with pytest.raises(RetriableError, match="not B2B's No entity found"):
        sink.apply(action, sample_location(name="Renamed"))
    assert record(sim, "l2u-stop-164557")["active"] is True and mappings.get("l2u-stop-164557")


def test_a_create_refused_as_a_duplicate_whose_update_then_finds_nothing_is_retried(sim, sink, mappings):
    """409 on the create, then 404 on the update: the location was deleted between the two calls. It was a
    PermanentError, dead-lettered at once; the next try creates it."""
    sim.app.config["FAULTS"].inject(409, body={"code": 409, "error": "Duplicate entry"}, path_prefix="/Location/create")
    with pytest.raises(RetriableError, match="yet no location has that idRemote"):
        sink.apply("upsert", sample_location())
    sink.apply("upsert", sample_location())
    assert record(sim, "l2u-stop-164557")["active"] is True


@pytest.mark.parametrize("error, raised", [({"code": 500, "error": "Database connection failed."}, RetriableError),
                                           ({"code": 400, "error": "Parameter city is required"}, PermanentError)])
def test_a_write_answered_200_with_an_error_body_is_that_error_not_applied(sim, sink, mappings, error, raised):
    """B2B's error bodies carry their own ``code``; one answered with HTTP 200 was recorded as applied
    (``remote_id`` the key) while B2B held nothing."""
    sim.app.config["FAULTS"].inject(200, body=error, path_prefix="/Location/create")
    with pytest.raises(raised, match=f"answered 200 saying it failed \\({error['code']}\\)"):
        sink.apply("upsert", sample_location())
    assert record(sim, "l2u-stop-164557") is None and mappings.get("l2u-stop-164557") is None


def test_a_delete_refused_for_its_business_partner_with_200_deactivates(sim, sink, mappings):
    """The refusal to delete a location tied to a business partner, answered with 200, was recorded as
    deleted with the location still active there."""
    sink.apply("upsert", sample_location())
    sim.app.config["FAULTS"].inject(200, body={"code": 400, "error": "Location has a Business Partner"},
                                    path_prefix="/Location/delete")
    sink.apply("delete", sample_location())
    assert record(sim, "l2u-stop-164557")["active"] is False and mappings.get("l2u-stop-164557")


def test_errors_name_the_parameter(sim, sink):
    with pytest.raises(PermanentError, match="Parameter name is required") as caught:
        sink.apply("upsert", sample_location(name=None))
    assert caught.value.status == 400
    body = {"code": 404, "error": "No entity found for BusinessPartner with BP-1."}
    sim.app.config["FAULTS"].inject(404, body=body)
    with pytest.raises(NotFound, match="No entity found for BusinessPartner with BP-1"):
        sink.apply("upsert", sample_location())


def test_server_errors_are_retriable(sim, sink):
    documented_fault(sim.app.config["FAULTS"], 500)
    with pytest.raises(RetriableError, match="Database connection failed"):
        sink.apply("upsert", sample_location())


def test_reconcile_rebuilds_and_reports_drift(sim, sink, mappings, redis_client):
    ids = {n: sink.apply("upsert", sample_location(stop_id=n)) for n in (1, 2, 3)}
    theirs = sim_state(sim).add("ERP-77")["id"]
    sim_state(sim).locations[ids[2]]["city"] = "Brooklyn"
    del sim_state(sim).locations[ids[3]]
    redis_client.delete(mappings.key)
    mappings.set("l2u-stop-3", ids[3])

    report = sink.reconcile()

    assert report.rebuilt == {"l2u-stop-1": ids[1], "l2u-stop-2": ids[2]}
    assert report.changed_remote == {"l2u-stop-2": ["city"]}
    assert report.missing_remote == ["l2u-stop-3"]
    assert report.unknown_remote == [theirs] and report.scanned == 3
    assert mappings.get("l2u-stop-1") == ids[1]


def test_a_listing_page_that_is_not_the_apis_is_retriable_and_changes_nothing(sim, sink, mappings):
    """docs/sinks/b2b.md: a listing's 2xx without ``data`` (a proxy's page) is a ``BadAnswer``."""
    location_id = sink.apply("upsert", sample_location(stop_id=1))
    sim.app.config["FAULTS"].fail_after_apply("garbled", path_prefix="/Location/updatedFrom", methods=("GET",))
    with pytest.raises(BadAnswer):
        sink.reconcile()
    assert mappings.get("l2u-stop-1") == location_id
    assert sink.reconcile().scanned == 1  # the next run reads it whole


def test_reconcile_since_pages_through_recent_changes_only(sim, sink, mappings):
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    sim_state(sim).clock = lambda: start
    for n in range(1, 4):
        sink.apply("upsert", sample_location(stop_id=n))
    sim_state(sim).clock = lambda: start + timedelta(days=2)
    for n in range(4, 205):
        sink.apply("upsert", sample_location(stop_id=n))
    mappings.delete("l2u-stop-1")

    report = sink.reconcile(since="2025-01-02")

    assert report.scanned == 201 and report.rebuilt == {} and report.missing_remote == []
    listing = [path for _, path in requests(sim, "GET")]
    assert listing == [f"/Location/updatedFrom?date=2025-01-02T00%3A00%3A00&page={p}&pageSize=100" for p in (1, 2, 3)]

