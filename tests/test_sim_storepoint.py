"""The Storepoint simulator enforces the documented API rules."""
import re
import time

import pytest
import requests

from workers.ops.simulators.base import SimulatorServer
from workers.ops.simulators.storepoint import StorepointState, create_app

AUTH = {"Authorization": "Bearer sp-test-token"}
ID_RE = re.compile(r"^loc_[a-z0-9]{10}$")


def valid_body(**overrides):
    body = {"name": "Stop 1", "address": "1 Main St, Springfield", "coordinates": {"lat": -33.86, "lng": 151.2}}
    body.update(overrides)
    return body


@pytest.fixture
def state():
    return StorepointState()


def create(client, **overrides):
    response = client.post("/locations", json=valid_body(**overrides), headers=AUTH)
    assert response.status_code == 200, response.json
    return response.json["location"]


# ---------------------------------------------------------------- auth

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sp-test-token"}])
@pytest.mark.parametrize("method,path", [("GET", "/locations"), ("GET", "/custom_fields"),
                                         ("POST", "/locations"), ("POST", "/locations/loc_x/delete")])
def test_every_route_needs_the_bearer_token(client, headers, method, path):
    response = client.open(path, method=method, json={}, headers=headers)
    assert response.status_code == 401
    assert response.json == {"error": "error", "message": "Invalid API token"}


# ---------------------------------------------------------------- create

def test_create_returns_the_location_with_a_loc_id(client, state):
    location = create(client, tags=["l2u"], custom_fields={"cf_l2u_key": "stop-1"},
                      contact={"phone": "555", "email": "a@b.co", "website": "https://x.example"},
                      hours={"monday": "9:00-17:00", "sunday": "closed", "friday": "08:30-23:59"})
    assert ID_RE.match(location["id"])
    assert location["custom_fields"] == {"cf_l2u_key": "stop-1"}
    assert state.locations[location["id"]] == location
    assert set(location) == {"id", "name", "address", "coordinates", "description", "tags",
                             "contact", "hours", "custom_fields", "image_url"}
    assert state.requests_log[-1][:2] == ("POST", "/locations")


@pytest.mark.parametrize("body,field", [
    ({"address": "x", "coordinates": {"lat": 1, "lng": 1}}, "name"),
    (valid_body(name=""), "name"),
    (valid_body(address=None), "address"),
    ({"name": "n", "address": "x"}, "coordinates"),
    (valid_body(coordinates={"lat": 1}), "coordinates.lng"),
    (valid_body(coordinates={"lat": 91, "lng": 0}), "coordinates.lat"),
    (valid_body(coordinates={"lat": 0, "lng": -180.5}), "coordinates.lng"),
    (valid_body(coordinates={"lat": "1", "lng": 0}), "coordinates.lat"),
    (valid_body(contact={"email": "not-an-email"}), "contact.email"),
    (valid_body(contact={"website": "example.com"}), "contact.website"),
    (valid_body(contact={"fax": "1"}), "contact.fax"),
    (valid_body(tags="a,b"), "tags"),
    (valid_body(tags=["a", 1]), "tags"),
    (valid_body(hours={"monday": "9-5"}), "hours.monday"),
    (valid_body(hours={"monday": "25:00-26:00"}), "hours.monday"),
    (valid_body(hours={"holiday": "closed"}), "hours.holiday"),
    (valid_body(custom_fields={"unknown_field": "x"}), "custom_fields.unknown_field"),
    (valid_body(image_url="not a url"), "image_url"),
    (valid_body(external_id="k1"), "external_id"),
])
def test_create_rejects_invalid_input(client, state, body, field):
    response = client.post("/locations", json=body, headers=AUTH)
    assert response.status_code == 400
    assert response.json["error"] == "validation_error"
    assert response.json["message"] == "Invalid input data"
    assert isinstance(response.json["details"][field], list)
    assert state.locations == {}


@pytest.mark.parametrize("kwargs", [{"data": "name=x", "content_type": "application/x-www-form-urlencoded"},
                                    {"json": [valid_body()]}, {"data": "{", "content_type": "application/json"}])
def test_create_rejects_bodies_that_are_not_a_json_object(client, kwargs):
    response = client.post("/locations", headers=AUTH, **kwargs)
    assert response.status_code == 400
    assert response.json["error"] == "validation_error"


# ---------------------------------------------------------------- read / list

def test_get_location_and_unknown_id(client):
    location = create(client)
    assert client.get(f"/locations/{location['id']}", headers=AUTH).json == {"success": True, "location": location}
    response = client.get("/locations/loc_missing000", headers=AUTH)
    assert response.status_code == 404
    assert response.json == {"error": "not_found", "message": "Location not found"}


def test_list_paginates_active_locations_with_the_documented_envelope(client, state):
    ids = [state.add(name=f"L{i}")["id"] for i in range(25)]
    first = client.get("/locations", headers=AUTH).json
    assert first["success"] is True
    assert [loc["id"] for loc in first["locations"]] == ids[:10]
    assert first["pagination"] == {"page": 1, "limit": 10, "total": 25, "total_pages": 3,
                                   "next": "/admin/v1/locations?page=2", "previous": None}
    last = client.get("/locations?limit=10&page=3", headers=AUTH).json
    assert len(last["locations"]) == 5
    assert last["pagination"]["next"] is None
    assert last["pagination"]["previous"] == "/admin/v1/locations?page=2"
    # the documented next link resolves against the simulator too
    assert client.get(first["pagination"]["next"], headers=AUTH).json["pagination"]["page"] == 2
    client.post(f"/locations/{ids[0]}/delete", headers=AUTH)
    everything = client.get("/locations?limit=500", headers=AUTH).json
    assert everything["pagination"]["total"] == 24
    assert ids[0] not in {loc["id"] for loc in everything["locations"]}


