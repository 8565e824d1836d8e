"""Lossless re-encoding of uncompressed pixel data (JPEG-LS or HTJ2K), for smaller bundles.

Rural links make the ratio matter more than speed: on a 512² CT series zstd reaches ~2.7,
JPEG-LS ~3.5 and HTJ2K ~3. Only what can be re-encoded exactly is: grayscale images in an
uncompressed little-endian transfer syntax, 8 or 16 bits allocated; JPEG-LS additionally only
when the values are unsigned or use every allocated bit (JPEG-LS has no sign, and a signed
value narrower than its word would be reinterpreted by decoders). Every frame is decoded again
and compared with the original words, unused high bits included, before the new file is used;
anything else (colour, big endian, deflated, already compressed, a codec refusing) goes as it
came.

The file is not parsed into a pydicom dataset: the source is mapped, the structure walk that
checked it on receipt finds the image attributes and the pixel data, and the frames are codec
input straight from the mapping. The new file is the old one with a new transfer syntax in its
File Meta and encapsulated pixel data; every other byte of an Explicit VR dataset is copied as
it came, and an Implicit VR one is re-encoded explicitly by pydicom (encapsulated syntaxes are
explicit). That halves the cost per file (measured: 20 → 13.5 CPU-s/GB for HTJ2K, of which the
codec and its check are 10).

Codecs hold the GIL and one has crashed inside a thread before, so `Transcoder` runs them in
worker processes: a crash costs that one instance its transcoding, not the agent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mmap
import multiprocessing
import os
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from agent.instance import IMPLICIT_VR_LE, Element, InvalidInstance, Layout, dataset_offset, layout

logger = logging.getLogger(__name__)

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
SYNTAXES = {"jpeg-ls": JPEG_LS_LOSSLESS, "htj2k": HTJ2K_LOSSLESS}
MAX_CRASHES = 3
"""After this many worker crashes in one pack, the rest of its files go as they came."""
_UNCOMPRESSED = frozenset({IMPLICIT_VR_LE, "1.2.840.10008.1.2.1"})
_UNDEFINED = 0xFFFFFFFF
_META_GROUP_LENGTH = 0x00020000
_TRANSFER_SYNTAX = 0x00020010
_SAMPLES_PER_PIXEL = 0x00280002
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
_BITS_STORED = 0x00280101
_PIXEL_REPRESENTATION = 0x00280103
_PIXEL_DATA = 0x7FE00010
_PRELOAD = ["__main__", "agent.transcode", "numpy", "imagecodecs"]
"""What the forkserver imports before forking workers. With
`__main__` among them (multiprocessing's own default), workers inherit the main module instead of
each importing it again: for the `dirigo` command, the whole agent."""
_IMAGE_TAGS = frozenset(
    {
        _SAMPLES_PER_PIXEL,
        _NUMBER_OF_FRAMES,
        _ROWS,
        _COLUMNS,
        _BITS_ALLOCATED,
        _BITS_STORED,
        _PIXEL_REPRESENTATION,
        _PIXEL_DATA,
    }
)


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


def transcode_file(source: Source, method: str) -> Outcome:
    """Re-encode `source` losslessly with `method` into `source.target`; runs in a worker."""
    try:
        with open(source.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _transcode_mapped(mm, source, method)
    except (OSError, ValueError) as exc:  # ValueError: mmap of an empty file
        return AsItCame(f"cannot read: {exc}", changed=True)


def _transcode_mapped(mm: mmap.mmap, source: Source, method: str) -> Outcome:
    try:
        found = layout(cast(BinaryIO, mm), len(mm), _IMAGE_TAGS)
    except InvalidInstance as exc:
        return AsItCame(f"cannot read: {exc}", changed=True)
    except ValueError:  # deflated: its dataset's bytes are not the file's
        found = None
    view = memoryview(mm)
    try:
        offset = found.dataset_offset if found else dataset_offset(cast(BinaryIO, mm), len(mm))
        if hashlib.sha256(view[offset:]).hexdigest() != source.sha256:
            return AsItCame("changed since it was received", changed=True)
        if found is None or found.transfer_syntax not in _UNCOMPRESSED:
            syntax = found.transfer_syntax if found else "deflated"
            return AsItCame(f"transfer syntax {syntax} is not uncompressed LE")
        image = _Image.read(view, found, method)
        if isinstance(image, AsItCame):
            return image
        try:
            return _encode(view, found, image, source.target, method)
        except Exception as exc:  # a codec or pydicom refusing this image: send it as it came
            _discard(source.target)
            return AsItCame(f"{type(exc).__name__}: {exc}")
    finally:
        view.release()


@dataclass(frozen=True)
class _Image:
    """The pixel data of an uncompressed grayscale image, as its attributes describe it."""

    pixels: Element
    frames: int
    rows: int
    columns: int
    bits: int
    signed: bool

    @property
    def dtype(self) -> str:
        return ("<i" if self.signed else "<u") + str(self.bits // 8)

    @property
    def nbytes(self) -> int:
        return self.frames * self.rows * self.columns * self.bits // 8

    @staticmethod
    def read(view: memoryview, found: Layout, method: str) -> _Image | AsItCame:
        """Return the image `found` describes, or why it cannot be re-encoded exactly."""
        pixels = found.elements.get(_PIXEL_DATA)
        if pixels is None:
            return AsItCame("no pixel data")
        values = {tag: _integer(view, e) for tag, e in found.elements.items() if tag != _PIXEL_DATA}
        samples, bits = values.get(_SAMPLES_PER_PIXEL), values.get(_BITS_ALLOCATED)
        stored, signed = values.get(_BITS_STORED), values.get(_PIXEL_REPRESENTATION) == 1
        if samples != 1 or bits not in (8, 16):
            return AsItCame(f"{samples} samples of {bits} bits: only grayscale 8/16")
        if method == "jpeg-ls" and signed and stored != bits:
            return AsItCame(f"signed {stored}-bit values in {bits}-bit words: not exact in JPEG-LS")
        image = _Image(
            pixels,
            values.get(_NUMBER_OF_FRAMES) or 1,
            values.get(_ROWS) or 0,
            values.get(_COLUMNS) or 0,
            bits,
            signed,
        )
        if not image.nbytes or pixels.length == _UNDEFINED or pixels.length < image.nbytes:
            return AsItCame(
                f"pixel data of {pixels.length} bytes does not hold {image.frames} frame(s)"
                f" of {image.rows}x{image.columns}"
            )
        return image


def _integer(view: memoryview, element: Element) -> int | None:
    """Return an US or IS value (the image attributes), None if it is neither."""
    value = view[element.value_offset : element.end]
    if element.vr == b"US" or (element.vr is None and element.tag != _NUMBER_OF_FRAMES):
        return int.from_bytes(value[:2], "little") if len(value) >= 2 else None
    try:
        return int(bytes(value).strip(b"\0 ").split(b"\\")[0])
    except ValueError:
        return None


def _encode(view: memoryview, found: Layout, image: _Image, target: str, method: str) -> Outcome:
    import imagecodecs
    import numpy as np

    start = image.pixels.value_offset
    frames = np.frombuffer(view[start : start + image.nbytes], dtype=image.dtype)
    frames = frames.reshape((image.frames, image.rows, image.columns))
    encoded: list[bytes] = []
    for frame in frames:
        if method == "jpeg-ls":
            data = imagecodecs.jpegls_encode(frame.view(f"<u{image.bits // 8}"))
            back = imagecodecs.jpegls_decode(data).view(frame.dtype)
        else:
            data = imagecodecs.htj2k_encode(frame, reversible=True)
            back = imagecodecs.htj2k_decode(data)
        if back.shape != frame.shape or not np.array_equal(back, frame):
            return AsItCame("decoding the new encoding does not give the same pixels")
        encoded.append(bytes(data))
    before: bytes | memoryview = view[found.dataset_offset : image.pixels.offset]
    after: bytes | memoryview = view[image.pixels.end :]
    if found.transfer_syntax == IMPLICIT_VR_LE:
        before, after = _explicit(before, after)
    digest = hashlib.sha256()
    with open(target, "wb") as f:
        f.write(view[: found.meta[0].offset])  # the preamble and "DICM", as they came
        f.write(_file_meta(view, found, SYNTAXES[method]))
        pieces: list[bytes | memoryview] = [before, *_encapsulated(encoded), after]
        for piece in pieces:
            digest.update(piece)
            f.write(piece)
        size = f.tell()
    return Transcoded(target, SYNTAXES[method], size, digest.hexdigest())


def _file_meta(view: memoryview, found: Layout, syntax: str) -> bytes:
    """Return the File Meta group as it came, but for the new transfer syntax and the group's
    length to match."""
    body = bytearray()
    for element in found.meta:
        if element.tag == _META_GROUP_LENGTH:
            continue
        if element.tag == _TRANSFER_SYNTAX:
            value = syntax.encode("ascii") + b"\0" * (len(syntax) % 2)
            body += struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(value)) + value
        else:
            body += view[element.offset : element.end]
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _encapsulated(fragments: Sequence[bytes]) -> list[bytes]:
    """Return encapsulated Pixel Data (PS3.5 A.4) of one fragment per frame, in pieces: the
    element's header, a Basic Offset Table (filled when there are several frames and their
    offsets fit in 32 bits), the fragments, and the sequence delimiter."""
    items = []
    offsets = []
    position = 0
    for fragment in fragments:
        padding = b"\0" * (len(fragment) % 2)
        offsets.append(position)
        items.append(struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment) + len(padding)))
        items.append(fragment + padding if padding else fragment)
        position += 8 + len(fragment) + len(padding)
    table = b""
    if len(fragments) > 1 and position <= 0xFFFFFFFF:
        table = struct.pack(f"<{len(offsets)}I", *offsets)
    return [
        struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, _UNDEFINED),
        struct.pack("<HHI", 0xFFFE, 0xE000, len(table)) + table,
        *items,
        struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
    ]


def _explicit(before: bytes | memoryview, after: bytes | memoryview) -> tuple[bytes, bytes]:
    """Re-encode the elements around the pixel data from Implicit to Explicit VR Little Endian
    (every encapsulated syntax is explicit), with pydicom's dictionary for the VRs."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset

    parsed = read_dataset(io.BytesIO(bytes(before) + bytes(after)), True, True)
    encoded = []
    for part in (before, after):
        dataset = Dataset()
        dataset.set_original_encoding(True, True)
        low, high = (0, _PIXEL_DATA) if part is before else (_PIXEL_DATA + 1, 0xFFFFFFFF)
        for element in parsed:
            if low <= element.tag < high:
                dataset.add(element)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, dataset)
        encoded.append(fp.getvalue())
    return encoded[0], encoded[1]


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
            # forkserver: never fork the agent's threads (pynetdicom, uploads) into a worker.
            # The server imports the codecs once (the first pack starts it); every worker is
            # then a cheap fork of it instead of a new interpreter importing numpy and the
            # codecs (measured: ~0.5 CPU-s per worker, 4 CPU-s/GB on a 260 MB study).
            context: Any = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(_PRELOAD)
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
