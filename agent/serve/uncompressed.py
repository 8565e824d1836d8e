"""An instance rewritten in an uncompressed syntax, file to file, a frame at a time.

A destination that did not accept the syntax an instance is held in gets it in Explicit or
Implicit VR Little Endian: decompressed when it is held losslessly compressed, re-encoded
between the two when it is held uncompressed in the other. pydicom's way holds the whole
instance in memory, and the C-STORE then encodes it again (a 1 GiB tomosynthesis instance cost
3 GB). Here the data set's other elements are read with their large values left in the file,
written anew in the target syntax, and the pixel data follows: decoded frame by frame from the
source file (only one frame in memory), or copied block by block. The result is the file
pydicom's `decompress` would write (the same elements, the image pixel module updated the same
way, the SOP Instance UID kept), and it is sent from its file like any other.

What this path does not rewrite exactly (a big-endian source, no Pixel Data, elements after
it, Bits Allocated other than 8, 16 or 32, more than 4 GiB of pixels) raises `Unstreamable`:
the caller then takes pydicom's way, in memory.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from agent.serve import codecs

DEFER_SIZE = 64 * 1024
"""Values larger than this stay in the source file until written."""
BLOCK = 1024 * 1024
"""Bytes copied at a time from an uncompressed source's pixel data."""
TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
"""The syntaxes an instance is rewritten in, the preferred first."""

_PIXEL_DATA = 0x7FE00010
_TRAILING_PADDING = 0xFFFCFFFC
_OFFSET_TABLES = (0x7FE00001, 0x7FE00002)
"""Extended Offset Table and its lengths: they index compressed frames only."""
_MOST = 2**32 - 2
"""The longest pixel data a defined length can hold (PS3.5 7.1.1), even."""


class Unstreamable(ValueError):
    """The instance holds something this path does not rewrite exactly."""


def write_uncompressed(source: Path, syntax: str, out: BinaryIO) -> None:
    """Write into `out` the Part-10 file of the instance at `source` in `syntax` (one of
    TARGETS), never more than a frame of its pixels in memory. Raise Unstreamable if this path
    does not rewrite it (see the module), what pydicom or a codec raises for data that does not
    read or decode (the instance's failure), OSError if reading or writing fails."""
    if syntax not in TARGETS:
        raise ValueError(f"{syntax} is not a syntax instances are rewritten in")
    ds = pydicom.dcmread(source, defer_size=DEFER_SIZE)
    held = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    pixels = ds.get_item(_PIXEL_DATA, keep_deferred=True) if _PIXEL_DATA in ds else None
    _check(ds, held, pixels)
    assert isinstance(pixels, RawDataElement)
    bits = int(ds.BitsAllocated)
    vr = b"OB" if bits <= 8 else b"OW"
    with _pixel_data(source, pixels) as (f, length):
        if held.is_compressed:
            opts = as_pixel_options(ds, transfer_syntax_uid=held, as_rgb=False)
            opts.update(pixel_keyword="PixelData", pixel_vr=pixels.VR or "OB")
            _without_pixels(ds)
            _decoded(ds, get_decoder(held).iter_array(f, validate=True, **opts), syntax, vr, out)
        else:
            _without_pixels(ds)
            _header(ds, syntax, (pixels.VR or vr.decode()).encode(), length, out)
            _copy(f, length, out)
            if length % 2:
                out.write(b"\0")
    out.flush()


@contextlib.contextmanager
def _pixel_data(source: Path, pixels: RawDataElement) -> Iterator[tuple[BinaryIO, int]]:
    """Yield the Pixel Data's value as a stream at its start, with its length: read from the
    file where it was left, from memory where it was small enough to be read with the rest."""
    if pixels.value is not None:
        value = bytes(pixels.value)
        yield io.BytesIO(value), len(value)
        return
    with source.open("rb") as f:
        f.seek(pixels.value_tell)
        yield f, int(pixels.length)


def target_syntax(accepted: frozenset[str]) -> str | None:
    """Return the syntax to rewrite an instance in for a destination that accepted `accepted`
    (for its SOP class), None if it accepted neither."""
    return next((syntax for syntax in TARGETS if syntax in accepted), None)


def _check(ds: Dataset, held: UID, pixels: Any) -> None:
    if not held or not held.is_little_endian or held.is_deflated:
        raise Unstreamable(f"held in {held.name or 'no syntax'}")
    if not isinstance(pixels, RawDataElement):
        raise Unstreamable("no Pixel Data")
    tags = ds.keys()
    if any(int(tag) > _PIXEL_DATA and int(tag) != _TRAILING_PADDING for tag in tags):
        raise Unstreamable("elements after the Pixel Data")
    if ds.get("BitsAllocated") not in (8, 16, 32):
        raise Unstreamable(f"Bits Allocated {ds.get('BitsAllocated')}")
    if held.is_compressed:
        codecs.register()


def _without_pixels(ds: Dataset) -> None:
    for tag in (_PIXEL_DATA, _TRAILING_PADDING, *_OFFSET_TABLES):
        if tag in ds:
            del ds[tag]


def _decoded(ds: Dataset, frames: Any, syntax: str, vr: bytes, out: BinaryIO) -> None:
    """Write the header and the decoded frames, updating the image pixel module from what the
    decoder says of its frames, as pydicom's `decompress` does."""
    first, image_pixel = next(frames)
    frame = _bytes_of(first)
    count = int(ds.get("NumberOfFrames") or 1)
    length = len(frame) * count
    if length > _MOST:
        raise Unstreamable("more pixel data than a defined length holds")
    ds.PhotometricInterpretation = image_pixel["photometric_interpretation"]
    if int(image_pixel["samples_per_pixel"]) > 1:
        ds.PlanarConfiguration = int(image_pixel["planar_configuration"])
    if "NumberOfFrames" in ds or count > 1:
        ds.NumberOfFrames = count
    _header(ds, syntax, vr, length, out)
    out.write(frame)
    written, size = 1, len(frame)
    for array, _ in frames:
        frame = _bytes_of(array)
        if written == count or len(frame) != size:
            raise ValueError("the frames do not match the image's size or count")
        out.write(frame)
        written += 1
    if written != count:
        raise ValueError(f"the pixel data holds {written} frames, not {count}")
    if length % 2:
        out.write(b"\0")


def _bytes_of(array: Any) -> memoryview:
    """Return a frame's bytes in C order, without a copy where the array is already so laid
    out (each copy of a tomosynthesis frame is 10 MB)."""
    return np.ascontiguousarray(array).data.cast("B")


def _header(ds: Dataset, syntax: str, vr: bytes, length: int, out: BinaryIO) -> None:
    """Write the file's preamble, file meta and data set but its pixel data, in `syntax`, then
    the Pixel Data element's tag and length (of `length` bytes, padded to even)."""
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    implicit = syntax == ImplicitVRLittleEndian
    pydicom.dcmwrite(out, ds, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    even = length + length % 2
    if implicit:
        out.write(struct.pack("<HHI", 0x7FE0, 0x0010, even))
    else:
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, even))


def _copy(source: BinaryIO, length: int, out: BinaryIO) -> None:
    left = length
    while left > 0:
        block = source.read(min(left, BLOCK))
        if not block:
            raise EOFError(f"the pixel data ends {left} bytes early")
        out.write(block)
        left -= len(block)
