"""STOW-RS mechanism: a study part's Part-10 files, as received, in one streamed multipart
request per batch, and what the archive's answer says about each instance.

For archives that speak only DICOMweb (`upload.protocol: stow-rs`). The body is never held in
memory: `MultipartBody` is an iterable of known length (so requests sends it with a
Content-Length), reading each spool file through one reused buffer, re-hashing its dataset as
it goes and paying the shared bandwidth budget block by block. A spool file whose dataset no
longer has the sha256 recorded at reception stops the request before that file's last block
leaves: the archive never receives it whole, and the part fails with `SpoolFileError`.

The answer (PS3.18 10.5.3, `application/dicom+json`) lists the instances stored in the
ReferencedSOPSequence (0008,1199), with a WarningReason (0008,1196) if the archive changed
something, and those it refused in the FailedSOPSequence (0008,1198) with a FailureReason
(0008,1197). Orthanc (1.10, DICOMweb plugin) answers 200 and lists an instance sent again as
stored again; it answers 400 when a part is not DICOM (listing the good ones) and 409 when none
could be stored. Which failures are worth retrying is decided here, as `cloud` does for HTTP.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.cloud import CloudError, CloudHttp, Throttle, bad_answer
from agent.connections import BUFFER_SIZE, PACED_BLOCK
from agent.dimse import Status, describe, is_out_of_resources
from agent.spool import SpoolFileError, open_received
from agent.store.uploads import PartFile

ACTION = "store instances (STOW-RS)"
DICOM = "application/dicom"

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

_REASONED = frozenset({400, 409})
"""Failure statuses whose answer may still list what the archive did with each instance."""


@dataclass(frozen=True)
class StowAnswer:
    """What the archive said about a request: the SOP Instance UIDs it stored (with the
    warning, if it gave one), those it refused (with the failure reason), and the HTTP status."""

    status: int
    stored: frozenset[str]
    failed: Mapping[str, int]
    warnings: Mapping[str, int]

    def verdict(self, sent: Collection[str]) -> tuple[set[str], CloudError | None]:
        """Return which of the `sent` instances the archive holds now (stored, or refused as
        duplicates), and the error for the rest, if any: retryable when every one was refused
        for a transient reason, or went unmentioned in a successful answer."""
        held = {uid for uid in sent if uid in self.stored}
        held |= {uid for uid in sent if self.failed.get(uid) == Status.DUPLICATE_SOP_INSTANCE}
        refused = {
            uid: code for uid, code in self.failed.items() if uid in sent and uid not in held
        }
        unmentioned = sorted(set(sent) - held - refused.keys())
        if not refused and not unmentioned:
            return held, None
        problems = [f"{uid}: {describe(code)}" for uid, code in sorted(refused.items())]
        problems += [f"{uid}: not in its answer" for uid in unmentioned]
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        message = (
            f"the archive did not store {len(problems)} of {len(sent)} instance(s)"
            f" (HTTP {self.status}): {shown}"
        )
        retryable = all(is_out_of_resources(code) for code in refused.values()) and (
            not unmentioned or 200 <= self.status < 300
        )
        return held, CloudError(message, retryable=retryable, status=self.status)


def parse_answer(status: int, body: bytes) -> StowAnswer:
    """Given a STOW-RS answer (a DICOM JSON dataset), return what it says per instance.
    Raise ValueError if it is not one."""
    data = json.loads(body)
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # some archives wrap the one dataset in a list
    if not isinstance(data, dict):
        raise ValueError("not a DICOM JSON dataset")
    if REFERENCED_SOP_SEQUENCE not in data and FAILED_SOP_SEQUENCE not in data:
        raise ValueError("neither a Referenced nor a Failed SOP Sequence")
    stored: set[str] = set()
    warnings: dict[str, int] = {}
    for item in _items(data, REFERENCED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            stored.add(uid.strip())
            warning = _first(item, WARNING_REASON)
            if isinstance(warning, int):
                warnings[uid.strip()] = warning
    failed: dict[str, int] = {}
    for item in _items(data, FAILED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            reason = _first(item, FAILURE_REASON)
            failed[uid.strip()] = reason if isinstance(reason, int) else Status.PROCESSING_FAILURE
    return StowAnswer(status, frozenset(stored), failed, warnings)


def _items(dataset: dict[str, object], tag: str) -> list[dict[str, object]]:
    element = dataset.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def _first(dataset: dict[str, object], tag: str) -> object:
    element = dataset.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def batches(files: Sequence[PartFile], limit: int) -> Iterator[list[PartFile]]:
    """Yield `files` in order, in consecutive batches of at most `limit` bytes of files; a
    file larger than `limit` goes alone."""
    batch: list[PartFile] = []
    size = 0
    for part_file in files:
        if batch and size + part_file.size > limit:
            yield batch
            batch, size = [], 0
        batch.append(part_file)
        size += part_file.size
    if batch:
        yield batch


@dataclass(frozen=True)
class SpoolFile:
    """A spool file checked before sending: its path, record, and where its dataset starts."""

    path: Path
    record: PartFile
    dataset_offset: int


def check_file(path: Path, part_file: PartFile) -> SpoolFile:
    """Return the spool file ready to send if it is there, of the size received, and a Part-10
    file. Raise SpoolFileError otherwise."""
    try:
        f, offset = open_received(path, part_file.sop_instance_uid, part_file.size)
    except OSError as exc:
        raise SpoolFileError(
            f"{part_file.sop_instance_uid}: cannot read spool file {path}: {exc}"
        ) from None
    f.close()
    return SpoolFile(path, part_file, offset)


class MultipartBody:
    """Spool files as a `multipart/related; type="application/dicom"` body of known length,
    each read through one reused buffer as it is sent and paid for at `throttle`."""

    def __init__(self, files: Sequence[SpoolFile], throttle: Throttle | None = None) -> None:
        self.files = files
        self.throttle = throttle
        self.boundary = f"dirigo-{uuid.uuid4().hex}"
        self._head = f"--{self.boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode("ascii")
        self._tail = f"--{self.boundary}--\r\n".encode("ascii")

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{DICOM}"; boundary={self.boundary}'

    def __len__(self) -> int:
        parts = sum(len(self._head) + f.record.size + 2 for f in self.files)
        return parts + len(self._tail)

    def __iter__(self) -> Iterator[bytes | memoryview]:
        paced = self.throttle is not None and bool(self.throttle.rate)
        buffer = bytearray(PACED_BLOCK if paced else BUFFER_SIZE)
        for spool_file in self.files:
            yield self._head
            yield from self._file(spool_file, buffer)
            yield b"\r\n"
        yield self._tail

    def _file(self, spool_file: SpoolFile, buffer: bytearray) -> Iterator[memoryview]:
        """Yield the file's bytes; check its dataset's sha256 before its last block goes."""
        record, offset = spool_file.record, spool_file.dataset_offset
        digest = hashlib.sha256()
        view = memoryview(buffer)
        position = 0
        try:
            with spool_file.path.open("rb") as f:
                while position < record.size:
                    count = _read(f, view[: record.size - position])
                    if count == 0:
                        raise SpoolFileError(
                            f"{record.sop_instance_uid}: spool file {spool_file.path} ended at"
                            f" {position} of {record.size} bytes"
                        )
                    if position + count > offset:
                        digest.update(view[max(offset - position, 0) : count])
                    position += count
                    if position == record.size and digest.hexdigest() != record.sha256:
                        raise SpoolFileError(
                            f"{record.sop_instance_uid}: spool file {spool_file.path} changed"
                            " since it was received (its dataset's sha256 differs); not sent"
                        )
                    if self.throttle is not None:
                        self.throttle.take(count)
                    yield view[:count]
        except OSError as exc:
            raise SpoolFileError(
                f"{record.sop_instance_uid}: cannot read spool file {spool_file.path}: {exc}"
            ) from None


def _read(f: io.BufferedReader, view: memoryview) -> int:
    return f.readinto(view) or 0


def store_instances(http: CloudHttp, dicomweb_url: str, files: Sequence[SpoolFile]) -> StowAnswer:
    """POST `files` to `{dicomweb_url}/studies` in one STOW-RS request, paid for at the edge's
    bandwidth budget; return the archive's answer per instance. Raise CloudError (classified
    by the edge) if the request got no usable answer, and SpoolFileError if a file cannot be
    sent as received."""
    url = dicomweb_url.rstrip("/") + "/studies"
    body = MultipartBody(files, http.throttle)
    headers = {"Content-Type": body.content_type, "Accept": "application/dicom+json"}
    # 400 and 409 may carry the per-instance reasons (PS3.18 10.5.3); anything else that is
    # not 2xx is classified as every other request to the cloud.
    response = http.send("POST", url, ACTION, headers=headers, data=body, accept=_REASONED)
    status = response.status_code
    try:
        return parse_answer(status, response.content)
    except ValueError:
        pass
    if 200 <= status < 300:
        raise CloudError(
            f"cannot {ACTION}: HTTP {status} without a STOW-RS answer it could read",
            retryable=True,
            status=status,
        )
    # a 400 or 409 without per-instance reasons: as any other failed answer
    raise bad_answer(
        "POST", url, ACTION, status, response.reason, response.headers, lambda: response.text
    )
