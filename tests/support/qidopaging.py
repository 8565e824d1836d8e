"""A DICOMweb archive with broken paging: a reverse proxy in front of a real one (Orthanc) that
rewrites the paging parameters of each QIDO-RS search on its way in.

Two archives met in the field, made from a correct one:

- `cap`: the archive answers at most `cap` results whatever `limit` asked for (PS3.18 lets an
  origin server cap its answers; a client that takes a short page as the last truncates);
- `ignore_offset`: the archive drops `offset`, so every page is the first one (a client that
  asks for the next page until a short one never ends).

Everything else (WADO-RS, the answer's status and headers) passes through unchanged. Every
request path is recorded, so tests can count the searches, and so is the most searches ever in
flight at once (`delay` holds each search that long, so that searches asked together overlap).
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests.support.net import LOOPBACK

_DROPPED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


class QidoPaging:
    """Forward HTTP requests to `target_host:target_port`, rewriting QIDO-RS `limit` and
    `offset` as configured. Use as a context manager; point the client at `url_for(path)`."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        cap: int | None = None,
        ignore_offset: bool = False,
        delay: float = 0.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.cap = cap
        self.ignore_offset = ignore_offset
        self.delay = delay
        self.paths: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((LOOPBACK, 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def __enter__(self) -> QidoPaging:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def url_for(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def searches(self) -> list[str]:
        """Return the paths (with queries, as forwarded) of the searches seen so far."""
        with self._lock:
            return [p for p in self.paths if "limit=" in p]

    @contextlib.contextmanager
    def searching(self, path: str) -> Iterator[None]:
        """Count a search in flight while it is forwarded (after `delay`)."""
        if "limit=" not in path:
            yield
            return
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def rewrite(self, path: str) -> str:
        """Return `path` with its paging rewritten; record it."""
        parts = urlsplit(path)
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(name == "limit" for name, _ in query):
            if self.ignore_offset:
                query = [(n, v) for n, v in query if n != "offset"]
            if self.cap is not None:
                query = [(n, str(min(int(v), self.cap)) if n == "limit" else v) for n, v in query]
            path = urlunsplit(("", "", parts.path, urlencode(query, safe="*?,"), ""))
        with self._lock:
            self.paths.append(path)
        return path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the paths are in `QidoPaging.paths`."""

    def do_GET(self) -> None:
        proxy: QidoPaging = self.server.proxy  # type: ignore[attr-defined]
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROPPED}
        upstream = http.client.HTTPConnection(*proxy.target, timeout=60)
        try:
            with proxy.searching(self.path):
                upstream.request("GET", proxy.rewrite(self.path), headers=headers)
                answer = upstream.getresponse()
                body = answer.read()
            self.send_response(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in _DROPPED:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)
        finally:
            upstream.close()
