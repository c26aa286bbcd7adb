"""Stop import: reading CSV/JSON with line numbers, row validation, batches against the simulator."""
import json
import time

import pytest
from click.testing import CliRunner

from workers.locate2u.client import Locate2uClient, RetryPolicy
from workers.locate2u.stops_command import stops_import
from workers.locate2u.stops_import import (ImportFileError, ImportReport, Place, RowError, import_stops, read_rows,
                                           validate_rows)
from workers.locate2u.token_store import TokenStore
from workers.locate2u.tokens import ReauthorizationRequired

CSV = """name,address,contact.name,contact.email,location.latitude,location.longitude,tripDate,durationMinutes
Alpha,1 George St Sydney,Ann,ann@example.com,-33.86,151.20,2024-05-01,10
"Bravo
two lines",,Bob,not-an-email,,,,
Charlie,3 Pitt St Sydney,,,95,151.2,2024-13-01,ten
Delta,4 King St Sydney,,,,,,,surplus
Echo,5 Market St Sydney,,,,,,
"""

JSON = """[
  {"name": "Alpha", "address": "1 George St", "customerId": 7},
  {"name": "Bravo",
   "address": "  ", "adress": "typo"},
  {"name": "Charlie", "address": "3 Pitt St", "contact": {"email": "c@example.com"}},
  "not an object"
]
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_rows_are_validated_with_line_and_field(tmp_path):
    valid, errors = validate_rows(read_rows(write(tmp_path, "stops.csv", CSV)))
    assert [place for place, _ in valid] == [Place(2), Place(7)]
    assert valid[0][1] == {"name": "Alpha", "address": "1 George St Sydney",
                           "contact": {"name": "Ann", "email": "ann@example.com"},
                           "location": {"latitude": -33.86, "longitude": 151.2},
                           "tripDate": "2024-05-01", "durationMinutes": 10}
    assert [str(e) for e in errors] == [
        "line 3: address: Missing data for required field.",
        "line 3: contact.email: Not a valid email address.",
        "line 5: location.latitude: Must be greater than or equal to -90 and less than or equal to 90.",
        "line 5: tripDate: Not a valid date.",
        "line 5: durationMinutes: Not a valid integer.",
        "line 6: (values beyond the header): Unknown field.",
    ]


def test_a_nested_field_of_the_wrong_type_is_named_itself(tmp_path):
    """``"contact": "Ann"`` was reported as field ``contact.row``."""
    rows = read_rows(write(tmp_path, "stops.json", '[{"name": "A", "address": "1 St", "contact": "Ann"}]'))
    assert validate_rows(rows)[1] == [RowError(Place(1, 1), "contact", "Invalid input type.")]


def test_json_rows_keep_their_lines(tmp_path):
    valid, errors = validate_rows(read_rows(write(tmp_path, "stops.json", JSON)))
    assert [(place, stop["name"]) for place, stop in valid] == [(Place(2, 1), "Alpha"), (Place(5, 3), "Charlie")]
    assert valid[0][1]["customerId"] == "7"
    assert errors == [RowError(Place(3, 2), "address", "Must not be blank."), RowError(Place(3, 2), "adress", "Unknown field."),
                      RowError(Place(6, 4), "row", "Invalid input type.")]


def test_items_of_minified_json_are_told_apart_by_their_number(tmp_path):
    """Minified JSON is one line: every row was "line 1", and rows failing for two reasons were
    counted once with all the others ("failed 1" for three failed rows)."""
    rows = [{"name": "A", "address": "1 St"}, {"name": "B"}, {"address": "3 St"}, {"name": "D", "adress": "x"}]
    path = write(tmp_path, "stops.json", json.dumps(rows, separators=(",", ":")))
    valid, errors = validate_rows(read_rows(path))
    assert [str(place) for place, _ in valid] == ["line 1, item 1"]
    assert [str(error) for error in errors] == [
        "line 1, item 2: address: Missing data for required field.",
        "line 1, item 3: name: Missing data for required field.",
        "line 1, item 4: address: Missing data for required field.",
        "line 1, item 4: adress: Unknown field."]
    report = ImportReport(errors=errors, not_sent=[place for place, _ in valid])
    assert report.summary() == ("created 0, failed 3, not sent 1 (from line 1, item 1 on: import them once the "
                                "problem is fixed)")
    result = CliRunner().invoke(stops_import, [str(path), "--dry-run"])
    assert result.exit_code == 1 and result.output.splitlines()[-1] == "dry run: 1 row(s) valid, 3 failed; nothing sent"


@pytest.mark.parametrize("text, message", [
    ("", "no header row"),
    ('[{"name": "A"} {"name": "B"}]', "expected ',' or ']'"),
    ('[{"name": "A",]', "invalid JSON at line 1"),
    ('[] trailing', "unexpected content"),
    ('[' + '[' * 100000 + ']' * 100000 + ']', "invalid JSON at line 1: nested too deeply"),  # RecursionError before
    ("name,address,customFields.a,customFields.a.b\nA,1 St,x,y\n",  # TypeError before
     "columns customFields.a and customFields.a.b clash: one holds a value, the other a field inside it"),
])
def test_unreadable_files_are_one_clear_error(tmp_path, text, message):
    with pytest.raises(ImportFileError, match=message):
        read_rows(write(tmp_path, "bad.json" if text else "empty.csv", text))


@pytest.fixture
def client(sim, settings, redis_client):
    return Locate2uClient.from_settings(sim.configure(settings), redis_client, RetryPolicy(sleep=lambda s: None))


def test_valid_rows_go_in_batches_and_the_report_adds_up(client, sim, tmp_path):
    rows = [(Place(n + 2), {"name": f"S{n}", "address": f"{n} Main St"}) for n in range(7)] + [(Place(9), {"name": "no address"})]
    done = []
    report = import_stops(client, rows, batch_size=3, progress=done.append)
    assert done == [1, 3, 3, 1] and sum(done) == len(rows)
    assert [place.line for place, _ in report.created] == list(range(2, 9))
    assert sorted(stop_id for _, stop_id in report.created) == sorted(sim.state.stops)
    assert [p for p in sim.state.requests_log if p[1] == "/v1/Stops/import"] == [("POST", "/v1/Stops/import")] * 3
    assert report.summary() == "created 7, failed 1"


def test_a_failed_batch_is_reported_row_by_row(client, sim):
    rows = [(Place(2), {"name": "A", "address": "1 A St"}), (Place(3), {"name": "B", "address": "2 B St"})]
    sim.faults.inject(503, path_prefix="/v1/Stops/import")
    failed = import_stops(client, rows, batch_size=1)
    assert [str(e) for e in failed.unconfirmed] == [  # a POST is not retried on 5xx: it may have been applied
        f"line 2: row: may have been created: POST {sim.url}/v1/Stops/import answered 503"]
    assert [place for place, _ in failed.created] == [Place(3)] and failed.errors == []
    sim.faults.inject(422, path_prefix="/v1/Stops/import")
    refused = import_stops(client, rows[:1], batch_size=1)
    assert [str(e) for e in refused.errors] == [
        f"line 2: row: not imported: POST {sim.url}/v1/Stops/import answered 422"] and refused.unconfirmed == []


def test_rows_the_api_rejects_are_reported_with_their_lines():
    class RejectsFirst:
        def import_stops(self, stops):
            return {"created": [501], "failed": [{"index": 0, "errors": {"address": ["Not deliverable."]}}]}

    rows = [(Place(4), {"name": "A", "address": "1 A St"}), (Place(6), {"name": "B", "address": "2 B St"})]
    report = import_stops(RejectsFirst(), rows)
    assert report.created == [(Place(6), 501)] and [str(e) for e in report.errors] == ["line 4: address: Not deliverable."]


@pytest.mark.parametrize("how", ["drop", "garbled"])
def test_a_batch_that_may_have_been_created_is_not_reported_as_not_imported(client, sim, how):
    """The import applied, then its answer was lost (``drop``) or was a proxy's page (``garbled``). The
    report said "not imported", so the rows were imported again: every stop twice (the API has no
    lookup by reference to check first)."""
    rows = [(Place(2), {"name": "A", "address": "1 A St"}), (Place(3), {"name": "B", "address": "2 B St"})]
    sim.faults.fail_after_apply(how, path_prefix="/v1/Stops/import")
    report = import_stops(client, rows, batch_size=1)
    assert len(sim.state.stops) == 2  # both were created
    assert [place for place, _ in report.created] == [Place(3)] and report.errors == []
    assert [row.place for row in report.unconfirmed] == [Place(2)]
    assert str(report.unconfirmed[0]).startswith(f"line 2: row: may have been created: POST {sim.url}/v1/Stops/import ")
    assert report.summary() == ("created 1, failed 0, unconfirmed 1 (the request got no usable answer: the stops "
                                "may have been created; look in Locate2u before importing those rows again)")


def test_rows_an_answer_leaves_out_are_unconfirmed_not_dropped_from_the_report(client, sim):
    sim.faults.inject(200, body={"created": [501], "failed": []}, path_prefix="/v1/Stops/import")
    rows = [(Place(4), {"name": "A", "address": "1 A St"}), (Place(6), {"name": "B", "address": "2 B St"})]
    report = import_stops(client, rows)
    assert report.created == [] and report.errors == []
    assert [str(row) for row in report.unconfirmed] == [
        f"line {line}: row: may have been created: the answer lists 1 created for the 2 rows it did not refuse"
        for line in (4, 6)]


def test_an_import_stopped_by_a_lost_authorisation_keeps_what_it_did_and_what_it_did_not_send(sim, settings,
                                                                                               redis_client):
    """Re-authorisation needed on the second batch (the user withdrew the relay's access): the report of
    the first was lost with the exit, so the stops it had created were imported again."""
    code_settings = sim.configure(settings, locate2u_grant="authorization_code")
    issued = sim.state.issue_tokens(code_settings.locate2u_client_id, "integrations-api", refresh=True)
    far = time.time() + 3600
    TokenStore.from_settings(redis_client, code_settings).save({
        "access_token": issued["access_token"], "refresh_token": issued["refresh_token"], "expires_at": far,
        "refresh_at": far, "scope": "integrations-api", "grant": "authorization_code",
        "client_id": code_settings.locate2u_client_id})
    client = Locate2uClient.from_settings(code_settings, redis_client, RetryPolicy(sleep=lambda s: None))

    def withdrawn_after_the_first_batch(count):
        if sim.state.stops:
            sim.state.revoke_access_tokens()
            sim.state.revoke_refresh_tokens()

    rows = [(Place(line), {"name": f"S{line}", "address": f"{line} Main St"}) for line in (2, 3, 4)] + [(Place(5), {"name": "X"})]
    report = ImportReport()
    with pytest.raises(ReauthorizationRequired):
        import_stops(client, rows, batch_size=1, progress=withdrawn_after_the_first_batch, report=report)
    assert [place for place, _ in report.created] == [Place(2)] and [error.place for error in report.errors] == [Place(5)]
    assert report.not_sent == [Place(3), Place(4)] and report.unconfirmed == [] and len(sim.state.stops) == 1
    assert report.summary() == ("created 1, failed 1, not sent 2 (from line 3 on: import them once the "
                                "problem is fixed)")
