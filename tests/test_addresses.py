"""Splitting one-line stop addresses: examples, and properties checked with hypothesis."""
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.domain.addresses import US_STATES, AddressParts, locality_parts, split_us_address, street_door
from workers.sinks.deliverycom import RULES, rule_violations

PART_FIELDS = ("street", "unit", "city", "state", "zip_code", "country", "problem")


@pytest.mark.parametrize("text, street, unit, city, state, zip_code", [
    ("235 Park Ave S, New York, NY 10003, USA", "235 Park Ave S", "", "New York", "NY", "10003"),
    ("235 Park Ave S Floor 5, New York, NY 10003", "235 Park Ave S", "Floor 5", "New York", "NY", "10003"),
    ("199 Water St Apt 4B, New York NY 10038-1234", "199 Water St", "Apt 4B", "New York", "NY", "10038"),
    ("1600 Pennsylvania Avenue NW, Washington, DC 20500", "1600 Pennsylvania Avenue NW", "", "Washington", "DC",
     "20500"),
    ("350 5th Ave, New York, ny", "350 5th Ave", "", "New York", "NY", ""),
    ("235 Park Ave S, New York, NY 100345", "235 Park Ave S", "", "New York", "NY", "100345"),
])
def test_us_addresses(text, street, unit, city, state, zip_code):
    parts = split_us_address(text)
    assert parts == AddressParts(street=street, unit=unit, city=city, state=state, zip_code=zip_code, country="US",
                                 us=True)


@pytest.mark.parametrize("text, problem", [
    ("", "the address is empty"),
    ("   ", "the address is empty"),
    (None, "the address is empty"),
    ("55 Miller St, Pyrmont NSW 2009, Australia", "the address is not in the US (country 'Australia')"),
    ("1 Queen St W, Toronto, ON M5H 2N2, Canada", "the address is not in the US (country 'Canada')"),
    ("10 Downing Street, London SW1A 2AA, United Kingdom", "the address is not in the US (country 'United Kingdom')"),
    ("PO Box 123, Austin, TX 73301", "the address is a po box, not a street address"),
    ("1 Main St, Springfield", "no US state found in the address (got '')"),
])
def test_addresses_that_are_not_us_street_addresses(text, problem):
    parts = split_us_address(text)
    assert not parts.us and parts.problem == problem


@pytest.mark.parametrize("text, city, postal", [
    ("235 Park Ave S, New York, NY 10003, USA", "New York", "10003"),
    ("55 Miller St, Pyrmont NSW 2009, Australia", "Pyrmont", "2009"),
    ("Calle Mayor 1, 28013 Madrid, Spain", "Madrid", "28013"),
    ("10 Downing Street, London SW1A 2AA, United Kingdom", "London", "SW1A 2AA"),
    ("nowhere", "", ""),
])
def test_locality_parts(text, city, postal):
    assert locality_parts(text) == (city, postal)


# ------------------------------------------------------------------ properties

STREET_NAMES = ["Park", "Water", "Main", "Oak", "Maple", "Washington", "Lincoln", "Elm", "Broadway", "Market"]
STREET_TYPES = ["St", "Ave", "Rd", "Blvd", "Ln", "Dr", "Way", "Street", "Avenue"]
CITIES = ["New York", "Brooklyn", "San Francisco", "Chicago", "Boston", "Austin", "Springfield", "Portland"]
UNITS = ["", "Apt 4B", "Suite 200", "Floor 5", "Unit 7"]
STATES = sorted(US_STATES - {"PR", "VI", "GU", "AS", "MP"})


@st.composite
def us_addresses(draw):
    """``(text, expected parts)`` for a well-formed one-line US street address."""
    street = (f"{draw(st.integers(1, 99999))} {draw(st.sampled_from(STREET_NAMES))} "
              f"{draw(st.sampled_from(STREET_TYPES))}")
    unit, city, state = draw(st.sampled_from(UNITS)), draw(st.sampled_from(CITIES)), draw(st.sampled_from(STATES))
    zip_code = f"{draw(st.integers(0, 99999)):05d}"
    text = (f"{street}{' ' + unit if unit else ''}, {city}, {state} {zip_code}"
            f"{draw(st.sampled_from(['', '-1234']))}{draw(st.sampled_from(['', ', USA', ', United States']))}")
    return text, AddressParts(street=street, unit=unit, city=city, state=state, zip_code=zip_code, country="US",
                              us=True)


address_like = st.lists(st.sampled_from(
    ["1", "235", "Park", "Ave", "S", ",", "New", "York", "NY", "ny", "10003", "94103-1234", "USA", "Apt", "4B", "#",
     "Suite", "PO", "Box", "St", "CA", "Road", "Australia", "NSW", "2009", "Canada", "-", "&", "1/2"]),
    max_size=12).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), address_like))
def test_never_raises_and_always_explains(text):
    parts = split_us_address(text)
    assert all(isinstance(getattr(parts, name), str) for name in PART_FIELDS)
    assert bool(parts.problem) != parts.us
    city, postal = locality_parts(text)
    assert isinstance(city, str) and isinstance(postal, str)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), address_like))
def test_us_parts_can_be_checked_against_the_seed_rules(text):
    parts = split_us_address(text)
    if not parts.us:
        return
    assert parts.state in US_STATES and parts.country == "US"
    for name in ("street", "unit", "city", "state", "zip_code"):
        value = getattr(parts, name)
        assert value == value.strip(" ,"), name
    problems = rule_violations({**dataclasses.asdict(parts), "phone": "2125550123"})
    assert set(problems) <= set(RULES) - {"state", "phone"}


@settings(max_examples=200, deadline=None)
@given(us_addresses())
def test_well_formed_us_addresses_split_exactly_and_pass_the_rules(case):
    text, expected = case
    parts = split_us_address(text)
    assert parts == expected
    assert rule_violations({**dataclasses.asdict(parts), "phone": "2125550123"}) == {}


@pytest.mark.parametrize("ours, theirs, same", [
    (("235 Park Ave S", "Floor 5"), ("235 PARK S AVE", "floor 5"), True),  # the seed's standardised form
    (("235 Park Avenue South", None), ("235 PARK AVE S", ""), True),
    (("235 Park Ave S", "Fl 5"), ("235 PARK AVE S", "Floor 5"), True),
    (("1 Main St", "#5"), ("1 MAIN ST", "APT 5"), True),
    (("1 Main St", "Building 2 Floor 5"), ("1 MAIN ST", "BLDG 2 FL 5"), True),
    (("235 E 20th St", ""), ("235 EAST 20TH STREET", ""), True),
    (("235 Park Ave S", "Floor 9"), ("235 PARK AVE S", "floor 5"), False),  # another floor
    (("235 Park Ave S", ""), ("235 PARK AVE S", "floor 5"), False),  # a unit against none
    (("1 Main St", "Building 2 Floor 5"), ("1 MAIN ST", "BLDG 3 FL 5"), False),
    (("235 E 20th St", ""), ("235 W 20TH ST", ""), False),  # the other side
    (("235 Park Ave S", ""), ("233 PARK AVE S", ""), False),  # the next house
    (("235 Park Ave S", ""), ("235 MADISON AVE", ""), False),  # another street, same number
    (("Park Ave", ""), ("Park Ave", ""), False),  # no house number: never the same
])
def test_street_door_tells_one_door_from_its_neighbours(ours, theirs, same):
    door = street_door(*ours)
    assert (door is not None and door == street_door(*theirs)) is same
