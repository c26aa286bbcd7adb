"""The Storepoint sink against the loopback Storepoint simulator."""
import time

import pytest

from tests.fixtures import sim_state
from tests.sink_contract import SinkContract, sample_location
from workers.config import ConfigError, Settings
from workers.resilience.errors import BadAnswer, NotYet, PermanentError, RetriableError
from workers.sinks.storepoint import StorepointSink
from workers.store.mappings import MappingStore

TOKEN = "sp-test-token"


@pytest.fixture
def sim(simulator):
    return simulator("storepoint", token=TOKEN)


def make_sink(sim, mappings):
    settings = Settings(webhook_secret="x" * 16, storepoint_api_url=sim.url, storepoint_api_token=TOKEN)
    return StorepointSink.from_settings(settings, mappings)


def ours(sim, key):
    return sim_state(sim).find(lambda location: f"l2u:{key}" in location["tags"])


def requests(sim, method=None):
    """(method, path) of every request the simulator saw, oldest first."""
    return [(m, path) for m, path, _ in sim_state(sim).requests_log if method in (None, m)]


class TestStorepointContract(SinkContract):
    make_sink = staticmethod(make_sink)

    def remote(self, sim, key):
        return ours(sim, key)

    def remote_name(self, record):
        return record["name"]

    def is_active(self, record):
        return True  # Storepoint lists active locations only; deleted ones are gone

    def invalid_location(self):
        return sample_location(contact_email="not-an-email")


@pytest.fixture
def sink(sim, mappings):
    return make_sink(sim, mappings)


def test_writes_tags_description_contact_and_coordinates(sim, sink):
    remote_id = sink.apply("upsert", sample_location(status="On Route"), {"tags": "vip"})
    [record] = ours(sim, "l2u-stop-164557")
    assert record["id"] == remote_id
    assert record["tags"] == ["locate2u", "on route", "vip", "l2u:l2u-stop-164557"]
    assert record["description"] == "Please call before you deliver"
    assert record["contact"] == {"phone": "212-555-0123", "email": "matt.robinson@example.com"}
    assert record["coordinates"] == {"lat": 40.73771, "lng": -73.987949}
    assert record["address"] == "235 Park Ave S, New York, NY 10003, USA"


def test_update_deleted_there_recreates_and_remaps(sim, sink, mappings):
    first = sink.apply("upsert", sample_location())
    sim_state(sim).locations.pop(first)  # a person deleted it in the Storepoint dashboard
    second = sink.apply("upsert", sample_location(name="Back again"))
    assert second != first and mappings.get("l2u-stop-164557") == second
    [record] = ours(sim, "l2u-stop-164557")
    assert record["id"] == second and record["name"] == "Back again"


def test_missing_coordinates_is_a_permanent_error_naming_them(sim, sink):
    with pytest.raises(PermanentError, match="no coordinates"):
        sink.apply("upsert", sample_location(latitude=None))
    assert requests(sim) == []  # never sent half-filled


def test_missing_coordinates_allowed_skips_a_new_location(sim, sink, mappings):
    assert sink.apply("upsert", sample_location(longitude=None), {"require_coordinates": False}) is None
    assert requests(sim) == [] and mappings.get("l2u-stop-164557") is None


def test_missing_coordinates_allowed_keeps_a_mapped_location_coordinates(sim, sink):
    remote_id = sink.apply("upsert", sample_location())
    sink.apply("upsert", sample_location(name="Renamed", latitude=None, longitude=None),
               {"require_coordinates": False})
    [record] = ours(sim, "l2u-stop-164557")
    assert record["id"] == remote_id and record["name"] == "Renamed"
    assert record["coordinates"] == {"lat": 40.73771, "lng": -73.987949}
    assert "coordinates" not in sim_state(sim).requests_log[-1][2]


def test_custom_fields_are_checked_once_then_written(sim, sink):
    location = sample_location(fields={"cf_l2u_key": "l2u-stop-164557", "name": "Locate2u"})
    sink.apply("upsert", location)
    sink.apply("upsert", location)
    [record] = ours(sim, location.key)
    assert record["custom_fields"] == {"cf_l2u_key": "l2u-stop-164557"}
    assert requests(sim, "GET") == [("GET", "/custom_fields")]


def test_unknown_custom_field_is_a_configuration_error(sim, sink):
    with pytest.raises(ConfigError, match="cf_nope.*the locator has: cf_l2u_key"):
        sink.apply("upsert", sample_location(fields={"cf_nope": "x"}))
    assert requests(sim, "POST") == []


