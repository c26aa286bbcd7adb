"""Hypothesis properties: every event schema, the address splitting, the webhook URL tokens.

Bounded for CI by ``BOUNDED`` (200 examples per property, no deadline); set
``L2U_HYPOTHESIS_EXAMPLES`` for a longer local run.
"""
import json
import os
import string
from datetime import datetime, timedelta, timezone

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from receiver.openapi import build_document
from tests.payloads import PUBLISHED
from workers.domain.addresses import OTHER_COUNTRY_NAMES, US_STATES, locality_parts, split_us_address
from workers.domain.events import ANY_ENTITY_KEYS, EVENT_TYPES, SCHEMAS, missing_key_field, parse_event
from workers.domain.instants import exact_instant
from workers.locate2u.webhook_auth import token_matches, url_token, webhook_url

BOUNDED = settings(max_examples=int(os.environ.get("L2U_HYPOTHESIS_EXAMPLES", 200)), deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])
event_types = st.sampled_from(sorted(EVENT_TYPES))
DOCUMENT = schemathesis.openapi.from_dict(build_document())

# --- event schemas ----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=10)
any_id = st.one_of(st.integers(), st.floats(), st.text(max_size=12), st.booleans(), st.none(), json_values)
offsets = st.integers(-14 * 60, 14 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes)))
aware_datetimes = st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2200, 1, 1), timezones=offsets)


def field_names(event_type):
    return sorted(SCHEMAS[event_type]().fields)


@st.composite
def bodies(draw, event_type):
    """Any JSON object over the type's own field names (any values), plus unknown fields."""
    names = field_names(event_type) + list(ANY_ENTITY_KEYS)
    known = draw(st.dictionaries(st.sampled_from(names), any_id | json_values, max_size=len(names)))
    extra = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    return {**extra, **known}


@st.composite
def valid_bodies(draw, event_type):
    """A published payload of the type with new ids, action date and extra fields."""
    body = dict(PUBLISHED[event_type])
    for name in EVENT_TYPES[event_type].key_fields or (draw(st.sampled_from(ANY_ENTITY_KEYS)),):
        body[name] = draw(st.integers(1, 2**63 - 1) | st.integers(1, 10**12).map(str))
    body["actionDate"] = draw(aware_datetimes).isoformat()
    body.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda key: key not in body), json_values,
                                     max_size=3)))
    return body


@BOUNDED
@given(data=st.data(), event_type=event_types)
def test_parse_event_raises_only_validation_errors_naming_fields(data, event_type):
    body = data.draw(bodies(event_type))
    try:
        event = parse_event("d", event_type, body)
    except ValidationError as exc:
        assert isinstance(exc.messages, dict) and exc.messages
        assert all(isinstance(name, str) for name in exc.messages)
        return
    assert event.action_date.tzinfo is not None
    assert event.payload is body
    json.dumps(event.to_json())


@BOUNDED
@given(data=st.data(), event_type=event_types)
def test_what_the_receiver_rejects_for_a_missing_key_the_schema_rejects_too(data, event_type):
    body = data.draw(bodies(event_type))
    missing = missing_key_field(event_type, body)
    assume(missing is not None)
    with pytest.raises(ValidationError) as caught:
        parse_event("d", event_type, body)
    if EVENT_TYPES[event_type].key_fields:  # note.created's any-one-key rule runs only once the fields pass
        assert missing in caught.value.messages


@BOUNDED
@given(data=st.data(), event_type=event_types)
def test_valid_bodies_parse_to_their_ids_and_instant(data, event_type):
    body = data.draw(valid_bodies(event_type))
    event = parse_event("d", event_type, body)
    assert missing_key_field(event_type, body) is None
    for name, value in event.keys.items():
        assert value == int(body[name]) and isinstance(value, int)
    assert event.action_date == datetime.fromisoformat(body["actionDate"])
    assert event.entity == EVENT_TYPES[event_type].entity
    assert json.loads(json.dumps(event.to_json()))["payload"] == body  # unknown fields kept


