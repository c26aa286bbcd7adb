"""The LOCATE inventory sink against the loopback LOCATE simulator."""
import time

import pytest
from flask import request as flask_request

from tests.fixtures import sim_state
from tests.sink_contract import SinkContract, sample_location
from workers.config import ConfigError, Settings
from workers.resilience.errors import CredentialsRefused, NotYet, PermanentError, RetriableError
from workers.sinks.locate import LocateSink, same_value

KEY = "locate-test-key"
RESOURCE = "customeraddress"


@pytest.fixture
def sim(simulator):
    return simulator("locate", api_key=KEY, resources=(RESOURCE, "carrier"), background_delay=0.15)


@pytest.fixture
def sink(sim, mappings):
    return make_locate(sim, mappings)


def make_locate(sim, mappings, token=KEY, **options):
    settings = Settings(webhook_secret="x" * 16, locate_api_url=sim.url, locate_api_token=token)
    sink = LocateSink.from_settings(settings, mappings)
    sink.options.update(options)
    return sink


def records(sim, key, resource=RESOURCE, with_trashed=False):
    return [row for row in sim_state(sim).rows(resource, with_trashed) if row.get("remote_key") == key]


def requests(sim, method=None, path=None):
    return [entry for entry in sim_state(sim).requests_log
            if (method is None or entry[0] == method) and (path is None or entry[1] == path)]


class TestLocateContract(SinkContract):
    def make_sink(self, sim, mappings):
        return make_locate(sim, mappings)

    def remote(self, sim, key):
        return records(sim, key)

    def remote_name(self, record):
        return record["name"]

    def is_active(self, record):
        return True  # no active flag: cancellations soft delete

    def invalid_location(self):
        return sample_location(name=None)


def test_fields_written_with_the_default_mapping(sim, sink):
    record_id = sink.apply("upsert", sample_location())
    record = sim_state(sim).get(RESOURCE, int(record_id))
    assert {name: record[name] for name in ("name", "address1", "latitude", "longitude", "phone", "email",
                                            "notes", "remote_key")} == {
        "name": "Locate2u", "address1": "235 Park Ave S, New York, NY 10003, USA", "latitude": 40.73771,
        "longitude": -73.987949, "phone": "212-555-0123", "email": "matt.robinson@example.com",
        "notes": "Please call before you deliver", "remote_key": "l2u-stop-164557"}


def test_every_call_sends_json_headers_and_basic_auth_with_a_60s_ceiling(sim, sink):
    sink.apply("upsert", sample_location())
    sink.apply("delete", sample_location())
    assert sink.client.timeout[1] == 60 and sink.client.auth == (KEY, KEY)
    for method, _path, _query, _body, headers in requests(sim):
        assert headers["Accept"] == "application/json" and headers["Content-Type"] == "application/json", method


def test_lookup_is_a_simple_filter_on_the_key_including_trashed(sim, sink):
    sink.apply("upsert", sample_location())
    [lookup] = requests(sim, "GET", f"/{RESOURCE}")
    assert lookup[2]["remote_key"] == "l2u-stop-164557" and lookup[2]["withTrashed"] == "1"
    assert lookup[2]["perPage"] == "100" and lookup[2]["fields"] == "id,deleted_at"


def test_route_options_choose_resource_mapping_and_static_fields(sim, sink):
    options = {"resource": "carrier", "key_field": "external_ref", "field_map": {"name": "title"},
               "static_fields": {"active": 1}}
    record_id = sink.apply("upsert", sample_location(), options)
    record = sim_state(sim).get("carrier", int(record_id))
    assert record.items() >= {"title": "Locate2u", "external_ref": "l2u-stop-164557", "active": 1}.items()
    assert sim_state(sim).rows(RESOURCE) == []


def test_route_fields_that_name_no_location_attribute_are_written_as_is(sim, sink):
    location = sample_location(fields={"name": "ignored here", "customer_id": "7"})
    record = sim_state(sim).get(RESOURCE, int(sink.apply("upsert", location)))
    assert record["customer_id"] == "7" and record["name"] == "Locate2u"


