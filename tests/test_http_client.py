"""The HTTP client's error classes against real sockets: what may still land, and for how long; an
answer that crawls or breaks off; and a write answered with a redirect."""
import contextlib
import gzip
import http.server
import socket
import ssl
import threading
import time

import pytest

from tests.processes import make_tls_certificates
from workers.resilience.errors import BadAnswer, NoAnswer, PermanentError, RetriableError
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


def answer_then(listener, then, tls=None):
    """Serve one request (over TLS with the server context ``tls``): read it, send a 200's status
    line and headers for a 100-byte JSON body, then ``then(connection)``."""
    def serve():
        connection, _ = listener.accept()
        if tls is not None:
            connection = tls.wrap_socket(connection, server_side=True)
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        try:
            then(connection)
        except OSError:  # the client hung up
            pass
        connection.close()

    threading.Thread(target=serve, daemon=True).start()


def cut_in_time(client, error_class):
    """The ``error_class`` a POST by ``client`` (timeout (1, 0.5)) raises within the exchange's 1.5 s,
    not after the 10 s its crawling answer would take."""
    started = time.monotonic()
    with pytest.raises(error_class) as cut:
        client.request("POST", "locations", json={})
    took = time.monotonic() - started
    assert took < 6, took
    return cut.value


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_answer_that_crawls_is_cut_when_the_time_for_it_is_up(listener, scheme, tmp_path):
    """A byte every 0.1 s: each read comes within the read timeout, so ``requests`` alone waits for
    all 100 (10 s). The whole exchange gets the connect plus the read timeout (1.5 s here)."""
    def crawl(connection):
        for _ in range(100):
            connection.sendall(b" ")
            time.sleep(0.1)

    tls = None
    if scheme == "https":  # the sinks' APIs: the cut shuts the TCP connection under the TLS one
        ca_file, cert_file, key_file = make_tls_certificates(tmp_path)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert_file, key_file)
    answer_then(listener, crawl, tls)
    client = HttpClient(f"{scheme}://127.0.0.1:{listener.getsockname()[1]}", timeout=(1, 0.5))
    if tls is not None:
        client.session.verify = ca_file
    assert "answered 200, but its answer was not complete within 1.5 s" in cut_in_time(client, BadAnswer).message


def test_an_answer_broken_off_is_retried_not_a_bug(listener):
    """The connection closed after half the body (a proxy reset): ``requests`` raises
    ChunkedEncodingError, which is not one of its connection errors."""
    answer_then(listener, lambda connection: connection.sendall(b"{" * 50))
    client = HttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=(1, 5))
    with pytest.raises(BadAnswer) as broken:
        client.request("POST", "locations", json={})
    assert "answered 200, but its answer could not be read whole (ChunkedEncodingError)" in broken.value.message


@pytest.fixture
def redirecting():
    """A server answering every request 301 to the same path under ``/moved`` (an API that moved),
    and 200 there; ``.requests`` lists what it was sent."""
    seen = []

    class Redirect(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            seen.append((self.command, self.path))
            moved = self.path.startswith("/moved/")
            self.send_response(200 if moved else 301)
            if not moved:
                self.send_header("Location", f"http://{self.headers['Host']}/moved{self.path}")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.requests = seen
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_a_write_answered_with_a_redirect_is_not_sent_on_and_says_where_it_points(redirecting, method):
    """requests sent a 301 or 302 POST on as a GET without its body: a create became a listing, read as
    the API's answer ("a body without location.id") and retried for hours."""
    with pytest.raises(PermanentError) as redirected:
        HttpClient(redirecting.url + "/admin/v1").request(method, "locations", json={"name": "Locate2u"})
    assert redirected.value.status == 301
    assert (f"was redirected (301) to {redirecting.url}/moved/admin/v1/locations: set the API URL"
            in redirected.value.message)
    assert redirecting.requests == [(method, "/admin/v1/locations")]  # nothing sent on


def test_a_read_still_follows_a_redirect(redirecting):
    response = HttpClient(redirecting.url + "/admin/v1").request("GET", "locations")
    assert response.status_code == 200
    assert redirecting.requests == [("GET", "/admin/v1/locations"), ("GET", "/moved/admin/v1/locations")]


def test_a_read_redirected_round_in_a_loop_is_a_mistake_to_fix_not_a_bug(listener):
    """An API URL whose server redirects to itself: ``requests`` gives up after 30 redirects with
    TooManyRedirects, outside the client's error classes, and the write was dead-lettered as an
    internal error."""
    def loop():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # the test is over
                return
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: /stops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            connection.close()

    threading.Thread(target=loop, daemon=True).start()
    with pytest.raises(PermanentError) as looped:  # the API URL's password shows nowhere (it did in ``url``)
        HttpClient(f"http://relay:pw-4e1b@127.0.0.1:{listener.getsockname()[1]}").request("GET", "stops")
    assert "was redirected more than 30 times" in looped.value.message
    assert "pw-4e1b" not in str(looped.value.to_json()) and "relay:[redacted]@" in looped.value.url


def test_an_answer_that_cannot_be_decoded_is_retried_not_a_bug(listener):
    """``Content-Encoding: gzip`` over a body that is not gzip (a proxy mangling the answer):
    ``requests`` raises ContentDecodingError, outside the client's error classes."""
    def mangled(connection):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                           b"Content-Length: 20\r\n\r\n" + b"not gzip, not json!!")

    def serve():
        connection, _ = listener.accept()
        connection.recv(65536)
        mangled(connection)
        connection.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(BadAnswer) as unreadable:
        HttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}").request("POST", "locations", json={})
    assert "answered 200, but its answer could not be read whole (ContentDecodingError)" in unreadable.value.message


