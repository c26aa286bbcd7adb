"""The Delivery.com sink against the loopback Delivery.com simulator."""
import time

import pytest

from tests.fixtures import kill_when_reached, sim_state
from tests.sink_contract import SinkContract, sample_location
from workers.config import Settings
from workers.resilience.errors import CredentialsRefused, NotYet, PermanentError, RetriableError
from workers.sinks.deliverycom import DeliverycomSink, normalize_phone, rule_violations
from workers.store.mappings import MappingStore

TOKEN = "dc-test-token"


@pytest.fixture
def sim(simulator):
    return simulator("deliverycom", access_token=TOKEN)


@pytest.fixture
def sink(sim, mappings):
    return make_deliverycom(sim, mappings)


def make_deliverycom(sim, mappings, token=TOKEN):
    settings = Settings(webhook_secret="x" * 16, deliverycom_api_url=sim.url, deliverycom_access_token=token)
    return DeliverycomSink.from_settings(settings, mappings)


def sent(sim, method=None):
    return [entry for entry in sim_state(sim).requests_log if method is None or entry[0] == method]


class TestDeliverycomContract(SinkContract):
    def make_sink(self, sim, mappings):
        return make_deliverycom(sim, mappings)

    def remote(self, sim, key):
        return list(sim_state(sim).locations.values())  # each test's account holds only that test's addresses

    def remote_name(self, record):
        return record["company"]

    def is_active(self, record):
        return True

    def invalid_location(self):
        return sample_location(address="1 Main St, Springfield, IL 62701")  # valid, but USPS cannot verify it


def test_address_is_split_into_the_seed_fields(sim, sink):
    location_id = sink.apply("upsert", sample_location(address="235 Park Ave S Floor 5, New York, NY 10003-1234",
                                                       contact_phone="+1 (212) 555-0123"))
    record = sim_state(sim).locations[location_id]
    assert {name: record[name] for name in ("street", "unit_number", "city", "state", "zip_code", "phone")} == {
        "street": "235 PARK AVE S", "unit_number": "Floor 5", "city": "NEW YORK", "state": "NY",
        "zip_code": "10003", "phone": "2125550123"}


@pytest.mark.parametrize("changes, field, reason", [
    ({"address": "12 B, New York, NY 10003"}, "street", "street has 4 characters; Delivery.com requires at least 5"),
    ({"address": "235 Park Ave S, X, NY 10003"}, "city", "city has 1 characters; Delivery.com requires at least 2"),
    ({"fields": {"state": "NYC"}}, "state", "state has 3 characters; Delivery.com requires exactly 2"),
    ({"address": "235 Park Ave S, New York, NY 1000"}, "zip_code", "zip_code has 4 characters"),
    ({"address": "235 Park Ave S, New York, NY"}, "zip_code", "zip_code is missing characters"),
    ({"contact_phone": "555-0123"}, "phone", "phone has 7 characters; Delivery.com requires 10-12"),
    ({"contact_phone": None}, "phone", "phone is missing characters"),
])
def test_rule_violations_are_permanent_and_never_sent(sim, sink, changes, field, reason):
    with pytest.raises(PermanentError) as caught:
        sink.apply("upsert", sample_location(**changes))
    assert reason in str(caught.value) and "l2u-stop-164557" in str(caught.value)
    assert sent(sim) == []


def test_every_violation_is_named_at_once():
    problems = rule_violations({"street": "1 A", "city": "", "state": "N", "zip_code": "123456", "phone": "1" * 13})
    assert list(problems) == ["street", "city", "state", "zip_code", "phone"]


def test_default_phone_option_fills_a_missing_phone(sim, sink):
    location_id = sink.apply("upsert", sample_location(contact_phone=None), {"default_phone": "(212) 555-0100"})
    assert sim_state(sim).locations[location_id]["phone"] == "2125550100"


@pytest.mark.parametrize("text, digits", [("212-555-0123", "2125550123"), ("+1 212 555 0123", "2125550123"),
                                          ("+61 2 9999 9999", "61299999999"), (None, "")])
def test_normalize_phone(text, digits):
    assert normalize_phone(text) == digits


@pytest.mark.parametrize("address, says", [
    ("55 Miller St, Pyrmont NSW 2009, Australia", "not in the US (country 'Australia')"),
    ("PO Box 123, Austin, TX 73301", "po box"),
    ("1 Main St, Springfield", "no US state"),
])
def test_addresses_that_are_not_us_street_addresses_are_permanent(sim, sink, address, says):
    with pytest.raises(PermanentError) as caught:
        sink.apply("upsert", sample_location(address=address))
    assert "US addresses only" in str(caught.value) and says in str(caught.value)
    assert sent(sim) == []


