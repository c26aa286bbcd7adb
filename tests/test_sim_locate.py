"""The LOCATE simulator enforces the documented rules."""
import base64
import re
import time

import pytest
import requests

from workers.ops.simulators.base import SimulatorServer
from workers.ops.simulators.locate import LocateState, create_app

KEY = "locate-test-key"
AUTH = "Basic " + base64.b64encode(f"{KEY}:{KEY}".encode()).decode()
HEADERS = {"Accept": "application/json", "Authorization": AUTH}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def address(**fields):
    return {"name": "Jane Doe", "address1": "1 Main St", **fields}


@pytest.fixture
def state():
    return LocateState(resources=("customeraddress", "carrier"))


def post(client, path, body, **headers):
    return client.post(path, json=body, headers={**HEADERS, **headers})


def put(client, path, body, **headers):
    return client.put(path, json=body, headers={**HEADERS, **headers})


def delete(client, path, **headers):
    return client.delete(path, headers={**HEADERS, "Content-Type": "application/json", **headers})


def restore(client, path, **headers):
    return client.post(path, headers={**HEADERS, "Content-Type": "application/json", **headers})


def listing(client, query=""):
    response = client.get(f"/customeraddress?{query}", headers=HEADERS)
    assert response.status_code == 200, response.json
    return response.json


# ----------------------------------------------------------------- auth & headers

@pytest.mark.parametrize("authorization", [None, "Basic " + base64.b64encode(b"wrong:wrong").decode(),
                                           "Basic " + base64.b64encode(f"{KEY}:other".encode()).decode(),
                                           "Bearer " + KEY])
def test_requires_basic_auth_with_key_as_user_and_password(client, authorization):
    headers = {"Accept": "application/json"} | ({"Authorization": authorization} if authorization else {})
    response = client.get("/customeraddress", headers=headers)
    assert response.status_code == 401
    assert response.json == {"message": "Unauthenticated."}


def test_missing_accept_or_content_type_redirects_to_login(client):
    no_accept = client.get("/customeraddress", headers={"Authorization": AUTH})
    assert no_accept.status_code == 302 and no_accept.headers["Location"].endswith("/login")
    star_accept = client.get("/customeraddress", headers={"Authorization": AUTH, "Accept": "*/*"})
    assert star_accept.status_code == 302
    form_post = client.post("/customeraddress", data={"name": "x"}, headers=HEADERS)
    assert form_post.status_code == 302
    bare_delete = client.delete("/customeraddress/1", headers=HEADERS)
    assert bare_delete.status_code == 302
    login = client.get("/login")
    assert login.status_code == 200 and login.mimetype == "text/html"


# ------------------------------------------------------------------------- CRUD

def test_create_and_get_with_utc_iso_dates(client, state):
    created = post(client, "/customeraddress", address(remote_key="stop-1", latitude=-33.8, longitude="151.2"))
    assert created.status_code == 201
    record = created.json
    assert record["id"] == 1 and record["remote_key"] == "stop-1" and record["deleted_at"] is None
    assert ISO_UTC.match(record["created_at"]) and ISO_UTC.match(record["updated_at"])
    assert client.get("/customeraddress/1", headers=HEADERS).json == record
    assert state.records["customeraddress"][1]["name"] == "Jane Doe"


def test_update_is_partial_and_ignores_read_only_fields(client):
    post(client, "/customeraddress", address())
    updated = put(client, "/customeraddress/1", {"address1": "2 Side St", "id": 99, "created_at": "x"})
    assert updated.status_code == 200
    assert updated.json["id"] == 1 and updated.json["address1"] == "2 Side St" and updated.json["name"] == "Jane Doe"
    assert updated.json["created_at"] != "x"


def test_validation_errors_are_422(client):
    response = post(client, "/customeraddress", {"remote_key": "k" * 192, "latitude": "north", "longitude": True})
    assert response.status_code == 422
    assert response.json["message"] == "The given data was invalid."
    assert set(response.json["errors"]) == {"name", "address1", "remote_key", "latitude", "longitude"}
    assert response.json["errors"]["name"] == ["The name field is required."]
    assert post(client, "/customeraddress", address(name=7)).json["errors"] == {"name": ["The name must be a string."]}
    assert post(client, "/customeraddress", address(remote_key="k" * 191)).status_code == 201
    post(client, "/customeraddress", address())
    assert put(client, "/customeraddress/1", {"address1": ""}).status_code == 422
    assert put(client, "/customeraddress/1", {"latitude": "x"}).json["errors"] == {
        "latitude": ["The latitude must be a number."]}


