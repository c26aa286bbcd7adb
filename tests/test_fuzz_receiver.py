"""Schemathesis against the receiver's own ``GET /openapi.json``, in-process with a real Redis.

Every operation of the document is fuzzed with a fixed number of schema-valid
(positive) and schema-violating (negative) cases. A webhook case carries a
valid token (current or previous secret) or an invalid one (as generated,
another event type's, a rotated-out secret's), so both the authenticated and
the rejected paths run. Checks: no 5xx, every status and body as documented,
every rejection a JSON ``{"error", "message"}``; an invalid token stores
nothing; a schema-valid delivery with a valid token is accepted. Raw bodies
that no schema describes (any bytes, other encodings, deep nesting) are
fuzzed with hypothesis directly.
"""
import collections
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance, unsupported_method)

from receiver import create_app
from receiver.openapi import build_document
from tests.helpers import TEST_SECRET
from tests.payloads import PUBLISHED
from workers.domain.events import EVENT_TYPES
from workers.locate2u.webhook_auth import url_token
from workers.ops.simulators.locate2u import Locate2uServer
from workers.store.ledger import Ledger

EXAMPLES = 40        # per operation and generation mode: 812 schemathesis cases in all
RAW_EXAMPLES = 200   # hypothesis cases for each raw-body property
MAX_BODY = 4096
PREVIOUS_SECRET = "previous-secret-0123456789"
ROTATED_OUT_SECRET = "rotated-out-secret-0123456789"
TOKEN_KINDS = ("current", "previous", "generated", "other-event-type", "rotated-out")
VALID_KINDS = ("current", "previous")
FUZZ = hsettings(deadline=None, suppress_health_check=list(HealthCheck))


def bounded(examples):
    return hsettings(FUZZ, max_examples=examples)

CASES = collections.Counter()  # (operation, mode, token kind, status) -> count, reported at the end

OPERATIONS = [(method.upper(), path, bool(spec.get("parameters") or spec.get("requestBody")))
              for path, item in build_document()["paths"].items() for method, spec in item.items()]
RUNS = [(method, path, mode) for method, path, takes_input in OPERATIONS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if takes_input or mode is GenerationMode.POSITIVE]  # nothing to negate without input


def event_type_of(path):
    return path.split("/")[3] if path.startswith("/webhooks/") else None


@pytest.fixture(scope="module")
def sim():
    with Locate2uServer() as server:
        yield server


@pytest.fixture
def fuzz_settings(settings, sim):
    """Previous secret set, a small body limit, and the OAuth code flow on (so its routes do real work)."""
    return sim.configure(settings, webhook_secret_previous=PREVIOUS_SECRET, max_body_bytes=MAX_BODY,
                         locate2u_grant="authorization_code", public_url="https://relay.example")


@pytest.fixture
def app(fuzz_settings):
    return create_app(fuzz_settings)


@pytest.fixture
def api_schema(app):
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


def token_for(kind, event_type, generated):
    return {"current": lambda: url_token(TEST_SECRET, event_type),
            "previous": lambda: url_token(PREVIOUS_SECRET, event_type),
            "generated": lambda: generated,
            "other-event-type": lambda: url_token(TEST_SECRET, next(t for t in EVENT_TYPES if t != event_type)),
            "rotated-out": lambda: url_token(ROTATED_OUT_SECRET, event_type)}[kind]()