def test_existing_address_on_the_account_is_updated_not_duplicated(sim, sink):
    existing = sim_state(sim).add({"street": "235 PARK AVE S", "city": "NEW YORK", "state": "NY", "zip_code": "10003",
                               "phone": "5555555555", "latitude": 40.73771, "longitude": -73.987949})
    location = sample_location()
    assert sink.apply("upsert", location) == existing["location_id"]
    assert len(sim_state(sim).locations) == 1 and sim_state(sim).locations[existing["location_id"]]["company"] == "Locate2u"
    [lookup] = sent(sim, "GET")
    assert lookup[2] == {"latitude": "40.73771", "longitude": "-73.987949"}
    assert sent(sim, "POST") == []


def test_nearby_different_address_is_not_taken(sim, sink):
    sim_state(sim).add({"street": "233 PARK AVE S", "city": "NEW YORK", "state": "NY", "zip_code": "10003",
                    "phone": "5555555555", "latitude": 40.73771, "longitude": -73.987949})
    sink.apply("upsert", sample_location())
    assert len(sim_state(sim).locations) == 2


CUSTOMERS = {"city": "NEW YORK", "state": "NY", "zip_code": "10003", "phone": "5555555555",
             "latitude": 40.73771, "longitude": -73.987949}  # where the sample stop is


@pytest.mark.parametrize("theirs", [
    {"street": "235 PARK AVE S", "unit_number": "Floor 5"},  # another floor of the same building
    {"street": "235 E 20TH ST"},  # another street, the same house number, as near
], ids=["other_unit", "other_street"])
def test_a_customers_address_that_is_another_door_is_not_taken(sim, sink, theirs):
    """The coordinate lookup matched on ZIP and house number alone: a stop on the 9th floor took the
    customer's 5th-floor address (or one on another street) and overwrote it with the stop's."""
    customers = sim_state(sim).add({**CUSTOMERS, **theirs})
    ours = sink.apply("upsert", sample_location(address="235 Park Ave S, Floor 9, New York, NY 10003, USA"))
    assert ours != customers["location_id"] and len(sim_state(sim).locations) == 2
    assert sim_state(sim).locations[customers["location_id"]] == customers  # untouched
    assert sim_state(sim).locations[ours]["unit_number"] == "Floor 9"


def test_the_same_door_is_matched_whatever_the_way_it_is_written(sim, sink):
    """Delivery.com stores addresses standardised (the seed: "235 Park Ave S", "Floor 5" came back
    as "235 PARK S AVE", "floor 5"): that is still the stop's door."""
    existing = sim_state(sim).add({**CUSTOMERS, "street": "235 PARK S AVE", "unit_number": "floor 5"})
    location = sample_location(address="235 Park Avenue South, Fl 5, New York, NY 10003, USA")
    assert sink.apply("upsert", location) == existing["location_id"] and len(sim_state(sim).locations) == 1


def test_an_address_mapped_to_another_stop_is_not_taken(sim, sink, mappings):
    """Two stops at one door (two deliveries to one office): the second took the first one's address,
    so each change of one overwrote the other, and cancelling one deleted the other's address."""
    first = sink.apply("upsert", sample_location(stop_id=1, name="First"))
    sim_state(sim).update(first, {"latitude": 40.73771, "longitude": -73.987949})  # geocoded where the stop is
    second = sink.apply("upsert", sample_location(stop_id=2, name="Second"))
    assert first != second and mappings.get("l2u-stop-1") == first and mappings.get("l2u-stop-2") == second
    assert sim_state(sim).locations[first]["company"] == "First"


def test_what_a_lost_create_left_is_told_from_another_stops_and_another_units_address(sim, sink, mappings):
    """After a create whose answer was lost, the first listed address with the same street and ZIP was
    taken as what it left: another stop's at that door, or the customer's on another floor."""
    other_stop = sink.apply("upsert", sample_location(stop_id=1, name="Other stop"))
    sim_state(sim).update(other_stop, {"latitude": 40.73771, "longitude": -73.987949})
    customers = sim_state(sim).add({**CUSTOMERS, "street": "235 PARK AVE S", "unit_number": "Floor 5"})
    sim.app.config["FAULTS"].fail_after_apply("garbled", path_prefix="/customer/location")
    with pytest.raises(RetriableError):
        sink.apply("upsert", sample_location(stop_id=2))
    [left] = set(sim_state(sim).locations) - {other_stop, customers["location_id"]}
    assert sink.apply("upsert", sample_location(stop_id=2, name="Retried")) == left == mappings.get("l2u-stop-2")
    assert sim_state(sim).locations[other_stop]["company"] == "Other stop"
    assert sim_state(sim).locations[customers["location_id"]] == customers
    assert len(sim_state(sim).locations) == 3


