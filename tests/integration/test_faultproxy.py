"""The fault proxy itself, against real servers on loopback.

Upload tests will trust `FaultProxy` to break a link exactly as asked (a reset after so many
bytes, a hang, a slow link, a refusal) and to pass bytes through unchanged otherwise. These
tests check that promise against a tiny HTTP server (it reports the length and SHA-256 of each
body it read, even a partial one) and a raw TCP server (echo, sink or source), so that a failing
upload test points at the uploader, not at the harness.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import pytest
import requests

from tests.support.faultproxy import FaultProxy
from tests.support.net import LOOPBACK, wait_until

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
WAIT = 10.0  # bound for every "until the servers have seen it" poll


# A tiny HTTP server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """What the HTTP server read of one request body, recorded even when the read broke off."""

    received: int
    complete: bool
    sha256: str


def blob(size: int) -> bytes:
    """Return `size` deterministic pseudo-random bytes: the body of GET /blob/<size>."""
    return random.Random(size).randbytes(size)


class BodyServer(ThreadingHTTPServer):
    """Records every PUT body it reads; handler threads are not joined, so a hung one can't block.

    The proxy resets its connections when it closes, which ends such a thread anyway.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__((LOOPBACK, 0), BodyHandler)
        self.uploads: list[Upload] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def record(self, upload: Upload) -> None:
        with self.lock:
            self.uploads.append(upload)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: connections broken by the proxy are what these tests are about."""


class BodyHandler(BaseHTTPRequestHandler):
    """PUT: read the body, answer its length and SHA-256. GET /blob/<n>: send `blob(n)`."""

    protocol_version = "HTTP/1.1"
    timeout = 30
    server: BodyServer

    def do_PUT(self) -> None:
        expected = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        received = 0
        try:
            while received < expected:
                chunk = self.rfile.read(min(CHUNK, expected - received))
                if not chunk:
                    break
                digest.update(chunk)
                received += len(chunk)
        except OSError:
            pass
        complete = received == expected
        self.server.record(Upload(received, complete, digest.hexdigest()))
        if not complete:
            self.close_connection = True
            return
        self._reply(json.dumps({"length": received, "sha256": digest.hexdigest()}).encode())

    def do_GET(self) -> None:
        prefix = "/blob/"
        if not self.path.startswith(prefix):
            self.send_error(404)
            return
        self._reply(blob(int(self.path[len(prefix) :])), "application/octet-stream")

    def _reply(self, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: the tests assert on `BodyServer.uploads` instead."""


# A raw TCP server --------------------------------------------------------------------------------


@dataclass
class RawConnection:
    """What one connection to the raw server received, and how it ended: "eof" or "reset"."""

    received: bytearray = field(default_factory=bytearray)
    ended: str | None = None