def test_other_resources_are_generic(client):
    assert post(client, "/carrier", {"active": True}).status_code == 201


def test_unknown_resource_and_id_are_404(client):
    assert client.get("/nosuchthing", headers=HEADERS).status_code == 404
    assert post(client, "/nosuchthing", {}).status_code == 404
    missing = client.get("/customeraddress/42", headers=HEADERS)
    assert missing.status_code == 404 and missing.json == {"message": "Not found"}
    assert put(client, "/customeraddress/42", address()).status_code == 404
    assert delete(client, "/customeraddress/42").status_code == 404


def test_soft_delete_with_trashed_and_restore(client):
    post(client, "/customeraddress", address(remote_key="a"))
    post(client, "/customeraddress", address(remote_key="b"))
    deleted = delete(client, "/customeraddress/1")
    assert deleted.status_code == 200 and ISO_UTC.match(deleted.json["deleted_at"])
    assert client.get("/customeraddress/1", headers=HEADERS).status_code == 404
    assert client.get("/customeraddress/1?withTrashed=1", headers=HEADERS).json["deleted_at"]
    assert [r["remote_key"] for r in listing(client)["data"]] == ["b"]
    assert [r["remote_key"] for r in listing(client, "withTrashed=1")["data"]] == ["a", "b"]
    assert put(client, "/customeraddress/1", {"name": "x"}).status_code == 404
    assert delete(client, "/customeraddress/1").status_code == 404
    restored = restore(client, "/customeraddress/1/restore")
    assert restored.status_code == 200 and restored.json["deleted_at"] is None
    assert len(listing(client)["data"]) == 2
    assert restore(client, "/customeraddress/9/restore").status_code == 404


# ------------------------------------------------------------ lists & filters

def test_pagination_envelope(client):
    for n in range(5):
        post(client, "/customeraddress", address(remote_key=f"k{n}"))
    page = listing(client, "perPage=2&page=2")
    assert {k: page[k] for k in ("total", "per_page", "current_page", "last_page", "from", "to")} == {
        "total": 5, "per_page": 2, "current_page": 2, "last_page": 3, "from": 3, "to": 4}
    assert [r["id"] for r in page["data"]] == [3, 4]
    assert "page=3" in page["next_page_url"] and "perPage=2" in page["next_page_url"]
    assert "page=1" in page["prev_page_url"]
    last = listing(client, "perPage=2&page=3")
    assert last["next_page_url"] is None and [r["id"] for r in last["data"]] == [5]
    default = listing(client)
    assert default["per_page"] == 100 and default["prev_page_url"] is None and default["last_page"] == 1
    beyond = listing(client, "perPage=2&page=9")
    assert beyond["data"] == [] and beyond["from"] is None and beyond["to"] is None
    count_only = listing(client, "perPage=0")
    assert count_only["total"] == 5 and count_only["data"] == []


@pytest.mark.parametrize("query, field", [("perPage=101", "perPage"), ("perPage=-1", "perPage"),
                                          ("perPage=ten", "perPage"), ("page=0", "page")])
def test_bad_pagination_is_422(client, query, field):
    response = client.get(f"/customeraddress?{query}", headers=HEADERS)
    assert response.status_code == 422 and list(response.json["errors"]) == [field]


def test_simple_filters_sort_and_fields(client):
    post(client, "/customeraddress", address(name="Bob", remote_key="R-1", priority=2))
    post(client, "/customeraddress", address(name="alice", remote_key="r-2", priority=2))
    post(client, "/customeraddress", address(name="Carol", remote_key="R-3", priority=1))
    assert [r["id"] for r in listing(client, "remote_key=r-1")["data"]] == [1]
    assert [r["id"] for r in listing(client, "name=ALICE&priority=2")["data"]] == [2]
    assert listing(client, "remote_key=r-%")["data"] == []  # no wildcards in simple filters
    assert [r["name"] for r in listing(client, "sort=name")["data"]] == ["alice", "Bob", "Carol"]
    assert [r["id"] for r in listing(client, "sort=-priority,-name")["data"]] == [1, 2, 3]
    assert listing(client, "fields=name&sort=-id")["data"][0] == {"id": 3, "name": "Carol"}