def test_unknown_field_map_attribute_is_a_config_error(sim, sink):
    with pytest.raises(ConfigError, match="colour"):
        sink.apply("upsert", sample_location(), {"field_map": {"colour": "color"}})


# ------------------------------------------------------------ background processing

@pytest.mark.parametrize("background", ["always", "auto"])
def test_202_is_read_back_before_returning(sim, sink, background):
    sim_state(sim).background = background
    for name in ("Locate2u", "Locate2u HQ", "Locate2u Depot"):
        record_id = sink.apply("upsert", sample_location(name=name))
        assert sim_state(sim).get(RESOURCE, int(record_id))["name"] == name  # applied before upsert returned
    sink.apply("delete", sample_location())
    assert records(sim, "l2u-stop-164557") == []
    if background == "always":
        assert any(entry[0] == "GET" and entry[1] == f"/{RESOURCE}/{record_id}" for entry in requests(sim))


def test_202_that_never_shows_is_retriable_and_bounded(sim, sink):
    sim_state(sim).background, sim_state(sim).background_delay = "always", 5
    started = time.monotonic()
    with pytest.raises(RetriableError, match="background processing"):
        sink.apply("upsert", sample_location(), {"background_timeout": 0.3})
    assert 0.3 <= time.monotonic() - started < 2


def test_a_retry_while_its_create_is_still_in_background_creates_no_second_record(sim, sink):
    """LOCATE answers a create 202 and runs it later; the relay gave up reading it back and its retry,
    not finding the record yet, created it a second time. Background processing has no published
    bound: the retry must wait for the first create to show, then update it."""
    sim_state(sim).background, sim_state(sim).background_delay = "always", 1.0
    sink.client.timeout = (1, 1)  # a create may land up to 2 s after it was sent (settle_seconds), not 120
    with pytest.raises(RetriableError, match="background processing"):
        sink.apply("upsert", sample_location(), {"background_timeout": 0.2})
    with pytest.raises(NotYet) as retried:  # at once, as the retry schedule's first step does
        sink.apply("upsert", sample_location(name="Locate2u HQ"))
    assert 1 < retried.value.retry_after <= 2
    assert sim_state(sim).wait_background()
    time.sleep(retried.value.retry_after)
    record_id = sink.apply("upsert", sample_location(name="Locate2u HQ"))  # finds the first create's record
    [record] = records(sim, "l2u-stop-164557")
    assert str(record["id"]) == record_id and record["name"] == "Locate2u HQ"
    assert len(requests(sim, "POST", f"/{RESOURCE}")) == 1
    assert sink.mappings.get("l2u-stop-164557") == record_id and sink._guard.pending("l2u-stop-164557") is None


def test_a_delete_while_its_create_is_still_in_background_waits_for_it_then_deletes_it(sim, sink):
    """Before, the delete found no record yet and succeeded; the create landed after it, leaving a
    live record for a cancelled stop."""
    sim_state(sim).background, sim_state(sim).background_delay = "always", 1.0
    sink.client.timeout = (1, 1)
    with pytest.raises(RetriableError, match="background processing"):
        sink.apply("upsert", sample_location(), {"background_timeout": 0.2})
    with pytest.raises(NotYet) as waited:
        sink.apply("delete", sample_location(status="Cancelled"))
    assert sim_state(sim).wait_background()
    time.sleep(waited.value.retry_after)
    sink.apply("delete", sample_location(status="Cancelled"))
    assert records(sim, "l2u-stop-164557") == [] and len(records(sim, "l2u-stop-164557", with_trashed=True)) == 1
    assert sink._guard.pending("l2u-stop-164557") is None


