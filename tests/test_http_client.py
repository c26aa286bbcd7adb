"""The HTTP client's error classes against real sockets: what may still land, and for how long."""
import socket
import threading

import pytest

from workers.resilience.errors import NoAnswer, RetriableError
from workers.resilience.http import HttpClient


@pytest.fixture
def listener():
    """A listening socket nobody answers on (the test decides what happens to a connection)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server
    server.close()


def test_a_refused_connection_was_never_sent():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(RetriableError) as refused:
        HttpClient(f"http://127.0.0.1:{port}").request("POST", "locations", json={})
    assert not isinstance(refused.value, NoAnswer)


def test_a_read_timeout_may_still_land_for_the_rest_of_the_settle_time(listener):
    client = HttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=(1, 0.3))
    with pytest.raises(NoAnswer) as timed_out:
        client.request("POST", "locations", json={})
    assert client.settle_seconds == 0.6
    assert timed_out.value.settles_in == pytest.approx(0.3)  # sent at least the read timeout ago


def test_a_dropped_connection_may_still_land_for_the_whole_settle_time(listener):
    def drop():
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.close()

    threading.Thread(target=drop, daemon=True).start()
    client = HttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=(1, 5))
    with pytest.raises(NoAnswer) as dropped:
        client.request("POST", "locations", json={})
    assert dropped.value.settles_in == 10
