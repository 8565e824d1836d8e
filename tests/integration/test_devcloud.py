"""The development cloud's tus server (devcloud/tus) speaks tus 1.0 as the reference does.

These tests drive the official server with plain HTTP requests and check what
it stores on disk, so that the harness Dirigo's uploader is tested against is
itself known to be right: creation, resumption at the server's offset,
conflicts, termination, and uploads that outlive the server process.
"""

from __future__ import annotations

import base64
import http.client
import socket
from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

import requests

from tests.conftest import TusServerFactory
from tests.support.net import LOOPBACK, wait_until
from tests.support.tus import TusServer

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
TIMEOUT = 10.0


def _metadata(values: Mapping[str, str | None]) -> str:
    """Return an Upload-Metadata header: base64 values, a bare key for None."""
    return ",".join(
        key if value is None else f"{key} {base64.b64encode(value.encode()).decode()}"
        for key, value in values.items()
    )


def _create(
    server: TusServer, length: int, metadata: Mapping[str, str | None] | None = None
) -> str:
    headers = {**TUS, "Upload-Length": str(length)}
    if metadata is not None:
        headers["Upload-Metadata"] = _metadata(metadata)
    response = requests.post(server.url, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 201, response.text
    return urljoin(server.url, response.headers["Location"])


def _patch(location: str, offset: int, data: bytes) -> requests.Response:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS}
    return requests.patch(location, headers=headers, data=data, timeout=TIMEOUT)


def _head(location: str) -> requests.Response:
    return requests.head(location, headers=TUS, timeout=TIMEOUT)


def _offset(location: str) -> int:
    response = _head(location)
    assert response.status_code == 200, response.status_code
    return int(response.headers["Upload-Offset"])


def test_options_advertises_tus_1_0_0_with_creation_and_termination(
    tus_server: TusServerFactory,
) -> None:
    server = tus_server()

    response = requests.options(server.url, timeout=TIMEOUT)

    assert response.status_code in (200, 204)
    assert response.headers["Tus-Version"].split(",") == ["1.0.0"]
    extensions = {e.strip() for e in response.headers["Tus-Extension"].split(",")}
    assert {"creation", "termination"} <= extensions


def test_options_reports_the_configured_maximum_size(tus_server: TusServerFactory) -> None:
    server = tus_server(max_size=1000)

    response = requests.options(server.url, timeout=TIMEOUT)
    too_big = requests.post(server.url, headers={**TUS, "Upload-Length": "1001"}, timeout=TIMEOUT)

    assert response.headers["Tus-Max-Size"] == "1000"
    assert too_big.status_code == 413


def test_creation_and_two_patches_store_the_exact_bytes_and_decoded_metadata(
    tus_server: TusServerFactory,
) -> None:
    server = tus_server()
    first, second = bytes(range(256)) * 40, b"\x00\xff" * 1000 + b"end"
    metadata = {"filename": "CT 1.2.840.dcm", "patient": "Müller^Jörg", "empty": None}

    location = _create(server, len(first) + len(second), metadata)
    after_first = _patch(location, 0, first)
    after_second = _patch(location, len(first), second)
    head = _head(location)

    assert after_first.status_code == 204
    assert after_first.headers["Upload-Offset"] == str(len(first))
    assert after_second.status_code == 204
    assert after_second.headers["Upload-Offset"] == str(len(first) + len(second))
    assert head.status_code == 200
    assert head.headers["Upload-Offset"] == head.headers["Upload-Length"]
    assert head.headers["Upload-Length"] == str(len(first) + len(second))
    assert head.headers["Cache-Control"] == "no-store"
    [stored] = server.uploads()
    assert location.endswith(f"/files/{stored.id}")
    assert stored.data() == first + second
    assert stored.metadata == {"filename": "CT 1.2.840.dcm", "patient": "Müller^Jörg", "empty": ""}
    assert stored.size == stored.offset == len(first) + len(second)
    assert stored.complete


def test_location_is_a_path_that_resolves_against_the_creation_url(
    tus_server: TusServerFactory,
) -> None:
    server = tus_server()
    response = requests.post(server.url, headers={**TUS, "Upload-Length": "3"}, timeout=TIMEOUT)
    location = response.headers["Location"]
    assert location.startswith("/files/")
    assert urljoin(server.url, location).startswith(f"{server.base_url}/files/")