def test_validation_error_names_the_field(sim, sink):
    with pytest.raises(PermanentError) as caught:
        sink.apply("upsert", sample_location(contact_email="nope"))
    assert caught.value.status == 400
    assert "validation_error" in caught.value.message and "contact.email" in caught.value.message


def test_token_never_appears_in_errors(sim, sink):
    sim.app.config["FAULTS"].inject(400, body={"error": "error", "message": f"bad token {TOKEN}"})
    with pytest.raises(PermanentError) as caught:
        sink.apply("upsert", sample_location())
    assert "bad token [redacted]" in caught.value.message and TOKEN not in str(caught.value.to_json())


def test_deactivate_is_refused_storepoint_has_no_active_flag(sink):
    assert not sink.supports_deactivate
    with pytest.raises(PermanentError, match="no active flag"):
        sink.apply("deactivate", sample_location(status="Cancelled"))


def test_delete_of_an_unmapped_location_sends_nothing(sim, sink):
    assert sink.apply("delete", sample_location()) is None
    assert requests(sim) == []


def test_reconcile_rebuilds_a_wiped_mapping_and_reports_drift(sim, sink, mappings, redis_client):
    ids = {stop: sink.apply("upsert", sample_location(stop_id=stop)) for stop in (1, 2, 3, 4)}
    sim_state(sim).locations[ids[2]]["name"] = "Edited by a person"
    sim_state(sim).locations.pop(ids[3])
    duplicate = sim_state(sim).add(tags=["l2u:l2u-stop-1"])["id"]
    foreign = sim_state(sim).add(name="Their own store")["id"]
    redis_client.delete(mappings.key)  # the mapping is lost; what we wrote is not
    mappings.set("l2u-stop-3", ids[3])

    report = sink.reconcile()

    assert report.rebuilt == {"l2u-stop-1": ids[1], "l2u-stop-2": ids[2], "l2u-stop-4": ids[4]}
    assert report.changed_remote == {"l2u-stop-2": ["name"]}
    assert report.missing_remote == ["l2u-stop-3"]
    assert report.untracked == [duplicate]  # ours (our tag), lost track of
    assert report.unknown_remote == [foreign]  # not ours
    assert report.scanned == 5
    before = len(sim_state(sim).locations)
    assert sink.apply("upsert", sample_location(stop_id=1)) == ids[1]
    assert len(sim_state(sim).locations) == before  # updated, not duplicated


def test_reconcile_pages_past_500(sim, sink, mappings):
    for n in range(1203):
        sim_state(sim).add(name=f"Stop {n}", tags=[f"l2u:l2u-stop-{n}"])
    report = sink.reconcile()
    assert report.scanned == 1203 and len(report.rebuilt) == 1203
    assert len(mappings.all()) == 1203
    assert requests(sim, "GET") == [("GET", f"/locations?limit=500&page={page}") for page in (1, 2, 3)]


def test_create_interrupted_before_mapping_is_not_duplicated(sim, redis_client, mappings):
    """A worker killed after Storepoint created the location but before the mapping was saved."""
    sink = make_sink(sim, mappings)
    location = sample_location()
    sink.apply("upsert", location)
    mappings.delete(location.key)  # the mapping write never happened...
    MappingStore(redis_client, "storepoint:intent").set(location.key, "1")  # ...after the intent was marked
    sink.apply("upsert", sample_location(name="After redelivery"))
    [only] = ours(sim, location.key)
    assert only["name"] == "After redelivery"
    assert mappings.get(location.key) == only["id"]
    assert MappingStore(redis_client, "storepoint:intent").get(location.key) is None


def test_create_still_in_flight_at_storepoint_is_waited_out_not_duplicated(sim, mappings):
    """Storepoint holds a create past the client's read timeout and applies it afterwards (a server
    keeps working on a request whose client gave up or was killed). The retry must not create a
    second location while the first may still land: it waits, then finds the first by its tag."""
    sink = make_sink(sim, mappings)
    assert sink.settle_seconds == 60  # what docs/sinks/storepoint.md promises
    sink.client.timeout = (1, 1.5)  # the create gets no answer in time; it may land up to 3 s after it was sent
    location = sample_location()
    sim_state(sim).requests_log.clear()
    sim.app.config["FAULTS"].slow(2.0, path_prefix="/locations")
    with pytest.raises(RetriableError):
        sink.apply("upsert", location)  # read timeout; Storepoint applies it 0.5 s later

    with pytest.raises(NotYet) as waiting:
        sink.apply("upsert", location)  # the retry comes at once: the create may still land
    assert 1.0 < waiting.value.retry_after <= 1.5
    assert requests(sim, "POST") == [("POST", "/locations")]  # no second create was sent

    time.sleep(waiting.value.retry_after)
    assert sink.apply("upsert", sample_location(name="After the wait")) == ours(sim, location.key)[0]["id"]
    [only] = ours(sim, location.key)
    assert only["name"] == "After the wait"
    assert mappings.get(location.key) == only["id"]


@pytest.mark.parametrize("answer", [503, "trickle"])
def test_create_applied_then_answered_badly_is_found_by_the_retry_at_once(sim, mappings, answer):
    """Storepoint created the location and then answered 503, or 201 with an answer that crawls in
    past the exchange's deadline: its status came, so nothing is in flight any more, and the retry
    looks for it by its tag straight away and updates it instead of creating a second one."""
    sink = make_sink(sim, mappings)
    sink.client.timeout = (0.2, 0.8)  # a trickled answer is cut after 1 s; a create may land 1.6 s after it was sent
    location = sample_location()
    sim.app.config["FAULTS"].fail_after_apply(answer, path_prefix="/locations")
    with pytest.raises(RetriableError):
        sink.apply("upsert", location)
    assert len(ours(sim, location.key)) == 1 and mappings.get(location.key) is None

    assert sink.apply("upsert", sample_location(name="Retried")) == ours(sim, location.key)[0]["id"]
    [only] = ours(sim, location.key)
    assert only["name"] == "Retried"


def test_delete_after_an_interrupted_create_waits_for_it_then_deletes_it(sim, mappings):
    """A create for the stop got no answer (its worker was killed) and Storepoint applies it late;
    the stop is cancelled meanwhile. The delete has no mapping to go by, so it must wait until that
    create can no longer land and then delete what it left, not report "nothing to delete"."""
    sink = make_sink(sim, mappings)
    sink.client.timeout = (1, 1.5)  # the create gets no answer in time; it may land up to 3 s after it was sent
    location = sample_location()
    sim.app.config["FAULTS"].slow(2.0, path_prefix="/locations")
    with pytest.raises(RetriableError):
        sink.apply("upsert", location)  # read timeout; Storepoint applies it 0.5 s later

    cancelled = sample_location(status="Cancelled")
    with pytest.raises(NotYet) as waiting:
        sink.apply("delete", cancelled)
    assert 1.0 < waiting.value.retry_after <= 1.5
    time.sleep(waiting.value.retry_after)
    assert sink.apply("delete", cancelled) is None
    assert ours(sim, location.key) == []
    assert MappingStore(mappings.redis, "storepoint:intent").get(location.key) is None


def test_delete_after_a_create_answered_503_deletes_what_it_left(sim, mappings):
    sink = make_sink(sim, mappings)
    location = sample_location()
    sim.app.config["FAULTS"].fail_after_apply(503, path_prefix="/locations")
    with pytest.raises(RetriableError):
        sink.apply("upsert", location)
    assert sink.apply("delete", sample_location(status="Cancelled")) is None
    assert ours(sim, location.key) == []


def test_a_create_answered_with_a_null_id_is_a_bad_answer_not_a_mapping_to_nothing(sim, mappings):
    """``{"location": {"id": null}}``: the key is there, its value is not. Before, saving it as the
    mapping failed inside the sink (a bug dead letter for the write); it is an answer that is not
    the API's, retried (and the retry finds by its tag a location the create did make)."""
    sink = make_sink(sim, mappings)
    location = sample_location()
    sim.app.config["FAULTS"].inject(201, body={"location": {"id": None}}, path_prefix="/locations")
    with pytest.raises(BadAnswer) as caught:
        sink.apply("upsert", location)
    assert "answered 201 with a body without location.id" in caught.value.message
    assert mappings.get(location.key) is None


@pytest.mark.parametrize("location_id", ["", 7, "   "])
def test_a_create_answered_with_an_id_that_is_not_one_is_a_bad_answer_not_a_second_location(sim, mappings,
                                                                                              location_id):
    """``"id": ""`` was mapped: the next change found no id to update and created the location again."""
    sink = make_sink(sim, mappings)
    sim.app.config["FAULTS"].inject(200, body={"success": True, "location": {"id": location_id}},
                                    path_prefix="/locations")
    with pytest.raises(BadAnswer, match="not a Storepoint location id"):
        sink.apply("upsert", sample_location())
    assert mappings.get("l2u-stop-164557") is None


