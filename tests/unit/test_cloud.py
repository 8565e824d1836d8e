"""Pieces of the cloud client that need no server: tus metadata encoding, the throttle, the
classification of answers and failures, the file ranges a PATCH sends, and which way it goes."""

from __future__ import annotations

import base64
import http.client
import io
import ssl
import time
from pathlib import Path

import pytest
import requests

from agent.cloud import (
    CloudError,
    CloudHttp,
    Throttle,
    UploadGone,
    build_session,
    check_answer,
    encode_metadata,
    unanswered,
)
from agent.config import CloudSettings
from agent.connections import (
    BUFFER_SIZE,
    PACED_BLOCK,
    FileEnded,
    RangeBody,
    Tls,
    check_range,
    read_range,
)

MiB = 1024 * 1024


def test_metadata_values_are_base64_and_an_empty_value_leaves_the_key_alone() -> None:
    header = encode_metadata({"filename": "a b,c.tar.zst", "part": "2", "flag": ""})
    pairs = header.split(",")
    assert pairs[0] == "filename " + base64.b64encode(b"a b,c.tar.zst").decode()
    assert pairs[1] == "part Mg=="
    assert pairs[2] == "flag"


@pytest.mark.parametrize("key", ["", "two words", "a,b", "clé"])
def test_metadata_keys_that_tus_cannot_carry_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="invalid tus metadata key"):
        encode_metadata({key: "x"})


def test_the_throttle_holds_the_average_rate() -> None:
    throttle = Throttle(400_000)
    started = time.monotonic()
    for _ in range(10):
        throttle.take(40_000)  # 400 kB in all: about a second, less the initial burst
    assert time.monotonic() - started >= 0.6


def test_no_rate_means_no_wait() -> None:
    throttle = Throttle(None)
    started = time.monotonic()
    throttle.take(10**12)
    assert time.monotonic() - started < 0.1


# The answer's status: one classification for requests and for the client's own connections --


def never_read() -> str:
    raise AssertionError("the body of a good answer is not read")


@pytest.mark.parametrize("status", [200, 201, 204, 409])
def test_a_good_answer_or_a_409_is_returned_without_reading_its_body(status: int) -> None:
    # 409 as tus accepts it: the offset conflict is an answer it reads itself
    url = "http://x.example/files/1"
    check_answer("PATCH", url, "send a chunk", status, "", {}, never_read, accept=(409,))


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (404, UploadGone, True),
        (410, UploadGone, True),
        (408, CloudError, True),
        (425, CloudError, True),
        (429, CloudError, True),
        (460, CloudError, True),
        (500, CloudError, True),
        (507, CloudError, True),
        (400, CloudError, False),
        (401, CloudError, False),
        (403, CloudError, False),
        (409, CloudError, False),
        (413, CloudError, False),
    ],
)
def test_a_bad_answer_is_classified_by_its_status(
    status: int, kind: type[CloudError], retryable: bool
) -> None:
    with pytest.raises(CloudError) as caught:
        check_answer(
            "PATCH", "https://u:pw@x.example/files/1", "send a chunk", status, "Why", {}, lambda: ""
        )
    assert type(caught.value) is kind
    assert (caught.value.retryable, caught.value.status) == (retryable, status)
    assert (
        str(caught.value)
        == f"cannot send a chunk: HTTP {status} Why from https://u:***@x.example/files/1"
    )


def test_a_bad_answer_quotes_its_body_and_carries_the_retry_after() -> None:
    with pytest.raises(CloudError) as caught:
        check_answer(
            "PATCH",
            "http://x.example/files/1",
            "send a chunk",
            503,
            "Service Unavailable",
            {"Retry-After": "7"},
            lambda: "the archive\n  is restarting",
        )
    assert str(caught.value).endswith(": the archive is restarting")
    assert caught.value.retry_after == 7.0


