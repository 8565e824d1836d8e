"""DICOM test data: real files from pydicom-data and deterministic synthetic ones.

The pydicom-data wheel installs its files as the module `data_store`, in
`data_store/data`. Several of them are one SOP instance in different encodings
(e.g. `693_UNCI.dcm`, `693_UNCR.dcm`, `693_J2KR.dcm`), and a few are broken on
purpose, which makes them good bad input.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

# pydicom's UID root: the synthetic data is test data made with pydicom.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MULTIFRAME_WORD_SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.3")
UNCOMPRESSED = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian})
_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1."
_INSTANCE_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def pydicom_data_dir() -> Path:
    """Return the directory of the pydicom-data files (module `data_store`)."""
    import data_store  # the pydicom-data wheel; its import name differs from its name

    return Path(data_store.__file__).parent / "data"


def _problem(path: Path) -> str | None:
    """Return why `path` is not a sound Part-10 storage instance, or None if it is."""
    try:
        with warnings.catch_warnings():
            # pydicom warns (rather than fails) on invalid values and truncation.
            warnings.simplefilter("error")
            ds = pydicom.dcmread(path)
            for element in ds.iterall():
                _ = element.value  # decode every raw element now, not lazily
    except (InvalidDicomError, UserWarning, ValueError, EOFError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    sop_class = str(ds.get("SOPClassUID", ""))
    if not sop_class.startswith(_STORAGE_PREFIX):
        return f"not a storage SOP class: {sop_class!r}"
    for keyword in _INSTANCE_UIDS:
        value = ds.get(keyword)
        if not value or not UID(str(value)).is_valid:
            return f"{keyword} missing or invalid: {value!r}"
    if ds.file_meta.get("MediaStorageSOPInstanceUID") != ds.SOPInstanceUID:
        return "file meta SOP Instance UID differs from the dataset's"
    return None


@functools.cache
def _classified() -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    good: list[Path] = []
    bad: list[Path] = []
    for path in sorted(pydicom_data_dir().glob("*.dcm")):
        (bad if _problem(path) else good).append(path)
    return tuple(good), tuple(bad)


def real_files() -> list[Path]:
    """Return the pydicom-data files that are sound DICOM Part-10 storage instances.

    A file qualifies when pydicom reads it strictly (File Meta and 'DICM'
    prefix present; every element decodes with warnings treated as errors, so
    truncated files and invalid values fail), its SOP Class is a storage class
    (1.2.840.10008.5.1.4.1.1.*), its SOP Instance, Study and Series Instance
    UIDs are present and valid UIDs, and the File Meta names the same SOP
    instance. That keeps CT, MR, US, CR, secondary captures, segmentations and
    enhanced multi-frames in many transfer syntaxes (uncompressed little and
    big endian, RLE, JPEG, JPEG-LS, JPEG 2000).

    Some of these are the same SOP instance in different encodings.
    """
    return list(_classified()[0])


def broken_files() -> list[Path]:
    """Return the pydicom-data files that fail `real_files()`' checks.

    With pydicom-data 1.0 these are `OT-PAL-8-face.dcm` (no File Meta, not
    Part-10), `emri_small_jpeg_2k_lossless_too_short.dcm` (truncated) and
    `bad_sequence.dcm` (hashes instead of UIDs; File Meta and dataset disagree).
    """
    return list(_classified()[1])


def transfer_syntax(path: Path) -> UID:
    """Return the Transfer Syntax UID from a Part-10 file's meta information."""
    meta = pydicom.filereader.read_file_meta_info(path)
    return UID(meta.TransferSyntaxUID)


def uncompressed_files() -> list[Path]:
    """Return `real_files()` in an uncompressed transfer syntax (what storescu can send)."""
    return [p for p in real_files() if transfer_syntax(p) in UNCOMPRESSED]


def distinct_instances(paths: list[Path]) -> list[Path]:
    """Return `paths` keeping only the first file of each SOP Instance UID."""
    seen: set[str] = set()
    kept: list[Path] = []
    for path in paths:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            kept.append(path)
    return kept


_LONG_VRS = frozenset(
    {
        b"OB",
        b"OD",
        b"OF",
        b"OL",
        b"OV",
        b"OW",
        b"SQ",
        b"SV",
        b"UC",
        b"UN",
        b"UR",
        b"UT",
        b"UV",
    }
)


