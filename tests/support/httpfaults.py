"""An HTTP fault injector on loopback: a reverse proxy in front of a real server that passes every
request through unchanged, or answers it itself with a status the test asked for.

`FaultProxy` breaks the TCP path; some faults only exist one level up: a cloud that answers 500
for a while, a token that is refused (401) from one moment on, a tus server that refuses one
chunk as damaged (460), a rate limit with `Retry-After`. `HttpFaults` sits between the agent and
the real tus server and, told at runtime, answers the next N requests (of one method, or any)
or every request until cleared with a given status, headers and body, without forwarding them.
Everything else goes to the server as it came: request line, headers in order and as spelled
(Host included, so the server's Location URLs keep pointing at the injector), the body streamed
block by block; the answer comes back the same way.

The one rewrite is opt-in: with `advertise_checksum=True` the injector adds `checksum` to the
`Tus-Extension` of OPTIONS answers and `Tus-Checksum-Algorithm: sha256`, and then does what a
checksum-capable server does: it reads each PATCH body whole, checks its `Upload-Checksum`, and
answers 460 itself on a mismatch instead of passing damaged bytes on. (@tus/server stores
bytes without checking any checksum.) `damage_next()` flips one byte of the next body before
that check, as a bad link would.

Every request is recorded as an `Exchange` (method, path, times, status, who answered, checksum
verdict), so tests can count requests per method and measure when a retry came.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import http.client
import select
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal

from tests.support.net import LOOPBACK

BLOCK = 64 * 1024
"""Most body bytes read or written in one call while streaming."""

UPSTREAM_TIMEOUT = 60.0
"""Seconds the injector waits on the real server before giving the request up."""

CHECKSUM_MISMATCH = 460
_REASONS = {CHECKSUM_MISMATCH: "Checksum Mismatch"}

Verdict = Literal["ok", "mismatch", "missing", "unsupported"]


@dataclass(frozen=True)
class Exchange:
    """One request as the injector saw it.

    `status` is what the client got (None if it got no answer: the client or the server went
    away); `injected` is True if the injector answered itself; `checksum` is the verdict on the
    PATCH's `Upload-Checksum` when checksums are advertised (None otherwise). Times are
    `time.time()` at arrival of the request line and when the answer was written.
    """

    method: str
    path: str
    arrived: float
    answered: float | None
    status: int | None
    injected: bool
    checksum: Verdict | None
    body_bytes: int


@dataclass
class _Rule:
    """Answer matching requests with `status`; `remaining` None means until cleared."""

    status: int
    method: str | None
    remaining: int | None
    body: bytes
    headers: tuple[tuple[str, str], ...]
    path: str = ""
    """Only requests whose path starts with this."""
    drop: bool = False
    """Close the connection without an answer instead of answering `status`."""
    cut: int | None = None
    """Forward the request, and close the connection after this many bytes of the answer's
    body (`status` unused): an answer cut short, as by a link that fails mid-transfer."""

    def matches(self, method: str, path: str) -> bool:
        return (
            (self.method is None or self.method == method)
            and path.startswith(self.path)
            and self.remaining != 0
        )


@dataclass
class _Request:
    """The state of one request while it is handled."""

    method: str
    path: str
    arrived: float
    rule: _Rule | None
    damage: bool
    status: int | None = None
    injected: bool = False
    checksum: Verdict | None = None
    body_bytes: int = 0
    answered: float | None = None


class _ClientGone(Exception):
    """The client closed its connection before its request body was complete."""


class _UpstreamFailed(Exception):
    """The real server could not be reached, or went away during the exchange."""


@dataclass
class _Connections:
    """Client sockets currently open, so that `close()` can end their handler threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    open: set[socket.socket] = field(default_factory=set)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, faults: HttpFaults) -> None:
        self.faults = faults
        super().__init__((LOOPBACK, 0), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        self.faults._harness_error()


class HttpFaults:
    """A threaded HTTP reverse proxy to `target_host:target_port` that can answer instead.

    Use as a context manager, or `start()` and `close()`. Point the client at
    `url_for("/files/")`. Rules (`fail_next`, `fail_all`, `damage_next`) may be changed from
    the test thread at any time; a request is matched against them when its headers arrive.
    """

    def __init__(
        self, target_host: str, target_port: int, *, advertise_checksum: bool = False
    ) -> None:
        self.target = (target_host, target_port)
        self.advertise_checksum = advertise_checksum
        self._lock = threading.Lock()
        self._next: list[_Rule] = []
        self._always: _Rule | None = None
        self._damage: str | None = None
        self._exchanges: list[Exchange] = []
        self._counts: Counter[str] = Counter()
        self._connections = _Connections()
        self._errors: list[BaseException] = []
        self._server = _Server(self)
        self.host = LOOPBACK
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    # Life cycle ----------------------------------------------------------------------------

    def start(self) -> HttpFaults:
        """Start serving in a background thread; return self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"httpfaults-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close every client connection.

        Raise RuntimeError if a handler failed with anything but a network error: that is a
        bug in the injector, and a test that passed through a broken injector should not pass.
        """
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5.0)
            self._thread = None
        with self._connections.lock:
            for sock in self._connections.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._errors:
            raise RuntimeError("HttpFaults handler failed") from self._errors[0]

    def __enter__(self) -> HttpFaults:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def url_for(self, path: str) -> str:
        """Return the http:// URL of `path` through the injector."""
        return f"http://{self.host}:{self.port}{path}"

    # Faults --------------------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        times: int = 1,
        *,
        method: str | None = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        path: str = "",
    ) -> None:
        """Answer the next `times` requests (of `method` only, if given; with a path starting
        with `path` only) with `status`.

        The request body is read and dropped first, so the connection stays usable. The answer
        carries `Tus-Resumable: 1.0.0`, `headers`, `Content-Type: text/plain` and `body`.
        Queued after earlier `fail_next` rules; a request takes the first rule it matches, and
        `fail_next` rules come before a `fail_all` one.
        """
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        rule = _Rule(status, _method(method), times, body, tuple((headers or {}).items()), path)
        with self._lock:
            self._next.append(rule)

    def drop_next(self, times: int = 1, *, method: str | None = None, path: str = "") -> None:
        """Close the connection of the next `times` requests (as `fail_next` matches them)
        without an answer, as a server that went away or a broken link does. Recorded with
        status None, injected."""
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        rule = _Rule(0, _method(method), times, b"", (), path, drop=True)
        with self._lock:
            self._next.append(rule)

    def cut_next(
        self, after: int, times: int = 1, *, method: str | None = None, path: str = ""
    ) -> None:
        """Forward the next `times` requests (as `fail_next` matches them), and close each
        one's connection once `after` bytes of the answer's body went back: the client sees
        the answer cut short. Recorded with status None, injected."""
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        rule = _Rule(0, _method(method), times, b"", (), path, cut=after)
        with self._lock:
            self._next.append(rule)

    def fail_all(
        self,
        status: int,
        *,
        method: str | None = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer every request (of `method` only, if given) with `status` until `clear()`."""
        rule = _Rule(status, _method(method), None, body, tuple((headers or {}).items()))
        with self._lock:
            self._always = rule

    def damage_next(self, method: str = "PATCH") -> None:
        """Flip one byte in the body of the next request of `method` (with a body).

        Only with `advertise_checksum`: the damage is then caught by the checksum check and
        answered with 460, never stored. Without it the damage would reach the server.
        """
        if not self.advertise_checksum:
            raise RuntimeError("damage_next() needs advertise_checksum=True")
        with self._lock:
            self._damage = _method(method)

    def clear(self) -> None:
        """Drop every rule: forward everything again."""
        with self._lock:
            self._next.clear()
            self._always = None
            self._damage = None

    # What was seen -------------------------------------------------------------------------

    def exchanges(self, method: str | None = None) -> list[Exchange]:
        """Return the finished exchanges (of `method` only, if given), in order of answer."""
        with self._lock:
            return [e for e in self._exchanges if method is None or e.method == method.upper()]

    def count(self, method: str | None = None) -> int:
        """Return how many requests arrived (of `method` only, if given), finished or not."""
        with self._lock:
            return self._counts[method.upper()] if method else sum(self._counts.values())

    def counts(self) -> dict[str, int]:
        """Return how many requests arrived, per method."""
        with self._lock:
            return dict(self._counts)

    # Used by the handler threads -----------------------------------------------------------

    def _arrive(self, method: str, path: str) -> _Request:
        with self._lock:
            self._counts[method] += 1
            rule = next((r for r in self._next if r.matches(method, path)), None)
            if rule is not None:
                assert rule.remaining is not None
                rule.remaining -= 1
                if rule.remaining == 0:
                    self._next.remove(rule)
            elif self._always is not None and self._always.matches(method, path):
                rule = self._always
            damage = self._damage == method
        return _Request(method, path, time.time(), rule, damage)

    def _claim_damage(self, method: str) -> bool:
        """Take the armed damage for a request of `method` that has a body; False if none."""
        with self._lock:
            if self._damage != method:
                return False
            self._damage = None
            return True

    def _finish(self, request: _Request) -> None:
        exchange = Exchange(
            request.method,
            request.path,
            request.arrived,
            request.answered,
            request.status,
            request.injected,
            request.checksum,
            request.body_bytes,
        )
        with self._lock:
            self._exchanges.append(exchange)

    def _harness_error(self) -> None:
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, OSError):
            with self._lock:
                self._errors.append(error)

    def _track(self, sock: socket.socket, open_: bool) -> None:
        with self._connections.lock:
            if open_:
                self._connections.open.add(sock)
            else:
                self._connections.open.discard(sock)


class _Handler(BaseHTTPRequestHandler):
    """One client connection: its requests in turn, each forwarded on one upstream connection."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None
        self.server.faults._track(self.connection, True)

    def finish(self) -> None:
        self.server.faults._track(self.connection, False)
        self._drop_upstream()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: every request is in `HttpFaults.exchanges()`."""

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (_ClientGone, _UpstreamFailed, OSError):
            self.close_connection = True

    def do_request(self) -> None:
        faults = self.server.faults
        method = self.command.upper()
        request = faults._arrive(method, self.path)
        try:
            self._serve(request)
        finally:
            faults._finish(request)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_request

    # One request ---------------------------------------------------------------------------

    def _serve(self, request: _Request) -> None:
        faults = self.server.faults
        checking = faults.advertise_checksum and request.method == "PATCH"
        cut = request.rule.cut if request.rule is not None else None
        if (request.rule is None or cut is not None) and not checking and not request.damage:
            self._forward(request, self._body_blocks(request), cut)
            return
        # Read the body whole: to answer in its place, to check it, or to damage it.
        body = b"".join(self._body_blocks(request))
        if body and request.damage and faults._claim_damage(request.method):
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        if checking:
            request.checksum = _verdict(self.headers.get("Upload-Checksum"), body)
        if request.rule is not None and request.rule.drop:
            request.injected = True
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        elif request.rule is not None:
            rule = request.rule
            self._answer(request, rule.status, rule.body, rule.headers)
        elif request.checksum == "mismatch":
            self._answer(request, CHECKSUM_MISMATCH, b"checksum mismatch\n", ())
        else:
            self._forward(request, iter((body,)) if body else iter(()))

    def _body_blocks(self, request: _Request) -> Iterator[bytes]:
        """Yield the request body as it arrives (Content-Length or chunked), counting it."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._chunked_body(request)
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            block = self.rfile.read(min(remaining, BLOCK))
            if not block:
                raise _ClientGone
            remaining -= len(block)
            request.body_bytes += len(block)
            yield block

    def _chunked_body(self, request: _Request) -> Iterator[bytes]:
        """Yield a chunked body's payload; its trailers are read and dropped."""
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise _ClientGone
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.readline(1024) not in (b"\r\n", b"\n"):
                raise _ClientGone
            request.body_bytes += size
            yield data

    def _answer(
        self,
        request: _Request,
        status: int,
        body: bytes,
        headers: tuple[tuple[str, str], ...],
    ) -> None:
        """Answer the request from the injector, keeping the connection open."""
        self.send_response_only(status, _REASONS.get(status))
        self.send_header("Tus-Resumable", "1.0.0")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if request.method != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
        request.status = status
        request.injected = True
        request.answered = time.time()

    def _forward(self, request: _Request, body: Iterator[bytes], cut: int | None = None) -> None:
        """Send the request to the server as it came, and its answer back as it comes; with
        `cut`, only that many bytes of the answer's body, and then close the connection."""
        response = self._exchange_upstream(request, body)
        headers = list(response.msg.items())
        if request.method == "OPTIONS" and self.server.faults.advertise_checksum:
            headers = _with_checksum(headers)
        chunked = bool(response.chunked)
        self.send_response_only(response.status, response.reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        sent = 0
        try:
            # Read even a HEAD answer (it has no body): that is what frees the connection.
            while block := response.read(BLOCK):
                if cut is not None:
                    block = block[: cut - sent]
                sent += len(block)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                if cut is not None and sent >= cut:
                    self.wfile.flush()
                    request.injected = True
                    self._drop_upstream()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
        except (http.client.HTTPException, OSError) as exc:
            self._drop_upstream()
            raise _UpstreamFailed(str(exc)) from exc  # the client sees the answer cut short
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        request.status = response.status
        request.answered = time.time()
        if response.will_close:
            self._drop_upstream()
            self.close_connection = True

    def _exchange_upstream(
        self, request: _Request, body: Iterator[bytes]
    ) -> http.client.HTTPResponse:
        """Send the request line, headers and body upstream; return the server's response.

        On any failure the upstream connection is dropped (the server sees the request break
        off) and _UpstreamFailed or _ClientGone is raised: the client's connection is then
        closed without an answer, as the server's would have been.
        """
        try:
            upstream = self._upstream_connection()
            upstream.putrequest(
                request.method, self.path, skip_host=True, skip_accept_encoding=True
            )
            for name, value in self.headers.items():
                upstream.putheader(name, value)
            upstream.endheaders()
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            for block in body:
                upstream.send(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            if chunked:
                upstream.send(b"0\r\n\r\n")
            return upstream.getresponse()
        except http.client.ImproperConnectionState:
            raise  # our own misuse of the connection, not the server's doing: a harness bug
        except _ClientGone:
            self._drop_upstream()
            raise
        except (http.client.HTTPException, OSError) as exc:
            self._drop_upstream()
            raise _UpstreamFailed(str(exc)) from exc

    def _upstream_connection(self) -> http.client.HTTPConnection:
        if self._upstream is not None and _dropped(self._upstream.sock):
            self._drop_upstream()  # the server closed it while idle (its keep-alive timeout)
        if self._upstream is None:
            host, port = self.server.faults.target
            self._upstream = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT)
        return self._upstream

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None


def _dropped(sock: socket.socket | None) -> bool:
    """Return True if an idle connection has something to read: the server's FIN (or junk)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _method(method: str | None) -> str | None:
    return method.upper() if method else None


def _verdict(header: str | None, body: bytes) -> Verdict:
    """Judge a tus `Upload-Checksum: <algorithm> <base64 digest>` against `body`."""
    if header is None:
        return "missing"
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm.lower() != "sha256":
        return "unsupported"
    try:
        claimed = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return "mismatch"
    return "ok" if claimed == hashlib.sha256(body).digest() else "mismatch"


def _with_checksum(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return OPTIONS answer headers that also advertise the checksum extension (sha256)."""
    result: list[tuple[str, str]] = []
    extended = False
    for name, value in headers:
        lower = name.lower()
        if lower == "tus-checksum-algorithm":
            continue
        if lower == "tus-extension":
            extensions = [e.strip() for e in value.split(",") if e.strip()]
            if "checksum" not in extensions:
                extensions.append("checksum")
            value = ",".join(extensions)
            extended = True
        result.append((name, value))
    if not extended:
        result.append(("Tus-Extension", "checksum"))
    result.append(("Tus-Checksum-Algorithm", "sha256"))
    return result
