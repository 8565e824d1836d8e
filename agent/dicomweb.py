"""DICOMweb mechanism on the cloud session: QIDO-RS searches page by page, and WADO-RS retrieval of
one instance streamed into a file.

Every request goes through the cloud's HTTP edge (`agent.cloud.CloudHttp`), which classifies
failures (`CloudError.retryable`); a body cut short while it streams is a retryable CloudError
too. Answers are streamed, so an instance is copied to its file block by block and never held
in memory whole: the multipart/related answer of WADO-RS is parsed as it arrives.

Query values are percent-encoded by this module, not by requests, so that the characters QIDO-RS
gives a meaning to (`*`, `?` and `,`) go literally, as RFC 3986 allows in a query: some archives
(Orthanc 1.10 among them) compare values without decoding them, and would never match `%2A`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from typing import Any, BinaryIO
from urllib.parse import quote

import requests

from agent.cloud import CloudError, CloudHttp
from agent.config import CloudSettings, redact_url

logger = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax={}'
"""The Accept of a WADO-RS instance retrieval, with the syntax asked for (`*`: as the archive
holds it, no transcoding on the way out)."""
BLOCK = 1024 * 1024
"""Bytes read from the answer at a time."""
_QUERY_SAFE = "*?,:/@!$'()"
"""Characters left literal in a query value: QIDO's wildcards and list separator, and others
RFC 3986 allows there. `&`, `=`, `+`, `#`, `%`, spaces and non-ASCII are percent-encoded."""
_HEADER_LIMIT = 64 * 1024
"""The most bytes of preamble and part headers read before the body starts."""

Params = Sequence[tuple[str, str]]


class IncompleteListing(CloudError):
    """The archive's pages cannot be walked to the end (it ignores `offset`): what was listed
    is not the whole answer. Raised as not retryable: asking again gives the same pages."""


def query_string(params: Params) -> str:
    """Return `params` as a URL query: `name=value` pairs joined by `&`, percent-encoded
    except for the characters QIDO-RS gives a meaning to."""
    return "&".join(
        f"{quote(name, safe='')}={quote(value, safe=_QUERY_SAFE)}" for name, value in params
    )


@dataclass(frozen=True)
class DicomWeb:
    """One DICOMweb service (QIDO-RS and WADO-RS) at `base_url`. Thread-safe: each call is one
    request on the cloud's HTTP edge."""

    http: CloudHttp
    base_url: str

    @classmethod
    def open(cls, settings: CloudSettings) -> DicomWeb | None:
        """Return the cloud's DICOMweb service with the configured trust, certificate and token,
        or None when `cloud.dicomweb_url` is not set. Raise CloudConfigError if a file the
        settings name cannot be read."""
        if settings.dicomweb_url is None:
            return None
        return cls(CloudHttp.open(settings), settings.dicomweb_url.rstrip("/"))

    def close(self) -> None:
        self.http.session.close()

    # --- QIDO-RS ---------------------------------------------------------------------------

    def search(
        self, resource: str, params: Params, offset: int, limit: int
    ) -> list[dict[str, Any]]:
        """Return one page of QIDO-RS results for `resource` (`studies`, `series` or
        `instances`, optionally below a study): at most `limit` answers from `offset` on.
        Raise CloudError if the request fails or the answer is not a JSON list."""
        paging = (
            [("limit", str(limit)), ("offset", str(offset))] if offset else [("limit", str(limit))]
        )
        url = f"{self.base_url}/{resource}?{query_string([*params, *paging])}"
        try:
            response = self.http.send(
                "GET", url, f"search {resource}", headers={"Accept": DICOM_JSON}, stream=True
            )
        except CloudError as exc:
            raise _without_query(exc, url) from None
        with contextlib.closing(response):
            try:
                content = response.content
            except requests.exceptions.RequestException as exc:
                raise CloudError(
                    f"cannot search {resource}: answer cut short ({type(exc).__name__})",
                    retryable=True,
                ) from None
        if response.status_code == 204 or not content.strip():
            return []
        try:
            answers = json.loads(content)
        except ValueError:
            raise CloudError(
                f"QIDO-RS answered {resource} with something not JSON", retryable=True
            ) from None
        if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
            raise CloudError(
                f"QIDO-RS answered {resource} with JSON that is not a list of datasets",
                retryable=False,
            )
        return answers

    def pages(
        self, resource: str, params: Params, page_size: int, ahead: int = 1
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield the QIDO-RS results for `resource` page by page (`limit`/`offset`), until the
        archive answers an empty page. With `ahead` > 1, that many pages are asked at once,
        the next ones assumed full, as long as every page comes back full: the archive's time
        per answer, not per request, is what a long listing costs (Orthanc: 0.6 ms per
        instance), and two pages at once take half as long.

        A short page is not taken as the last: an archive may cap `limit` below what was asked
        (PS3.18 lets it), and stopping there would truncate the answer; the pages after a
        short one are asked one at a time from where it ended. Raise CloudError as `search`
        does, at the page that failed, and IncompleteListing if the archive answers a later
        offset with the page it gave before (it ignores `offset`): the rest of the listing
        cannot be reached, and asking again would never end."""
        offset = 0
        previous: list[dict[str, Any]] = []
        with ThreadPoolExecutor(max(1, ahead), thread_name_prefix="qido") as pool:
            asked: deque[Future[list[dict[str, Any]]]] = deque()
            planned = 0  # the offset of the next page asked ahead
            try:
                while True:
                    while len(asked) < ahead:
                        asked.append(pool.submit(self.search, resource, params, planned, page_size))
                        planned += page_size
                    page = asked.popleft().result()
                    if not page:
                        return
                    if previous and page[0] == previous[0]:
                        raise IncompleteListing(
                            f"the archive answered {resource} at offset {offset} with the"
                            f" results it gave at offset {offset - len(previous)}: it ignores"
                            f" offset, so the listing stops incomplete after {offset} results",
                            retryable=False,
                        )
                    yield page
                    previous = page
                    offset += len(page)
                    if len(page) < page_size:  # capped, or the last: one at a time from here
                        for stale in asked:
                            stale.cancel()
                        asked.clear()
                        ahead, planned = 1, offset
            finally:
                for pending in asked:
                    pending.cancel()

    # --- WADO-RS ---------------------------------------------------------------------------

    def retrieve_instance(
        self, study: str, series: str, instance: str, out: BinaryIO, syntax: str = "*"
    ) -> int:
        """Write the Part-10 file of one instance into `out`, in transfer syntax `syntax` (a
        UID, or `*` as the archive holds it); return its size. Raise CloudError if the request
        fails (with its `status`: an archive that will not transcode answers 400, 406 or 500)
        or the answer is cut short or not an instance (UploadGone, a CloudError, if the archive
        does not know it), OSError if writing fails."""
        action = f"retrieve instance {instance}"
        size = 0
        with self._answer(action, syntax, study, series, instance) as answer:
            for block in next(answer, None) or _no_part(action):
                out.write(block)
                size += len(block)
        if size == 0:
            raise CloudError(f"cannot {action}: the archive sent an empty instance", retryable=True)
        return size

    @contextlib.contextmanager
    def series_parts(
        self, study: str, series: str, syntax: str = "*"
    ) -> Iterator[Iterator[Iterator[bytes]]]:
        """Yield the instances of one series as one WADO-RS answer streams them: an iterator
        of parts, each an iterator of one Part-10 file's bytes, block by block (a part not read
        to its end is skipped when the next is asked for). One request for a whole series: an
        archive answers each request after a latency of its own (Orthanc 1.10: 40 ms), which
        per instance would bound a retrieval more than the bytes do. Raise CloudError as
        `retrieve_instance` does, when the request is made or as the parts are read."""
        with self._answer(f"retrieve series {series}", syntax, study, series) as answer:
            yield answer

    @contextlib.contextmanager
    def _answer(self, action: str, syntax: str, *uids: str) -> Iterator[Iterator[Iterator[bytes]]]:
        """Make the WADO-RS request for the resource `uids` names (study, series, instance) in
        `syntax`; yield its parts (a bare application/dicom answer is one). The response is
        closed when the block ends. Raise CloudError if the request fails or the answer is not
        DICOM, and as the parts are read if it is cut short or malformed."""
        path = "".join(
            f"/{level}/{quote(uid, safe='')}"
            for level, uid in zip(("studies", "series", "instances"), uids, strict=False)
        )
        url = self.base_url + path
        accept = WADO_ACCEPT.format(syntax)
        response = self.http.send("GET", url, action, headers={"Accept": accept}, stream=True)
        with contextlib.closing(response):
            yield _answer_parts(response, action, redact_url(url))


def _without_query(exc: CloudError, url: str) -> CloudError:
    """Return `exc` with its message cut down to the search's path and status: the query of a
    C-FIND carries patient names and IDs, and the server's detail may echo them."""
    base, _, query = url.partition("?")
    shown = redact_url(base)
    text = str(exc).replace(redact_url(url), shown)
    if query:  # a library's own message may quote the request's path and query
        text = text.replace("?" + query, "")
    if exc.status is not None:
        text = text.split(f" from {shown}", 1)[0] + f" from {shown}"
    return type(exc)(text, retryable=exc.retryable, status=exc.status, retry_after=exc.retry_after)