class RawServer:
    """A TCP server with one thread per connection.

    "echo" sends back what it reads, "sink" only reads, "source" first sends `source_bytes`
    then reads. Every connection is recorded, so a test can see exactly which bytes crossed the
    proxy and whether the connection ended with a FIN or a reset.
    """

    def __init__(self, mode: Literal["echo", "sink", "source"], source_bytes: bytes = b"") -> None:
        self.mode = mode
        self.source_bytes = source_bytes
        self.connections: list[RawConnection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def received(self, index: int) -> bytes:
        with self._lock:
            return bytes(self.connections[index].received)

    def ended(self, index: int) -> str | None:
        with self._lock:
            return self.connections[index].ended

    def wait_ended(self, index: int) -> str:
        """Wait until connection `index` has been made and has ended; return how it ended."""
        how = wait_until(lambda: self.ended(index), WAIT, what=f"raw connection {index} ended")
        return str(how)

    def count(self) -> int:
        with self._lock:
            return len(self.connections)

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record = RawConnection()
            with self._lock:
                self.connections.append(record)
            thread = threading.Thread(target=self._serve, args=(conn, record), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, record: RawConnection) -> None:
        conn.settimeout(0.05)
        with conn:
            try:
                if self.mode == "source":
                    self._send_all(conn, self.source_bytes)
                while not self._stop.is_set():
                    try:
                        data = conn.recv(CHUNK)
                    except TimeoutError:
                        continue
                    if not data:
                        self._end(record, "eof")
                        return
                    with self._lock:
                        record.received += data
                    if self.mode == "echo":
                        self._send_all(conn, data)
            except (ConnectionResetError, BrokenPipeError):
                self._end(record, "reset")
            except OSError as exc:
                self._end(record, repr(exc))

    def _send_all(self, conn: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._stop.is_set():
            try:
                view = view[conn.send(view) :]
            except TimeoutError:
                continue

    def _end(self, record: RawConnection, how: str) -> None:
        with self._lock:
            record.ended = how


RawServerFactory = Callable[..., RawServer]


# Fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_proxy_thread_left() -> Iterator[None]:
    """Every proxy a test started must have stopped its thread by the end of the test."""
    yield
    assert proxy_threads() == []


@pytest.fixture
def http_server() -> Iterator[BodyServer]:
    server = BodyServer()  # already listening: no wait needed before the first request
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def proxy(http_server: BodyServer) -> Iterator[FaultProxy]:
    with FaultProxy(LOOPBACK, http_server.port) as p:
        yield p


@pytest.fixture
def raw_server() -> Iterator[RawServerFactory]:
    started: list[RawServer] = []

    def start(mode: Literal["echo", "sink", "source"], source_bytes: bytes = b"") -> RawServer:
        server = RawServer(mode, source_bytes)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection((LOOPBACK, proxy.port), timeout=WAIT)


def read_until_closed(sock: socket.socket) -> tuple[bytes, OSError | None]:
    """Read until EOF or an error; return the bytes and the error (None for a clean EOF)."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(CHUNK)
        except OSError as exc:
            return bytes(data), exc
        if not chunk:
            return bytes(data), None
        data += chunk


def put(proxy: FaultProxy, body: bytes, timeout: float = 60) -> requests.Response:
    return requests.put(proxy.url_for("/upload"), data=body, timeout=timeout)


def assert_echoed(response: requests.Response, body: bytes) -> None:
    assert response.status_code == 200
    assert response.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def uploads(server: BodyServer, count: int) -> list[Upload]:
    """Wait until the server has recorded `count` uploads; return them."""
    wait_until(lambda: len(server.uploads) >= count, WAIT, what=f"{count} upload(s) recorded")
    with server.lock:
        return list(server.uploads)


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("faultproxy-")]


# Pass-through ------------------------------------------------------------------------------------


def test_a_multi_megabyte_upload_passes_through_byte_for_byte(
    proxy: FaultProxy, http_server: BodyServer
) -> None:
    body = os.urandom(8 * MiB)

    response = put(proxy, body)

    assert_echoed(response, body)
    assert proxy.bytes_upstream > len(body)
    assert proxy.connections == 1
    assert proxy.cuts == 0


def test_a_multi_megabyte_download_passes_through_byte_for_byte(proxy: FaultProxy) -> None:
    size = 8 * MiB

    response = requests.get(proxy.url_for(f"/blob/{size}"), timeout=60)

    assert response.status_code == 200
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(blob(size)).digest()
    assert proxy.bytes_downstream > size


def test_raw_bytes_flow_both_ways_at_once_unchanged(raw_server: RawServerFactory) -> None:
    server = raw_server("echo")
    payload = os.urandom(3 * MiB)
    with FaultProxy(LOOPBACK, server.port) as proxy, connect(proxy) as client:
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        echoed = bytearray()
        while len(echoed) < len(payload):
            chunk = client.recv(CHUNK)
            assert chunk, "the proxy closed the connection early"
            echoed += chunk
        sender.join(WAIT)

        assert bytes(echoed) == payload
        assert proxy.bytes_upstream == len(payload)
        assert proxy.bytes_downstream == len(payload)


def test_a_half_close_is_passed_on_and_the_connection_then_closes_cleanly(
    raw_server: RawServerFactory,
) -> None:
    server = raw_server("echo")
    with FaultProxy(LOOPBACK, server.port) as proxy, connect(proxy) as client:
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)

        data, error = read_until_closed(client)

        assert (data, error) == (b"last words", None)
        assert server.wait_ended(0) == "eof"
        wait_until(lambda: proxy.open_connections == 0, WAIT, what="proxy dropped the link")


# Cuts --------------------------------------------------------------------------------------------


def test_cut_after_fails_a_larger_upload_and_the_server_sees_at_most_the_limit(
    proxy: FaultProxy, http_server: BodyServer
) -> None:
    limit = 256 * KiB
    proxy.cut_after(limit)

    with pytest.raises(requests.exceptions.ConnectionError):
        put(proxy, os.urandom(4 * MiB))

    [upload] = uploads(http_server, 1)
    assert not upload.complete
    assert upload.received <= limit
    assert proxy.bytes_upstream == limit  # headers and body, up to the limit exactly
    assert proxy.cuts == 1


def test_a_new_request_succeeds_after_the_cut(proxy: FaultProxy, http_server: BodyServer) -> None:
    proxy.cut_after(100 * KiB)
    with pytest.raises(requests.exceptions.ConnectionError):
        put(proxy, os.urandom(1 * MiB))
    body = os.urandom(2 * MiB)

    response = put(proxy, body)

    assert_echoed(response, body)
    assert proxy.cuts == 1
    assert proxy.connections == 2


def test_cut_after_forwards_exactly_up_to_the_limit_then_resets_both_sides(
    raw_server: RawServerFactory,
) -> None:
    server = raw_server("sink")
    payload = os.urandom(50_000)
    with FaultProxy(LOOPBACK, server.port) as proxy, connect(proxy) as client:
        proxy.cut_after(10_000)

        error: OSError | None
        try:
            client.sendall(payload)
        except OSError as exc:
            data, error = b"", exc
        else:
            data, error = read_until_closed(client)

        assert data == b""
        assert isinstance(error, ConnectionResetError | BrokenPipeError), error
        assert server.wait_ended(0) == "reset"
        assert server.received(0) == payload[:10_000]
        assert proxy.cuts == 1


def test_a_downstream_cut_delivers_exactly_the_limit_to_the_client_then_resets(
    raw_server: RawServerFactory,
) -> None:
    source = os.urandom(200_000)
    server = raw_server("source", source)
    with FaultProxy(LOOPBACK, server.port) as proxy:
        proxy.cut_after(30_000, direction="downstream")
        with connect(proxy) as client:
            data, error = read_until_closed(client)

        assert data == source[:30_000]
        assert isinstance(error, ConnectionResetError), error
        assert proxy.bytes_downstream == 30_000
        assert server.wait_ended(0) == "reset"


def test_cut_every_resets_each_connection_that_carries_another_n_bytes(
    raw_server: RawServerFactory,
) -> None:
    server = raw_server("sink")
    with FaultProxy(LOOPBACK, server.port) as proxy:
        proxy.cut_every(4096)
        for index in range(3):
            with connect(proxy) as client:
                client.sendall(os.urandom(20_000))
                _, error = read_until_closed(client)
            assert isinstance(error, ConnectionResetError), error
            assert server.wait_ended(index) == "reset"
            assert len(server.received(index)) == 4096

        proxy.stop_cutting()
        with connect(proxy) as client:
            client.sendall(b"x" * 20_000)
            client.shutdown(socket.SHUT_WR)
            _, error = read_until_closed(client)

        assert error is None
        assert server.wait_ended(3) == "eof"
        assert len(server.received(3)) == 20_000
        assert proxy.cuts == 3


def test_reset_all_resets_every_open_connection(raw_server: RawServerFactory) -> None:
    server = raw_server("echo")
    with FaultProxy(LOOPBACK, server.port) as proxy:
        clients = [connect(proxy) for _ in range(3)]
        try:
            for client in clients:
                client.sendall(b"ping")
                assert client.recv(16) == b"ping"

            assert proxy.reset_all() == 3

            for client in clients:
                _, error = read_until_closed(client)
                assert isinstance(error, ConnectionResetError), error
        finally:
            for client in clients:
                client.close()
        for index in range(3):
            assert server.wait_ended(index) == "reset"
        assert proxy.cuts == 3
        assert proxy.open_connections == 0


# Stall, throttle, refuse -------------------------------------------------------------------------


def test_stall_makes_a_request_time_out_and_resume_lets_the_next_one_through(
    proxy: FaultProxy,
) -> None:
    proxy.stall()

    with pytest.raises(requests.exceptions.Timeout):
        requests.get(proxy.url_for("/blob/100"), timeout=1)

    proxy.resume()
    response = requests.get(proxy.url_for("/blob/100"), timeout=WAIT)
    assert response.content == blob(100)
    assert proxy.cuts == 0


def test_stall_holds_bytes_on_an_open_connection_and_resume_delivers_them(
    raw_server: RawServerFactory,
) -> None:
    server = raw_server("echo")
    with FaultProxy(LOOPBACK, server.port) as proxy, connect(proxy) as client:
        client.sendall(b"before")
        assert client.recv(16) == b"before"
        proxy.stall()
        held = os.urandom(100_000)
        client.sendall(held)

        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(CHUNK)
        assert server.received(0) == b"before"

        proxy.resume()
        client.settimeout(WAIT)
        echoed = bytearray()
        while len(echoed) < len(held):
            chunk = client.recv(CHUNK)
            assert chunk, "the connection closed instead of resuming"
            echoed += chunk

        assert bytes(echoed) == held
        assert server.count() == 1
        assert proxy.cuts == 0


def test_throttle_makes_a_two_megabyte_upload_take_at_least_one_and_a_half_seconds(
    proxy: FaultProxy,
) -> None:
    body = os.urandom(2_000_000)
    proxy.throttle(1_000_000)
    started = time.monotonic()

    response = put(proxy, body)

    elapsed = time.monotonic() - started
    assert_echoed(response, body)
    assert elapsed >= 1.5, f"2 MB through a 1 MB/s link took only {elapsed:.2f} s"


def test_refuse_makes_requests_fail_fast_and_accept_restores_them(
    proxy: FaultProxy, http_server: BodyServer
) -> None:
    proxy.refuse()
    started = time.monotonic()

    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(proxy.url_for("/blob/10"), timeout=WAIT)

    assert time.monotonic() - started < 3.0
    assert proxy.refused == 1
    assert proxy.connections == 0

    proxy.accept()
    assert requests.get(proxy.url_for("/blob/10"), timeout=WAIT).content == blob(10)


def test_a_refused_connection_is_reset_before_reaching_the_target(
    raw_server: RawServerFactory,
) -> None:
    server = raw_server("echo")
    with FaultProxy(LOOPBACK, server.port) as proxy:
        proxy.refuse()

        # The kernel completes the handshake before the proxy turns the connection away, so the
        # reset shows up in connect() or, if that returned first, in the first read or write.
        with pytest.raises((ConnectionResetError, BrokenPipeError)), connect(proxy) as client:
            client.sendall(b"hello")
            client.recv(16)

        assert server.count() == 0
        assert proxy.refused == 1


# Life cycle --------------------------------------------------------------------------------------


def test_close_stops_the_thread_and_resets_open_connections_in_bounded_time(
    raw_server: RawServerFactory,
) -> None:
    server = raw_server("echo")
    proxy = FaultProxy(LOOPBACK, server.port).start()
    port = proxy.port
    client = connect(proxy)
    try:
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"
        proxy.stall()
        started = time.monotonic()

        proxy.close()

        assert time.monotonic() - started < 5.0
        assert proxy_threads() == []
        _, error = read_until_closed(client)
        assert isinstance(error, ConnectionResetError), error
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, port), timeout=WAIT).close()
        proxy.close()  # a second close is harmless
    finally:
        client.close()
