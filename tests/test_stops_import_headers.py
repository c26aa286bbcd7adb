"""``l2u-relay stops import`` takes the CSV people have: headers in any case and spelling, synonyms, the
sample in docs/, header problems reported once before anything is sent, --dry-run sending nothing.
Run as the real command against the Locate2u simulator."""
import subprocess

import pytest

from tests.processes import BIN, process_env
from workers.ops.devstack import REPO_ROOT
from workers.locate2u.stops_import import ImportFileError, map_header

SAMPLE = REPO_ROOT / "docs" / "stops-sample.csv"
SNAKE_CASE = """name,address,contact_name,contact_phone,contact_email,trip_date
Alpha,1 George St Sydney,Ann,0212345001,ann@example.com,2026-12-01
Bravo,3 Pitt St Sydney,Bob,0212345002,bob@example.com,2026-12-01
"""
TITLE_CASE = """Name,Address,Contact Name,Contact Phone,Contact.Email,Trip Date,Lat,Lng
Alpha,1 George St Sydney,Ann,0212345001,ann@example.com,2026-12-01,-33.86,151.21
Bravo,3 Pitt St Sydney,Bob,0212345002,bob@example.com,2026-12-01,-33.87,151.20
"""


def import_command(sim, settings, path, *options):
    env = process_env(sim.configure(settings))
    return subprocess.run([str(BIN / "l2u-relay"), "stops", "import", str(path), *options], env=env,
                          capture_output=True, text=True, timeout=120)


def imported(sim):
    return [stop for stop in sim.state.stops.values() if stop.get("status") == "Created"]


def test_one_column_whatever_its_spelling():
    for spelling in ("Contact Name", "contact_name", "contact.name", "CONTACT-NAME", "contact"):
        assert map_header(["name", "address", spelling])[spelling] == "contact.name"
    assert map_header(["Stop Name", "Address", "Phone", "lat", "LONG", "Custom Fields.Door Code"]) == {
        "Stop Name": "name", "Address": "address", "Phone": "contact.phone", "lat": "location.latitude",
        "LONG": "location.longitude", "Custom Fields.Door Code": "customFields.Door Code"}


def test_header_problems_are_listed_together_with_the_accepted_columns():
    with pytest.raises(ImportFileError) as caught:
        map_header(["Name", "Adress", "phone", "Phone Number", "colour"])
    message = str(caught.value)
    assert "unknown column 'Adress'" in message and "unknown column 'colour'" in message
    assert "columns 'phone' and 'Phone Number' are both contact.phone" in message
    assert "no address column" in message
    assert "Accepted columns" in message and "contact.email: also email" in message


def test_the_sample_csv_in_docs_imports(sim, settings):
    result = import_command(sim, settings, SAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "created 3, failed 0" in result.stdout
    stops = {stop["name"]: stop for stop in imported(sim)}
    assert stops["Harbour Cafe"]["contact"]["name"] == "Ann Lee"
    assert stops["Harbour Cafe"]["location"] == {"latitude": -33.861, "longitude": 151.21}
    assert stops["Market Florist"]["notes"] == "Fragile, keep upright"


@pytest.mark.parametrize("text", [SNAKE_CASE, TITLE_CASE], ids=["snake_case", "Title Case"])
def test_snake_case_and_title_case_headers_import(sim, settings, tmp_path, text):
    path = tmp_path / "stops.csv"
    path.write_text(text)
    result = import_command(sim, settings, path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "created 2, failed 0" in result.stdout
    stops = {stop["name"]: stop for stop in imported(sim)}
    assert stops["Alpha"]["contact"]["name"] == "Ann" and stops["Bravo"]["contact"]["email"] == "bob@example.com"
    assert stops["Alpha"]["contact"]["phone"] == "0212345001" and stops["Alpha"]["tripDate"].startswith("2026-12-01")


def test_a_header_problem_is_reported_once_and_nothing_is_sent(sim, settings, tmp_path):
    path = tmp_path / "stops.csv"
    path.write_text("name,adress,contact_nme\n" + "A,1 Main St,Ann\n" * 50)
    result = import_command(sim, settings, path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("unknown column 'adress'") == 1 and "contact_nme" in result.stderr
    assert "Traceback" not in result.stderr and "line 2" not in result.stdout + result.stderr
    assert sim.state.requests_log == []  # not even a token was asked for


def test_dry_run_checks_every_row_and_sends_nothing(sim, settings, tmp_path):
    path = tmp_path / "stops.csv"
    path.write_text(SNAKE_CASE + "Charlie,,Cy,,not-an-email,2026-12-01\n")
    result = import_command(sim, settings, path, "--dry-run")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "line 4: address: Missing data for required field." in result.stdout
    assert "line 4: contact.email: Not a valid email address." in result.stdout
    assert "dry run: 2 row(s) valid, 1 failed; nothing sent" in result.stdout
    assert sim.state.requests_log == []


def test_help_lists_the_columns():
    result = subprocess.run([str(BIN / "l2u-relay"), "stops", "import", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for column in ("name (required)", "contact.phone: also phone", "location.latitude", "customFields.NAME",
                   "docs/stops-sample.csv", "--dry-run"):
        assert column in result.stdout, column


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_csv_excel_wrote_with_semicolons_or_tabs_imports(sim, settings, tmp_path, delimiter):
    """Excel writes ';' where the decimal mark is a comma, and "Text (Tab delimited)": before, the whole
    header was one unknown column and nothing was imported."""
    path = tmp_path / "stops.csv"
    path.write_text(TITLE_CASE.replace(",", delimiter), encoding="utf-8-sig")
    result = import_command(sim, settings, path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "created 2, failed 0" in result.stdout
    assert {stop["name"]: stop["contact"]["phone"] for stop in imported(sim)} == {"Alpha": "0212345001",
                                                                                   "Bravo": "0212345002"}
