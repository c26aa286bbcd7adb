"""The B2B simulator enforces the documented API rules."""
import time
from datetime import datetime, timedelta, timezone

import pytest
import requests

from workers.ops.simulators.b2b import B2BState, create_app, documented_fault
from workers.ops.simulators.base import SimulatorServer

AUTH = {"Authorization": "Bearer b2b-static-token"}
DOC_KEYS = {"id", "idRemote", "businessPartner", "name", "address", "city", "state", "postalCode",
            "default", "active", "shippingAddress", "billingAddress", "country", "createdAt", "updatedAt"}


def item(id_remote="l2u-1", **overrides):
    body = {"idRemote": id_remote, "businessPartnerId": "BP-1", "countryId": "AU", "name": "Stop",
            "address": "1 Main St", "city": "Sydney", "shippingAddress": True, "billingAddress": False,
            "active": True, "default": False}
    body.update(overrides)
    return body


def without(name):
    body = item()
    del body[name]
    return body


@pytest.fixture
def state():
    return B2BState()


def create(client, *items):
    response = client.post("/Location/create", json=list(items), headers=AUTH)
    assert response.status_code == 201, response.json
    return response.json["data"]


# ---------------------------------------------------------------- auth

def test_login_issues_a_jwt_accepted_until_expired(client, state):
    assert client.get("/Location/getLocation").json == {"code": 401, "error": "Unauthorized."}
    bad = client.post("/login", json={"_username": "b2b-user", "_password": "nope"})
    assert bad.status_code == 401 and bad.json == {"code": 401, "error": "Unauthorized."}
    token = client.post("/login", json={"_username": "b2b-user", "_password": "b2b-pass"}).json["token"]
    assert token.count(".") == 2 and state.login_count == 1
    jwt = {"Authorization": f"Bearer {token}"}
    assert client.get("/Location/getLocation", headers=jwt).status_code == 200
    state.expire_jwts()
    expired = client.get("/Location/getLocation", headers=jwt)
    assert expired.status_code == 401 and expired.json == {"code": 401, "error": "Unauthorized."}
    assert client.get("/Location/getLocation", headers=AUTH).status_code == 200


def test_jwt_lifetime_follows_the_clock():
    state = B2BState(jwt_lifetime=60)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    state.clock = lambda: start
    client = create_app(state).test_client()
    jwt = {"Authorization": "Bearer " + client.post("/login", json={"_username": "b2b-user",
                                                                   "_password": "b2b-pass"}).json["token"]}
    assert client.get("/Location/getLocation", headers=jwt).status_code == 200
    state.clock = lambda: start + timedelta(seconds=61)
    assert client.get("/Location/getLocation", headers=jwt).status_code == 401


# ---------------------------------------------------------------- create

def test_create_stores_a_batch_with_the_documented_shape(client, state):
    created = create(client, item("l2u-1", stateId="NSW", postalCode="2000"), item("l2u-2", countryId="US"))
    assert [c["idRemote"] for c in created] == ["l2u-1", "l2u-2"]
    first = created[0]
    assert set(first) == DOC_KEYS and first["id"].isdigit()
    assert first["businessPartner"] == {"id": "BP-1", "idRemote": "BP-1", "contactName": "Contact BP-1",
                                        "commercialName": "Partner BP-1"}
    assert first["country"] == {"id": "AU", "description": "Australia", "iso": "AU"}
    assert first["state"] == {"id": "NSW", "description": "NSW", "iso": "NSW"}
    assert datetime.fromisoformat(first["createdAt"]).tzinfo is not None
    assert state.locations[first["id"]] == first and len(state.locations) == 2


@pytest.mark.parametrize("body,message", [
    ({"idRemote": "x"}, "Parameter body is required"),
    ([], "Parameter body is required"),
    ([without("idRemote")], "Parameter idRemote is required"),
    ([without("businessPartnerId")], "Parameter businessPartnerId is required"),
    ([without("countryId")], "Parameter countryId is required"),
    ([without("name")], "Parameter name is required"),
    ([item(address="")], "Parameter address is required"),
    ([without("city")], "Parameter city is required"),
    ([without("shippingAddress")], "Parameter shippingAddress is required"),
    ([without("billingAddress")], "Parameter billingAddress is required"),
    ([without("active")], "Parameter active is required"),
    ([without("default")], "Parameter default is required"),
    ([{"name": "only"}], "Parameter idRemote is required"),
    ([item(businessPartnerId="BP-9")], "Parameter businessPartnerId is invalid: no BusinessPartner with id BP-9"),
    ([item(countryId="XX")], "Parameter countryId is invalid: no Country with id XX"),
    ([item(active="yes")], "Parameter active must be a boolean"),
    ([item(idRemote=7)], "Parameter idRemote must be a string"),
    ([item(postcode="2000")], "Unknown parameter postcode"),
    ([item("ok-1"), without("city")], "Parameter city is required"),
])
def test_create_rejects_missing_or_invalid_parameters(client, state, body, message):
    response = client.post("/Location/create", json=body, headers=AUTH)
    assert response.status_code == 400
    assert response.json == {"code": 400, "error": message}
    assert state.locations == {}


