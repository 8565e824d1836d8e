"""Retrieval from the cloud: list a C-MOVE/C-GET's instances by QIDO-RS, fetch each one not
already cached by WADO-RS, and prepare it in a syntax its destination accepted.

C-MOVE, C-GET and `dirigo retrieve` share this path; they differ only in who sends the C-STOREs
(pynetdicom for the first two, `push` for the command). Each instance is fetched into the cache
before it is read: an interrupted retrieval that is asked again resumes where it stopped. An
instance whose syntax the destination accepted goes from its file block by block (`ondisk`), and
one that must be re-encoded is read with its large values left in the file until they are sent:
memory never holds a study, nor an instance sent as the archive holds it. (Decompressing, and
re-encoding between implicit and explicit VR, still hold that one instance in memory.)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import ssl
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset

from agent.cloud import CloudError, UploadGone
from agent.dicom import tune
from agent.dicomweb import DicomWeb
from agent.dimse import STORAGE_WARNINGS, Status
from agent.pynetdicom_internals import send_from_files
from agent.retry import Backoff, retried
from agent.serve.cache import InstanceCache, NotDicom
from agent.serve.fetchsyntax import AS_STORED, REFUSALS, SyntaxChooser
from agent.serve.ondisk import OnDisk, file_of, inflate
from agent.serve.query import InstanceRef, Scope, instance_ref, instance_search
from agent.serve.syntax import Accepted, Action, accepted_by, decompress, plan, proposals

logger = logging.getLogger(__name__)

PREFETCH = 4
"""Instances fetched ahead of the one being sent, each by its own thread: fetching (a WADO-RS
request and an fsync) then overlaps sending instead of adding to it."""
DEFER_SIZE = 64 * 1024
"""Values larger than this stay in the file when an instance is read: read only when sent."""
FETCH_ATTEMPTS = 5
"""Tries of one instance's WADO-RS request before its sub-operation counts as failed, when it
fails in a way that may pass (no connection, a timeout, a body cut short, 429, 5xx)."""
FETCH_BACKOFF = Backoff(first=0.5, cap=8.0)
"""Waits between those tries (a `Retry-After` honoured up to the cap): about 0.5, 1, 2, 4 s,
so a blip of the archive or its link costs seconds, not an image."""
FETCH_PATIENCE = 3
"""No try starts later than this many `cloud.timeout`s after the first: a dead archive fails
each instance within bounded time instead of holding the PACS for ever."""


@dataclass(frozen=True)
class Ready:
    """An instance to send: `dataset` in a syntax the destination accepted."""

    ref: InstanceRef
    dataset: Dataset
    action: Action


@dataclass(frozen=True)
class Failed:
    """An instance that cannot be sent, and why (one line, no patient data)."""

    ref: InstanceRef
    reason: str


Item = Ready | Failed


@dataclass
class Counts:
    """What a retrieval did so far."""

    fetched: int = 0
    cached: int = 0
    decompressed: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        took = time.monotonic() - self.started
        return (
            f"{self.fetched} fetched, {self.cached} from the cache,"
            f" {self.decompressed} decompressed, {self.failed} failed in {took:.1f} s"
        )


class Retriever:
    """Lists, fetches and prepares instances from one DICOMweb archive through one cache."""

    def __init__(
        self,
        dicomweb: DicomWeb,
        cache: InstanceCache,
        page_size: int,
        fetch_syntax: str = "auto",
    ) -> None:
        self.dicomweb = dicomweb
        self.cache = cache
        self.page_size = page_size
        self.syntaxes = SyntaxChooser(fetch_syntax)
        self.fetched: Callable[[int, float], None] | None = None
        """Told the size and seconds of each instance fetched from the archive (metrics)."""

    def instances(self, scope: Scope, most: int | None = None) -> Listing:
        """Return the instances `scope` names, each once, in the archive's order, as they
        stream in page by page: kept in a temporary file under the cache, never in a list.
        Raise CloudError if the archive cannot be asked, TooManyInstances as soon as more than
        `most` (if given) are listed."""
        listing = Listing(self.cache.root / "tmp")
        try:
            seen: set[str] = set()
            params = instance_search(scope)
            for page in self.dicomweb.pages("instances", params, self.page_size):
                for result in page:
                    ref = instance_ref(result)
                    if ref is None:
                        logger.warning("skipped an instance the archive listed without valid UIDs")
                    elif ref.sop_instance not in seen:
                        seen.add(ref.sop_instance)
                        listing.add(ref)
                if most is not None and len(listing) > most:
                    raise TooManyInstances(f"more than {most} instances match")
        except BaseException:
            listing.close()
            raise
        return listing

    def known_syntaxes(self, refs: Iterable[InstanceRef]) -> dict[str, list[str | None]]:
        """Return, per SOP class, the syntaxes of its instances as far as they are known before
        fetching them (each once): from the cached file, else from the archive's listing (with
        the compressed syntaxes it may be fetched in), else None."""
        known: dict[str, dict[str | None, None]] = {}
        for ref in refs:
            syntaxes: list[str | None] = [ref.transfer_syntax]
            path = self.cache.path(ref.sop_instance)
            if path.exists():
                # a file another process is replacing or removing: go by the listing
                with contextlib.suppress(OSError, InvalidDicomError, AttributeError):
                    meta = pydicom.filereader.read_file_meta_info(path)
                    syntaxes = [str(meta.TransferSyntaxUID)]
            else:
                syntaxes += self.syntaxes.compressible(ref)
            for syntax in syntaxes:
                known.setdefault(ref.sop_class, {})[syntax] = None
        return {sop_class: list(syntaxes) for sop_class, syntaxes in known.items()}

    def items(
        self, refs: Iterable[InstanceRef], accepted: Callable[[], Accepted], counts: Counts
    ) -> Generator[Item, None, None]:
        """Yield each instance of `refs`, fetched and ready to send, or failed, in order.
        `accepted` says what the destination took (asked once, when the first instance is
        due: pynetdicom associates with a C-MOVE's destination only then).

        Up to PREFETCH instances are fetched ahead, each by its own thread, while the current
        one is sent. Closing the generator early (a cancel, an abort) waits for the fetches in
        flight, which end within cloud.timeout, and keeps what they fetched in the cache.
        """
        destination: Accepted | None = None
        upcoming = iter(refs)
        ahead: deque[tuple[InstanceRef, Future[_Fetched]]] = deque()
        held: _Held | None = None  # the instance last yielded: its file is being sent
        stop = threading.Event()  # set when the generator ends: fetches waiting to retry give up
        with ThreadPoolExecutor(PREFETCH, thread_name_prefix="wado") as pool:
            try:
                for ref in itertools.islice(upcoming, PREFETCH):
                    ahead.append((ref, pool.submit(self._fetched, ref, stop)))
                while ahead:
                    ref, fetch = ahead.popleft()
                    for following in itertools.islice(upcoming, 1):
                        ahead.append((following, pool.submit(self._fetched, following, stop)))
                    if destination is None:
                        destination = accepted()
                    held = _Held(self.cache)
                    item = self._item(ref, fetch, destination, counts, held)
                    if isinstance(item, Failed):
                        counts.failed += 1
                    elif item.action is Action.DECOMPRESS:
                        counts.decompressed += 1
                    yield item
                    held.release()  # asked for the next one: this one was sent
                    held = None
            finally:
                stop.set()
                if held is not None:
                    held.release()
                for ref, fetch in ahead:
                    if not fetch.cancel() and fetch.exception() is None:
                        self.cache.release(ref.sop_instance)

    def _item(
        self,
        ref: InstanceRef,
        fetch: Future[_Fetched],
        accepted: Accepted,
        counts: Counts,
        held: _Held,
    ) -> Item:
        """Return one instance ready to send to a destination that accepted `accepted`, or why
        it cannot be; what it is sent from stays in `held` until released. Never raises for a
        failure of the cloud, the cache or the data."""
        try:
            fetched = fetch.result()
            held.uid = ref.sop_instance
            if fetched.from_cache:
                counts.cached += 1
            else:
                counts.fetched += 1
            return self._prepare(ref, fetched, accepted, held)
        except UploadGone:
            return Failed(ref, "the archive no longer has it")
        except (CloudError, NotDicom) as exc:
            return Failed(ref, str(exc))
        except OSError as exc:
            return Failed(ref, f"cannot keep it in the cache: {exc.strerror or exc}")
        except (InvalidDicomError, ValueError, EOFError, zlib.error) as exc:
            return Failed(ref, f"the archive's copy is not readable DICOM: {exc}")

    def _prepare(
        self, ref: InstanceRef, fetched: _Fetched, accepted: Accepted, held: _Held
    ) -> Item:
        """Return the fetched instance ready to send: as a stand-in for its file when the
        destination takes its syntax, else read (large values left in the file until sent) and
        decompressed if the plan says so. A Deflated file is inflated into a scratch file first.
        Raise what reading raises."""
        path, meta, head = fetched.path, fetched.meta, fetched.head
        if head is None:  # Deflated
            taken = accepted.get(str(meta.get("MediaStorageSOPClassUID", "")), frozenset())
            if uid.DeflatedExplicitVRLittleEndian in taken and _sendable(meta, ref):
                return Ready(ref, _stand_in(path, meta), Action.AS_IS)
            held.scratch = self.cache.scratch(ref.sop_instance)
            inflate(path, fetched.offset, meta, held.scratch)
            path = Path(held.scratch.name)
            head = _head(path)
        if str(head.get("SOPInstanceUID", "")).strip() != ref.sop_instance:
            return Failed(ref, "the archive's copy is another instance")
        syntax = head.file_meta.get("TransferSyntaxUID")
        sop_class = str(head.get("SOPClassUID", ""))
        if syntax is None or not sop_class:
            return Failed(ref, "the archive's copy has no transfer syntax or SOP class")
        delivery = plan(sop_class, str(syntax), accepted)
        if delivery.action is Action.REFUSE:
            return Failed(ref, delivery.reason)
        if (
            delivery.action is not Action.DECOMPRESS
            and str(syntax) in accepted.get(sop_class, ())
            and _sendable(head.file_meta, ref)
        ):
            return Ready(ref, _stand_in(path, head.file_meta), delivery.action)
        dataset = pydicom.dcmread(path, defer_size=DEFER_SIZE)
        if delivery.action is Action.DECOMPRESS:
            try:
                decompress(dataset)
            except Exception as exc:  # a codec's failure: this instance, not the retrieval
                return Failed(ref, f"cannot decompress {syntax.name}: {exc}")
        return Ready(ref, dataset, delivery.action)

    def _fetched(self, ref: InstanceRef, stop: threading.Event) -> _Fetched:
        """Return the instance's file in the cache, fetched first if it is not there, with
        what decides how it goes (`_Fetched.read`); it is held (kept from eviction) until
        released. Reading it here, on a fetch thread, takes that parse off the sending thread,
        which runs only while the previous instance's C-STORE waits on the destination.

        A fetch that fails in a way that may pass is tried again (FETCH_ATTEMPTS, FETCH_BACKOFF,
        FETCH_PATIENCE), from the start of the instance: WADO-RS has no offset to resume a
        multipart answer from, and nothing of a failed try is kept. Raise the last CloudError
        when the tries are spent, the failure is not retryable, or `stop` is set."""
        path, from_cache = retried(
            lambda: self._fetch_once(ref),
            attempts=FETCH_ATTEMPTS,
            backoff=FETCH_BACKOFF,
            deadline=time.monotonic() + FETCH_PATIENCE * self.dicomweb.http.timeout,
            stop=stop,
            again=_passing,
            what=f"instance {ref.sop_instance}",
        )
        try:
            return _Fetched.read(path, from_cache)
        except BaseException:
            self.cache.release(ref.sop_instance)
            raise

    def _fetch_once(self, ref: InstanceRef) -> tuple[Path, bool]:
        """Return the instance's file in the cache, fetched by one WADO-RS request if it is not
        there; held until released."""
        path = self.cache.get(ref.sop_instance)
        if path is not None:
            return path, True

        choices, learner = self.syntaxes.choices(ref)
        try:
            return self._fetch_as(ref, choices)
        finally:
            if learner:
                self.syntaxes.settled(ref)

    def _fetch_as(self, ref: InstanceRef, choices: list[str]) -> tuple[Path, bool]:
        """Return the instance's file in the cache, fetched by WADO-RS in the first syntax of
        `choices` the archive does not refuse; held until released."""
        for asked in choices:
            size = 0

            def write(out: BinaryIO, asked: str = asked) -> None:
                nonlocal size
                size = self.dicomweb.retrieve_instance(
                    ref.study, ref.series, ref.sop_instance, out, asked
                )

            started = time.monotonic()
            try:
                path = self.cache.put(ref.sop_instance, write)
            except UploadGone:
                raise
            except CloudError as exc:
                if asked == AS_STORED or exc.status not in REFUSALS:
                    raise
                self.syntaxes.refused(asked, f"HTTP {exc.status}")
                continue
            took = time.monotonic() - started
            if self.fetched is not None:
                self.fetched(size, took)
            if asked == AS_STORED:
                with contextlib.suppress(OSError, InvalidDicomError, AttributeError):
                    syntax = str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID)
                    self.syntaxes.fetched(ref, asked, syntax, size, took)
            else:
                self.syntaxes.fetched(ref, asked, asked, size, took)
            return path, False
        raise AssertionError("unreachable: the last choice, as held, returns or raises")


class TooManyInstances(Exception):
    """A retrieval names more instances than one C-MOVE or C-GET can count (65535)."""


class Listing:
    """The instances of one retrieval, in order, one line of JSON each in an unnamed temporary
    file (gone when closed, or when the process ends however it ends). Iterating reads the file
    block by block; several iterations may run at once."""

    def __init__(self, directory: Path) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed in close())
        self._count = 0

    def add(self, ref: InstanceRef) -> None:
        line = json.dumps(
            [ref.study, ref.series, ref.sop_instance, ref.sop_class, ref.transfer_syntax]
        )
        self._file.write(line.encode("ascii") + b"\n")
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[InstanceRef]:
        self._file.flush()
        fd, offset, rest = self._file.fileno(), 0, b""
        while block := os.pread(fd, _LISTING_BLOCK, offset):
            offset += len(block)
            *lines, rest = (rest + block).split(b"\n")
            for line in lines:
                yield InstanceRef(*json.loads(line))

    def close(self) -> None:
        self._file.close()


_LISTING_BLOCK = 64 * 1024


@dataclass
class _Held:
    """What one instance being sent needs kept: its hold on the cache, and the scratch file it
    is sent from, if one was made."""

    cache: InstanceCache
    uid: str | None = None
    scratch: BinaryIO | None = None

    def release(self) -> None:
        if self.scratch is not None:
            self.scratch.close()
            Path(self.scratch.name).unlink(missing_ok=True)
            self.scratch = None
        if self.uid is not None:
            self.cache.release(self.uid)
            self.uid = None


def _passing(exc: Exception) -> tuple[bool, float | None]:
    """Return whether a failed fetch may pass if tried again, and the archive's `Retry-After`.
    An instance the archive no longer has (UploadGone) will not come back."""
    if isinstance(exc, CloudError) and not isinstance(exc, UploadGone):
        return exc.retryable, exc.retry_after
    return False, None


def _sendable(meta: Dataset, ref: InstanceRef) -> bool:
    """Return True if the file with this file meta can go as it is: pynetdicom then takes the
    SOP Class, Instance and syntax from the file meta, which must name this instance."""
    return (
        "MediaStorageSOPClassUID" in meta
        and "TransferSyntaxUID" in meta
        and str(meta.get("MediaStorageSOPInstanceUID", "")).strip() == ref.sop_instance
    )


def _head(path: Path) -> Dataset:
    """Return the file meta and the data set's first elements, up to its SOP Instance UID: all
    that decides how the instance goes (parsing the whole header of each instance was a tenth
    of a warm C-MOVE's CPU). Raise what reading raises."""
    with path.open("rb") as source:
        return pydicom.filereader.read_partial(source, stop_when=_past_sop_instance_uid)


def _past_sop_instance_uid(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag > _SOP_INSTANCE_UID)


_SOP_INSTANCE_UID = 0x00080018


def _stand_in(path: Path, meta: Dataset) -> OnDisk:
    return OnDisk(
        path,
        str(meta.MediaStorageSOPClassUID).strip(),
        str(meta.MediaStorageSOPInstanceUID).strip(),
        str(meta.TransferSyntaxUID).strip(),
    )


@dataclass(frozen=True)
class _Fetched:
    """An instance's file in the cache, whether it was there already, its file meta, where its
    data set starts, and its file meta and first elements (`_head`), None if it is Deflated
    (read only once inflated, if it must be)."""

    path: Path
    from_cache: bool
    meta: Dataset
    offset: int
    head: Dataset | None

    @classmethod
    def read(cls, path: Path, from_cache: bool) -> _Fetched:
        """Return the file at `path` with what decides how it goes. Raise what reading
        raises."""
        meta, offset = split_dataset(path)
        deflated = meta.get("TransferSyntaxUID") == uid.DeflatedExplicitVRLittleEndian
        return cls(path, from_cache, meta, offset, None if deflated else _head(path))


@dataclass
class Pushed:
    """The outcome of `push`."""

    completed: int = 0
    warnings: int = 0
    failures: list[str] = field(default_factory=list)


def push(
    ae: AE,
    host: str,
    port: int,
    ae_title: str,
    retriever: Retriever,
    refs: Iterable[InstanceRef],
    progress: Callable[[Item], None],
    counts: Counts,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> Pushed:
    """Send `refs` to a storage SCP by C-STORE, the way a C-MOVE does: same proposals, same
    preparation, over TLS with `tls_args`. `progress` is called after each instance. Raise
    ConnectionError if the destination cannot be associated with."""
    contexts = proposals(retriever.known_syntaxes(refs))
    assoc: Association = ae.associate(
        host, port, contexts=contexts, ae_title=ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        outcome = "rejected the association" if assoc.is_rejected else "could not be reached"
        raise ConnectionError(f"{ae_title} at {host}:{port} {outcome}")
    result = Pushed()
    try:
        tune(assoc, sends_stores=True)
        send_from_files(assoc, file_of)
        for item in retriever.items(refs, lambda: accepted_by(assoc.accepted_contexts), counts):
            if isinstance(item, Ready):
                _send(assoc, item, result)
            else:
                result.failures.append(f"{item.ref.sop_instance}: {item.reason}")
            progress(item)
            if not assoc.is_established:
                raise ConnectionError(f"{ae_title} ended the association")
    finally:
        if assoc.is_established:
            assoc.release()
    return result


def _send(assoc: Association, item: Ready, result: Pushed) -> None:
    uid = item.ref.sop_instance
    try:
        status = assoc.send_c_store(item.dataset)
    except (ValueError, AttributeError, RuntimeError) as exc:
        result.failures.append(f"{uid}: {exc}")
        return
    code = int(getattr(status, "Status", -1)) if status else -1
    if code == Status.SUCCESS:
        result.completed += 1
    elif code in STORAGE_WARNINGS:
        result.warnings += 1
    else:
        answer = f"status 0x{code:04X}" if code >= 0 else "no answer"
        result.failures.append(f"{uid}: the destination answered {answer}")