def test_an_answer_longer_than_the_relay_reads_is_cut_at_once(listener):
    """An API URL pointing at something else (a file server, a misrouted proxy) answering with a
    body of gigabytes: read whole into a worker's memory, it gets the dyno killed, and the
    redelivered message kills the next one."""
    def serve():
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                           b"Content-Length: 4000000000\r\n\r\n")
        try:
            for _ in range(1000):
                connection.sendall(b"\0" * 65536)
        except OSError:  # the client hung up
            pass
        connection.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(BadAnswer) as cut:
        HttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}").request("GET", "v1/Stops/1")
    assert "answered 200, but its answer of 4,000,000,000 bytes is over the 33,554,432 the relay reads" \
        in cut.value.message


def serve_then_count(listener, head, chunks):
    """Serve one request: read it, send ``head`` (status line and headers), then each of ``chunks``
    until the client hangs up. Returns a dict whose "sent" is the body's bytes sent so far."""
    sent = {"sent": 0}

    def serve():
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(head)
        try:
            for chunk in chunks:
                connection.sendall(chunk)
                sent["sent"] += len(chunk)
        except OSError:  # the client hung up
            pass
        connection.close()

    threading.Thread(target=serve, daemon=True).start()
    return sent


def test_an_answer_without_a_length_is_cut_once_it_runs_past_what_the_relay_reads(listener):
    """A chunked answer announces no length: a file server or a stream behind a misrouted URL sends
    on for as long as it is read. Read whole, 64 MiB here (gigabytes at LAN speed within the
    exchange's 33 s), it is in the worker's memory before anything looks at it."""
    piece = b"\0" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    sent = serve_then_count(listener, b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n", [chunk] * 1024)
    with pytest.raises(BadAnswer) as cut:
        HttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}").request("GET", "v1/Stops/1")
    assert "answered 200, but its answer ran past the 33,554,432 bytes the relay reads" in cut.value.message
    time.sleep(0.2)
    assert sent["sent"] < 48 * 1024 * 1024, sent  # it hung up soon after 32 MiB, not at the end


def test_a_compressed_answer_that_inflates_past_what_the_relay_reads_is_cut(listener):
    """A small gzip answer that inflates a thousandfold (a decompression bomb, or a misrouted URL
    serving a compressed file): its Content-Length says 100 KiB, ``requests`` inflates it to
    100 MiB. What the relay reads is counted after decompression."""
    body = gzip.compress(b"\0" * (100 * 1024 * 1024), compresslevel=9)
    serve_then_count(listener, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(body), [body])
    with pytest.raises(BadAnswer) as cut:
        HttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}").request("GET", "v1/Stops/1")
    assert len(body) < 1024 * 1024
    assert "answered 200, but its answer ran past the 33,554,432 bytes the relay reads" in cut.value.message


def test_an_answer_whose_head_crawls_in_is_cut_when_the_time_for_it_is_up(listener):
    """The status line, then a header every 0.1 s: each read comes within the read timeout, and
    ``requests`` reads the whole head before anything of the relay's runs, so it alone waits for
    all 100 headers (10 s). The exchange's deadline (1.5 s) holds for the head too; with no whole
    answer, the write may still land there, for the whole settle time."""
    headers = [b"X-Crawl-%d: 1\r\n" % number for number in range(100)]
    serve_then_count(listener, b"HTTP/1.1 200 OK\r\n", (time.sleep(0.1) or header for header in headers))
    client = HttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=(1, 0.5))
    cut = cut_in_time(client, NoAnswer)
    assert "POST http://127.0.0.1:" in cut.message and "got no whole answer within 1.5 s" in cut.message
    assert cut.settles_in == client.settle_seconds


def test_an_answer_without_a_length_that_crawls_is_not_taken_for_whole_when_cut(listener):
    """``Connection: close`` and no length: the body is whatever comes before the connection ends,
    so the deadline's cut, read as the end, would pass half an answer off as a whole one."""
    serve_then_count(listener, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
                     (time.sleep(0.1) or b" " for _ in range(100)))
    client = HttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=(1, 0.5))
    assert "answered 200, but its answer was not complete within 1.5 s" in cut_in_time(client, BadAnswer).message


def test_a_certificate_the_client_refuses_was_never_sent_and_says_why(listener, tmp_path):
    """A sink's certificate expired, or its URL points at a host with another name's: the TLS
    handshake fails before the request leaves, so nothing of it can land later (before, it was
    taken for a request without an answer and its key locked for the settle time), and the error
    says what is wrong with the certificate instead of just "SSLError"."""
    _, cert_file, key_file = make_tls_certificates(tmp_path)  # signed by a CA the client does not trust
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)

    def serve():
        connection, _ = listener.accept()
        with contextlib.suppress(OSError):
            tls.wrap_socket(connection, server_side=True)
        connection.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(RetriableError) as refused:
        HttpClient(f"https://127.0.0.1:{listener.getsockname()[1]}").request("POST", "locations", json={})
    assert not isinstance(refused.value, NoAnswer)
    assert "its TLS certificate was refused (certificate verify failed: " in refused.value.message