def test_create_rejects_non_json_body(client):
    response = client.post("/Location/create", data="idRemote=x", headers=AUTH)
    assert response.json == {"code": 400, "error": "Parameter body is required"}


def test_duplicates_are_409_and_nothing_is_stored(client, state):
    create(client, item("l2u-1"))
    for batch in ([item("new-1"), item("l2u-1")], [item("new-1"), item("new-1")]):
        response = client.post("/Location/create", json=batch, headers=AUTH)
        assert response.status_code == 409
        assert response.json == {"code": 409, "error": "Duplicate entry"}
    assert [loc["idRemote"] for loc in state.locations.values()] == ["l2u-1"]


# ---------------------------------------------------------------- update

def test_update_is_partial_by_id_or_id_remote(client, state):
    times = iter([datetime(2025, 1, 1, tzinfo=timezone.utc), datetime(2025, 1, 2, tzinfo=timezone.utc),
                  datetime(2025, 1, 3, tzinfo=timezone.utc)])
    state.clock = lambda: next(times)
    created = create(client, item("l2u-1"))[0]
    by_remote = client.put("/Location/update/l2u-1", json={"name": "Renamed"}, headers=AUTH)
    assert by_remote.status_code == 200
    by_id = client.put(f"/Location/update/{created['id']}", json={"active": False, "countryId": "ES"},
                       headers=AUTH).json["data"][0]
    assert (by_id["name"], by_id["active"], by_id["country"]["iso"]) == ("Renamed", False, "ES")
    assert by_id["address"] == created["address"]
    assert by_id["createdAt"] == created["createdAt"] and by_id["updatedAt"].startswith("2025-01-03")


@pytest.mark.parametrize("body,status,message", [
    ({"businessPartnerId": "BP-1"}, 400, "Parameter businessPartnerId cannot be updated from this endpoint; "
                                         "use the Business Partner update endpoint"),
    ({"name": ""}, 400, "Parameter name is required"),
    ({"default": "true"}, 400, "Parameter default must be a boolean"),
    ({"countryId": "XX"}, 400, "Parameter countryId is invalid: no Country with id XX"),
    ({"idRemote": "l2u-2"}, 409, "Duplicate entry"),
    ([], 400, "Parameter body is required"),
])
def test_update_rejections(client, state, body, status, message):
    create(client, item("l2u-1"), item("l2u-2"))
    response = client.put("/Location/update/l2u-1", json=body, headers=AUTH)
    assert (response.status_code, response.json) == (status, {"code": status, "error": message})
    assert state.by_remote("l2u-1")["name"] == "Stop"


def test_update_unknown_id_is_404(client):
    response = client.put("/Location/update/nope", json={"name": "x"}, headers=AUTH)
    assert response.status_code == 404
    assert response.json == {"code": 404, "error": "No entity found for Location with nope."}


# ---------------------------------------------------------------- delete

def test_delete_is_refused_for_business_partner_locations(client, state):
    created = create(client, item("l2u-1"), item("l2u-2"))
    refused = client.delete("/Location/delete/l2u-1", headers=AUTH)
    assert refused.status_code == 400
    assert refused.json == {"code": 400, "error": "A Location that has a Business Partner associated "
                                                  "with it cannot be deleted"}
    state.allow_delete = True
    state.bp_locked.add("l2u-2")
    assert client.delete("/Location/delete/l2u-2", headers=AUTH).status_code == 400
    assert client.delete(f"/Location/delete/{created[0]['id']}", headers=AUTH).status_code == 200
    assert [d["idRemote"] for d in state.deleted] == ["l2u-1"] and state.by_remote("l2u-1") is None
    gone = client.delete("/Location/delete/l2u-1", headers=AUTH)
    assert gone.json == {"code": 404, "error": "No entity found for Location with l2u-1."}


# ---------------------------------------------------------------- listings