def _answer_parts(
    response: requests.Response, action: str, where: str
) -> Iterator[Iterator[bytes]]:
    """Return the parts of a WADO-RS answer: of a multipart/related answer, or a bare
    application/dicom body as one part. Raise CloudError for another content type; a body cut
    short while it is read raises a retryable CloudError."""
    kind = Message()
    kind["Content-Type"] = response.headers.get("Content-Type", "")
    blocks = _guarded(response.iter_content(BLOCK), action, where)
    if kind.get_content_type() == "application/dicom":
        return iter([blocks])
    if kind.get_content_type() != "multipart/related":
        answered = kind.get_content_type()
        raise CloudError(f"cannot {action}: the archive answered {answered}", retryable=False)
    boundary = kind.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise CloudError(f"cannot {action}: multipart answer without boundary", retryable=False)
    return parts(blocks, boundary.encode("ascii", "replace"), action)


def _guarded(blocks: Iterator[bytes], action: str, where: str) -> Iterator[bytes]:
    """Yield `blocks`, a body being read, raising a retryable CloudError if it is cut short."""
    try:
        yield from blocks
    except requests.exceptions.RequestException as exc:
        raise CloudError(
            f"cannot {action}: answer cut short ({where}: {type(exc).__name__})",
            retryable=True,
        ) from None


