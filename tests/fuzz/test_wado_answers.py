"""A WADO-RS answer is untrusted input: its Content-Type (with or without a boundary) and its
multipart body, however it is cut into blocks. The instance comes out byte for byte when the
answer is sound; otherwise the retrieval fails with a CloudError, never anything else."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cloud import CloudError, CloudHttp, build_session
from agent.config import CloudSettings
from agent.dicomweb import DicomWeb, first_part, parts
from tests.fuzz.support import Answer, ScriptedHttp, budget, corpus, header_text, scripted_http

server = pytest.fixture(scope="module")(scripted_http)

boundaries = st.text(
    st.sampled_from("abcXYZ0123456789'()+_,-./:=?"), min_size=1, max_size=70
).filter(lambda b: not b.endswith(" "))


def blocks(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo its length, in order)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@budget(200)
@given(
    boundaries,
    st.binary(max_size=300),
    st.binary(max_size=40),
    st.lists(st.integers(0, 10_000), max_size=8),
    st.booleans(),
)
def test_a_sound_multipart_answer_gives_its_first_part_byte_for_byte(
    boundary: str, part: bytes, preamble: bytes, cuts: list[int], second: bool
) -> None:
    delimiter = b"--" + boundary.encode()
    found = b"\r\n" + delimiter
    if (b"\r\n" + preamble + found).find(found) != len(preamble) + 2 or (part + found).find(
        found
    ) != len(part):
        return  # a preamble or part holding the delimiter is not a sound answer
    body = (
        (preamble + b"\r\n" if preamble else b"")
        + delimiter
        + b"\r\nContent-Type: application/dicom\r\n\r\n"
        + part
        + b"\r\n"
        + (delimiter + b"\r\nContent-Type: application/dicom\r\n\r\nnext\r\n" if second else b"")
        + delimiter
        + b"--\r\n"
    )
    out = b"".join(first_part(iter(blocks(body, cuts)), boundary.encode(), "retrieve"))
    assert out == part


@budget(200)
@given(
    boundaries,
    st.lists(st.binary(max_size=200), max_size=5),
    st.lists(st.integers(0, 10_000), max_size=8),
)
def test_a_sound_series_answer_gives_each_part_byte_for_byte(
    boundary: str, payloads: list[bytes], cuts: list[int]
) -> None:
    delimiter = b"--" + boundary.encode()
    if any(
        (payload + b"\r\n" + delimiter).find(b"\r\n" + delimiter) != len(payload)
        for payload in payloads
    ):
        return  # a part holding the delimiter is not a sound answer
    body = (
        b"".join(
            delimiter + b"\r\nContent-Type: application/dicom\r\n\r\n" + payload + b"\r\n"
            for payload in payloads
        )
        + delimiter
        + b"--\r\n"
    )
    got = [
        b"".join(part) for part in parts(iter(blocks(body, cuts)), boundary.encode(), "retrieve")
    ]
    assert got == payloads


@budget(200)
@given(boundaries, st.binary(max_size=400), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_series_body_gives_parts_or_a_cloud_error(
    boundary: str, body: bytes, cuts: list[int]
) -> None:
    try:
        got = [b"".join(part) for part in parts(iter(blocks(body, cuts)), boundary.encode(), "s")]
    except CloudError as exc:
        assert str(exc)
    else:
        assert sum(map(len, got)) <= len(body)


@budget(200)
@given(boundaries, st.binary(max_size=400), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_body_gives_bytes_or_a_cloud_error(boundary: str, body: bytes, cuts: list[int]) -> None:
    try:
        out = b"".join(first_part(iter(blocks(body, cuts)), boundary.encode(), "retrieve"))
    except CloudError as exc:
        assert str(exc)
    else:
        assert len(out) <= len(body)


content_types = st.one_of(
    header_text,
    st.builds(
        lambda boundary, extra: (
            f"multipart/related; type=application/dicom; {extra}boundary={boundary}"
        ),
        header_text,
        st.sampled_from(["", "boundary*=utf-8''x; ", 'boundary="a"; ', "charset=x; "]),
    ),
    st.sampled_from(["application/dicom", "multipart/related", "text/html", ""]),
)


def retrieve(server: ScriptedHttp, content_type: str, body: bytes, status: int = 200) -> bytes:
    """Retrieve one instance from `server` answering with `content_type` and `body`; return
    the bytes written (raise CloudError as the retrieval does)."""
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    server.answer = Answer(status, headers, body)
    base = f"{server.url}/dicom-web"
    dicomweb = DicomWeb(CloudHttp(build_session(CloudSettings(dicomweb_url=base)), 5), base)
    out = io.BytesIO()
    try:
        size = dicomweb.retrieve_instance("1.2", "1.2.3", "1.2.3.4", out)
    finally:
        dicomweb.close()
    assert size == len(out.getvalue()) > 0
    return out.getvalue()


@budget(100)
@given(content_types, st.binary(max_size=300), st.sampled_from([200, 203, 206]))
def test_any_wado_answer_is_an_instance_or_a_cloud_error(
    server: ScriptedHttp, content_type: str, body: bytes, status: int
) -> None:
    try:
        retrieve(server, content_type, body, status)
    except CloudError as exc:
        assert str(exc)


@pytest.mark.parametrize("path", corpus("wado"), ids=lambda p: p.stem)
def test_each_answer_in_the_corpus_gets_its_documented_result(
    server: ScriptedHttp, path: Path
) -> None:
    """Each corpus file is an HTTP answer's Content-Type line, a blank line, and its body; a
    name starting `ok-` holds an instance whose bytes are `DICM-INSTANCE`, any other a
    CloudError."""
    head, _, body = path.read_bytes().partition(b"\n\n")
    content_type = head.decode().removeprefix("Content-Type: ").strip()
    if path.name.startswith("ok-"):
        assert retrieve(server, content_type, body) == b"DICM-INSTANCE"
    else:
        with pytest.raises(CloudError):
            retrieve(server, content_type, body)