def test_a_bad_answer_to_head_has_no_body_to_quote() -> None:
    with pytest.raises(UploadGone, match=r"HTTP 404 from http://x.example/files/1$"):
        check_answer("HEAD", "http://x.example/files/1", "ask", 404, None, {}, never_read)


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (TimeoutError("timed out"), "timed out (http://x.example/f)"),
        (requests.exceptions.ReadTimeout("read"), "timed out (http://x.example/f)"),
        (ConnectionResetError(104, "reset"), "connection failed (http://x.example/f)"),
        (http.client.RemoteDisconnected("gone"), "connection failed (http://x.example/f)"),
        (http.client.BadStatusLine("junk"), "connection failed (http://x.example/f)"),
        (requests.exceptions.ConnectionError("refused"), "connection failed (http://x.example/f)"),
        (ssl.SSLCertVerificationError(1, "verify failed"), "TLS failed with http://x.example/f: "),
        (requests.exceptions.SSLError("bad cert"), "TLS failed with http://x.example/f: bad cert"),
        (requests.exceptions.InvalidURL("no host"), "no host (http://x.example/f)"),
    ],
)
def test_a_request_without_an_answer_is_retryable_and_says_what_happened(
    error: Exception, says: str
) -> None:
    failure = unanswered("send a chunk", "http://x.example/f", error)
    assert failure.retryable and failure.status is None
    assert str(failure).startswith(f"cannot send a chunk: {says}")


# A byte range of a file --------------------------------------------------------------------


def test_a_range_body_yields_exactly_its_range_through_one_buffer_paying_each_block() -> None:
    data = bytes(range(256)) * 16_000  # about 4 MB
    paid: list[int] = []
    body = RangeBody(io.BytesIO(data), 1000, 3 * MiB + 5, paid.append)
    assert len(body) == 3 * MiB + 5
    blocks = [(bytes(view), view.obj) for view in body]
    assert b"".join(block for block, _ in blocks) == data[1000 : 1000 + 3 * MiB + 5]
    assert paid == [len(block) for block, _ in blocks]
    assert max(paid) == PACED_BLOCK
    assert len({id(buffer) for _, buffer in blocks}) == 1  # one reused buffer


def test_an_unpaced_range_body_goes_in_blocks_of_the_whole_buffer() -> None:
    data = b"x" * (2 * MiB + 1)
    assert [len(view) for view in RangeBody(io.BytesIO(data), 0, len(data), None)] == [
        BUFFER_SIZE,
        BUFFER_SIZE,
        1,
    ]


def test_a_file_shorter_than_the_range_is_a_local_error() -> None:
    f = io.BytesIO(b"x" * 100)
    check_range(f, 40, 60)
    with pytest.raises(FileEnded, match="ends at byte 100"):
        check_range(f, 40, 61)
    with pytest.raises(FileEnded):
        list(read_range(f, 90, 20, BUFFER_SIZE))
    assert issubclass(FileEnded, OSError)  # the upload worker's "local I/O failed"


# Which way a PATCH goes ----------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUESTS_CA_BUNDLE"):
        for spelt in (name, name.upper()):
            monkeypatch.delenv(spelt, raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    return monkeypatch


def tus_client(url: str, **settings: object) -> CloudHttp:
    """The HTTP edge a tus client for `url` sends through."""
    cloud = CloudSettings.model_validate({"upload_url": url, **settings})
    return CloudHttp(build_session(cloud), timeout=10)


def test_a_patch_goes_direct_unless_requests_would_use_a_proxy(
    clean_env: pytest.MonkeyPatch,
) -> None:
    client = tus_client("https://cloud.example/files/")
    url = "https://cloud.example/files/abc"
    assert client._direct_tls(url) == Tls(True, None)
    clean_env.setenv("https_proxy", "http://proxy.hospital.example:3128")
    assert client._direct_tls(url) is None
    assert client._direct_tls("http://cloud.example/files/abc") is not None  # https only
    clean_env.setenv("no_proxy", ".example")
    assert client._direct_tls(url) is not None
    client.session.proxies = {"https": "http://proxy.hospital.example:3128"}
    assert client._direct_tls(url) is None  # the session's own proxies apply too
    forced = CloudHttp(client.session, 10, direct=False)
    assert forced._direct_tls("http://other.example/files/abc") is None


def test_a_session_ignoring_the_environment_ignores_its_proxy(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("https_proxy", "http://proxy.hospital.example:3128")
    client = tus_client("https://cloud.example/files/")
    client.session.trust_env = False
    assert client._direct_tls("https://cloud.example/files/abc") == Tls(True, None)


def test_the_patch_trusts_what_requests_would_trust(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca_file, cert, key = tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "c.key"
    for path in (ca_file, cert, key):
        path.write_text("-")
    clean_env.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/bundle.pem")
    url = "https://cloud.example/files/abc"
    default = tus_client("https://cloud.example/files/")
    assert default._direct_tls(url) == Tls("/etc/ssl/bundle.pem", None)
    pinned = tus_client(
        "https://cloud.example/files/", ca_file=ca_file, client_cert=cert, client_key=key
    )
    assert pinned._direct_tls(url) == Tls(str(ca_file), (str(cert), str(key)))