def locate2u_text(ticks, offset):
    """``ticks`` (100 ns since the epoch) as Locate2u writes an actionDate: seven digits, in ``offset``."""
    seconds, rest = divmod(ticks, 10**7)
    local = datetime.fromtimestamp(seconds, timezone.utc).astimezone(offset)
    return local.strftime("%Y-%m-%dT%H:%M:%S") + f".{rest:07d}" + local.isoformat()[19:]


@BOUNDED
@given(ticks=st.lists(st.integers(0, 7 * 10**16), min_size=2, max_size=2), offset_pair=st.tuples(offsets, offsets))
def test_instants_order_as_locate2u_ticks_do_in_any_offsets(ticks, offset_pair):
    """To the 100 ns, whatever each side's UTC offset: through the version text the fan-out builds too."""
    texts = [locate2u_text(tick, offset) for tick, offset in zip(ticks, offset_pair)]
    versions = [parse_event("d", "trip.created", {"tripId": 1, "actionDate": text}).version for text in texts]
    for written in (texts, versions):
        instants = [exact_instant(text) for text in written]
        assert (instants[0] < instants[1]) == (ticks[0] < ticks[1])
        assert (instants[0] == instants[1]) == (ticks[0] == ticks[1])


@BOUNDED
@given(data=st.data(), event_type=event_types, fraction=st.floats(0.01, 0.99))
def test_a_fractional_id_is_refused_not_truncated_to_another_entity(data, event_type, fraction):
    body = data.draw(valid_bodies(event_type))
    name = next(name for name in ANY_ENTITY_KEYS if name in body and body[name] is not None)
    body[name] = float(min(int(body[name]), 2**40)) + fraction  # below 2**52 a fraction survives
    with pytest.raises(ValidationError) as caught:
        parse_event("d", event_type, body)
    assert name in caught.value.messages


def document_bodies(mode):
    """``(event_type, case)`` drawn from the operation of every event type in the OpenAPI document."""
    operations = {event_type: DOCUMENT[f"/webhooks/locate2u/{event_type}/{{token}}"]["POST"]
                  for event_type in sorted(EVENT_TYPES)}
    return event_types.flatmap(lambda event_type: st.tuples(
        st.just(event_type), operations[event_type].as_strategy(generation_mode=mode)))


@BOUNDED
@given(drawn=document_bodies(schemathesis.GenerationMode.POSITIVE))
def test_every_body_the_published_document_calls_valid_parses(drawn):
    """The OpenAPI document is generated from the schemas: what it calls valid, the workers accept."""
    event_type, case = drawn
    event = parse_event("d", event_type, case.body)
    assert missing_key_field(event_type, case.body) is None and event.keys


@BOUNDED
@given(drawn=document_bodies(schemathesis.GenerationMode.NEGATIVE))
def test_bodies_the_document_calls_invalid_never_crash_the_schema(drawn):
    event_type, case = drawn
    if not isinstance(case.body, dict):
        return  # the receiver answers 400 before any schema sees it
    try:
        parse_event("d", event_type, case.body)
    except ValidationError as exc:
        assert exc.messages


# --- address splitting ------------------------------------------------------------------------------

CITIES = ["Pyrmont", "Toronto", "London", "Surry Hills", "Port Melbourne", "Auckland", "Vancouver", "Madrid"]
REGIONS = ["", "NSW", "VIC", "ON", "BC", "QLD"]
COUNTRIES = ["Australia", "Canada", "United Kingdom", "New Zealand", "Spain", "Germany", "India"]
postcodes = st.one_of(st.integers(200, 9999).map(str), st.sampled_from(["M5H 2N2", "SW1A 2AA", "EC1A 1BB", "V6B 4Y8"]))
streets = st.tuples(st.integers(1, 999), st.sampled_from(["Miller", "Queen", "Harris", "King", "George"]),
                    st.sampled_from(["St", "Street", "Rd", "Ave"])).map(lambda parts: " ".join(map(str, parts)))
hostile_text = st.one_of(st.text(), st.text(alphabet=",.#&-/ \t\n\x00" + string.digits, max_size=40),
                         st.text(max_size=20).map(lambda text: text * 50), st.lists(st.text(max_size=6)).map(", ".join))


