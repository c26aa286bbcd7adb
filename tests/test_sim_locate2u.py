"""The Locate2u simulator enforces the platform's rules."""
import base64
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask, request

from workers.ops.simulators.base import SimulatorServer
from workers.ops.simulators.locate2u import EVENT_TYPES, Locate2uState, create_app

REDIRECT = "https://relay.example/oauth/callback"


@pytest.fixture
def state():
    return Locate2uState()


def client_token(client, **extra):
    form = {"grant_type": "client_credentials", "client_id": "test-client",
            "client_secret": "test-secret", "scope": "integrations-api", **extra}
    return client.post("/connect/token", data=form)


def bearer(client):
    return {"Authorization": "Bearer " + client_token(client).json["access_token"]}


def authorize(client, scope="integrations-api offline_access", redirect_uri=REDIRECT, **extra):
    args = {"response_type": "code", "client_id": "test-client", "redirect_uri": redirect_uri,
            "scope": scope, "state": "xyz", **extra}
    return client.get("/connect/authorize", query_string=args)


def exchange(client, code, redirect_uri=REDIRECT):
    return client.post("/connect/token", data={
        "grant_type": "authorization_code", "client_id": "test-client", "client_secret": "test-secret",
        "code": code, "redirect_uri": redirect_uri})


def code_from(response):
    assert response.status_code == 302
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    assert query["state"] == ["xyz"]
    return query["code"][0]


# --- identity server ---------------------------------------------------------

def test_client_credentials_grant_form_and_basic(client, state):
    body = client_token(client).json
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["scope"] == "integrations-api" and "refresh_token" not in body
    basic = base64.b64encode(b"test-client:test-secret").decode()
    response = client.post("/connect/token", data={"grant_type": "client_credentials"},
                           headers={"Authorization": "Basic " + basic})
    assert response.status_code == 200 and response.json["access_token"] != body["access_token"]
    assert all("client_secret" not in r for r in state.token_requests)
    assert state.token_requests[0]["grant_type"] == "client_credentials"


def test_token_endpoint_errors(client):
    assert client_token(client, client_secret="wrong").status_code == 401
    assert client_token(client, client_secret="wrong").json == {"error": "invalid_client"}
    assert client_token(client, grant_type="password").json["error"] == "unsupported_grant_type"
    as_json = client.post("/connect/token", json={"grant_type": "client_credentials",
                                                 "client_id": "test-client", "client_secret": "test-secret"})
    assert as_json.status_code == 400 and as_json.json["error"] == "invalid_request"
    assert client_token(client, scope="integrations-api offline_access").json["error"] == "invalid_scope"


@pytest.mark.parametrize("change, error", [
    ({"response_type": "token"}, "invalid_request"),
    ({"client_id": "someone-else"}, "unauthorized_client"),
    ({"scope": "openid"}, "invalid_scope"),
])
def test_authorize_validates(client, change, error):
    response = authorize(client, **change)
    assert response.status_code == 400 and response.json["error"] == error


def test_authorization_code_is_single_use(client):
    code = code_from(authorize(client))
    first = exchange(client, code)
    assert first.status_code == 200 and "refresh_token" in first.json
    assert first.json["scope"] == "integrations-api offline_access"
    headers = {"Authorization": "Bearer " + first.json["access_token"]}
    assert client.get("/v1/Discovery/User", headers=headers).status_code == 200
    again = exchange(client, code)
    assert again.status_code == 400 and again.json["error"] == "invalid_grant"
    # reuse of a code revokes what it issued (RFC 6749 4.1.2)
    assert client.get("/v1/Discovery/User", headers=headers).status_code == 401


def test_code_without_offline_access_has_no_refresh_token(client):
    body = exchange(client, code_from(authorize(client, scope="integrations-api"))).json
    assert "access_token" in body and "refresh_token" not in body


def test_redirect_uri_must_match(client):
    code = code_from(authorize(client))
    assert exchange(client, code, "https://evil.example/cb").json["error"] == "invalid_grant"
    assert exchange(client, code).json["error"] == "invalid_grant"  # consumed by the failed try


def test_refresh_token_rotates(client, state):
    first = exchange(client, code_from(authorize(client))).json
    form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"],
            "client_id": "test-client", "client_secret": "test-secret"}
    second = client.post("/connect/token", data=form)
    assert second.status_code == 200
    assert second.json["refresh_token"] != first["refresh_token"]
    assert client.post("/connect/token", data=form).json["error"] == "invalid_grant"
    form["refresh_token"] = second.json["refresh_token"]
    assert client.post("/connect/token", data=form).status_code == 200
    assert client.get("/_sim/state").json["token_requests"] == {"authorization_code": 1, "refresh_token": 3}


def test_access_token_expires(client, state):
    state.token_lifetime = 1
    headers = bearer(client)
    assert client.get("/v1/Discovery/User", headers=headers).status_code == 200
    time.sleep(1.1)
    response = client.get("/v1/Discovery/User", headers=headers)
    assert response.status_code == 401 and response.json == {"error": "invalid_token"}


# --- integration API -----------------------------------------------------------

def test_api_requires_bearer_token(client, state):
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}):
        response = client.get("/v1/Webhooks", headers=headers)
        assert response.status_code == 401 and response.json == {"error": "invalid_token"}
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert state.requests_log == [("GET", "/v1/Webhooks")] * 3


