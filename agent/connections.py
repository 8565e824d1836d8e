"""Kept-alive HTTP/1.1 connections that send a byte range of a file as a request body: the tus
PATCH without copying the bundle through Python.

On plain TCP the body goes with `sendfile`, from the page cache to the socket; over TLS, which
`sendfile` cannot encrypt, through one reused 1 MiB buffer per thread. Each thread keeps one
connection per origin (scheme, host, port) and reuses it from one request to the next; a
connection is closed and forgotten after any failure, or when the server answers
`Connection: close`.

Mechanism only: `cloud` builds the request headers, decides whether this path applies (not
through a proxy), reads the answer's status and turns failures into CloudError.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from requests.structures import CaseInsensitiveDict

logger = logging.getLogger(__name__)

BUFFER_SIZE = 1024 * 1024
"""The reused buffer each thread reads a range through (hashing it, sending it over TLS)."""

PACED_BLOCK = 256 * 1024
"""Bytes sent per payment at a bandwidth cap: small enough that the rate stays even."""

_TEXT_LIMIT = 64 * 1024
"""Bytes of an answer's body kept for an error message; the rest is read and dropped."""

Origin = tuple[str, str, int]
Pace = Callable[[int], None]
"""Blocks until the given number of bytes may be sent (a bandwidth cap)."""

_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
"""How a kept-alive connection the server already closed fails (RemoteDisconnected included)."""


class FileEnded(OSError):
    """The file ends inside the byte range to send: it was cut short under us (a local fault)."""


@dataclass(frozen=True)
class Tls:
    """Trust and identity for https: `verify` is True (requests' default CA bundle), False, or
    a CA file or directory; `cert` a certificate file (key inside) or (certificate, key)."""

    verify: bool | str
    cert: str | tuple[str, str] | None


@dataclass(frozen=True)
class Answer:
    """A server's answer: status, reason, headers and the start of its body, decoded."""

    status: int
    reason: str
    headers: CaseInsensitiveDict[str]
    text: str


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.view = memoryview(bytearray(BUFFER_SIZE))


_buffers = _Buffers()


