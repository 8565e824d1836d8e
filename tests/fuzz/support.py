"""What the fuzz tests share: their example budget, byte mutations of real files, the corpus kept
in the repository, and a scripted HTTP server that answers whatever a test tells it to.

The budget: each test names how many examples it runs by default, few enough that the whole
fuzz suite takes a minute or two in CI. `DIRIGO_FUZZ_SCALE` multiplies every budget for a long
run (`DIRIGO_FUZZ_SCALE=100 python -m pytest tests/fuzz`); failing examples hypothesis finds
are kept in its database (.hypothesis/) and replayed first the next time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).parent / "corpus"
SCALE = float(os.environ.get("DIRIGO_FUZZ_SCALE", "1"))

F = TypeVar("F", bound=Callable[..., Any])


def budget(examples: int) -> Callable[[F], F]:
    """Return hypothesis settings for a fuzz test: `examples` times DIRIGO_FUZZ_SCALE, no
    deadline (a loaded CI machine is not a slow parser), fixtures of any scope welcome."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


def corpus(kind: str) -> list[Path]:
    """Return the corpus files of `kind` (a folder of tests/fuzz/corpus), in name order."""
    return sorted(p for p in (CORPUS / kind).iterdir() if p.is_file() and p.name != "README.md")


INTERESTING = (
    b"\xff\xff\xff\xff",  # undefined length
    b"\x00\x00\x00\x00",
    b"\xfe\xff\xff\x7f",
    b"\xfe\xff\x00\xe0",  # item
    b"\xfe\xff\x0d\xe0",  # item delimiter
    b"\xfe\xff\xdd\xe0",  # sequence delimiter
    b"SQ",
    b"UN",
    b"OB",
    b"\x08\x00\x18\x00",  # (0008,0018) SOP Instance UID
)
"""Byte strings a DICOM parser treats specially: lengths, delimiters, VRs, a key tag."""


@st.composite
def mutated(draw: st.DrawFn, data: bytes, start: int = 0, most: int = 6) -> bytes:
    """Return `data` with 1 to `most` mutations at or after byte `start`: a byte set, an
    interesting value written over, bytes inserted, deleted or repeated, or the end cut."""
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, most))):
        if len(raw) <= start:
            break
        at = draw(st.integers(start, len(raw) - 1))
        kind = draw(st.sampled_from(("set", "interesting", "insert", "delete", "repeat", "cut")))
        if kind == "set":
            raw[at] = draw(st.integers(0, 255))
        elif kind == "interesting":
            value = draw(st.sampled_from(INTERESTING))
            raw[at : at + len(value)] = value
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del raw[at : at + draw(st.integers(1, 64))]
        elif kind == "repeat":
            piece = raw[at : at + draw(st.integers(1, 64))]
            raw[at:at] = piece * draw(st.integers(1, 8))
        else:
            del raw[at:]
    return bytes(raw)


# --- a scripted HTTP server ----------------------------------------------------------------------


@dataclass
class Answer:
    """What the scripted server answers: status, headers in order (names and values as sent,
    repeated names allowed), body."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


class ScriptedHttp:
    """An HTTP/1.1 server on loopback that answers every request with `answer`, as it is
    (the status line and headers written byte for byte, no Content-Length unless given), then
    closes the connection. `requests` sees exactly what a misbehaving server would send."""

    def __init__(self) -> None:
        self.answer = Answer()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                outer.requests.append((self.command, self.path, dict(self.headers)))
                answer = outer.answer
                lines = [f"HTTP/1.1 {answer.status} Scripted".encode()]
                lines += [f"{name}: {value}".encode("latin-1") for name, value in answer.headers]
                lines.append(b"Connection: close")
                self.wfile.write(b"\r\n".join(lines) + b"\r\n\r\n")
                if self.command != "HEAD":
                    self.wfile.write(answer.body)
                self.close_connection = True

            do_GET = do_POST = do_PATCH = do_HEAD = do_OPTIONS = do_DELETE = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def scripted_http() -> Iterator[ScriptedHttp]:
    """A fixture body: one scripted server for a test module."""
    server = ScriptedHttp()
    yield server
    server.close()


header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=40,
)
"""A header value as HTTP can carry it: Latin-1 text without control characters."""