@BOUNDED
@given(street=streets, city=st.sampled_from(CITIES), region=st.sampled_from(REGIONS), postcode=postcodes,
       country=st.sampled_from(COUNTRIES))
def test_international_addresses_give_their_city_and_postcode(street, city, region, postcode, country):
    text = f"{street}, {city}{' ' + region if region else ''} {postcode}, {country}"
    assert locality_parts(text) == (city, postcode)
    parts = split_us_address(text)
    assert not parts.us and parts.country == country and country in parts.problem


@BOUNDED
@given(street=streets, city=st.sampled_from(CITIES), postcode=st.integers(10000, 99999).map(str),
       country=st.sampled_from(COUNTRIES))
def test_postcode_before_the_city_european_style(street, city, postcode, country):
    assert locality_parts(f"{street}, {postcode} {city}, {country}") == (city, postcode)


@BOUNDED
@given(text=hostile_text, country=st.sampled_from(sorted(OTHER_COUNTRY_NAMES)))
def test_any_text_ending_in_a_known_foreign_country_is_not_us(text, country):
    parts = split_us_address(f"{text}, {country}")
    assert not parts.us and parts.problem


@BOUNDED
@given(text=st.one_of(st.none(), hostile_text))
def test_splitting_never_raises_and_is_deterministic(text):
    parts = split_us_address(text)
    assert parts == split_us_address(text)
    assert parts.us == (not parts.problem)
    if parts.us:
        assert parts.state in US_STATES and parts.country == "US"
    city, postal = locality_parts(text)
    assert (city, postal) == locality_parts(text)
    if not parts.us:
        assert all(any(ch.isdigit() for ch in word) for word in postal.split())


# --- webhook URL tokens -----------------------------------------------------------------------------

secrets_text = st.text(min_size=1, max_size=64)
tokens = st.text(max_size=64)


@BOUNDED
@given(secret=secrets_text, event_type=st.text(max_size=30))
def test_token_shape(secret, event_type):
    token = url_token(secret, event_type)
    assert len(token) == 43 and set(token) <= set(string.ascii_letters + string.digits + "-_")
    assert webhook_url("https://relay.example/", secret, event_type).endswith(f"/{event_type}/{token}")


@BOUNDED
@given(secret=secrets_text, others=st.lists(st.one_of(st.none(), st.just(""), secrets_text), max_size=3),
       event_type=event_types, position=st.integers(0, 3))
def test_a_token_matches_exactly_when_its_secret_is_accepted(secret, others, event_type, position):
    accepted = list(others)
    accepted.insert(min(position, len(accepted)), secret)
    token = url_token(secret, event_type)
    assert token_matches(token, event_type, accepted)
    assert not token_matches(token, event_type, [s for s in accepted if s != secret])
    assert not token_matches(token, event_type, (None, ""))


@BOUNDED
@given(secret=secrets_text, pair=st.lists(event_types, min_size=2, max_size=2, unique=True))
def test_a_token_opens_only_its_own_event_type(secret, pair):
    event_type, other_type = pair
    assert not token_matches(url_token(secret, event_type), other_type, (secret,))


@BOUNDED
@given(secret=secrets_text, event_type=event_types, index=st.integers(0, 42),
       char=st.characters(codec="utf-8"), mutation=st.sampled_from(["replace", "drop", "append", "swapcase"]))
def test_any_changed_token_is_refused(secret, event_type, index, char, mutation):
    token = url_token(secret, event_type)
    changed = {"replace": token[:index] + char + token[index + 1:], "drop": token[:index] + token[index + 1:],
               "append": token + char, "swapcase": token.swapcase()}[mutation]
    assume(changed != token)
    assert not token_matches(changed, event_type, (secret,))


@BOUNDED
@given(token=tokens, event_type=st.text(max_size=30), secrets=st.lists(st.one_of(st.none(), secrets_text), max_size=3))
def test_token_matches_never_raises(token, event_type, secrets):
    assert token_matches(token, event_type, secrets) in (True, False)
