"""The shaped namespace itself: tests of the slow-link harness that the rural retrieve and
upload tests trust, against a real HTTP server inside it, so that a failing link test points
at Dirigo, not at the harness."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.support.net import LOOPBACK, free_port
from tests.support.netns import ShapedNamespace, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

BODY = b"\x5a" * 2_000_000  # 16 Mbit


class _Body(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        while length:
            length -= len(self.rfile.read(min(length, 65536)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def link() -> Iterator[tuple[ShapedNamespace, int, int]]:
    """A namespace with two HTTP servers inside: the first port to be shaped, the second not."""
    with ShapedNamespace() as namespace, namespace.inside():
        servers = []
        for _ in range(2):
            server = http.server.ThreadingHTTPServer((LOOPBACK, free_port()), _Body)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        try:
            yield namespace, servers[0].server_port, servers[1].server_port
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()


def _seconds(method: str, port: int) -> float:
    started = time.monotonic()
    if method == "GET":
        assert len(requests.get(f"http://{LOOPBACK}:{port}/", timeout=30).content) == len(BODY)
    else:
        requests.put(f"http://{LOOPBACK}:{port}/", data=BODY, timeout=30).raise_for_status()
    return time.monotonic() - started


def test_a_shaped_port_passes_at_its_rate_each_way_and_other_ports_stay_fast(
    link: tuple[ShapedNamespace, int, int],
) -> None:
    namespace, shaped, other = link
    namespace.shape(shaped, mbit=32)  # 16 Mbit at 32 Mbit/s: 0.5 s
    down, up = _seconds("GET", shaped), _seconds("PUT", shaped)
    assert 0.45 < down < 1.5 and 0.45 < up < 1.5, (down, up)
    assert _seconds("GET", other) < 0.3
    sent = namespace.counters()
    assert sent["from"] >= len(BODY) and sent["to"] >= len(BODY), sent


def test_shaping_again_changes_the_rate_and_unshape_lifts_it(
    link: tuple[ShapedNamespace, int, int],
) -> None:
    namespace, shaped, _ = link
    namespace.shape(shaped, mbit=16)
    slow = _seconds("GET", shaped)
    namespace.shape(shaped, mbit=64)
    quicker = _seconds("GET", shaped)
    namespace.unshape()
    assert slow > 0.9 and 0.2 < quicker < 0.6 and _seconds("GET", shaped) < 0.2, (slow, quicker)


def test_the_namespace_is_gone_and_the_thread_back_home_afterwards() -> None:
    outside = _inode()
    with ShapedNamespace() as namespace:
        name = namespace.name
        with namespace.inside():
            assert _inode() != outside
        assert _inode() == outside
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in listed


def _inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino
