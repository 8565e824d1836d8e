"""Lossless transcoding: the pixels come back bit for bit, every other element as it came."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from agent.instance import inspect
from agent.transcode import (
    HTJ2K_LOSSLESS,
    JPEG_LS_LOSSLESS,
    AsItCame,
    Source,
    Transcoded,
    transcode_file,
)
from tests.support import datasets

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
METHODS = [("jpeg-ls", JPEG_LS_LOSSLESS), ("htj2k", HTJ2K_LOSSLESS)]


def image(
    path: Path,
    pixels: np.ndarray,
    *,
    syntax: str = ExplicitVRLittleEndian,
    bits_stored: int | None = None,
    trailing: bool = False,
) -> Path:
    """Write a grayscale image of `pixels` (frames, rows, columns) with a nested sequence and a
    private element around it; with `trailing`, an element after the pixel data too."""
    frames, rows, columns = pixels.shape
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Transcode"
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    ds.add_new(0x00091010, "LO", "PRIVATE VALUE")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    if trailing:
        ds.add_new(0xFFFCFFFC, "OB", b"\0" * 8)  # Data Set Trailing Padding
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def transcode(path: Path, method: str) -> tuple[Path, Transcoded | AsItCame]:
    target = path.with_suffix(".out")
    outcome = transcode_file(Source(str(path), str(target), inspect(path).sha256), method)
    return target, outcome


def decoded(path: Path, method: str, frames: int, dtype: np.dtype) -> list[np.ndarray]:
    data = dcmread(path).PixelData
    found = list(generate_frames(data, number_of_frames=frames))
    if method == "jpeg-ls":
        return [imagecodecs.jpegls_decode(f).view(dtype) for f in found]
    return [imagecodecs.htj2k_decode(f) for f in found]


def noisy(shape: tuple[int, ...], dtype: str, low: int, high: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=shape).astype(dtype)


@pytest.mark.parametrize(("method", "syntax"), METHODS)
def test_an_explicit_image_keeps_every_byte_but_its_pixel_data_and_syntax(
    tmp_path: Path, method: str, syntax: str
) -> None:
    pixels = noisy((1, 32, 48), "<i2", -1024, 3000)
    source = image(tmp_path / "ct.dcm", pixels, trailing=True)
    target, outcome = transcode(source, method)
    assert isinstance(outcome, Transcoded)
    assert outcome.transfer_syntax == syntax
    header = inspect(target)
    assert (header.sha256, header.size) == (outcome.sha256, outcome.size)
    before, after = source.read_bytes(), target.read_bytes()
    start = datasets.file_meta_length(source)
    end = before.index(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
    new_start = datasets.file_meta_length(target)
    assert after[new_start : new_start + end - start] == before[start:end]
    assert after.endswith(before[-20:])  # the trailing padding element, as it came
    original, rewritten = dcmread(source), dcmread(target)
    assert rewritten.file_meta.TransferSyntaxUID == syntax
    assert rewritten.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert [e.tag for e in rewritten] == [e.tag for e in original]
    (frame,) = decoded(target, method, 1, pixels.dtype)
    assert np.array_equal(frame, pixels[0])


@pytest.mark.parametrize(("method", "syntax"), METHODS)
def test_an_implicit_image_is_rewritten_explicit_with_the_same_values(
    tmp_path: Path, method: str, syntax: str
) -> None:
    pixels = noisy((1, 24, 24), "<u2", 0, 4096)
    source = image(tmp_path / "implicit.dcm", pixels, syntax=ImplicitVRLittleEndian)
    target, outcome = transcode(source, method)
    assert isinstance(outcome, Transcoded)
    original, rewritten = dcmread(source), dcmread(target)
    assert rewritten.file_meta.TransferSyntaxUID == syntax
    for element in original:
        if element.tag != 0x7FE00010:
            assert rewritten[element.tag].value == element.value
    assert len(rewritten) == len(original)
    (frame,) = decoded(target, method, 1, pixels.dtype)
    assert np.array_equal(frame, pixels[0])


@pytest.mark.parametrize(("method", "syntax"), METHODS)
def test_every_frame_of_a_multiframe_image_comes_back_with_its_offset(
    tmp_path: Path, method: str, syntax: str
) -> None:
    pixels = noisy((5, 16, 20), "<u1", 0, 256)
    source = image(tmp_path / "multi.dcm", pixels)
    target, outcome = transcode(source, method)
    assert isinstance(outcome, Transcoded)
    frames = decoded(target, method, 5, pixels.dtype)
    assert all(np.array_equal(f, p) for f, p in zip(frames, pixels, strict=True))
    # The Basic Offset Table points at each frame's item, from the first fragment's start.
    data = dcmread(target).PixelData
    (table_length,) = struct.unpack("<I", data[4:8])
    offsets = struct.unpack(f"<{table_length // 4}I", data[8 : 8 + table_length])
    first = 8 + table_length
    assert len(offsets) == 5
    for offset in offsets:
        assert data[first + offset : first + offset + 4] == struct.pack("<HH", 0xFFFE, 0xE000)


def test_unused_high_bits_come_back_as_they_were(tmp_path: Path) -> None:
    """12 bits stored in 16: whatever the sender left in the top four bits is kept too."""
    pixels = noisy((1, 16, 16), "<u2", 0, 65536)
    source = image(tmp_path / "dirty.dcm", pixels, bits_stored=12)
    target, outcome = transcode(source, "htj2k")
    assert isinstance(outcome, Transcoded)
    (frame,) = decoded(target, "htj2k", 1, pixels.dtype)
    assert np.array_equal(frame, pixels[0])


def test_pixel_data_shorter_than_its_attributes_goes_as_it_came(tmp_path: Path) -> None:
    source = image(tmp_path / "short.dcm", noisy((1, 16, 16), "<u2", 0, 100))
    ds = dcmread(source)
    ds.Rows = 32  # the attributes now promise twice the pixels there are
    ds.save_as(source, enforce_file_format=True)
    target, outcome = transcode(source, "htj2k")
    assert isinstance(outcome, AsItCame) and not outcome.changed
    assert "does not hold" in outcome.reason
    assert not target.exists()


def test_a_source_changed_since_it_was_received_is_reported_changed(tmp_path: Path) -> None:
    source = image(tmp_path / "changed.dcm", noisy((1, 8, 8), "<u2", 0, 100))
    digest = inspect(source).sha256
    data = bytearray(source.read_bytes())
    data[-1] ^= 0xFF
    source.write_bytes(bytes(data))
    outcome = transcode_file(Source(str(source), str(tmp_path / "out"), digest), "htj2k")
    assert isinstance(outcome, AsItCame) and outcome.changed


def test_an_empty_or_missing_source_is_reported_changed(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    for path in (empty, tmp_path / "missing.dcm"):
        outcome = transcode_file(Source(str(path), str(tmp_path / "out"), "0" * 64), "htj2k")
        assert isinstance(outcome, AsItCame) and outcome.changed


def test_a_real_implicit_ultrasound_transcodes_exactly(tmp_path: Path) -> None:
    (source,) = [p for p in datasets.uncompressed_files() if p.name == "gdcm-US-ALOKA-16.dcm"]
    target, outcome = transcode(source, "htj2k")
    assert isinstance(outcome, Transcoded)
    original = dcmread(source)
    (frame,) = decoded(target, "htj2k", 1, original.pixel_array.dtype)
    raw = np.frombuffer(original.PixelData, dtype=original.pixel_array.dtype)
    assert np.array_equal(frame.ravel(), raw[: frame.size])
    assert dcmread(io.BytesIO(target.read_bytes())).SOPInstanceUID == original.SOPInstanceUID
