"""Retrieval from the cloud: list a C-MOVE/C-GET's instances by QIDO-RS, fetch each one not
already cached by WADO-RS, and prepare it in a syntax its destination accepted.

C-MOVE, C-GET and `dirigo retrieve` share this path; they differ only in who sends the C-STOREs
(pynetdicom for the first two, `push` for the command). Each instance is fetched into the cache
before it is read: an interrupted retrieval that is asked again resumes where it stopped. An
instance whose syntax the destination accepted goes from its file block by block (`ondisk`); one
it did not is rewritten file to file in the uncompressed syntax it accepted, decompressed a frame
at a time (`uncompressed`), and goes from that file: memory never holds a study, nor a whole
instance. (What that rewrite does not handle, a big-endian instance say, is read whole and
re-encoded by pynetdicom, in memory.)
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import queue
import ssl
import struct
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
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset

from agent.cloud import CloudError, UploadGone
from agent.dicom import tune
from agent.dicomweb import DicomWeb
from agent.dimse import STORAGE_WARNINGS, Status
from agent.part10 import Head, head_in, read_head
from agent.pynetdicom_internals import send_from_files
from agent.retry import Backoff, retried
from agent.serve.cache import Incoming, InstanceCache, NotDicom
from agent.serve.fetchsyntax import AS_STORED, REFUSALS, SyntaxChooser
from agent.serve.ondisk import OnDisk, file_of, inflate
from agent.serve.query import InstanceRef, Scope, instance_ref, instance_search
from agent.serve.syntax import Accepted, Action, accepted_by, decompress, plan, proposals
from agent.serve.uncompressed import Unstreamable, target_syntax, write_uncompressed

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
LISTING_PAGE = 1000
"""Instances asked for per QIDO-RS request when listing a retrieval (`serve.page_size` if that
is larger): the listing is read whole before the first C-STORE, and an archive may answer each
page by matching the whole study again (Orthanc 1.10 lists 2,000 instances in 1.9 s by pages of
100, 1.1 s by pages of 1,000). An archive that caps its pages lower loses nothing
(`DicomWeb.pages`)."""
LISTING_AHEAD = 2
"""Listing pages asked at once: the archive's time goes into each answer (Orthanc: 0.6 ms per
instance, a page of 1,000 in 0.6 s whatever its offset), so two at once list 2,000 instances in
0.67 s instead of 1.2 s."""
REGROUP_MOST = 100
"""Series of a listing from which its instances are no longer regrouped series by series (one
reading of the listing per series), but taken in runs as listed."""
STREAM_LEAST = 3
"""Instances of one series not yet cached from which the series streams in one request."""
PLACERS = 2
"""Threads placing a streamed series' instances in the cache (fsync, rename, index) while the
next one arrives."""
UNREADABLE = (
    OSError,
    InvalidDicomError,
    ValueError,
    EOFError,
    AttributeError,
    NotImplementedError,
    struct.error,
)
"""What reading a file's head raises when it is not a readable Part-10 file (pydicom's
exceptions: `agent.part10.read_head`), or is gone."""
STREAM_LEAD = 16 * 1024
"""Bytes of a streamed part read before its file meta is parsed (which instance it is)."""


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
    """Instances that could not be fetched or prepared: never offered to the destination."""
    refused: int = 0
    """Instances the destination answered with a failure (or no answer)."""
    warned: int = 0
    """Instances the destination stored with a warning."""
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        took = time.monotonic() - self.started
        return (
            f"{self.fetched} fetched, {self.cached} from the cache,"
            f" {self.decompressed} decompressed, {self.failed} failed,"
            f" {self.refused} refused and {self.warned} stored with a warning by the destination"
            f" in {took:.1f} s"
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
            page_size = max(self.page_size, LISTING_PAGE)
            for page in self.dicomweb.pages("instances", params, page_size, LISTING_AHEAD):
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
                with contextlib.suppress(*UNREADABLE):
                    syntaxes = [read_head(path).transfer_syntax]
            else:
                syntaxes += self.syntaxes.compressible(ref)
            for syntax in syntaxes:
                known.setdefault(ref.sop_class, {})[syntax] = None
        return {sop_class: list(syntaxes) for sop_class, syntaxes in known.items()}

    def items(
        self, refs: Iterable[InstanceRef], accepted: Callable[[], Accepted], counts: Counts
    ) -> Generator[Item, None, None]:
        """Yield each instance of `refs`, fetched and ready to send, or failed. `accepted` says
        what the destination took (asked once, when the first instance is due: pynetdicom
        associates with a C-MOVE's destination only then).

        Fetching runs ahead of sending (`_Fetches`): a series of several instances not yet
        cached streams in one WADO-RS request, its instances in the order the archive sends
        them; other instances are fetched one request each, up to PREFETCH ahead, in the
        listing's order. Closing the generator early (a cancel, an abort) waits for the fetches
        in flight, which end within cloud.timeout, and keeps what they fetched in the cache.
        """
        destination: Accepted | None = None
        held: _Held | None = None  # the instance last yielded: its file is being sent
        with ThreadPoolExecutor(PREFETCH, thread_name_prefix="wado") as pool:
            fetches = _Fetches(self, pool, refs)
            try:
                for ref, fetch in fetches:
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
                fetches.stop.set()
                if held is not None:
                    held.release()
                fetches.close()

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
        except (*UNREADABLE, zlib.error) as exc:  # OSError was caught above
            return Failed(ref, f"the archive's copy is not readable DICOM: {exc}")

    def _prepare(
        self, ref: InstanceRef, fetched: _Fetched, accepted: Accepted, held: _Held
    ) -> Item:
        """Return the fetched instance ready to send: as a stand-in for its file when the
        destination takes its syntax, else read (large values left in the file until sent) and
        decompressed if the plan says so. A Deflated file is inflated into a scratch file first.
        Raise what reading raises."""
        path, head = fetched.path, fetched.head
        if not head.dataset_read:  # Deflated
            taken = accepted.get(head.media_sop_class or "", frozenset())
            if uid.DeflatedExplicitVRLittleEndian in taken and _sendable(head, ref):
                return Ready(ref, OnDisk(path, head), Action.AS_IS)
            inflated = held.scratch(ref.sop_instance)
            meta, offset = split_dataset(path)
            inflate(path, offset, meta, inflated)
            path = Path(inflated.name)
            head = read_head(path)
        if head.sop_instance != ref.sop_instance:
            return Failed(ref, "the archive's copy is another instance")
        syntax, sop_class = head.transfer_syntax, head.sop_class
        if not syntax or not sop_class:
            return Failed(ref, "the archive's copy has no transfer syntax or SOP class")
        delivery = plan(sop_class, syntax, accepted)
        if delivery.action is Action.REFUSE:
            return Failed(ref, delivery.reason)
        if (
            delivery.action is not Action.DECOMPRESS
            and syntax in accepted.get(sop_class, ())
            and _sendable(head, ref)
        ):
            return Ready(ref, OnDisk(path, head), delivery.action)
        target = target_syntax(accepted.get(sop_class, frozenset()))
        if target is not None and _sendable(head, ref):
            rewritten = held.scratch(ref.sop_instance)
            try:
                write_uncompressed(path, target, rewritten)
            except Unstreamable:
                pass  # pydicom's way below, in memory
            except Exception as exc:  # a codec's failure: this instance, not the retrieval
                return Failed(ref, f"cannot rewrite {uid.UID(syntax).name} uncompressed: {exc}")
            else:
                written = Path(rewritten.name)
                return Ready(ref, OnDisk(written, read_head(written)), delivery.action)
        dataset = pydicom.dcmread(path, defer_size=DEFER_SIZE)
        if delivery.action is Action.DECOMPRESS:
            try:
                decompress(dataset)
            except Exception as exc:  # a codec's failure: this instance, not the retrieval
                return Failed(ref, f"cannot decompress {uid.UID(syntax).name}: {exc}")
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
                with contextlib.suppress(*UNREADABLE):
                    syntax = read_head(path).transfer_syntax
                    self.syntaxes.fetched(ref, asked, syntax or asked, size, took)
            else:
                self.syntaxes.fetched(ref, asked, asked, size, took)
            return path, False
        raise AssertionError("unreachable: the last choice, as held, returns or raises")

    def streams(self, group: list[InstanceRef]) -> list[InstanceRef] | None:
        """Return the instances of `group` (one series) to fetch by streaming the series in one
        request, or None if they are better fetched one by one: fewer than STREAM_LEAST not
        cached, or more than a quarter of the series cached (the stream would fetch those
        again: a retrieval resumed after an interruption fetches what is missing, one by one)."""
        missing = [ref for ref in group if not self._cached(ref)]
        if len(missing) < STREAM_LEAST or 4 * len(missing) < 3 * len(group):
            return None
        return missing

    def _cached(self, ref: InstanceRef) -> bool:
        try:
            return self.cache.path(ref.sop_instance).exists()
        except ValueError:
            return False

    def stream_series(
        self,
        missing: list[InstanceRef],
        deliver: Callable[[_Delivery], bool],
        stop: threading.Event,
    ) -> None:
        """Fetch the instances `missing` (of one series) by streaming the series in one WADO-RS
        request, each into the cache as it arrives; tell `deliver` each one placed (held until
        released), or why reading it failed. Parts of instances not asked for are skipped. When
        the series must first be measured (`SyntaxChooser.series_choices`), the first instance
        is fetched alone, and comes again in the stream, skipped. A syntax the archive refuses
        is remembered and the next asked; any other failure ends the stream, and what it did not
        deliver is for the caller to fetch one by one. Stop when `deliver` returns False (the
        retrieval ended) or `stop` is set."""
        wanted = {ref.sop_instance: ref for ref in missing}
        first = missing[0]
        choices = self.syntaxes.series_choices(first)
        if choices is None:
            try:
                alone: _Fetched | BaseException = self._fetched(first, stop)
            except (CloudError, NotDicom, *UNREADABLE) as exc:
                alone = exc
            del wanted[first.sop_instance]
            if not deliver((first, alone)):
                return
            choices = self.syntaxes.series_choices(first)
            if choices is None or not wanted:
                return
        for asked in choices:
            before = len(wanted)
            try:
                with (
                    self.dicomweb.series_parts(first.study, first.series, asked) as answer,
                    ThreadPoolExecutor(PLACERS, thread_name_prefix="wado-place") as placers,
                ):
                    placing: deque[Future[None]] = deque()
                    for part in answer:
                        if stop.is_set():
                            return
                        received = self._receive(part, wanted, stop)
                        if received is not None:
                            placing.append(placers.submit(self._settle, *received, asked, deliver))
                        while len(placing) > PLACERS or (placing and placing[0].done()):
                            placing.popleft().result()
                return
            except CloudError as exc:
                if asked != AS_STORED and exc.status in REFUSALS and len(wanted) == before:
                    self.syntaxes.refused(asked, f"HTTP {exc.status}")
                    continue
                if wanted:
                    logger.warning(
                        "streaming series %s stopped (%s): fetching its %d other instances one"
                        " by one",
                        first.series,
                        exc,
                        len(wanted),
                    )
                return

    def _receive(
        self, part: Iterator[bytes], wanted: dict[str, InstanceRef], stop: threading.Event
    ) -> tuple[InstanceRef, Incoming, int, float] | None:
        """Write one part of a series' answer into the cache's incoming file if it is an
        instance in `wanted` (which it leaves); return it with its size and when it started
        arriving, for `_settle`. Return None for a part skipped, or if `stop` was set. Raise
        CloudError if the answer is cut short, OSError if the cache cannot take it."""
        started = time.monotonic()
        lead = _leading(part)
        uid = _instance_uid(lead)
        ref = wanted.pop(uid, None) if uid is not None else None
        if ref is None:
            return None
        incoming = self.cache.incoming(ref.sop_instance)
        try:
            incoming.file.write(lead)
            size = len(lead)
            for block in part:
                if stop.is_set():
                    incoming.abandon()
                    return None
                incoming.file.write(block)
                size += len(block)
        except BaseException:
            incoming.abandon()
            raise
        return ref, incoming, size, started

    def _settle(
        self,
        ref: InstanceRef,
        incoming: Incoming,
        size: int,
        started: float,
        asked: str,
        deliver: Callable[[_Delivery], bool],
    ) -> None:
        """Place an instance a series' answer brought (`_receive`) in the cache, read what
        decides how it goes, and deliver it, or why it cannot be read. Runs on a placing
        thread: its fsyncs wait on the disk while the next part arrives."""
        try:
            path = self.cache.place(incoming)
        except (OSError, NotDicom) as exc:
            deliver((ref, exc))
            return
        if self.fetched is not None:
            self.fetched(size, time.monotonic() - started)
        try:
            fetched = _Fetched.read(path, from_cache=False)
        except UNREADABLE as exc:
            self.cache.release(ref.sop_instance)
            deliver((ref, exc))
            return
        syntax = fetched.head.transfer_syntax
        self.syntaxes.fetched(ref, asked, syntax or asked, size, 0.0)  # 0 s: not a measure
        deliver((ref, fetched))


_Delivery = tuple[InstanceRef, "_Fetched | BaseException"]
"""An instance a series' stream placed in the cache (held), or why it could not be read."""
_Pending = tuple[InstanceRef, "Future[_Fetched]"]
"""An instance to send and the future of its file in the cache."""


class _Fetches:
    """The instances of a retrieval as they are fetched, each with the future of its file in the
    cache (held until released), in sending order: the listing is read in groups of one
    series (`_series_groups`); a group that `Retriever.streams` streams comes as its
    stream delivers it (the cached ones first, then the rest in the archive's order, then what
    the stream did not deliver, fetched one by one); the other groups' instances are fetched one
    request each, PREFETCH ahead, in the listing's order across groups. `close` waits for what
    is in flight and releases what was fetched and not taken."""

    def __init__(self, retriever: Retriever, pool: ThreadPoolExecutor, refs: Iterable[InstanceRef]):
        self.retriever = retriever
        self.pool = pool
        self.stop = threading.Event()
        """Set when the retrieval ends: fetches waiting to retry give up, streams stop."""
        self._plans = ((group, retriever.streams(group)) for group in _series_groups(refs))
        """Each group of the listing, with the instances to stream (None: one by one), decided
        once per group, as it comes up."""
        self._upcoming: tuple[list[InstanceRef], list[InstanceRef] | None] | None = None
        self._iterator = self._all()

    def __iter__(self) -> Iterator[_Pending]:
        return self._iterator

    def close(self) -> None:
        self.stop.set()
        self._iterator.close()

    def _all(self) -> Generator[_Pending, None, None]:
        self._upcoming = next(self._plans, None)
        while self._upcoming is not None:
            group, missing = self._upcoming
            if missing is None:
                yield from self._each(self._one_by_one())
            else:
                self._upcoming = next(self._plans, None)
                yield from self._streamed(group, missing)

    def _one_by_one(self) -> Iterator[InstanceRef]:
        """Yield the instances of the upcoming groups while they are fetched one by one; stop at
        the first that streams, left upcoming."""
        while self._upcoming is not None and self._upcoming[1] is None:
            group = self._upcoming[0]
            self._upcoming = next(self._plans, None)
            yield from group

    def _each(self, upcoming: Iterator[InstanceRef]) -> Generator[_Pending, None, None]:
        """Fetch `upcoming` one request each, PREFETCH ahead, yielding them in order."""
        fetch = self.retriever._fetched
        ahead: deque[_Pending] = deque()
        try:
            for ref in itertools.islice(upcoming, PREFETCH):
                ahead.append((ref, self.pool.submit(fetch, ref, self.stop)))
            while ahead:
                ref, future = ahead.popleft()
                for following in itertools.islice(upcoming, 1):
                    ahead.append((following, self.pool.submit(fetch, following, self.stop)))
                yield ref, future
        finally:
            if ahead:
                self.stop.set()
            for ref, future in ahead:
                if not future.cancel() and future.exception() is None:
                    self.retriever.cache.release(ref.sop_instance)

    def _streamed(
        self, group: list[InstanceRef], missing: list[InstanceRef]
    ) -> Generator[_Pending, None, None]:
        """Yield the group's cached instances, then those its stream delivers as they come,
        then the ones it did not, fetched one by one."""
        deliveries: queue.Queue[_Delivery | None] = queue.Queue(maxsize=PREFETCH)
        ended = threading.Event()  # the consumer no longer takes deliveries

        def deliver(delivery: _Delivery) -> bool:
            while not ended.is_set():
                with contextlib.suppress(queue.Full):
                    deliveries.put(delivery, timeout=0.2)
                    return True
            _release(delivery)
            return False

        def _release(delivery: _Delivery) -> None:
            if isinstance(delivery[1], _Fetched):
                self.retriever.cache.release(delivery[0].sop_instance)

        def run() -> None:
            try:
                self.retriever.stream_series(missing, deliver, self.stop)
            except Exception:  # a failure of this stream: the rest is fetched one by one
                logger.exception("streaming series %s failed", missing[0].series)
            finally:
                deliveries.put(None)

        streaming = threading.Thread(target=run, name="wado-series", daemon=True)
        streaming.start()
        delivered: set[str] = set()
        try:
            skipped = {ref.sop_instance for ref in missing}
            yield from self._each(ref for ref in group if ref.sop_instance not in skipped)
            while (delivery := deliveries.get()) is not None:
                ref, fetched = delivery
                delivered.add(ref.sop_instance)
                future: Future[_Fetched] = Future()
                if isinstance(fetched, _Fetched):
                    future.set_result(fetched)
                else:
                    future.set_exception(fetched)
                yield ref, future
            streaming.join()
            yield from self._each(ref for ref in missing if ref.sop_instance not in delivered)
        finally:
            ended.set()
            if streaming.is_alive():
                self.stop.set()  # the retrieval ended: so does the stream
            while streaming.is_alive() or not deliveries.empty():
                with contextlib.suppress(queue.Empty):
                    if (left := deliveries.get(timeout=0.2)) is not None:
                        _release(left)


def _series_groups(refs: Iterable[InstanceRef]) -> Iterator[list[InstanceRef]]:
    """Yield `refs` in groups of one series each. A `Listing` (read again as often as needed)
    of at most REGROUP_MOST series goes whole series at a time, in the order each first
    appears: an archive may list a study's instances in the order they arrived, series
    interleaved (Orthanc does), which would leave no run long enough to stream. Other iterables,
    and listings of more series, go in runs of consecutive instances of one series."""
    if isinstance(refs, Listing):
        series = dict.fromkeys(_series_of(ref) for ref in refs)
        if 1 < len(series) <= REGROUP_MOST:
            for wanted in series:
                yield [ref for ref in refs if _series_of(ref) == wanted]
            return
    for _series, run in itertools.groupby(refs, key=_series_of):
        yield list(run)


def _series_of(ref: InstanceRef) -> tuple[str, str]:
    return ref.study, ref.series


def _leading(part: Iterator[bytes]) -> bytes:
    """Return the first STREAM_LEAD bytes of a part (fewer if it is shorter), read from it."""
    lead = bytearray()
    while len(lead) < STREAM_LEAD and (block := next(part, None)) is not None:
        lead += block
    return bytes(lead)


def _instance_uid(lead: bytes) -> str | None:
    """Return the SOP Instance UID the file meta of a Part-10 file starting with `lead` names,
    None if it names none or `lead` does not hold a file meta."""
    head = head_in(lead)
    if head is not None:
        return head.media_sop_instance
    with contextlib.suppress(*UNREADABLE):
        meta = pydicom.filereader.read_partial(io.BytesIO(lead), stop_when=lambda *_: True)
        value = meta.file_meta.get("MediaStorageSOPInstanceUID")
        return str(value).strip("\0 ") if value else None
    return None


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
    """What one instance being sent needs kept: its hold on the cache, and the scratch files
    made to send it (an inflated copy, a rewritten one)."""

    cache: InstanceCache
    uid: str | None = None
    scratches: list[BinaryIO] = field(default_factory=list)

    def scratch(self, sop_instance_uid: str) -> BinaryIO:
        """Return a new scratch file under the cache for the instance, removed on release."""
        made = self.cache.scratch(sop_instance_uid)
        self.scratches.append(made)
        return made

    def release(self) -> None:
        for scratch in self.scratches:
            scratch.close()
            Path(scratch.name).unlink(missing_ok=True)
        self.scratches.clear()
        if self.uid is not None:
            self.cache.release(self.uid)
            self.uid = None


def _passing(exc: Exception) -> tuple[bool, float | None]:
    """Return whether a failed fetch may pass if tried again, and the archive's `Retry-After`.
    An instance the archive no longer has (UploadGone) will not come back."""
    if isinstance(exc, CloudError) and not isinstance(exc, UploadGone):
        return exc.retryable, exc.retry_after
    return False, None


def _sendable(head: Head, ref: InstanceRef) -> bool:
    """Return True if the file with this head can go as it is: pynetdicom then takes the SOP
    Class, Instance and syntax from the file meta, which must name this instance."""
    return (
        head.media_sop_class is not None
        and head.transfer_syntax is not None
        and head.media_sop_instance == ref.sop_instance
    )


@dataclass(frozen=True)
class _Fetched:
    """An instance's file in the cache, whether it was there already, and its head: all that
    decides how it goes (the data set's UIDs not read if it is Deflated: read only once
    inflated, if it must be)."""

    path: Path
    from_cache: bool
    head: Head

    @classmethod
    def read(cls, path: Path, from_cache: bool) -> _Fetched:
        """Return the file at `path` with its head. Raise what reading raises (UNREADABLE)."""
        return cls(path, from_cache, read_head(path))


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