@pytest.mark.parametrize("action", ["upsert", "delete"])
def test_a_404_that_is_not_storepoints_not_found_is_retried_not_taken_for_a_deleted_location(sim, mappings, action):
    """A 404 a gateway answers itself (``{"message": "no Route matched…"}``, not Storepoint's
    ``{"error": "not_found"}``) was taken for a location deleted there: an update created a second
    location, a delete was recorded as done with the location still there."""
    sink = make_sink(sim, mappings)
    remote_id = sink.apply("upsert", sample_location())
    sim.app.config["FAULTS"].inject(404, body={"message": "no Route matched with those values"},
                                    path_prefix="/locations/")
    with pytest.raises(RetriableError, match="not Storepoint's not_found"):
        sink.apply(action, sample_location(name="Renamed"))
    assert [location["id"] for location in ours(sim, "l2u-stop-164557")] == [remote_id]
    assert mappings.get("l2u-stop-164557") == remote_id


@pytest.mark.parametrize("action", ["upsert", "delete"])
def test_a_write_answered_200_with_success_false_is_an_error_not_applied(sim, mappings, action):
    """Every Storepoint answer carries ``success``; a 200 saying ``false`` was recorded as applied (an
    update, a delete) while Storepoint kept the old location."""
    sink = make_sink(sim, mappings)
    remote_id = sink.apply("upsert", sample_location())
    sim.app.config["FAULTS"].inject(200, body={"success": False, "error": "error", "message": "Could not save"},
                                    path_prefix="/locations/")
    with pytest.raises(RetriableError, match="answered 200 saying it failed.*error: Could not save"):
        sink.apply(action, sample_location(name="Renamed"))
    [record] = ours(sim, "l2u-stop-164557")
    assert record["name"] == "Locate2u" and mappings.get("l2u-stop-164557") == remote_id


def _created_behind(sim, mappings, others):
    """The sink and a location whose create Storepoint applied after ``others`` locations and answered 503."""
    sink = make_sink(sim, mappings)
    for n in range(others):
        sim_state(sim).add(name=f"Other {n}", tags=[f"l2u:l2u-stop-{n}"])
    location = sample_location()
    sim.app.config["FAULTS"].fail_after_apply(503, path_prefix="/locations")
    with pytest.raises(RetriableError):
        sink.apply("upsert", location)
    return sink, location


def test_a_create_looked_for_while_another_client_deletes_is_found_not_created_twice(sim, mappings):
    """Storepoint lists by page; a location deleted on page 1 while the relay reads it moves the first
    of page 2 onto page 1, already read. The create's location sat there: the look missed it and the
    retry created a second one (the large chaos run of seed 20261129 found one such duplicate)."""
    sink, location = _created_behind(sim, mappings, 500)  # the 501st, first of page 2
    sim_state(sim).deletes_while_listing = 1  # right after the retry's look reads page 1
    assert sink.apply("upsert", sample_location(name="Retried")) == ours(sim, location.key)[0]["id"]
    [only] = ours(sim, location.key)
    assert only["name"] == "Retried"


def test_a_create_look_that_never_reads_a_steady_list_waits_and_creates_nothing(sim, mappings):
    sink, location = _created_behind(sim, mappings, 1200)
    sim_state(sim).deletes_while_listing = 100  # a delete after every page served
    with pytest.raises(RetriableError, match="list changed while it was read, 3 times in a row"):
        sink.apply("upsert", sample_location(name="Retried"))
    assert len(ours(sim, location.key)) == 1 and requests(sim, "POST") == [("POST", "/locations")]


def test_a_pager_that_does_not_move_is_a_bad_answer_not_an_endless_read_or_a_second_create(sim, mappings):
    """Every page answered with page 1 and a ``next``: the look read page 1 forever."""
    sink, location = _created_behind(sim, mappings, 500)
    sim_state(sim).ignores_page = True
    with pytest.raises(BadAnswer, match=r"answered page 2 with locations of earlier pages: its paging does not move"):
        sink.apply("upsert", sample_location(name="Retried"))
    assert len(ours(sim, location.key)) == 1 and requests(sim, "POST") == [("POST", "/locations")]