def file_meta_length(path: Path) -> int:
    """Return the byte offset where a Part-10 file's dataset starts (after group 0002).

    The File Meta group is always Explicit VR Little Endian; its elements are
    walked one by one rather than trusting (0002,0000), which some writers omit.
    Raise ValueError if the file is not Part-10.
    """
    with path.open("rb") as f:
        return _meta_length(f, str(path))


def _meta_length(f: BinaryIO, name: str) -> int:
    head = f.read(132)
    if len(head) != 132 or head[128:] != b"DICM":
        raise ValueError(f"{name}: no DICM prefix, not a Part-10 file")
    offset = 132
    while True:
        header = f.read(8)
        if len(header) < 8:
            return offset
        group, _element = struct.unpack("<HH", header[:4])
        if group != 0x0002:
            return offset
        vr = header[4:6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack("<I", f.read(4))
            size = 12 + length
        else:
            (length,) = struct.unpack("<H", header[6:8])
            size = 8 + length
        offset += size
        f.seek(offset)


def dataset_digest(part10: bytes) -> str:
    """Return what `dataset_sha256` returns for a file holding `part10`."""
    offset = _meta_length(io.BytesIO(part10), "<bytes>")
    return hashlib.sha256(part10[offset:]).hexdigest()


def dataset_sha256(path: Path) -> str:
    """Return the sha256 (hex) of everything after the File Meta group of a Part-10 file.

    Receivers rewrite the File Meta (implementation UID, source AE …), so this
    is how a test compares what was sent with what was stored.
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(file_meta_length(path))
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# Synthetic CT ------------------------------------------------------------------------


@functools.cache
def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return x², (y + 0.05)² and the fixed HU (spine, table, outside the FOV; NaN elsewhere)."""
    y, x = np.ogrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : cols * 1j]
    fixed = np.full((rows, cols), np.nan, dtype=np.float32)
    fixed[(np.abs(y - 0.62) < 0.02) & (np.abs(x) < 0.85)] = 200.0  # patient table
    fixed[(x / 0.09) ** 2 + ((y - 0.3) / 0.09) ** 2 <= 1.0] = 700.0  # spine
    fixed[x**2 + y**2 > 1.0] = -2048.0  # outside the reconstruction circle
    abs_x = np.abs(x).astype(np.float32)
    return abs_x, ((y + 0.05) ** 2).astype(np.float32), fixed


def _phantom_hu(rows: int, cols: int, z: float, rng: np.random.Generator) -> np.ndarray:
    """Return one axial slice (HU, int16) of a body-like phantom at relative height z in [0, 1].

    An elliptical body of soft tissue whose size varies with z, two lungs,
    a spine, a patient table, Gaussian noise, and -2048 HU outside the
    reconstruction circle: compresses about as well as a real CT slice
    (zlib ≈ 2.6:1).
    """
    abs_x, y2, fixed = _grid(rows, cols)
    bulge = 1.0 + 0.08 * math.sin(math.pi * z)
    body = (abs_x / (0.72 * bulge)) ** 2 + y2 / (0.5 * bulge) ** 2 <= 1.0
    lung_size = max(0.22 * math.sin(math.pi * min(1.0, z * 1.4)), 1e-3)
    lungs = ((abs_x - 0.33) / lung_size) ** 2 + y2 / 0.09 <= 1.0
    hu = np.where(body, np.where(lungs, -850.0, 40.0), -1000.0).astype(np.float32)
    noise = rng.standard_normal((rows, cols), dtype=np.float32)
    noise *= np.where(body, np.float32(18.0), np.float32(6.0))
    hu += noise
    hu = np.where(np.isnan(fixed), hu, fixed)
    return np.rint(hu).astype(np.int16)


def _ct_template(rows: int, cols: int, seed: int) -> Dataset:
    uid = functools.partial(generate_uid, prefix=UID_PREFIX)
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyInstanceUID = uid(entropy_srcs=["dirigo-ct", str(seed), "study"])
    ds.SeriesInstanceUID = uid(entropy_srcs=["dirigo-ct", str(seed), "series"])
    ds.FrameOfReferenceUID = uid(entropy_srcs=["dirigo-ct", str(seed), "frame"])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"ACC{seed:06d}"
    ds.Modality = "CT"
    ds.Manufacturer = "Dirigo synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST ABDOMEN (synthetic)"
    ds.SeriesDescription = "AXIAL 1.0 mm"
    ds.PatientName = f"Synthetic^Patient{seed}"
    ds.PatientID = f"SYN{seed:06d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _slice_name(index: int) -> str:
    return f"CT{index + 1:04d}.dcm"


