import textwrap

import pytest

from tests.payloads import PUBLISHED, status_change
from workers.config import ConfigError
from workers.domain.events import parse_event
from workers.pipeline.routes import DEFAULT_ROUTES, load_routes, render


def event(body, event_type="stop.status-changed"):
    return parse_event("d", event_type, body)


def write(tmp_path, text):
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_follow_the_design():
    cancelled = event(status_change(1, "Cancelled", "2022-04-27T05:00:00+00:00"))
    arrived = event(status_change(1, "Arrived", "2022-04-27T05:00:00+00:00"))
    assert {name: route.action_for(cancelled) for name, route in DEFAULT_ROUTES.items()} == {
        "storepoint": "delete", "b2b": "deactivate", "locate": "delete", "deliverycom": None, "forward": "upsert"}
    assert {name: route.action_for(arrived) for name, route in DEFAULT_ROUTES.items()} == {
        "storepoint": "upsert", "b2b": "upsert", "locate": "upsert", "deliverycom": "upsert", "forward": "upsert"}


@pytest.mark.parametrize("event_type", ["shipment.status-changed", "trip.created", "trip.assigned", "note.created"])
def test_non_stop_events_go_to_the_forward_only(event_type):
    taken = [name for name, route in DEFAULT_ROUTES.items() if route.action_for(event(PUBLISHED[event_type], event_type))]
    assert taken == ["forward"]


def test_file_overrides_per_sink_and_keeps_other_defaults(tmp_path):
    routes = load_routes(write(tmp_path, """
        storepoint:
          statuses: [Arrived, Complete]
          on_event: {stop.assigned: skip}
          key: "stop-{stopRef}"
          fields: {cf_ref: "{stopRef}/{stopId}"}
        deliverycom:
          on_status: {Cancelled: delete}
        """))
    storepoint = routes["storepoint"]
    assert storepoint.action_for(event(status_change(1, "Arrived", "2022-04-27T05:00:00+00:00"))) == "upsert"
    assert storepoint.action_for(event(status_change(1, "Enroute", "2022-04-27T05:00:00+00:00"))) is None
    assert storepoint.action_for(event(PUBLISHED["stop.assigned"], "stop.assigned")) is None
    assert storepoint.on_status == {"Cancelled": "delete"}  # default kept
    assert render(storepoint.fields["cf_ref"], {"stopRef": "L1", "stopId": 9}) == "L1/9"
    assert routes["deliverycom"].action_for(event(status_change(1, "Cancelled", "2022-04-27T05:00:00+00:00"))) == "delete"
    assert routes["b2b"] == DEFAULT_ROUTES["b2b"]


def test_bad_file_names_line_and_field(tmp_path):
    path = write(tmp_path, """\
        storepoint:
          events: [stop.assigned, stop.teleported]
          action: explode
        b2c:
          action: upsert
        b2b:
          rate_limit: {rate: 0, burst: 5}
          key: "{oops"
        """)
    with pytest.raises(ConfigError) as caught:
        load_routes(path)
    message = caught.value.problems["RELAY_ROUTES_FILE"]
    assert "line 2: storepoint.events.1: Must be one of:" in message
    assert "line 3: storepoint.action: Must be one of: upsert, deactivate, delete, skip." in message
    assert "line 4: b2c: unknown sink" in message
    assert "line 7: b2b.rate_limit.rate: Must be greater than or equal to 0.01." in message
    assert "line 8: b2b.key: bad template '{oops'" in message


def test_not_yaml_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_routes(write(tmp_path, "storepoint: [unclosed\n"))
    with pytest.raises(ConfigError, match="must map sink names to routes"):
        load_routes(write(tmp_path, "- storepoint\n"))


@pytest.mark.parametrize("template", ["l2u-{}", "{0}", "{stopId!x}", "{stopId:d}", "{stopId.real}", "{stopId[0]}"])
def test_a_template_that_cannot_render_is_refused_at_start_up_not_at_every_event(tmp_path, template):
    """These parse as format strings, so they passed the start-up check, then ``render`` raised
    (IndexError, ValueError, AttributeError, TypeError) for every event: each dead-lettered as an internal
    error. Templates name fields only."""
    with pytest.raises(ConfigError) as caught:
        load_routes(write(tmp_path, f'storepoint:\n  key: "{template}"\n'))
    assert f"line 2: storepoint.key: bad template {template!r}" in caught.value.problems["RELAY_ROUTES_FILE"]


def test_a_routes_file_that_cannot_be_read_is_one_message_not_a_traceback(tmp_path):
    """``RELAY_ROUTES_FILE`` naming a missing file, a folder or a file that is not UTF-8 (a spreadsheet
    saved as Latin-1), or whose sink names are not all text: every process ended in a traceback."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("storepoint:\n  fields: {name: 'Café'}\n".encode("latin-1"))
    for path, said in ((tmp_path / "nope.yaml", "cannot read it: No such file"),
                       (tmp_path, "cannot read it: Is a directory"),
                       (latin1, "cannot read it: not UTF-8")):
        with pytest.raises(ConfigError) as caught:
            load_routes(str(path))
        assert said in caught.value.problems["RELAY_ROUTES_FILE"]
    with pytest.raises(ConfigError) as caught:
        load_routes(write(tmp_path, "1: {}\nstorepoint: {}\n"))
    assert "line 1: 1: unknown sink" in caught.value.problems["RELAY_ROUTES_FILE"]


def test_worker_refuses_to_start_with_a_bad_routes_file(tmp_path, settings):
    import subprocess
    import sys

    from tests.processes import process_env
    path = write(tmp_path, "storepoint:\n  action: explode\n")
    env = process_env(settings.replace(routes_file=path))
    result = subprocess.run([sys.executable, "-c", "import workers.app"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "line 2: storepoint.action: Must be one of" in result.stderr


def test_receiver_refuses_a_bad_routes_file_too(tmp_path, settings):
    from receiver import create_app
    with pytest.raises(ConfigError, match="line 2: storepoint.action"):
        create_app(settings.replace(routes_file=write(tmp_path, "storepoint:\n  action: explode\n")))