def test_get_location_paginates(client, state):
    for n in range(12):
        state.add(f"r{n}")
    page = client.get("/Location/getLocation?pageSize=5&page=2", headers=AUTH).json
    assert [loc["idRemote"] for loc in page["data"]] == [f"r{n}" for n in range(5, 10)]
    assert page["pagination"] == {"totalItems": 12, "itemsPerPage": 5, "currentPage": 2, "totalPages": 3,
                                  "nextPageUrl": "http://localhost/Location/getLocation?page=3&pageSize=5"}
    default = client.get("/Location/getLocation", headers=AUTH).json
    assert len(default["data"]) == 10 and default["pagination"]["itemsPerPage"] == 10
    last = client.get("/Location/getLocation?page=3&pageSize=5", headers=AUTH).json
    assert last["pagination"]["nextPageUrl"] is None
    assert client.get("/Location/getLocation?pageSize=0", headers=AUTH).status_code == 400
    one = state.by_remote("r3")
    assert client.get(f"/Location/getLocation?id={one['id']}", headers=AUTH).json["data"] == [one]


def test_updated_from_filters_by_date(client, state):
    state.clock = lambda: datetime(2025, 3, 1, 8, 0, tzinfo=timezone.utc)
    state.add("old")
    state.clock = lambda: datetime(2025, 3, 2, 12, 0, tzinfo=timezone.utc)
    state.add("new")
    missing = client.get("/Location/updatedFrom", headers=AUTH)
    assert missing.status_code == 400 and missing.json == {"code": 400, "error": "Parameter date is required"}
    assert client.get("/Location/updatedFrom?date=yesterday", headers=AUTH).status_code == 400

    def remotes(date):
        return [loc["idRemote"] for loc in
                client.get(f"/Location/updatedFrom?date={date}", headers=AUTH).json["data"]]

    assert remotes("2025-03-01") == ["old", "new"]
    assert remotes("2025-03-02") == ["new"]
    assert remotes("2025-03-02T12:00:01") == []
    page = client.get("/Location/updatedFrom?date=2025-01-01&pageSize=1", headers=AUTH).json["pagination"]
    assert page["nextPageUrl"] == "http://localhost/Location/updatedFrom?date=2025-01-01&page=2&pageSize=1"


def test_business_partner_listing():
    client = create_app(B2BState(business_partners=("BP-1", "BP-2"))).test_client()
    listing = client.get("/BusinessPartner/getBPartner", headers=AUTH).json
    assert [p["id"] for p in listing["data"]] == ["BP-1", "BP-2"]
    assert listing["pagination"]["totalItems"] == 2
    assert client.get("/BusinessPartner/getBPartner?id=BP-2", headers=AUTH).json["data"][0]["id"] == "BP-2"
    assert client.get("/BusinessPartner/getBPartner?id=BP-9", headers=AUTH).status_code == 404


# ---------------------------------------------------------------- faults

def test_faults_429_5xx_rate_and_latency(app, client):
    faults = app.config["FAULTS"]
    documented_fault(faults, 429, retry_after=3, path_prefix="/Location")
    throttled = client.get("/Location/getLocation", headers=AUTH)
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "3"
    assert throttled.json == {"code": 429, "error": "Too Many Requests"}
    client.post("/_sim/faults", json={"status": 500, "times": 1})
    assert client.post("/login", json={}).status_code == 500
    faults.fail_rate(1.0, 503)
    assert client.get("/Location/getLocation", headers=AUTH).status_code == 503
    faults.clear()
    faults.latency(0.05)
    started = time.monotonic()
    assert client.get("/Location/getLocation", headers=AUTH).status_code == 200
    assert time.monotonic() - started >= 0.05
    faults.clear()
    assert [method for method, _, _ in app.config["STATE"].requests_log] == ["GET", "POST", "GET", "GET"]


def test_round_trip_over_real_http(state):
    app = create_app(state)
    with SimulatorServer(app) as server, requests.Session() as http:
        token = http.post(f"{server.url}/login", json={"_username": "b2b-user", "_password": "b2b-pass"},
                          timeout=5).json()["token"]
        http.headers["Authorization"] = f"Bearer {token}"
        assert http.post(f"{server.url}/Location/create", json=[item("l2u-9")], timeout=5).status_code == 201
        assert http.post(f"{server.url}/Location/create", json=[item("l2u-9")], timeout=5).status_code == 409
        updated = http.put(f"{server.url}/Location/update/l2u-9", json={"active": False}, timeout=5)
        assert updated.json()["data"][0]["active"] is False
        refused = http.delete(f"{server.url}/Location/delete/l2u-9", timeout=5)
        assert refused.status_code == 400
        listing = http.get(f"{server.url}/Location/getLocation", params={"pageSize": 50}, timeout=5).json()
        assert [loc["idRemote"] for loc in listing["data"]] == ["l2u-9"]
    assert state.login_count == 1