@pytest.mark.parametrize("query,field", [("limit=501", "limit"), ("limit=0", "limit"),
                                         ("limit=abc", "limit"), ("page=0", "page")])
def test_list_rejects_bad_paging(client, query, field):
    response = client.get(f"/locations?{query}", headers=AUTH)
    assert response.status_code == 400
    assert response.json["error"] == "validation_error"
    assert field in response.json["details"]


# ---------------------------------------------------------------- update / delete

def test_update_is_partial_and_validated(client, state):
    location = create(client, tags=["a"], contact={"phone": "1"}, custom_fields={"cf_l2u_key": "k"})
    path = f"/locations/{location['id']}"
    response = client.post(path, json={"name": "Renamed", "coordinates": {"lat": 10}, "tags": ["b"],
                                       "contact": {"email": "x@y.io"}}, headers=AUTH)
    assert response.status_code == 200
    updated = response.json["location"]
    assert updated["name"] == "Renamed" and updated["address"] == location["address"]
    assert updated["coordinates"] == {"lat": 10, "lng": location["coordinates"]["lng"]}
    assert updated["tags"] == ["b"]
    assert updated["contact"] == {"phone": "1", "email": "x@y.io"}
    assert updated["custom_fields"] == {"cf_l2u_key": "k"}
    bad = client.post(path, json={"coordinates": {"lng": 200}, "name": ""}, headers=AUTH)
    assert bad.status_code == 400
    assert set(bad.json["details"]) == {"coordinates.lng", "name"}
    assert state.locations[location["id"]]["name"] == "Renamed"
    missing = client.post("/locations/loc_nothere000", json={"name": "x"}, headers=AUTH)
    assert missing.status_code == 404 and missing.json["error"] == "not_found"


def test_delete_moves_the_location_to_deleted(client, state):
    location = create(client)
    path = f"/locations/{location['id']}/delete"
    response = client.post(path, headers=AUTH)
    assert response.json == {"success": True, "message": "Location deleted successfully"}
    assert location["id"] in state.deleted and location["id"] not in state.locations
    assert client.get(f"/locations/{location['id']}", headers=AUTH).status_code == 404
    assert client.post(path, headers=AUTH).status_code == 404


def test_custom_fields_lists_the_configured_fields(client):
    custom = StorepointState(custom_fields=(("cf1", "One", "text"), ("cf2", "Two", "dropdown")))
    other = create_app(custom).test_client()
    assert client.get("/custom_fields", headers=AUTH).json == {
        "success": True, "custom_fields": [{"id": "cf_l2u_key", "name": "Locate2u key", "type": "text"}]}
    assert [f["id"] for f in other.get("/custom_fields", headers=AUTH).json["custom_fields"]] == ["cf1", "cf2"]


# ---------------------------------------------------------------- faults

def test_faults_429_5xx_rate_and_latency(app, client):
    faults = app.config["FAULTS"]
    faults.inject(429, retry_after=2, path_prefix="/locations")
    throttled = client.get("/locations", headers=AUTH)
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "2"
    assert client.get("/locations", headers=AUTH).status_code == 200
    client.post("/_sim/faults", json={"status": 502, "times": 1})
    assert client.get("/custom_fields", headers=AUTH).status_code == 502
    faults.fail_rate(1.0, 500)
    assert client.get("/locations", headers=AUTH).status_code == 500
    client.delete("/_sim/faults")
    faults.latency(0.05)
    started = time.monotonic()
    assert client.get("/locations", headers=AUTH).status_code == 200
    assert time.monotonic() - started >= 0.05
    faults.clear()


def test_a_rate_limit_answers_429_beyond_its_bucket_and_refills(app, client, state):
    app.config["FAULTS"].rate_limit(rate=2, burst=3, path_prefix="/locations")
    answers = [client.post("/locations", json=valid_body(name=f"Shop {n}"), headers=AUTH) for n in range(5)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429, 429]
    assert answers[3].headers["Retry-After"] == "1" and len(state.locations) == 3  # refused: not created
    assert client.get("/locations", headers=AUTH).status_code == 200  # reads are not limited here
    time.sleep(0.6)  # one token back at 2 a second
    assert client.post("/locations", json=valid_body(name="Shop 5"), headers=AUTH).status_code == 200
    assert app.config["FAULTS"].counts["429 over the rate limit"] == 2
    app.config["FAULTS"].clear()
    assert all(client.post("/locations", json=valid_body(name=f"Shop {n}"), headers=AUTH).status_code == 200
               for n in range(6, 12))
    client.post("/_sim/faults", json={"rate_limit": {"rate": 1, "burst": 1}})  # the same over HTTP
    assert [client.post("/locations", json=valid_body(name=f"Shop {n}"), headers=AUTH).status_code
            for n in range(12, 14)] == [200, 429]


def test_round_trip_over_real_http(state):
    app = create_app(state)
    app.config["FAULTS"].inject(429, retry_after=1)
    with SimulatorServer(app) as server, requests.Session() as http:
        http.headers.update(AUTH)
        assert http.get(f"{server.url}/locations", timeout=5).status_code == 429
        created = http.post(f"{server.url}/locations", json=valid_body(), timeout=5).json()["location"]
        http.post(f"{server.url}/locations/{created['id']}", json={"address": "2 Side St"}, timeout=5)
        listed = http.get(f"{server.url}/locations", params={"limit": 500}, timeout=5).json()
        assert listed["locations"][0]["address"] == "2 Side St"
        assert http.post(f"{server.url}/locations/{created['id']}/delete", timeout=5).json()["success"] is True
    assert state.locations == {} and created["id"] in state.deleted