def ct_series(
    out_dir: Path, slices: int = 500, rows: int = 512, cols: int = 512, seed: int = 0
) -> list[Path]:
    """Write a deterministic synthetic CT series into `out_dir` and return its files in order.

    One study, one series, Explicit VR Little Endian, 16-bit signed
    MONOCHROME2 in HU, one file per slice (`CT0001.dcm` …) with its own
    InstanceNumber, ImagePositionPatient and SliceLocation. UIDs derive from
    `seed`. If `out_dir` already holds the complete series for the same
    parameters (recorded in `series.json`, written last), return it as is.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"slices": slices, "rows": rows, "cols": cols, "seed": seed, "version": 1}
    manifest = out_dir / "series.json"
    paths = [out_dir / _slice_name(i) for i in range(slices)]
    if _complete(manifest, params, paths):
        return paths
    manifest.unlink(missing_ok=True)
    for stale in out_dir.glob("CT[0-9][0-9][0-9][0-9].dcm"):
        stale.unlink()

    ds = _ct_template(rows, cols, seed)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    rng = np.random.default_rng(seed)
    for i, path in enumerate(paths):
        z = -float(i)  # 1 mm slices, head first, going down
        sop_uid = generate_uid(UID_PREFIX, entropy_srcs=["dirigo-ct", str(seed), "sop", str(i)])
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-179.2, -179.2, z]
        ds.SliceLocation = str(z)
        pixels = _phantom_hu(rows, cols, i / max(slices - 1, 1), rng)
        ds.PixelData = pixels.tobytes()
        ds.save_as(path, enforce_file_format=True)
    sizes = {p.name: p.stat().st_size for p in paths}
    manifest.write_text(json.dumps({"params": params, "sizes": sizes}))
    return paths


def _complete(manifest: Path, params: dict[str, int], paths: list[Path]) -> bool:
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("params") != params:
        return False
    sizes = recorded.get("sizes", {})
    return all(p.is_file() and p.stat().st_size == sizes.get(p.name) for p in paths)


# One large instance ------------------------------------------------------------------


def large_instance(path: Path, size_bytes: int, seed: int = 0) -> Path:
    """Write one valid multi-frame instance of about `size_bytes` to `path`; return `path`.

    A Multi-frame Grayscale Word Secondary Capture (512 x 512, 16-bit, Explicit
    VR Little Endian) with as many frames as fit. The header is written with
    pydicom; the Pixel Data element header and the frames follow, one frame at
    a time, so memory use stays at a few frames whatever the size.
    """
    rows = cols = 512
    frame_bytes = rows * cols * 2
    frames = max(1, (size_bytes - 2048) // frame_bytes)
    if frames * frame_bytes >= 0xFFFFFFFE:
        raise ValueError(f"{size_bytes} bytes do not fit one Pixel Data element")
    uid = functools.partial(generate_uid, prefix=UID_PREFIX)
    ds = Dataset()
    ds.SOPClassUID = MULTIFRAME_WORD_SC_STORAGE
    ds.SOPInstanceUID = uid(entropy_srcs=["dirigo-large", str(seed), str(size_bytes)])
    ds.StudyInstanceUID = uid(entropy_srcs=["dirigo-large", str(seed), "study"])
    ds.SeriesInstanceUID = uid(entropy_srcs=["dirigo-large", str(seed), "series"])
    ds.PatientName = f"Synthetic^Large{seed}"
    ds.PatientID = f"LRG{seed:06d}"
    ds.StudyDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.ContentTime = "101500"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    ds.FrameTime = "100"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)  # everything before (7FE0,0010)
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame_bytes))
        for frame in _large_frames(frames, rows, cols, seed):
            f.write(frame)
    return path


def _large_frames(frames: int, rows: int, cols: int, seed: int) -> Iterator[bytes]:
    rng = np.random.default_rng(seed)
    for i in range(frames):
        hu = _phantom_hu(rows, cols, (i % 200) / 199, rng)
        yield np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype("<u2").tobytes()