def test_background_processing_header_is_a_route_option(sim, sink):
    sim_state(sim).background = "always"
    sink.apply("upsert", sample_location(), {"background_processing": "never"})
    [create] = requests(sim, "POST", f"/{RESOURCE}")
    assert create[4]["X-Background-Processing"] == "never"
    assert all("X-Background-Processing" not in entry[4] for entry in requests(sim, "GET"))


# ------------------------------------------------------------------- soft deletes

def test_soft_deleted_record_is_restored_not_duplicated(sim, sink, mappings):
    record_id = sink.apply("upsert", sample_location())
    sim_state(sim).delete(RESOURCE, int(record_id))
    mappings.delete("l2u-stop-164557")  # as after losing Redis
    assert sink.apply("upsert", sample_location(name="Back again")) == record_id
    [record] = records(sim, "l2u-stop-164557", with_trashed=True)
    assert record["deleted_at"] is None and record["name"] == "Back again"
    assert requests(sim, "POST", f"/{RESOURCE}/{record_id}/restore")


def test_restore_after_our_own_delete(sim, sink):
    record_id = sink.apply("upsert", sample_location())
    sink.apply("delete", sample_location())
    assert sink.apply("upsert", sample_location()) == record_id
    assert len(records(sim, "l2u-stop-164557", with_trashed=True)) == 1


def test_soft_deleted_record_is_reported_when_restore_is_off(sim, sink):
    record_id = sink.apply("upsert", sample_location())
    sink.apply("delete", sample_location())
    with pytest.raises(PermanentError, match=f"{RESOURCE} {record_id} holding l2u-stop-164557 is soft-deleted"):
        sink.apply("upsert", sample_location(), {"restore_trashed": False})
    assert requests(sim, "POST", f"/{RESOURCE}/{record_id}/restore") == []


def test_delete_soft_deletes_every_live_record_with_our_key(sim, sink):
    for _ in range(2):
        sim_state(sim).create(RESOURCE, {"name": "dup", "address1": "1 Main St", "remote_key": "l2u-stop-164557"})
    sink.apply("delete", sample_location())
    assert records(sim, "l2u-stop-164557") == []
    assert len(records(sim, "l2u-stop-164557", with_trashed=True)) == 2


# ------------------------------------------------------------------------ errors

def test_422_names_the_fields(sim, sink):
    with pytest.raises(PermanentError) as caught:
        sink.apply("upsert", sample_location(name=None, address=None, latitude="north"))
    message = str(caught.value)
    assert caught.value.status == 422
    for text in ("name: The name field is required.", "address1: The address1 field is required.",
                 "latitude: The latitude must be a number."):
        assert text in message


def test_unauthorised_is_credentials_refused_and_hides_the_key(sim, mappings):
    sink = make_locate(sim, mappings, token="wrong-locate-key")
    with pytest.raises(CredentialsRefused) as caught:
        sink.apply("upsert", sample_location())
    assert caught.value.status == 401 and "wrong-locate-key" not in str(caught.value.to_json())


def test_login_redirect_is_permanent_not_success(sim, sink):
    del sink.client.headers["Accept"]
    with pytest.raises(PermanentError, match="login page") as caught:
        sink.apply("upsert", sample_location())
    assert caught.value.status == 302


# --------------------------------------------------------------------- reconcile