def test_api_requires_integrations_scope(client):
    token = client_token(client, scope="locate2u.api").json["access_token"]
    response = client.get("/v1/Discovery/User", headers={"Authorization": "Bearer " + token})
    assert response.status_code == 403 and response.json == {"error": "insufficient_scope"}


def test_discovery_user(client):
    body = client.get("/v1/Discovery/User", headers=bearer(client)).json
    assert body["userId"] == 12345 and body["teamId"] == 67890 and body["teamName"] == "Simulated Team"


def test_stops_create_get_and_validate(client, state):
    headers = bearer(client)
    created = client.post("/v1/Stops", headers=headers,
                          json={"name": "Bob", "address": "1 George St, Sydney NSW 2000", "unknown": 1})
    assert created.status_code == 201
    stop = created.json
    assert stop["status"] == "Created" and stop["location"] is None and "unknown" not in stop
    assert client.get(f"/v1/Stops/{stop['stopId']}", headers=headers).json == stop
    assert client.get("/v1/Stops/999", headers=headers).status_code == 404
    bad = client.post("/v1/Stops", headers=headers, json={"name": "Bob", "address": "  "})
    assert bad.status_code == 400 and list(bad.json["errors"]) == ["address"]
    assert client.post("/v1/Stops", headers=headers, json=[]).status_code == 400


def test_add_stop_uses_spec_defaults(client, state):
    stop = state.add_stop(stopId=987786, address="2 Pitt St")
    assert stop["status"] == "Pending" and stop["contact"]["name"] == "Matthew Robinson"
    fetched = client.get("/v1/Stops/987786", headers=bearer(client)).json
    assert fetched["address"] == "2 Pitt St" and state.add_stop()["stopId"] > 987786


def test_stops_import_reports_bad_rows(client, state):
    headers = bearer(client)
    rows = [{"name": "A", "address": "1 A St"}, {"name": "B"}, {"name": "C", "address": "3 C St"}]
    body = client.post("/v1/Stops/import", headers=headers, json=rows).json
    assert len(body["created"]) == 2 and all(i in state.stops for i in body["created"])
    assert body["failed"] == [{"index": 1, "errors": {"address": body["failed"][0]["errors"]["address"]}}]
    too_many = client.post("/v1/Stops/import", headers=headers, json=rows[:1] * 501)
    assert too_many.status_code == 400 and len(state.stops) == 2


def test_webhooks_crud(client, state):
    headers = bearer(client)
    assert client.get("/v1/Webhooks/event-types", headers=headers).json == list(EVENT_TYPES)
    created = client.post("/v1/Webhooks", headers=headers,
                          json={"eventType": "stop.assigned", "url": "https://relay.example/hooks/a"})
    assert created.status_code == 201
    hook = created.json
    assert hook == {"id": hook["id"], "eventType": "stop.assigned", "url": "https://relay.example/hooks/a"}
    url = f"/v1/Webhooks/{hook['id']}"
    assert client.get(url, headers=headers).json == hook
    updated = client.put(url, headers=headers, json={"eventType": "trip.created"})
    assert updated.json["eventType"] == "trip.created" and updated.json["url"] == hook["url"]
    assert client.get("/v1/Webhooks", headers=headers).json == [updated.json]
    assert client.delete(url, headers=headers).status_code == 204
    assert client.get(url, headers=headers).status_code == 404
    assert client.put(url, headers=headers, json={"url": "https://x.example"}).status_code == 404
    assert state.webhooks == {}


def test_webhooks_validate(client):
    headers = bearer(client)
    bad_type = client.post("/v1/Webhooks", headers=headers,
                           json={"eventType": "stop.created", "url": "https://relay.example/h"})
    assert bad_type.status_code == 400 and "eventType" in bad_type.json["errors"]
    bad_url = client.post("/v1/Webhooks", headers=headers, json={"eventType": "note.created", "url": "/h"})
    assert bad_url.status_code == 400 and "url" in bad_url.json["errors"]


# --- faults and real HTTP ---------------------------------------------------------

def test_injected_429_with_retry_after(client):
    headers = bearer(client)
    client.post("/_sim/faults", json={"status": 429, "retry_after": 7, "path_prefix": "/v1/"})
    limited = client.get("/v1/Discovery/User", headers=headers)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert client.get("/v1/Discovery/User", headers=headers).status_code == 200


def test_deliver_over_real_http():
    received = []
    receiver = Flask("receiver")

    @receiver.post("/hooks/<event>")
    def _hook(event):
        received.append((event, request.headers.get("Content-Type"),
                         request.headers.get("Authorization"), request.get_data()))
        return "", 204

    state = Locate2uState()
    with SimulatorServer(create_app(state)) as sim, SimulatorServer(receiver) as hooks:
        session = requests.Session()
        session.trust_env = False
        token = session.post(sim.url + "/connect/token", data={"grant_type": "client_credentials"},
                             auth=("test-client", "test-secret")).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        for event in ("stop.assigned", "trip.created"):
            session.post(sim.url + "/v1/Webhooks", headers=auth,
                         json={"eventType": event, "url": f"{hooks.url}/hooks/{event}"}).raise_for_status()
        responses = state.deliver("stop.assigned", {"stopId": 987786, "stopRef": "L1"})
        assert [r.status_code for r in responses] == [204]
        assert session.get(sim.url + "/_sim/state").json()["webhooks"][1]["eventType"] == "trip.created"
    assert received == [("stop.assigned", "application/json", None, b'{"stopId": 987786, "stopRef": "L1"}')]
