"""Syslog over TCP (RFC 6587) or TLS (RFC 5425): a bounded queue and one sender thread.

Whoever audits never waits for the collector: `submit` puts the item in a bounded queue and
returns at once. When the queue is full the item is dropped and counted (`dropped`); the audit
row it came from is already in the database, so `dirigo audit` still lists it. The sender
thread renders each item to its framed record, connects (again) when it has to, and after a
failure waits by the project's one backoff policy before it tries the same record again.

TCP syslog has no acknowledgement: a record written into a connection the collector has just
closed is lost without an error. Before each write the sender therefore checks that the
collector has not closed its side (a collector never writes back, so a readable socket means
it closed), which catches a collector restarted between two records.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from agent.retry import Backoff

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT = 10.0
"""Seconds to connect (and finish the TLS handshake) before the attempt counts as failed."""
SEND_TIMEOUT = 30.0
"""Seconds one record may take to be written before the connection counts as broken."""
RECONNECT = Backoff(first=1.0, cap=60.0)
"""Waits between failed attempts to reach the collector."""


@dataclass(frozen=True)
class Collector:
    """Where records go: host, port, and whether over TLS (with `ca`, or the system's CAs)."""

    host: str
    port: int
    tls: bool
    ca: Path | None = None

    @classmethod
    def parse(cls, address: str, ca: Path | None = None) -> Collector:
        """Given `tcp://host:port` or `tcp+tls://host:port` (checked by the configuration),
        return the collector."""
        parts = urlsplit(address)
        assert parts.hostname is not None and parts.port is not None
        return cls(parts.hostname, parts.port, parts.scheme.lower() == "tcp+tls", ca)

    def __str__(self) -> str:
        return f"{'tcp+tls' if self.tls else 'tcp'}://{self.host}:{self.port}"

    def context(self) -> ssl.SSLContext | None:
        """Return the TLS context to reach the collector with (None without `tls`): TLS 1.2 or
        later, its certificate checked against `ca` (or the system's CAs) and its name. Raise
        OSError (ssl.SSLError included) if `ca` cannot be read or holds no certificate."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca is not None else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def connect(self, context: ssl.SSLContext | None) -> socket.socket:
        """Return a connected socket, over TLS with `context`. Raise OSError (ssl.SSLError
        included) if that fails."""
        sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        try:
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(SEND_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return sock


class SyslogSender(Generic[T]):
    """Sends what `render` makes of each submitted item to one collector, from its own thread.

    `render` returns the framed record, or None for an item that has no record; it runs on the
    sender's thread, so the cost of building a message never falls on the caller. Raise OSError
    (ssl.SSLError included) if the collector's TLS context cannot be made (its CA file).
    """

    def __init__(
        self,
        collector: Collector,
        render: Callable[[T], bytes | None],
        capacity: int,
        backoff: Backoff = RECONNECT,
    ) -> None:
        self.collector = collector
        self._context = collector.context()  # a CA that cannot be read fails here, at once
        self._render = render
        self._queue: queue.Queue[T] = queue.Queue(maxsize=capacity)
        self._backoff = backoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.sent = 0
        self.dropped = 0
        """Items not sent: the queue was full when they came, or still held them at stop."""
        self.failures = 0
        """Failed attempts in a row (0 while the collector takes records)."""
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> bool:
        """Queue `item` for sending; return False (and count it dropped) if the queue is full."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.dropped += 1
                first = self.dropped == 1 or self.dropped % 1000 == 0
            if first:
                logger.warning(
                    "audit: the syslog queue is full (%s unreachable?): %d message(s) dropped so"
                    " far; every one stays in the database (`dirigo audit`)",
                    self.collector,
                    self.dropped,
                )
            return False
        return True

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def stop(self, flush: float) -> None:
        """Send what is queued for up to `flush` seconds, then stop; what is left is dropped
        (and counted)."""
        if self._thread is not None:
            deadline = time.monotonic() + flush
            while self._queue.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.02)
            self._stop.set()
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
            self._thread = None
        left = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            left += 1
        if left:
            with self._lock:
                self.dropped += left
            logger.warning(
                "audit: %d message(s) not sent to %s at stop (kept in the database)",
                left,
                self.collector,
            )
        self._disconnect()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                record = self._render(item)
                if record is not None:
                    self._deliver(record)
            except Exception:
                # A bug in rendering one item must not stop the trail: log it and go on.
                logger.exception("audit: cannot send a message")
            finally:
                self._queue.task_done()

    def _deliver(self, record: bytes) -> None:
        """Write `record`, reconnecting and retrying until it is written or the sender stops
        (then it counts as dropped)."""
        while not self._stop.is_set():
            try:
                sock = self._connected()
                sock.sendall(record)
            except OSError as exc:
                self._disconnect()
                self.failures += 1
                wait = self._backoff.delay(self.failures)
                if self.failures == 1 or str(exc) != self.last_error:
                    logger.warning(
                        "audit: cannot send to %s (%s); trying again in %.0f s",
                        self.collector,
                        exc,
                        wait,
                    )
                self.last_error = str(exc)
                self._stop.wait(wait)
                continue
            if self.failures:
                logger.info("audit: sending to %s again", self.collector)
            self.failures = 0
            self.sent += 1
            return
        with self._lock:
            self.dropped += 1

    def _connected(self) -> socket.socket:
        if self._sock is not None and _closed_by_peer(self._sock):
            self._disconnect()
        if self._sock is None:
            self._sock = self.collector.connect(self._context)
        return self._sock

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError, ValueError):
                if isinstance(self._sock, ssl.SSLSocket):
                    # close_notify first, so the collector sees an orderly end, not an error
                    self._sock.settimeout(1.0)
                    self._sock.unwrap()
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _closed_by_peer(sock: socket.socket) -> bool:
    """Return True if the collector closed its side (it never writes, so readable = closed)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        if isinstance(sock, ssl.SSLSocket):
            return True  # a TLS close_notify or a reset: either way, start over
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