def test_reconcile_pages_by_100_with_fields_and_sort(sim, sink, mappings):
    kept = sink.apply("upsert", sample_location())
    gone = sink.apply("upsert", sample_location(stop_id=2))
    sim_state(sim).delete(RESOURCE, int(gone))
    sim_state(sim).update(RESOURCE, int(kept), {"name": "Renamed in LOCATE"})
    for number in range(1000, 1230):
        sim_state(sim).create(RESOURCE, {"name": f"stop {number}", "address1": "1 Main St",
                                     "remote_key": f"l2u-stop-{number}"})
    duplicate = sim_state(sim).create(RESOURCE, {"name": "dup", "address1": "x", "remote_key": "l2u-stop-164557"})
    sim_state(sim).create(RESOURCE, {"name": "not ours", "address1": "x"})
    del sim_state(sim).requests_log[:]

    report = sink.reconcile()

    listings = requests(sim, "GET", f"/{RESOURCE}")
    assert [query["page"] for _, _, query, _, _ in listings] == ["1", "2", "3"]
    for _, _, query, _, _ in listings:
        assert query["perPage"] == "100" and query["sort"] == "id" and query["filter"] == "remote_key IS NOT NULL"
        assert query["fields"].split(",")[:2] == ["id", "remote_key"] and "name" in query["fields"]
    assert report.scanned == 232
    assert len(report.rebuilt) == 230 and report.rebuilt["l2u-stop-1000"] == mappings.get("l2u-stop-1000")
    assert report.missing_remote == ["l2u-stop-2"]
    assert report.untracked == [str(duplicate["id"])] and report.unknown_remote == []
    assert report.changed_remote == {"l2u-stop-164557": ["name"]}
    assert mappings.get("l2u-stop-164557") == kept


def test_reconcile_since_filters_by_update_time_and_reports_no_missing(sim, sink):
    sink.apply("upsert", sample_location())
    report = sink.reconcile(since="2000-01-01T00:00:00Z")
    [listing] = requests(sim, "GET", f"/{RESOURCE}")[-1:]
    assert listing[2]["filter"] == 'remote_key IS NOT NULL && updated_at>="2000-01-01T00:00:00Z"'
    assert report.scanned == 1 and report.missing_remote == []


@pytest.mark.parametrize("since, sent", [("2026-11-01T10:00:00+10:00", "2026-11-01T00:00:00Z"),
                                         ("2026-11-01T08:00", "2026-11-01T08:00:00Z")])
def test_reconcile_since_is_sent_in_utc(sim, sink, since, sent):
    sink.reconcile(since=since)
    assert requests(sim, "GET", f"/{RESOURCE}")[-1][2]["filter"].endswith(f'updated_at>="{sent}"')


@pytest.mark.parametrize("remote, written, same", [
    ("40.7377100", 40.73771, True), (40.73771, 40.73772, False), ("LOCATE2U ", "Locate2u", True),
    (None, None, True), (None, "", True), ("1", True, False), ("a", "b", False),
])
def test_read_back_tolerates_how_locate_serves_values(remote, written, same):
    assert same_value(remote, written) is same


@pytest.mark.parametrize("body", [{}, [], {"message": "Accepted"}])
def test_a_backgrounded_write_answered_with_a_body_is_read_back_not_taken_as_done(sim, mappings, body):
    """LOCATE answers 202 when it moved a write to the background; only a 202 without a body was read back,
    so one with ``{}`` or a message was recorded as applied while LOCATE still held the old record."""
    sink = make_locate(sim, mappings, background_timeout=0.3)
    sink.apply("upsert", sample_location())
    sim.app.config["FAULTS"].inject(202, body=body, path_prefix=f"/{RESOURCE}/")  # moved to the background,
    with pytest.raises(RetriableError, match="moved PUT .* to background processing"):  # never done here
        sink.apply("upsert", sample_location(name="Renamed"))
    assert [row["name"] for row in records(sim, "l2u-stop-164557")] == ["Locate2u"]


def test_a_create_answered_without_its_id_is_retried_and_found_not_dead_lettered(sim, mappings):
    """A create LOCATE applied and answered 201 with no body was a PermanentError, dead-lettered at once
    though the record was there; the retry finds it by its key."""
    @sim.app.after_request
    def without_a_body(response):
        if flask_request.method == "POST" and flask_request.path == f"/{RESOURCE}" and response.status_code == 201:
            response.set_data(b"")
        return response

    sink = make_locate(sim, mappings)
    with pytest.raises(RetriableError, match="answered without its id"):
        sink.apply("upsert", sample_location())
    assert sink.apply("upsert", sample_location()) == str(records(sim, "l2u-stop-164557")[0]["id"])
    assert len(records(sim, "l2u-stop-164557")) == 1
