"""The tus client's PATCH against the real tus server: a byte range of a file sent straight from
the file on a kept-alive connection (or through requests when a proxy applies), with the same
checksums, bandwidth cap and failure classification either way.

"direct" is the client's own connection (sendfile); "requests" is the path a PATCH takes when a
proxy applies, forced here with `CloudHttp(direct=False)` unless a test sets a proxy itself.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent.cloud import (
    CloudError,
    CloudHttp,
    OffsetConflict,
    Throttle,
    TusClient,
    UploadGone,
    build_session,
)
from agent.config import CloudSettings
from tests.support.faultproxy import FaultProxy
from tests.support.httpfaults import HttpFaults
from tests.support.net import LOOPBACK, wait_until
from tests.support.tus import StoredUpload, TusServer

TusFactory = Callable[..., TusServer]

KiB = 1024
MiB = 1024 * KiB
PATHS = ["direct", "requests"]
META = {"filename": "bundle.bin"}


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    """A file of 5 MiB and a few bytes, deterministic and incompressible."""
    path = tmp_path / "bundle.bin"
    path.write_bytes(random.Random(7).randbytes(5 * MiB + 321))
    return path


@pytest.fixture
def clients() -> Iterator[Callable[..., TusClient]]:
    """Return a factory of TusClients for an endpoint; their connections close after the test.

    `clients(endpoint, path="direct", timeout=10, throttle=None)`.
    """
    made: list[TusClient] = []

    def make(
        endpoint: str, path: str = "direct", timeout: float = 10, throttle: Throttle | None = None
    ) -> TusClient:
        session = build_session(CloudSettings(upload_url=endpoint))
        http = CloudHttp(session, timeout, throttle, direct=path == "direct")
        client = TusClient(http, endpoint)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def stored(tus: TusServer, url: str) -> StoredUpload:
    (upload,) = [u for u in tus.uploads() if url.endswith("/" + u.id)]
    return upload


def via(front: FaultProxy | HttpFaults, url: str) -> str:
    """Return the upload `url` as reached through `front`."""
    return front.url_for(urlsplit(url).path)


def send_all(client: TusClient, url: str, path: Path, chunk: int, start: int = 0) -> int:
    """PATCH `path` from `start` in ranges of `chunk` bytes, as the upload worker does; return
    how many PATCHes it took."""
    size = path.stat().st_size
    offset, patches = start, 0
    with path.open("rb") as f:
        while offset < size:
            length = min(chunk, size - offset)
            new_offset = client.patch(url, offset, f, length)
            assert new_offset == offset + length
            offset, patches = new_offset, patches + 1
    return patches


@pytest.mark.parametrize("path", PATHS)
def test_each_range_lands_as_exactly_its_bytes(
    tus_server: TusFactory, clients: Callable[..., TusClient], payload: Path, path: str
) -> None:
    tus = tus_server()
    client = clients(tus.url, path)
    data = payload.read_bytes()
    url = client.create(len(data), META)
    first = MiB + 7  # not a multiple of any buffer or block
    with payload.open("rb") as f:
        f.seek(len(data) - 10)  # where the file stands does not matter: the range does
        assert client.patch(url, 0, f, first) == first
    assert stored(tus, url).data() == data[:first]
    assert send_all(client, url, payload, 2 * MiB, start=first) == 3
    upload = stored(tus, url)
    assert upload.complete and upload.data() == data


def test_patches_share_one_kept_alive_connection(
    tus_server: TusFactory, clients: Callable[..., TusClient], payload: Path
) -> None:
    tus = tus_server()
    client = clients(tus.url)
    url = client.create(payload.stat().st_size, META)
    with FaultProxy(LOOPBACK, tus.port) as proxy:  # the PATCHes alone go through it
        assert send_all(client, via(proxy, url), payload, MiB) == 6
        assert proxy.connections == 1
    assert stored(tus, url).data() == payload.read_bytes()


def test_an_error_answer_keeps_the_connection_unless_the_server_closes_it(
    tus_server: TusFactory, clients: Callable[..., TusClient], payload: Path
) -> None:
    tus = tus_server()
    client = clients(tus.url)
    url = client.create(payload.stat().st_size, META)
    with (
        HttpFaults(LOOPBACK, tus.port) as faults,
        FaultProxy(LOOPBACK, faults.port) as proxy,
        payload.open("rb") as f,
    ):
        faults.fail_next(503, method="PATCH")
        with pytest.raises(CloudError, match="HTTP 503"):
            client.patch(via(proxy, url), 0, f, MiB)
        assert client.patch(via(proxy, url), 0, f, MiB) == MiB
        assert proxy.connections == 1
        faults.fail_next(503, method="PATCH", headers={"Connection": "close"})
        with pytest.raises(CloudError, match="HTTP 503"):
            client.patch(via(proxy, url), MiB, f, MiB)
        assert client.patch(via(proxy, url), MiB, f, MiB) == 2 * MiB
        assert proxy.connections == 2
    assert stored(tus, url).data() == payload.read_bytes()[: 2 * MiB]


def test_a_connection_reset_while_idle_is_replaced_without_failing_the_chunk(
    tus_server: TusFactory, clients: Callable[..., TusClient], payload: Path
) -> None:
    tus = tus_server()
    client = clients(tus.url)
    size = payload.stat().st_size
    url = client.create(size, META)
    with FaultProxy(LOOPBACK, tus.port) as proxy, payload.open("rb") as f:
        assert client.patch(via(proxy, url), 0, f, MiB) == MiB
        assert proxy.reset_all() == 1  # the kept-alive connection, idle between two PATCHes
        assert client.patch(via(proxy, url), MiB, f, size - MiB) == size
        assert proxy.connections == 2
    assert stored(tus, url).data() == payload.read_bytes()


def test_a_connection_reset_after_the_headers_before_any_body_byte_is_retried_once(
    tus_server: TusFactory, clients: Callable[..., TusClient], payload: Path
) -> None:
    """The race a check before reuse cannot see: the server closes the connection just as a
    request starts. A bandwidth cap holds the body back for about a second after the headers
    went out; the link is reset in that second."""
    tus = tus_server()
    chunk = 64 * KiB
    client = clients(tus.url, throttle=Throttle(chunk))
    url = client.create(payload.stat().st_size, META)
    results: list[Any] = []
    with FaultProxy(LOOPBACK, tus.port) as proxy, payload.open("rb") as f:
        first_done = threading.Event()
        before: list[int] = []

        def worker() -> None:  # connections are per thread: both PATCHes on this one
            try:
                results.append(client.patch(via(proxy, url), 0, f, chunk))
                before.append(proxy.bytes_upstream)
                first_done.set()
                results.append(client.patch(via(proxy, url), chunk, f, chunk))
            except CloudError as exc:
                results.append(exc)
            finally:
                first_done.set()

        thread = threading.Thread(target=worker)
        thread.start()
        assert first_done.wait(10) and before, results
        wait_until(lambda: proxy.bytes_upstream > before[0], 5, 0.01, what="the headers sent")
        assert proxy.bytes_upstream - before[0] < 1 * KiB  # the headers alone
        assert proxy.reset_all() == 1
        thread.join(10)
        assert results == [chunk, 2 * chunk]
        assert proxy.connections == 2
    assert stored(tus, url).data() == payload.read_bytes()[: 2 * chunk]


def test_a_reset_mid_body_is_a_retryable_failure_not_a_silent_second_try(
    tus_server: TusFactory, clients: Callable[..., TusClient], payload: Path
) -> None:
    tus = tus_server()
    client = clients(tus.url)
    url = client.create(payload.stat().st_size, META)
    with FaultProxy(LOOPBACK, tus.port) as proxy, payload.open("rb") as f:
        assert client.patch(via(proxy, url), 0, f, MiB) == MiB
        proxy.cut_after(MiB // 2)  # mid-body of the next PATCH, on the kept-alive connection
        with pytest.raises(CloudError, match="send a chunk: connection failed") as caught:
            client.patch(via(proxy, url), MiB, f, 2 * MiB)
        assert caught.value.retryable
        assert proxy.connections == 1  # not sent again behind the caller's back
        # The server kept what it got; the next attempt starts from its offset, anew.
        offset, _ = client.offset(url)
        assert MiB < offset < 3 * MiB
        assert client.patch(via(proxy, url), offset, f, 3 * MiB - offset) == 3 * MiB
    assert stored(tus, url).data() == payload.read_bytes()[: 3 * MiB]


@pytest.mark.parametrize("path", PATHS)
def test_the_bandwidth_cap_holds(
    tus_server: TusFactory, clients: Callable[..., TusClient], payload: Path, path: str
) -> None:
    rate, length = 150_000, 300_000
    tus = tus_server()
    client = clients(tus.url, path, throttle=Throttle(rate))
    url = client.create(length, META)
    started = time.monotonic()
    with payload.open("rb") as f:
        assert client.patch(url, 0, f, length) == length
    took = time.monotonic() - started
    # The bucket may start with a quarter second's worth.
    assert took >= 0.9 * (length - rate / 4) / rate, took
    assert stored(tus, url).data() == payload.read_bytes()[:length]


@pytest.mark.parametrize("path", PATHS)
def test_every_patch_carries_the_sha256_of_its_range_when_the_server_offers_checksums(
    tus_server: TusFactory, clients: Callable[..., TusClient], payload: Path, path: str
) -> None:
    tus = tus_server()
    with HttpFaults(LOOPBACK, tus.port, advertise_checksum=True) as faults:
        client = clients(faults.url_for("/files/"), path)
        url = client.create(payload.stat().st_size, META)
        assert send_all(client, url, payload, 2 * MiB) == 3
        with payload.open("rb") as f:
            faults.damage_next("PATCH")
            with pytest.raises(CloudError, match="HTTP 460") as caught:
                client.patch(url, 0, f, MiB)  # the server has it all: a 409 had it come through
        assert caught.value.retryable and caught.value.status == 460
    patches = faults.exchanges("PATCH")
    assert [e.checksum for e in patches] == ["ok", "ok", "ok", "mismatch"]
    assert [e.status for e in patches] == [204, 204, 204, 460]
    assert stored(tus, url).data() == payload.read_bytes()


@pytest.mark.parametrize("path", PATHS)
def test_answers_are_classified_alike_on_both_paths(
    tus_server: TusFactory, clients: Callable[..., TusClient], payload: Path, path: str
) -> None:
    tus = tus_server()
    with HttpFaults(LOOPBACK, tus.port) as faults, payload.open("rb") as f:
        client = clients(faults.url_for("/files/"), path)
        url = client.create(payload.stat().st_size, META)
        assert client.patch(url, 0, f, MiB) == MiB
        # The real server's answers to a wrong offset and an unknown upload. It may answer
        # before reading a large body, then close: small bodies keep the answer from being lost.
        with pytest.raises(OffsetConflict, match=r"send a chunk: .*\(409\)"):
            client.patch(url, 0, f, 10)
        with pytest.raises(UploadGone, match="HTTP 404"):
            client.patch(url + "-unknown", MiB, f, 10)
        faults.fail_next(503, method="PATCH", body=b"the archive is restarting")
        with pytest.raises(CloudError, match=r"HTTP 503.*the archive is restarting") as caught:
            client.patch(url, MiB, f, MiB)
        assert caught.value.retryable and caught.value.status == 503
        faults.fail_next(429, method="PATCH", headers={"Retry-After": "7"})
        with pytest.raises(CloudError, match="HTTP 429") as caught:
            client.patch(url, MiB, f, MiB)
        assert caught.value.retryable and caught.value.retry_after == 7.0
        faults.fail_next(401, method="PATCH", body=b"token revoked")
        with pytest.raises(CloudError, match=r"HTTP 401.*token revoked") as caught:
            client.patch(url, MiB, f, MiB)
        assert not caught.value.retryable
        # Each failure left the connection fit for the next PATCH (or dropped it).
        assert client.patch(url, MiB, f, MiB) == 2 * MiB
    assert stored(tus, url).data() == payload.read_bytes()[: 2 * MiB]


def test_a_refused_or_stalled_link_is_a_retryable_failure(
    tus_server: TusFactory, clients: Callable[..., TusClient], payload: Path
) -> None:
    tus = tus_server()
    client = clients(tus.url, timeout=1)
    url = client.create(payload.stat().st_size, META)
    with FaultProxy(LOOPBACK, tus.port) as proxy, payload.open("rb") as f:
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(CloudError, match="send a chunk: timed out") as caught:
            client.patch(via(proxy, url), 0, f, MiB)
        assert caught.value.retryable and time.monotonic() - started >= 1.0
        proxy.resume()
        proxy.refuse()
        with pytest.raises(CloudError, match="send a chunk: connection failed") as caught:
            client.patch(via(proxy, url), 0, f, MiB)
        assert caught.value.retryable


def test_a_file_shorter_than_the_range_is_a_local_error_and_sends_nothing(
    tus_server: TusFactory, clients: Callable[..., TusClient], tmp_path: Path
) -> None:
    tus = tus_server()
    client = clients(tus.url)
    short = tmp_path / "short.bin"
    short.write_bytes(b"x" * 1000)
    url = client.create(2000, META)
    with short.open("rb") as f, pytest.raises(OSError, match="ends at byte 1000"):
        client.patch(url, 0, f, 2000)
    assert stored(tus, url).offset == 0


def test_with_a_proxy_in_the_environment_the_patch_goes_through_requests_and_the_proxy(
    tus_server: TusFactory,
    clients: Callable[..., TusClient],
    payload: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No proxy software here: `FaultProxy` relays bytes unchanged to the tus server, which
    accepts the absolute-form request line a client sends to a proxy. What is tested is that,
    with `http_proxy` set, the PATCH leaves on requests' proxy path with the whole range (and
    that NO_PROXY brings it back to the direct path), not what a real proxy does with it."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    tus = tus_server()
    size = payload.stat().st_size
    with FaultProxy(LOOPBACK, tus.port) as proxy:
        monkeypatch.setenv("http_proxy", proxy.url_for(""))
        client = clients(tus.url)
        url = client.create(size, META)
        before = proxy.bytes_upstream
        with payload.open("rb") as f:
            assert client.patch(url, 0, f, 2 * MiB) == 2 * MiB
        assert proxy.bytes_upstream - before > 2 * MiB
        monkeypatch.setenv("no_proxy", LOOPBACK)
        before = proxy.bytes_upstream
        assert send_all(client, url, payload, 2 * MiB, start=2 * MiB) == 2
        assert proxy.bytes_upstream == before
    assert stored(tus, url).data() == payload.read_bytes()