def test_match_existing_off_skips_the_lookup(sim, sink):
    sink.apply("upsert", sample_location(), {"match_existing": False})
    assert sent(sim, "GET") == [] and len(sent(sim, "POST")) == 1


def test_bad_loc_is_permanent_with_user_and_dev_messages(sim, sink):
    with pytest.raises(PermanentError) as caught:
        sink.apply("upsert", sample_location(address="1 Main St, Springfield, IL 62701"))
    assert not caught.value.retriable and caught.value.status == 400
    assert "bad_loc" in str(caught.value) and "Address was not verified." in str(caught.value)
    assert "We could not find the address" in str(caught.value)


def test_server_field_errors_carry_their_messages(sim, sink):
    message = {"code": "bad_street", "field": "street", "user_msg": "The street must be at least 2 characters.",
               "dev_msg": "street rejected"}
    sim.app.config["FAULTS"].inject(400, body={"message": [message]}, path_prefix="/customer/location")
    with pytest.raises(PermanentError) as caught:
        sink.apply("upsert", sample_location(), {"match_existing": False})
    assert "bad_street (street): The street must be at least 2 characters. [street rejected]" in str(caught.value)


def test_bad_loc_id_on_update_is_permanent_and_drops_the_stale_mapping(sim, sink, mappings):
    location_id = sink.apply("upsert", sample_location())
    sim_state(sim).delete(location_id)
    with pytest.raises(PermanentError) as caught:
        sink.apply("upsert", sample_location(name="Locate2u HQ"))
    assert "bad_loc_id" in str(caught.value) and f"location id {location_id}" in str(caught.value)
    assert mappings.get("l2u-stop-164557") is None
    recreated = sink.apply("upsert", sample_location(name="Locate2u HQ"))
    assert recreated != location_id and sim_state(sim).locations[recreated]["company"] == "Locate2u HQ"


def test_delete_only_what_we_mapped(sim, sink):
    other = sim_state(sim).add({"street": "235 PARK AVE S", "city": "NEW YORK", "state": "NY", "zip_code": "10003",
                            "phone": "5555555555"})
    assert sink.apply("delete", sample_location()) is None
    assert list(sim_state(sim).locations) == [other["location_id"]] and sent(sim) == []


def test_delete_of_an_address_removed_there_succeeds(sim, sink, mappings):
    location_id = sink.apply("upsert", sample_location())
    sim_state(sim).delete(location_id)
    sink.apply("delete", sample_location())
    assert mappings.get("l2u-stop-164557") is None


def test_unauthorised_is_credentials_refused_and_hides_the_token(sim, mappings):
    sink = make_deliverycom(sim, mappings, token="wrong-token-value")
    with pytest.raises(CredentialsRefused) as caught:
        sink.apply("upsert", sample_location())
    assert caught.value.status == 401 and "wrong-token-value" not in str(caught.value.to_json())


def test_reconcile_reports_missing_unknown_and_changed(sim, sink, mappings):
    kept = sink.apply("upsert", sample_location())
    gone = sink.apply("upsert", sample_location(stop_id=2, address="199 Water St, New York, NY 10038"))
    sim_state(sim).delete(gone)
    sim_state(sim).update(kept, {"company": "Renamed"})
    stranger = sim_state(sim).add({"street": "1 Main St", "city": "Boston", "state": "MA", "zip_code": "02108",
                               "phone": "6175550100"})
    report = sink.reconcile()
    assert report.missing_remote == ["l2u-stop-2"]
    assert report.unknown_remote == [stranger["location_id"]]
    assert report.changed_remote == {"l2u-stop-164557": ["company"]}
    assert report.scanned == 2


def test_retry_after_is_kept(sim, sink):
    sim.app.config["FAULTS"].inject(429, retry_after=11)
    with pytest.raises(RetriableError) as caught:
        sink.apply("upsert", sample_location())
    assert caught.value.retry_after == 11


@pytest.mark.parametrize("options", [{}, {"match_existing": False}], ids=["default", "match_existing_false"])
def test_create_without_an_answer_is_waited_out_then_found_not_added_twice(sim, sink, mappings, options):
    """The create took effect and the connection dropped before its answer. Delivery.com keeps no
    key of ours, so the retry created the address a second time (the coordinate lookup cannot find
    it: Delivery.com geocodes the address itself). Now it waits until that create can no longer
    land, then finds the address by street and ZIP and updates it, also with ``match_existing`` off."""
    sink.client.timeout = (1, 1.5)  # a create without an answer may land up to 3 s after it was sent
    sim.app.config["FAULTS"].fail_after_apply("drop", path_prefix="/customer/location")
    with pytest.raises(RetriableError):
        sink.apply("upsert", sample_location(), options)
    with pytest.raises(NotYet) as waiting:
        sink.apply("upsert", sample_location(name="After the wait"), options)
    assert 2.0 < waiting.value.retry_after <= 3.0 and len(sent(sim, "POST")) == 1

    time.sleep(waiting.value.retry_after)
    location_id = sink.apply("upsert", sample_location(name="After the wait"), options)
    assert [location["company"] for location in sim_state(sim).locations.values()] == ["After the wait"]
    assert mappings.get("l2u-stop-164557") == location_id and len(sent(sim, "POST")) == 1


def test_delete_after_a_create_whose_answer_was_lost_deletes_what_it_left(sim, sink, mappings):
    sim.app.config["FAULTS"].fail_after_apply("garbled", path_prefix="/customer/location")
    with pytest.raises(RetriableError):
        sink.apply("upsert", sample_location())
    assert len(sim_state(sim).locations) == 1 and mappings.get("l2u-stop-164557") is None
    sink.apply("delete", sample_location(status="Cancelled"))
    assert sim_state(sim).locations == {}
    sink.apply("upsert", sample_location(name="Created again"))  # no mark left to look for
    assert [location["company"] for location in sim_state(sim).locations.values()] == ["Created again"]


def test_what_a_lost_create_left_is_taken_before_an_address_the_customer_added_meanwhile(sim, sink, mappings):
    """The coordinate lookup came first and adopted the customer's address: ours stayed on the
    account unmapped, and the lost create's mark was never dropped."""
    sim.app.config["FAULTS"].fail_after_apply("garbled", path_prefix="/customer/location")
    with pytest.raises(RetriableError):
        sink.apply("upsert", sample_location())
    [ours] = sim_state(sim).locations
    customers = sim_state(sim).add({"street": "235 PARK AVE S", "city": "NEW YORK", "state": "NY",
                                    "zip_code": "10003", "phone": "5555555555", "latitude": 40.73771,
                                    "longitude": -73.987949})
    assert sink.apply("upsert", sample_location(name="Retried")) == ours == mappings.get("l2u-stop-164557")
    assert sim_state(sim).locations[ours]["company"] == "Retried"
    assert sim_state(sim).locations[customers["location_id"]]["company"] is None  # theirs untouched
    assert MappingStore(mappings.redis, "deliverycom:intent").get("l2u-stop-164557") is None


def test_a_worker_killed_before_the_mapping_was_saved_leaves_the_mark_for_the_retry(sim, sink, mappings):
    """Killed (SIGKILL) right after Delivery.com created the address, before the mapping was saved."""
    sink.client.timeout = (1, 1.5)
    kill_when_reached(lambda: sink.apply("upsert", sample_location()), [(sink, "remember")], [sink])
    with pytest.raises(NotYet) as waiting:  # it cannot tell the create from one still in flight
        sink.apply("upsert", sample_location())
    time.sleep(waiting.value.retry_after)
    location_id = sink.apply("upsert", sample_location(name="Redelivered"))
    assert [location["company"] for location in sim_state(sim).locations.values()] == ["Redelivered"]
    assert mappings.get("l2u-stop-164557") == location_id


def test_an_update_answered_200_with_a_bad_message_is_refused_not_applied(sim, sink, mappings):
    """A successful update says ``loc_update_success``; one answered 200 with a ``bad_*`` message and the
    location as it was was recorded as applied, and its snapshot hid the drift from reconcile."""
    location_id = sink.apply("upsert", sample_location())
    [before] = sim_state(sim).locations.values()
    sim.app.config["FAULTS"].inject(200, path_prefix="/customer/location/", body={
        "message": [{"code": "bad_phone", "field": "phone", "user_msg": "The phone must be at least 10 characters.",
                     "dev_msg": "The phone must be at least 10 characters."}],
        "location": {**before, "location_id": location_id}})
    with pytest.raises(PermanentError, match="answered 200 saying it failed \\(400\\).*bad_phone"):
        sink.apply("upsert", sample_location(name="Renamed Co"))
