"""Lossless re-encoding of uncompressed pixel data (JPEG-LS or HTJ2K), for smaller bundles.

Rural links make the ratio matter more than speed: on a 512² CT series zstd reaches ~1.7,
JPEG-LS ~3.5 and HTJ2K ~3. Only what can be re-encoded exactly is: grayscale images in an
uncompressed little-endian transfer syntax, 8 or 16 bits allocated; JPEG-LS additionally only
when the values are unsigned or use every allocated bit (JPEG-LS has no sign, and a signed
value narrower than its word would be reinterpreted by decoders). Every frame is decoded again
and compared with the original, element by element, before the new file is used; anything
else (colour, big endian, deflated, already compressed, a codec refusing) goes as it came.

Codecs hold the GIL and one has crashed inside a thread before, so `Transcoder` runs them in
worker processes: a crash costs that one instance its transcoding, not the agent.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.instance import InvalidInstance, inspect

logger = logging.getLogger(__name__)

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
SYNTAXES = {"jpeg-ls": JPEG_LS_LOSSLESS, "htj2k": HTJ2K_LOSSLESS}
MAX_CRASHES = 3
"""After this many worker crashes in one pack, the rest of its files go as they came."""
_UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


@dataclass(frozen=True)
class Source:
    """One spool file to transcode: where it is, where the result goes, what it must hash to."""

    path: str
    target: str
    sha256: str


@dataclass(frozen=True)
class Transcoded:
    """A re-encoded copy at `path`, checked pixel for pixel against its source."""

    path: str
    transfer_syntax: str
    size: int
    sha256: str


@dataclass(frozen=True)
class AsItCame:
    """The source goes unchanged, and why (`changed` means its dataset no longer matches)."""

    reason: str
    changed: bool = False


Outcome = Transcoded | AsItCame


def missing_codec() -> str | None:
    """Return why transcoding cannot run here (imagecodecs or numpy missing), or None."""
    try:
        import imagecodecs  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as exc:
        extra = "pip install 'dirigo-agent[transcode]'"
        return f"upload.transcode needs the 'transcode' extra ({extra}): {exc}"
    return None


def transcode_file(source: Source, method: str) -> Outcome:
    """Re-encode `source` losslessly with `method` into `source.target`; runs in a worker."""
    try:
        header = inspect(Path(source.path))
    except (InvalidInstance, OSError) as exc:
        return AsItCame(f"cannot read: {exc}", changed=True)
    if header.sha256 != source.sha256:
        return AsItCame("changed since it was received", changed=True)
    if header.transfer_syntax not in _UNCOMPRESSED:
        return AsItCame(f"transfer syntax {header.transfer_syntax} is not uncompressed LE")
    try:
        return _encode(source, method)
    except Exception as exc:  # a codec or pydicom refusing this image: send it as it came
        _discard(source.target)
        return AsItCame(f"{type(exc).__name__}: {exc}")


def _encode(source: Source, method: str) -> Outcome:
    import imagecodecs
    import numpy as np
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    ds = dcmread(source.path)
    if "PixelData" not in ds:
        return AsItCame("no pixel data")
    bits, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    if int(ds.SamplesPerPixel) != 1 or bits not in (8, 16):
        return AsItCame(f"{ds.SamplesPerPixel} samples of {bits} bits: only grayscale 8/16")
    if method == "jpeg-ls" and signed and stored != bits:
        return AsItCame(f"signed {stored}-bit values in {bits}-bit words: not exact in JPEG-LS")
    frames = ds.pixel_array
    frames = frames.reshape((-1, *frames.shape[-2:]))
    encoded = []
    for frame in frames:
        if method == "jpeg-ls":
            plain = frame.view(np.uint16 if bits == 16 else np.uint8)
            data = imagecodecs.jpegls_encode(plain)
            back = imagecodecs.jpegls_decode(data).view(frame.dtype)
        else:
            data = imagecodecs.htj2k_encode(frame, reversible=True)
            back = imagecodecs.htj2k_decode(data)
        if back.shape != frame.shape or not np.array_equal(back, frame):
            return AsItCame("decoding the new encoding does not give the same pixels")
        encoded.append(bytes(data))
    ds.PixelData = encapsulate(encoded, has_bot=len(encoded) > 1)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = UID(SYNTAXES[method])
    ds.save_as(source.target, enforce_file_format=True)
    written = inspect(Path(source.target))
    return Transcoded(source.target, written.transfer_syntax, written.size, written.sha256)


def _discard(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Transcoder:
    """A pool of worker processes re-encoding files in order, a bounded number ahead."""

    def __init__(self, method: str, workers: int) -> None:
        self.method = method
        self.workers = workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None
        self._crashes = 0

    def __enter__(self) -> Transcoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def run(self, sources: Sequence[Source]) -> Iterator[Outcome]:
        """Yield the outcome for each source, in order. At most twice as many files as there
        are workers are in flight, so memory stays bounded whatever the study's size."""
        pending: deque[tuple[Source, Future[Outcome] | None]] = deque()
        upcoming = iter(sources)
        while True:
            while len(pending) < 2 * self.workers:
                source = next(upcoming, None)
                if source is None:
                    break
                pending.append((source, self._submit(source)))
            if not pending:
                return
            source, future = pending.popleft()
            yield self._result(source, future)

    def _submit(self, source: Source) -> Future[Outcome] | None:
        if self._crashes >= MAX_CRASHES:
            return None
        if self._pool is None:
            # forkserver: never fork the agent's threads (pynetdicom, uploads) into a worker
            context: Any = multiprocessing.get_context("forkserver")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
        return self._pool.submit(transcode_file, source, self.method)

    def _result(self, source: Source, future: Future[Outcome] | None) -> Outcome:
        if future is None:
            return AsItCame(f"transcoding stopped after {MAX_CRASHES} worker crashes")
        try:
            return future.result()
        except BrokenProcessPool:
            # A codec crashed a worker: this file (and any queued with it) go as they came.
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                self._crashes += 1
                logger.error(
                    "a transcoding worker crashed on %s; sending it as it came", source.path
                )
            _discard(source.target)
            return AsItCame("the codec crashed")