def origin_of(url: str) -> Origin:
    """Return the (scheme, host, port) of `url`, lower-cased, the scheme's default port filled
    in. Raise ValueError if its port is not a port number."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80)


def same_origin(url: str, other: str) -> bool:
    """Return True if the two URLs reach the same server the same way: one scheme, host and
    port. A URL with a malformed port has no origin in common with any."""
    try:
        return origin_of(url) == origin_of(other)
    except ValueError:
        return False


def check_range(f: io.BufferedIOBase, offset: int, length: int) -> None:
    """Raise FileEnded unless `f` holds bytes [offset, offset + length)."""
    end = f.seek(0, os.SEEK_END)
    if end < offset + length:
        raise FileEnded(f"the file ends at byte {end}, inside [{offset}, {offset + length})")


def read_range(f: io.BufferedIOBase, offset: int, length: int, block: int) -> Iterator[memoryview]:
    """Yield bytes [offset, offset + length) of `f` as views of this thread's reused buffer, at
    most `block` bytes each; a view is valid until the next one is asked for. Raise FileEnded
    if the file ends first."""
    view = _buffers.view[: min(block, BUFFER_SIZE)]
    f.seek(offset)
    left = length
    while left:
        count = f.readinto(view[: min(left, len(view))])
        if not count:
            raise FileEnded(f"the file ends at byte {offset + length - left}")
        left -= count
        yield view[:count]


class RangeBody:
    """Bytes [offset, offset + length) of `f` as a request body for requests: an iterable of
    known length, so it goes out with a Content-Length, read through the thread's buffer as it
    is sent and paid for block by block at `pace`."""

    def __init__(self, f: io.BufferedIOBase, offset: int, length: int, pace: Pace | None) -> None:
        self.f = f
        self.offset = offset
        self.length = length
        self.pace = pace

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[memoryview]:
        block = PACED_BLOCK if self.pace else BUFFER_SIZE
        for view in read_range(self.f, self.offset, self.length, block):
            if self.pace:
                self.pace(len(view))
            yield view


class _StaleConnection(Exception):
    """A reused connection failed before any byte of the body left: the server had closed it."""


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.open: dict[Origin, http.client.HTTPConnection] = {}


class Connections:
    """The kept-alive connections of one client: one per thread and origin. `timeout` applies
    to connecting and to every socket operation after."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._local = _PerThread()

    def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: tuple[io.BufferedIOBase, int, int],
        pace: Pace | None,
        tls: Tls,
    ) -> Answer:
        """Send `method url` with `headers` (Content-Length included) and bytes [offset, offset
        + length) of the file `body` = (f, offset, length) as its body; return the answer, whose
        body is read whole.

        A reused connection the server had closed while it was idle is replaced, and if it
        fails before any byte of the body left (a reset, a broken pipe, no answer), the request
        is made once more on a new connection. Raise OSError or http.client.HTTPException if
        the exchange fails (FileEnded if the file is shorter than the range).
        """
        parts = urlsplit(url)
        origin = origin_of(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            return self._attempt(origin, method, target, headers, body, pace, tls)
        except _StaleConnection:
            logger.debug("%s:%d closed a kept-alive connection; reconnecting", *origin[1:])
            return self._attempt(origin, method, target, headers, body, pace, tls)

    def close(self) -> None:
        """Close the calling thread's connections (another thread's close when that one ends)."""
        for connection in self._local.open.values():
            connection.close()
        self._local.open.clear()

    def _attempt(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: tuple[io.BufferedIOBase, int, int],
        pace: Pace | None,
        tls: Tls,
    ) -> Answer:
        connection, reused = self._connection(origin, tls)
        sent = [0]  # body bytes that left, for telling a stale connection from a broken one
        try:
            connection.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders()
            complete = _send_body(connection, body, pace, sent)
            response = connection.getresponse()
            text = _drain(response)
        except BaseException as exc:  # half a request on it: the connection is done for
            self._drop(origin)
            if reused and not sent[0] and isinstance(exc, _STALE):
                raise _StaleConnection from exc
            raise
        if not complete or response.will_close:
            self._drop(origin)
        headers_in = CaseInsensitiveDict(response.getheaders())
        return Answer(response.status, response.reason or "", headers_in, text)

    def _connection(self, origin: Origin, tls: Tls) -> tuple[http.client.HTTPConnection, bool]:
        """Return this thread's connection to `origin` and whether it served a request before."""
        open_ = self._local.open
        connection = open_.get(origin)
        if connection is not None:
            if connection.sock is not None and not _closed_while_idle(connection.sock):
                return connection, True
            connection.close()
        scheme, host, port = origin
        if scheme == "https":
            context = _ssl_context(tls)
            connection = http.client.HTTPSConnection(
                host, port, timeout=self.timeout, context=context
            )
        else:
            connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
        open_[origin] = connection
        return connection, False

    def _drop(self, origin: Origin) -> None:
        connection = self._local.open.pop(origin, None)
        if connection is not None:
            connection.close()


def _send_body(
    connection: http.client.HTTPConnection,
    body: tuple[io.BufferedIOBase, int, int],
    pace: Pace | None,
    sent: list[int],
) -> bool:
    """Send the body on the connection's socket, counting in `sent[0]` the bytes that left.

    Return False if the server closed the connection before taking it all: it may have
    answered early (a 401, a 413) and urllib3 reads that answer, so the caller reads it too,
    then drops the connection.
    """
    f, offset, length = body
    sock = connection.sock
    assert sock is not None  # endheaders() connected it
    try:
        if isinstance(sock, ssl.SSLSocket) or not _has_fileno(f):
            for view in RangeBody(f, offset, length, pace):
                sock.sendall(view)
                sent[0] += len(view)
        else:
            _sendfile(sock, f.fileno(), offset, length, pace, sent)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def _sendfile(
    sock: socket.socket, fd: int, offset: int, length: int, pace: Pace | None, sent: list[int]
) -> None:
    """Send bytes [offset, offset + length) of the file `fd` with os.sendfile, in one go or in
    blocks paid for at `pace`, waiting for the socket at most its timeout each time.

    Not socket.sendfile: when its first sendfile fails it falls back to reading and sending,
    and then cannot say how much left, which tells a stale connection from a broken one.
    """
    timeout = sock.gettimeout()
    wait_ms = None if timeout is None else int(timeout * 1000)
    writable = select.poll()
    writable.register(sock, select.POLLOUT)
    position, end = offset, offset + length
    while position < end:
        count = min(PACED_BLOCK if pace else length, end - position)
        if pace:
            pace(count)
        while count:
            if not writable.poll(wait_ms):
                raise TimeoutError("timed out")
            try:
                done = os.sendfile(sock.fileno(), fd, position, count)
            except BlockingIOError:
                continue
            if not done:
                raise FileEnded(f"the file ends at byte {position}, inside the range to send")
            position += done
            count -= done
            sent[0] += done


def _has_fileno(f: io.BufferedIOBase) -> bool:
    try:
        f.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    return True


def _drain(response: http.client.HTTPResponse) -> str:
    """Read an answer's body whole (so the connection can serve the next request); return its
    start, decoded."""
    kept = bytearray()
    while block := response.read(65536):
        if len(kept) < _TEXT_LIMIT:
            kept += block[: _TEXT_LIMIT - len(kept)]
    return kept.decode("utf-8", "replace")


def _closed_while_idle(sock: socket.socket) -> bool:
    """Return True if an idle connection has something to read: the server's FIN or reset
    (or stray bytes). Either way it cannot carry another request.

    Checked before each reuse, as urllib3 does: a server closes idle connections after its
    keep-alive timeout, and over a long path much of a body could be on its way before the
    reset came back, too late to tell a stale connection from a broken one.
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def _ssl_context(tls: Tls) -> ssl.SSLContext:
    """Return a client TLS context trusting what requests would trust with the same settings,
    with the client certificate loaded."""
    if tls.verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        where = requests.utils.DEFAULT_CA_BUNDLE_PATH if tls.verify is True else tls.verify
        if os.path.isdir(where):
            context = ssl.create_default_context(capath=where)
        else:
            context = ssl.create_default_context(cafile=where)
    if tls.cert is not None:
        certfile, keyfile = (tls.cert, None) if isinstance(tls.cert, str) else tls.cert
        context.load_cert_chain(certfile, keyfile)
    return context