def rejection_is_a_json_error(ctx, response, case):
    """Every 4xx/5xx is ``application/json`` with a non-empty ``error`` code and ``message``."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/json"), (response.status_code, content_type)
    body = json.loads(response.content)
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    return None


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          rejection_is_a_json_error]


def test_the_document_is_served_and_covers_every_event_type(app):
    document = app.test_client().get("/openapi.json").get_json()
    assert document == json.loads(json.dumps(build_document()))
    assert document["openapi"].startswith("3.")
    webhook_paths = {path for path in document["paths"] if path.startswith("/webhooks/")}
    assert webhook_paths == {f"/webhooks/locate2u/{event_type}/{{token}}" for event_type in EVENT_TYPES}
    assert TEST_SECRET not in json.dumps(document) and url_token(TEST_SECRET, "stop.assigned") not in json.dumps(document)


@pytest.mark.parametrize("method, path, mode", RUNS, ids=[f"{m} {p} {mode.value}" for m, p, mode in RUNS])
def test_schemathesis(api_schema, redis_client, method, path, mode):
    operation = api_schema[path][method]
    event_type = event_type_of(path)
    takes_input = next(takes for m, p, takes in OPERATIONS if (m, p) == (method, path))
    ran = []

    @bounded(EXAMPLES if takes_input else 3)
    @given(case=operation.as_strategy(generation_mode=mode), kind=st.sampled_from(TOKEN_KINDS))
    def run(case, kind):
        kind = kind if event_type else "-"
        if event_type:
            case.path_parameters["token"] = token_for(kind, event_type, case.path_parameters["token"])
        keys_before = redis_client.dbsize()
        response = case.call_and_validate(checks=CHECKS)
        CASES[(f"{method} {path}", mode.value, kind, response.status_code)] += 1
        ran.append(response.status_code)
        if event_type:
            check_webhook_answer(redis_client, case, kind, mode, response, keys_before)

    run()
    assert ran, "schemathesis generated no case"


@pytest.mark.parametrize("method, path", [(m, p) for m, p, _ in OPERATIONS], ids=[f"{m} {p}" for m, p, _ in OPERATIONS])
def test_coverage_phase_with_valid_tokens_including_undeclared_methods(api_schema, redis_client, method, path):
    """Schemathesis' coverage phase (boundary values, every undeclared method) with a valid token: the
    documented checks, and ``unsupported_method``: an undeclared method answers 405 with ``Allow``."""
    operation = api_schema[path][method]
    event_type = event_type_of(path)
    cases = api_schema.iter_coverage_cases(
        operation, generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        generation_config=api_schema.config.generation_for(operation=operation, phase="coverage"))
    methods = set()
    for case in cases:
        if event_type:
            case.path_parameters["token"] = url_token(TEST_SECRET, event_type)
        response = case.call_and_validate(checks=[*CHECKS, unsupported_method])
        CASES[(f"{method} {path}", "coverage", "current" if event_type else "-", response.status_code)] += 1
        methods.add(case.method)
    assert {"DELETE", "PATCH", "PUT"} <= methods, "the coverage phase sent no undeclared method"


def check_webhook_answer(redis_client, case, kind, mode, response, keys_before):
    if kind not in VALID_KINDS:
        assert response.status_code in (401, 404), response.content  # 404: a generated token with a "/"
        assert redis_client.dbsize() == keys_before, "a rejected token stored something"
        return
    assert response.status_code in (200, 400, 413, 422), response.content
    answer = json.loads(response.content)
    if response.status_code == 200:
        entry = Ledger(redis_client).get(answer["delivery_id"])
        assert entry is not None and isinstance(json.loads(entry["body"]), dict)
    elif mode is GenerationMode.POSITIVE:
        assert response.status_code == 413 and len(response.request.body or b"") > MAX_BODY, answer


def test_report_case_counts():
    """Run last in this module: the counts that docs/reliability.md quotes (see ``pytest -s``)."""
    if not CASES:
        pytest.skip("the schemathesis tests did not run in this session")
    for phase, modes in (("generated", ("positive", "negative")), ("coverage phase", ("coverage",))):
        cases = {key: count for key, count in CASES.items() if key[1] in modes}
        by_status = collections.Counter()
        for (_, _, _, status), count in cases.items():
            by_status[status] += count
        valid = sum(count for (_, _, kind, _), count in cases.items() if kind in VALID_KINDS)
        print(f"\nschemathesis {phase}: {sum(cases.values())} cases, {valid} with a valid token, "
              f"by status {dict(sorted(by_status.items()))}")
        assert not any(status >= 500 for status in by_status)


# --- raw bodies: what no schema describes -----------------------------------------------------------

def post(client, event_type, body, token=None):
    token = url_token(TEST_SECRET, event_type) if token is None else token
    return client.post(f"/webhooks/locate2u/{event_type}/{token}", data=body, content_type="application/json")


def assert_json_error(response, status):
    assert response.status_code == status, response.get_data()
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] and body["message"]


PUBLISHED_DATE = PUBLISHED["stop.assigned"]["actionDate"]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda children: st.lists(children) | st.dictionaries(st.text(), children),
                           max_leaves=20)
entity_id = st.one_of(st.integers(), st.none(), st.text(max_size=5), st.floats())
json_objects = st.tuples(
    st.fixed_dictionaries({}, optional={"stopId": entity_id, "shipmentId": entity_id, "tripId": entity_id,
                                        "actionDate": st.one_of(st.text(max_size=30), st.just(PUBLISHED_DATE))}),
    st.dictionaries(st.text(max_size=10), json_values, max_size=4)).map(lambda pair: {**pair[1], **pair[0]})
ENCODINGS = ("utf-8", "utf-16", "utf-16-le", "utf-32", "utf-32-be", "latin-1", "utf-8-sig", "cp1252")


def encoded(value, encoding):
    return json.dumps(value, ensure_ascii=False).encode(encoding, "surrogatepass" if "utf" in encoding else "replace")


raw_bodies = st.one_of(
    st.binary(max_size=600),
    st.tuples(st.one_of(json_values, json_objects), st.sampled_from(ENCODINGS)).map(lambda pair: encoded(*pair)),
    st.tuples(st.sampled_from([b"[", b'{"a":']), st.integers(1, 3000)).map(  # nesting, closed or not
        lambda pair: b'{"stopId": 1, "tripId": 1, "shipmentId": 1, "x": ' + pair[0] * pair[1]))


@bounded(RAW_EXAMPLES)
@given(event_type=st.sampled_from(sorted(EVENT_TYPES)), body=raw_bodies)
def test_any_body_with_a_valid_token_is_accepted_or_a_precise_4xx(app, redis_client, event_type, body):
    response = post(app.test_client(), event_type, body)
    if response.status_code == 200:
        entry = Ledger(redis_client).get(response.get_json()["delivery_id"])
        assert isinstance(json.loads(entry["body"]), dict)  # the worker parses what the receiver accepted
        return
    assert response.status_code in (400, 413, 422), response.get_data()
    assert_json_error(response, response.status_code)


@bounded(RAW_EXAMPLES)
@given(event_type=st.text(max_size=40), token=st.text(max_size=60), body=st.binary(max_size=200))
def test_any_url_and_body_without_a_valid_token_stores_nothing(app, redis_client, event_type, token, body):
    keys_before = redis_client.dbsize()
    response = app.test_client().post(f"/webhooks/locate2u/{event_type}/{token}", data=body)
    if response.status_code == 308:  # Werkzeug merges "//" in the path: a redirect to this same receiver
        assert response.headers["Location"].startswith("http://localhost/webhooks/locate2u/")
    else:
        assert response.status_code in (401, 404, 405), response.get_data()
        assert_json_error(response, response.status_code)
    assert redis_client.dbsize() == keys_before


@pytest.mark.parametrize("body, message", [
    ("\ufeff" + json.dumps(PUBLISHED["stop.assigned"]), None),
    (json.dumps(PUBLISHED["stop.assigned"]).encode("utf-16"), "body is not valid JSON: 'utf-8' codec can't decode"),
    (b'{"stopId": 1, "actionDate": "2022-04-27T04:35:56Z", "x": "\xed\xa0\x80"}', "body is not valid JSON: 'utf-8'"),
    (b"[" * 100_000, "body is not valid JSON: nested too deeply"),
    (b'{"stopId": 1, "a": ' + b"[" * 3000 + b"]" * 3000 + b"}", "body is not valid JSON: nested too deeply"),
    (b'{"stopId": ' + b"9" * 5000 + b"}", "body is not valid JSON: Exceeds the limit"),
], ids=["utf-8 BOM", "utf-16", "encoded surrogate", "deep array", "deep in object", "huge integer"])
def test_found_by_fuzzing(fuzz_settings, redis_client, body, message):
    """Each of these once answered 500 (or was accepted in a form the worker could not parse)."""
    client = create_app(fuzz_settings.replace(max_body_bytes=1024 * 1024)).test_client()
    response = post(client, "stop.assigned", body if isinstance(body, bytes) else body.encode())
    if message is None:
        entry = Ledger(redis_client).get(response.get_json()["delivery_id"])
        assert json.loads(entry["body"]) == PUBLISHED["stop.assigned"]
        return
    assert_json_error(response, 400)
    assert response.get_json()["message"].startswith(message)
    assert redis_client.keys("l2u:*") == []