def test_an_upload_url_works_as_a_path_or_as_an_absolute_request_target(
    tus_server: TusServerFactory,
) -> None:
    server = tus_server()
    location = _create(server, 10)
    assert _patch(location, 0, b"12345").status_code == 204
    path = urlsplit(location).path

    answers = []
    for target in (path, location):
        connection = http.client.HTTPConnection(LOOPBACK, server.port, timeout=TIMEOUT)
        try:
            connection.request("HEAD", target, headers=TUS)
            response = connection.getresponse()
            answers.append((response.status, response.getheader("Upload-Offset")))
        finally:
            connection.close()

    assert answers == [(200, "5"), (200, "5")]


def test_patch_with_a_wrong_offset_gets_409_and_changes_nothing(
    tus_server: TusServerFactory,
) -> None:
    server = tus_server()
    location = _create(server, 100)
    assert _patch(location, 0, b"a" * 40).status_code == 204

    behind = _patch(location, 0, b"b" * 10)
    ahead = _patch(location, 50, b"c" * 10)

    assert behind.status_code == 409
    assert ahead.status_code == 409
    assert _offset(location) == 40
    [stored] = server.uploads()
    assert stored.data() == b"a" * 40
    assert not stored.complete


def test_delete_terminates_an_upload(tus_server: TusServerFactory) -> None:
    server = tus_server()
    location = _create(server, 100, {"filename": "x.dcm"})
    assert _patch(location, 0, b"z" * 30).status_code == 204

    response = requests.delete(location, headers=TUS, timeout=TIMEOUT)

    assert response.status_code == 204
    assert _head(location).status_code in (404, 410)
    assert _patch(location, 30, b"z").status_code in (404, 410)
    assert server.uploads() == []
    assert list(server.directory.iterdir()) == []


def test_partial_upload_survives_a_server_restart(tus_server: TusServerFactory) -> None:
    server = tus_server()
    location = _create(server, 20, {"filename": "a.dcm"})
    assert _patch(location, 0, b"0123456789").status_code == 204
    old_pid = server.pid

    server.restart()

    assert server.pid != old_pid
    assert _offset(location) == 10
    assert _patch(location, 10, b"abcdefghij").status_code == 204
    [stored] = server.uploads()
    assert stored.data() == b"0123456789abcdefghij"
    assert stored.metadata == {"filename": "a.dcm"}
    assert stored.complete


def test_partial_upload_survives_a_killed_server(tus_server: TusServerFactory) -> None:
    server = tus_server()
    location = _create(server, 8)
    assert _patch(location, 0, b"1234").status_code == 204

    server.kill()
    assert not server.running
    server.start()

    assert _offset(location) == 4
    assert _patch(location, 4, b"5678").status_code == 204
    assert server.uploads()[0].data() == b"12345678"


def test_a_new_server_on_the_same_directory_sees_the_same_uploads(
    tus_server: TusServerFactory,
) -> None:
    first = tus_server()
    location = _create(first, 6)
    assert _patch(location, 0, b"abc").status_code == 204
    first.stop()

    second = tus_server(first.directory)
    moved = location.replace(first.base_url, second.base_url)

    assert second.port != first.port
    assert _offset(moved) == 3
    assert [(u.offset, u.size) for u in second.uploads()] == [(3, 6)]


def test_a_patch_cut_mid_stream_keeps_the_bytes_received(tus_server: TusServerFactory) -> None:
    server = tus_server()
    location = _create(server, 100_000)
    sent = b"q" * 30_000
    request = (
        f"PATCH {urlsplit(location).path} HTTP/1.1\r\n"
        f"Host: {LOOPBACK}:{server.port}\r\n"
        "Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
        f"Content-Type: {OCTETS}\r\nContent-Length: 100000\r\n\r\n"
    ).encode()

    with socket.create_connection((LOOPBACK, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(request + sent)
        # The server has the bytes once they are on disk; then the client goes away.
        wait_until(
            lambda: server.uploads()[0].offset == len(sent), TIMEOUT, what="30000 bytes on disk"
        )

    wait_until(lambda: _offset(location) == len(sent), TIMEOUT, what="HEAD offset 30000")
    assert _patch(location, len(sent), b"r" * 70_000).status_code == 204
    [stored] = server.uploads()
    assert stored.data() == sent + b"r" * 70_000
    assert stored.complete


def test_healthz_answers_and_other_paths_are_not_found(tus_server: TusServerFactory) -> None:
    server = tus_server()

    health = requests.get(f"{server.base_url}/healthz", timeout=TIMEOUT)
    elsewhere = requests.post(
        f"{server.base_url}/other", headers={**TUS, "Upload-Length": "1"}, timeout=TIMEOUT
    )

    assert (health.status_code, health.text) == (200, "ok\n")
    assert elsewhere.status_code == 404
    assert server.uploads() == []