def _no_part(action: str) -> Iterator[bytes]:
    raise CloudError(f"cannot {action}: the multipart answer has no part", retryable=False)


def first_part(blocks: Iterator[bytes], boundary: bytes, action: str) -> Iterator[bytes]:
    """Yield the body of the first part of a multipart body arriving as `blocks`, block by block,
    holding no more than a block and a delimiter in memory. Raise CloudError if the body ends
    before the part does, or has no part."""
    yield from next(parts(blocks, boundary, action), None) or _no_part(action)


def parts(blocks: Iterator[bytes], boundary: bytes, action: str) -> Iterator[Iterator[bytes]]:
    """Yield the parts of a multipart body arriving as `blocks`, each as an iterator of its
    body's bytes, holding no more than a block and a delimiter in memory. A part must be read
    before the next is asked for, or is skipped then. Raise CloudError if the body ends before
    its closing delimiter, or its preamble or a part's headers run past _HEADER_LIMIT."""
    delimiter = b"\r\n--" + boundary
    buffer = bytearray(b"\r\n")  # the first delimiter may open the body without a line break
    source = iter(blocks)

    def more() -> None:
        block = next(source, None)
        if block is None:
            raise CloudError(f"cannot {action}: the multipart answer was cut short", retryable=True)
        buffer.extend(block)

    def body() -> Iterator[bytes]:
        keep = len(delimiter) - 1  # a delimiter may straddle two blocks
        while (end := buffer.find(delimiter)) < 0:
            if len(buffer) > keep:
                yield bytes(memoryview(buffer)[: len(buffer) - keep])
                del buffer[: len(buffer) - keep]
            more()
        if end:
            yield bytes(memoryview(buffer)[:end])
        del buffer[: end + len(delimiter)]

    while (start := buffer.find(delimiter)) < 0:
        if len(buffer) > _HEADER_LIMIT:
            raise CloudError(
                f"cannot {action}: no multipart boundary in the answer", retryable=False
            )
        more()
    del buffer[: start + len(delimiter)]
    while True:
        while len(buffer) < 2:
            more()
        if buffer.startswith(b"--"):
            return
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > _HEADER_LIMIT:
                raise CloudError(
                    f"cannot {action}: multipart part headers too long", retryable=False
                )
            more()
        del buffer[: end + 4]
        part = body()
        yield part
        for _skipped in part:  # what the reader left of it
            pass
