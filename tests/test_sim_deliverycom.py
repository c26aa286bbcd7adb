"""The Delivery.com simulator enforces the documented rules."""
import pytest
import requests

from workers.ops.simulators.base import SimulatorServer
from workers.ops.simulators.deliverycom import FIELD_RULES, DeliverycomState, create_app, format_coordinate, geocode

TOKEN = "dc-test-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
SEED_MESSAGES = {
    "street": "The street must be at least 2 characters.",
    "city": "The city must be at least 2 characters.",
    "state": "The state must be 2 characters.",
    "zip_code": "The zip code field must be 5 characters.",
    "phone": "The phone must be at least 10 characters.",
}


def valid(**fields):
    return {"street": "199 Water St", "city": "New York", "state": "ny", "zip_code": "10038",
            "phone": "555-555-5555", "cross_streets": "Fulton Street", **fields}


@pytest.fixture
def state():
    return DeliverycomState()


def create(client, **fields):
    return client.post("/customer/location", json=valid(**fields), headers=HEADERS)


def codes(response):
    return [message["code"] for message in response.json["message"]]


@pytest.mark.parametrize("authorization", [None, "Bearer nope", "nope", "Basic " + TOKEN])
def test_rejects_missing_or_wrong_token(client, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = client.get("/customer/location", headers=headers)
    assert response.status_code == 401
    [message] = response.json["message"]
    assert message["code"] == "bad_token" and message["user_msg"] and message["dev_msg"]


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", TOKEN, f"bearer {TOKEN}"])
def test_accepts_bearer_or_bare_token(client, authorization):
    assert client.get("/customer/location", headers={"Authorization": authorization}).status_code == 200


def test_create_returns_normalised_location(client, state):
    response = create(client)
    assert response.status_code == 200 and response.json["message"] == []
    location = response.json["location"]
    assert location["location_id"] == 1574900 and isinstance(location["location_id"], int)
    assert (location["street"], location["city"], location["state"]) == ("199 WATER ST", "NEW YORK", "NY")
    assert (location["zip_code"], location["phone"], location["cross_streets"]) == ("10038", "555-555-5555",
                                                                                   "Fulton Street")
    assert location["unit_number"] is None and location["company"] is None
    latitude, longitude = geocode("199 Water St", "10038")
    assert location["latitude"] == format_coordinate(latitude) and location["longitude"] == format_coordinate(longitude)
    assert len(location["latitude"].split(".")[1]) == 16
    assert abs(latitude - 40.7093) < 0.02 and abs(longitude + 74.0027) < 0.02
    assert state.locations["1574900"]["street"] == "199 WATER ST"
    assert create(client).json["location"]["location_id"] == 1574901


def test_create_uses_coordinates_sent_in_body(client):
    location = create(client, latitude=40.70688857, longitude="-74.00427103").json["location"]
    assert location["latitude"] == "40.7068885700000000" and location["longitude"] == "-74.0042710300000000"


def test_every_failing_field_is_listed_with_seed_messages(client):
    response = client.post("/customer/location", json={}, headers=HEADERS)
    assert response.status_code == 400
    assert response.json["message"] == [
        {"code": f"bad_{field}", "field": field, "user_msg": text, "dev_msg": text}
        for field, text in SEED_MESSAGES.items()]


@pytest.mark.parametrize("field, value", [
    ("street", "1 Ma"), ("street", "     x   "), ("city", "N"), ("state", "NYC"), ("state", "N"),
    ("zip_code", "1003"), ("zip_code", "100380"), ("zip_code", 10038), ("phone", "555-5555"),
    ("phone", "+1-555-555-5555"), ("phone", None),
])
def test_each_rule(client, field, value):
    response = create(client, **{field: value})
    assert response.status_code == 400 and codes(response) == [f"bad_{field}"]
    assert response.json["message"][0]["field"] == field


def test_length_boundaries(client):
    assert create(client, street="1 Ma ", phone="5555555555").status_code == 400  # street strips to 4 chars
    assert create(client, street="1 Mai", city="NY", phone="+15555555555").status_code == 200
    assert create(client, phone="5555555555").status_code == 200


def test_phone_too_long_message(client):
    assert create(client, phone="5" * 13).json["message"][0]["user_msg"] == FIELD_RULES["phone"]["too_long"]


def test_unverifiable_zip_is_bad_loc_only_when_otherwise_valid(client, state):
    response = create(client, zip_code="99999")
    assert response.status_code == 400
    assert response.json["message"] == [{
        "code": "bad_loc",
        "user_msg": "We could not find the address that you submitted. "
                    "Please double check all the fields and try again.",
        "dev_msg": "Address was not verified."}]
    assert codes(create(client, zip_code="99999", city="X")) == ["bad_city"]
    assert state.locations == {}


def test_update_is_partial(client):
    create(client)
    response = client.put("/customer/location/1574900", json={"unit_number": "Floor 3"}, headers=HEADERS)
    assert response.status_code == 200
    assert response.json["message"] == [{"code": "loc_update_success", "user_msg": "Address was successfully updated.",
                                          "dev_msg": "Address was successfully updated."}]
    location = response.json["location"]
    assert location["location_id"] == "1574900" and location["unit_number"] == "Floor 3"
    assert location["street"] == "199 WATER ST" and location["phone"] == "555-555-5555"


def test_update_validates_present_fields_and_regeocodes(client):
    before = create(client).json["location"]
    bad = client.put("/customer/location/1574900", json={"state": "New York", "phone": "1"}, headers=HEADERS)
    assert bad.status_code == 400 and codes(bad) == ["bad_state", "bad_phone"]
    unverified = client.put("/customer/location/1574900", json={"zip_code": "99999"}, headers=HEADERS)
    assert codes(unverified) == ["bad_loc"]
    moved = client.put("/customer/location/1574900", json={"street": "235 Park Ave S", "zip_code": "10003"},
                       headers=HEADERS).json["location"]
    assert moved["street"] == "235 PARK AVE S" and moved["latitude"] != before["latitude"]
    assert moved["latitude"] == format_coordinate(geocode("235 Park Ave S", "10003")[0])


def test_unknown_location_id_is_bad_loc_id(client):
    for response in (client.put("/customer/location/8", json={"unit_number": "x"}, headers=HEADERS),
                     client.put("/customer/location/abc", json={}, headers=HEADERS),
                     client.delete("/customer/location/8", headers=HEADERS)):
        assert response.status_code == 400 and codes(response) == ["bad_loc_id"]
    assert "location id 8" in response.json["message"][0]["dev_msg"]


def test_delete(client, state):
    create(client)
    assert client.delete("/customer/location/1574900", headers=HEADERS).status_code == 200
    assert state.locations == {}
    assert codes(client.delete("/customer/location/1574900", headers=HEADERS)) == ["bad_loc_id"]


def test_list_all_and_filter_by_coordinates(client):
    create(client, latitude=40.7068885, longitude=-74.0042710)
    create(client, street="235 Park Ave S", zip_code="10003")
    everything = client.get("/customer/location/", headers=HEADERS).json
    assert everything["message"] == [] and [loc["location_id"] for loc in everything["locations"]] == [
        "1574900", "1574901"]
    assert everything["locations"][0]["unit_number"] == "" and everything["locations"][0]["company"] == ""
    assert len(client.get("/customer/location", headers=HEADERS).json["locations"]) == 2
    near = client.get("/customer/location?latitude=40.70694&longitude=-74.00433", headers=HEADERS).json
    assert [loc["location_id"] for loc in near["locations"]] == ["1574900"]
    far = client.get("/customer/location/?latitude=40.7071&longitude=-74.00427", headers=HEADERS).json
    assert far["locations"] == []
    only_one = client.get("/customer/location?latitude=40.7068885", headers=HEADERS).json
    assert len(only_one["locations"]) == 2
    bad = client.get("/customer/location?latitude=north&longitude=-74", headers=HEADERS)
    assert bad.status_code == 400 and codes(bad) == ["bad_latitude"]


def test_fault_injection_and_request_log(client, state):
    client.application.config["FAULTS"].inject(429, retry_after=2, path_prefix="/customer/location")
    limited = create(client)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "2"
    assert create(client).status_code == 200
    method, path, query, body, headers = state.requests_log[-1]
    assert (method, path, query, body["zip_code"]) == ("POST", "/customer/location", {}, "10038")
    assert headers == {"Content-Type": "application/json"} and len(state.requests_log) == 2


def test_over_http_with_requests():
    state = DeliverycomState(access_token="secret", verifiable_zips=("94103",))
    with SimulatorServer(create_app(state)) as server:
        session = requests.Session()
        session.headers["Authorization"] = "Bearer secret"
        body = valid(street="1355 Market St", city="San Francisco", state="CA", zip_code="94103")
        created = session.post(f"{server.url}/customer/location", json=body, timeout=5)
        assert created.status_code == 200
        location = created.json()["location"]
        found = session.get(f"{server.url}/customer/location/", timeout=5,
                            params={"latitude": location["latitude"], "longitude": location["longitude"]})
        assert [loc["location_id"] for loc in found.json()["locations"]] == [str(location["location_id"])]
        assert codes_of(session.post(f"{server.url}/customer/location", json=valid(), timeout=5)) == ["bad_loc"]
        assert requests.get(f"{server.url}/customer/location", timeout=5).status_code == 401
        requests.post(f"{server.url}/_sim/faults", json={"status": 503}, timeout=5)
        assert session.get(f"{server.url}/customer/location", timeout=5).status_code == 503


def codes_of(response):
    return [message["code"] for message in response.json()["message"]]
