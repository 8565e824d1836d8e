"""DICOMweb mechanism without a server: query encoding and the streamed multipart parser."""

from __future__ import annotations

import pytest

from agent.cloud import CloudError
from agent.dicomweb import first_part, parts, query_string

BOUNDARY = b"b0undary-1"
PAYLOAD = bytes(range(256)) * 40 + b"\r\n--b0undar" + b"tail"  # a near-delimiter inside the body


def body(payload: bytes = PAYLOAD, *, preamble: bytes = b"") -> bytes:
    return (
        preamble
        + b"--"
        + BOUNDARY
        + b"\r\nContent-Type: application/dicom\r\n\r\n"
        + payload
        + b"\r\n--"
        + BOUNDARY
        + b"--\r\n"
    )


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_query_values_keep_qido_wildcards_and_lists_literal() -> None:
    query = query_string([("00100010", "Doe^J*"), ("0020000D", "1.2,1.3"), ("x", "a?b")])
    assert query == "00100010=Doe%5EJ*&0020000D=1.2,1.3&x=a?b"


def test_query_values_escape_what_would_break_the_query() -> None:
    assert query_string([("00100010", "A&B=C+D #%")]) == "00100010=A%26B%3DC%2BD%20%23%25"
    assert query_string([("00100010", "Müller")]) == "00100010=M%C3%BCller"


@pytest.mark.parametrize("size", [1, 7, 13, 64, 100_000])
def test_the_first_part_comes_out_whole_however_the_body_is_split(size: int) -> None:
    got = b"".join(first_part(iter(split(body(), size)), BOUNDARY, "test"))
    assert got == PAYLOAD


def test_a_preamble_before_the_first_boundary_is_skipped() -> None:
    data = body(preamble=b"ignore me\r\n")
    assert b"".join(first_part(iter(split(data, 5)), BOUNDARY, "test")) == PAYLOAD


def test_an_empty_part_yields_nothing() -> None:
    assert b"".join(first_part(iter([body(b"")]), BOUNDARY, "test")) == b""


def test_memory_stays_near_one_block() -> None:
    blocks = first_part(iter(split(body(b"x" * 1_000_000), 4096)), BOUNDARY, "test")
    assert max(len(block) for block in blocks) <= 4096 + len(BOUNDARY) + 4


def test_a_body_cut_short_is_a_retryable_cloud_error() -> None:
    data = body()[:-30]
    with pytest.raises(CloudError, match="cut short") as caught:
        b"".join(first_part(iter(split(data, 100)), BOUNDARY, "test"))
    assert caught.value.retryable


def test_a_body_without_parts_is_refused() -> None:
    with pytest.raises(CloudError, match="no part"):
        b"".join(first_part(iter([b"--" + BOUNDARY + b"--\r\n"]), BOUNDARY, "test"))
    with pytest.raises(CloudError, match="no multipart boundary"):
        b"".join(first_part(iter([b"x" * 70_000, b"y"]), BOUNDARY, "test"))


def several(payloads: list[bytes]) -> bytes:
    """Return a multipart body holding one part per payload."""
    out = b"preamble"
    for payload in payloads:
        out += b"\r\n--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n\r\n" + payload
    return out + b"\r\n--" + BOUNDARY + b"--\r\n"


@pytest.mark.parametrize("size", [1, 9, 100, 100_000])
def test_every_part_comes_out_whole_in_order(size: int) -> None:
    payloads = [PAYLOAD, b"", b"second", PAYLOAD[::-1]]
    got = [b"".join(part) for part in parts(iter(split(several(payloads), size)), BOUNDARY, "t")]
    assert got == payloads


def test_a_part_left_unread_is_skipped() -> None:
    payloads = [b"one" * 5000, b"two", b"three" * 3000]
    answer = parts(iter(split(several(payloads), 1000)), BOUNDARY, "t")
    first = next(answer)
    assert next(first)  # read only a block of it
    assert b"".join(next(answer)) == b"two"
    assert b"".join(next(answer)) == payloads[2]
    assert next(answer, None) is None


def test_no_part_is_no_part_and_a_cut_is_retryable() -> None:
    assert list(parts(iter([b"--" + BOUNDARY + b"--\r\n"]), BOUNDARY, "t")) == []
    with pytest.raises(CloudError, match="cut short") as caught:
        for part in parts(iter(split(several([PAYLOAD, PAYLOAD])[:-500], 64)), BOUNDARY, "t"):
            b"".join(part)
    assert caught.value.retryable


def test_a_failed_search_never_logs_its_query() -> None:
    from agent.dicomweb import _without_query

    url = "https://archive.example/dicom-web/studies?00100010=Doe*&limit=100"
    shown = "https://archive.example/dicom-web/studies"
    refused = CloudError(
        f"cannot search studies: HTTP 400 Bad Request from {url}: no patient Doe*",
        retryable=False,
        status=400,
    )
    unreachable = CloudError(f"cannot search studies: connection failed ({url})", retryable=True)
    assert (
        str(_without_query(refused, url))
        == f"cannot search studies: HTTP 400 Bad Request from {shown}"
    )
    assert (
        str(_without_query(unreachable, url))
        == f"cannot search studies: connection failed ({shown})"
    )
    assert _without_query(unreachable, url).retryable
    tls = CloudError(
        "cannot search studies: TLS failed with host: Max retries exceeded with url:"
        " /dicom-web/studies?00100010=Doe*&limit=100 (certificate verify failed)",
        retryable=True,
    )
    assert "Doe" not in str(_without_query(tls, url))