@pytest.mark.parametrize("expression, ids", [
    ('remote_key="r-2"', [2]),
    ("priority>=2", [1, 2]),
    ('(priority=2 && name!="bob") || name="carol"', [2, 3]),
    ('name="c%"', [3]),
    ("note IS NULL", [1, 3]),
    ("note is not null", [2]),
    ('created_at>="2000-01-01T00:00:00Z"', [1, 2, 3]),
])
def test_advanced_filter(client, expression, ids):
    post(client, "/customeraddress", address(name="Bob", remote_key="R-1", priority=2))
    post(client, "/customeraddress", address(name="alice", remote_key="r-2", priority=2, note="gate"))
    post(client, "/customeraddress", address(name="Carol", remote_key="R-3", priority=1))
    assert [r["id"] for r in listing(client, "filter=" + requests.utils.quote(expression))["data"]] == ids


@pytest.mark.parametrize("expression", ['= "s%"', "(name=1", "name ~ 1", "name=1 &&"])
def test_unparsed_advanced_filter_is_422(client, expression):
    response = client.get("/customeraddress", query_string={"filter": expression}, headers=HEADERS)
    assert response.status_code == 422 and "filter" in response.json["errors"]


# ---------------------------------------------------------- background processing

def test_background_header_always_answers_202_then_applies_later(state, client):
    state.background_delay = 0.2
    response = post(client, "/customeraddress", address(remote_key="bg"), **{"X-Background-Processing": "always"})
    assert response.status_code == 202 and response.data == b""
    assert listing(client)["total"] == 0
    assert state.wait_background()
    assert listing(client, "remote_key=bg")["total"] == 1


def test_background_validation_and_404_stay_synchronous(state, client):
    state.background = "always"
    assert post(client, "/customeraddress", {"name": "x"}).status_code == 422
    assert put(client, "/customeraddress/5", address()).status_code == 404


def test_server_default_background_and_header_override(state, client):
    state.background = "always"
    assert post(client, "/customeraddress", address()).status_code == 202
    state.wait_background()
    assert put(client, "/customeraddress/1", {"name": "Now"}, **{"X-Background-Processing": "never"}).json[
        "name"] == "Now"
    assert delete(client, "/customeraddress/1").status_code == 202
    state.wait_background()
    assert client.get("/customeraddress/1", headers=HEADERS).status_code == 404
    state.background = "never"
    assert post(client, "/customeraddress", address()).status_code == 201


def test_auto_mode_backgrounds_some_writes(state, client):
    state.background = "auto"
    statuses = [post(client, "/customeraddress", address(), **{"X-Background-Processing": "maybe"}).status_code
                for _ in range(4)]
    assert statuses == [201, 202, 201, 202]
    state.wait_background()
    assert listing(client)["total"] == 4


# ------------------------------------------------------------ faults, log, HTTP

def test_fault_injection_and_request_log(client, state):
    client.application.config["FAULTS"].inject(503, times=1, retry_after=3)
    faulted = client.get("/customeraddress", headers=HEADERS)
    assert faulted.status_code == 503 and faulted.headers["Retry-After"] == "3"
    assert client.get("/customeraddress", headers=HEADERS).status_code == 200
    post(client, "/customeraddress", address(), **{"X-Background-Processing": "never"})
    method, path, query, body, headers = state.requests_log[-1]
    assert (method, path, query, body["name"]) == ("POST", "/customeraddress", {}, "Jane Doe")
    assert headers == {"Accept": "application/json", "Content-Type": "application/json",
                       "X-Background-Processing": "never"}
    assert "Authorization" not in headers and len(state.requests_log) == 3


def test_over_http_with_requests():
    state = LocateState(background_delay=0.05)
    with SimulatorServer(create_app(state)) as server:
        session = requests.Session()
        session.auth = (KEY, KEY)
        session.headers.update({"Accept": "application/json", "Content-Type": "application/json"})
        created = session.post(f"{server.url}/customeraddress", json=address(remote_key="http"), timeout=5)
        assert created.status_code == 201
        backgrounded = session.put(f"{server.url}/customeraddress/{created.json()['id']}", json={"name": "Later"},
                                   headers={"X-Background-Processing": "always"}, timeout=5)
        assert backgrounded.status_code == 202 and backgrounded.content == b""
        deadline = time.monotonic() + 5
        while session.get(f"{server.url}/customeraddress/1", timeout=5).json()["name"] != "Later":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        page = session.get(f"{server.url}/customeraddress", params={"remote_key": "HTTP"}, timeout=5).json()
        assert page["total"] == 1
        redirected = requests.get(f"{server.url}/customeraddress", auth=(KEY, KEY), allow_redirects=False, timeout=5)
        assert redirected.status_code == 302 and redirected.headers["Location"] == f"{server.url}/login"
        requests.post(f"{server.url}/_sim/faults", json={"status": 429, "retry_after": 1}, timeout=5)
        limited = session.get(f"{server.url}/customeraddress", timeout=5)
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
