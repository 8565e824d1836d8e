"""What a tus server answers is untrusted input: any status, `Location`, `Upload-Offset`,
`Upload-Length`, `Tus-Version`, `Tus-Extension`, `Tus-Max-Size` and `Retry-After` a server (or
anything on the path) writes. Each call of the tus client returns what the protocol lets it
return, or raises CloudError with a message; nothing else escapes to the upload worker (which
would log a traceback and call it an unexpected error)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.cloud import CloudError, CloudHttp, TusClient, build_session
from agent.config import CloudSettings
from tests.fuzz.support import Answer, ScriptedHttp, budget, corpus, header_text, scripted_http

TUS_HEADERS = {"Tus-Resumable": "1.0.0", "Tus-Version": "1.0.0"}
CAPABLE = [
    ("Tus-Resumable", "1.0.0"),
    ("Tus-Version", "1.0.0"),
    ("Tus-Extension", "creation,termination,checksum"),
    ("Tus-Checksum-Algorithm", "sha256"),
]

server = pytest.fixture(scope="module")(scripted_http)


def client(server: ScriptedHttp) -> TusClient:
    endpoint = f"{server.url}/files/"
    settings = CloudSettings(upload_url=endpoint, timeout=5)
    return TusClient(CloudHttp(build_session(settings), timeout=5), endpoint)


@pytest.fixture(scope="module")
def capable(server: ScriptedHttp) -> Iterator[TusClient]:
    """A client that has asked the server's capabilities already (a sound answer)."""
    server.answer = Answer(204, CAPABLE)
    tus = client(server)
    tus.capabilities()
    yield tus
    tus.close()


statuses = st.sampled_from([200, 201, 204, 301, 400, 404, 409, 410, 412, 460, 500, 503])
locations = st.one_of(
    header_text,
    st.sampled_from(["//[::1:/x", "http://[a/files/1", "//x:99999/", "/files/../../x", "?a#b"]),
)
offsets = st.one_of(
    header_text,
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["1_000", "+5", " 7 ", "²", "0x10", "1e3", "9" * 5000]),
)


def answers(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[Answer]:
    """Answers carrying the tus headers and 0 to 2 `name` headers with fuzzed values."""
    return st.builds(
        lambda status, got, retry: Answer(
            status,
            [*TUS_HEADERS.items(), *((name, v) for v in got), *(("Retry-After", r) for r in retry)],
        ),
        statuses,
        st.lists(values, max_size=2),
        st.lists(header_text, max_size=1),
    )


@budget(150)
@given(answers("Location", locations))
@example(Answer(201, [*TUS_HEADERS.items(), ("Location", "//[::1:/x")]))
def test_any_location_gives_an_upload_url_on_the_endpoint_or_a_cloud_error(
    server: ScriptedHttp, capable: TusClient, answer: Answer
) -> None:
    server.answer = answer
    try:
        url = capable.create(10, {"filename": "a.tar.zst"})
    except CloudError as exc:
        assert str(exc)
        return
    assert answer.status in (200, 201, 204)
    assert url.startswith(f"{server.url}/")


@budget(150)
@given(answers("Upload-Offset", offsets), offsets)
@example(Answer(200, [*TUS_HEADERS.items(), ("Upload-Offset", "1_000")]), "10")
def test_any_upload_offset_is_a_plain_non_negative_number_or_a_cloud_error(
    server: ScriptedHttp, capable: TusClient, answer: Answer, length: str
) -> None:
    answer.headers.append(("Upload-Length", length))
    server.answer = answer
    try:
        offset, _ = capable.offset(f"{server.url}/files/1")
    except CloudError as exc:
        assert str(exc)
    else:
        sent = [v for n, v in answer.headers if n == "Upload-Offset"]
        assert sent and str(offset) == sent[-1].strip()  # the digits as sent, nothing read in
    server.answer = answer
    body = io.BytesIO(b"0123456789")
    try:
        new_offset = capable.patch(f"{server.url}/files/1", 0, body, 10)
    except CloudError as exc:
        assert str(exc)
    else:
        assert new_offset >= 0


@budget(100)
@given(
    statuses,
    st.lists(
        st.tuples(
            st.sampled_from(["Tus-Version", "Tus-Extension", "Tus-Max-Size", "Retry-After"]),
            header_text,
        ),
        max_size=6,
    ),
)
def test_any_capabilities_answer_is_read_or_refused_with_a_cloud_error(
    server: ScriptedHttp, status: int, headers: list[tuple[str, str]]
) -> None:
    server.answer = Answer(status, headers)
    tus = client(server)
    try:
        capabilities = tus.capabilities()
        tus.create(1, {"filename": "a"})
    except CloudError as exc:
        assert str(exc)
    else:
        assert "1.0.0" in capabilities.versions
    finally:
        tus.close()


@pytest.mark.parametrize("path", corpus("tus"), ids=lambda p: p.stem)
def test_each_answer_in_the_corpus_gets_its_documented_error(
    server: ScriptedHttp, capable: TusClient, path: object
) -> None:
    """Each corpus file: {"call": "create"|"offset", "status", "headers", "error"}, the error
    message part the answer must raise."""
    case = json.loads(path.read_text())  # type: ignore[attr-defined]
    server.answer = Answer(case["status"], [*TUS_HEADERS.items(), *map(tuple, case["headers"])])
    with pytest.raises(CloudError, match=case["error"]):
        if case["call"] == "create":
            capable.create(10, {"filename": "a"})
        else:
            capable.offset(f"{server.url}/files/1")
