"""The instance checker: whole, well-formed instances pass; every kind of broken input is named."""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from agent import instance
from agent.instance import InvalidInstance, Problem, inspect

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BROKEN = ("bad_sequence.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm", "OT-PAL-8-face.dcm")


def make_dataset(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Patient"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 16
    ds.PixelData = bytes(range(32))
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def write(path: Path, ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def dataset_offset(data: bytes) -> int:
    (group_length,) = struct.unpack("<I", data[140:144])
    return 144 + group_length


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_whole_instance_passes_with_its_uids_and_dataset_hash(
    tmp_path: Path, syntax: str
) -> None:
    ds = make_dataset()
    path = write(tmp_path / "a.dcm", ds, syntax)
    header = inspect(path, ds.SOPInstanceUID)
    data = path.read_bytes()
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.study_uid == ds.StudyInstanceUID
    assert header.series_uid == ds.SeriesInstanceUID
    assert header.sop_class_uid == CT_IMAGE
    assert header.transfer_syntax == syntax
    assert header.size == len(data)
    assert header.sha256 == hashlib.sha256(data[dataset_offset(data) :]).hexdigest()


def test_every_valid_pydicom_data_file_passes() -> None:
    data_store = pytest.importorskip("data_store")
    folder = Path(data_store.__file__).parent / "data"
    broken = set(BROKEN)
    files = [p for p in sorted(folder.glob("*.dcm")) if p.name not in broken]
    assert len(files) > 50
    for path in files:
        assert inspect(path).sop_instance_uid


def test_the_deliberately_broken_pydicom_data_files_are_refused() -> None:
    data_store = pytest.importorskip("data_store")
    folder = Path(data_store.__file__).parent / "data"
    for name in BROKEN:
        with pytest.raises(InvalidInstance):
            inspect(folder / name)


def test_a_truncated_instance_is_malformed(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm", make_dataset())
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(InvalidInstance) as err:
        inspect(path)
    assert err.value.problem is Problem.MALFORMED


def test_an_absurd_element_length_is_malformed_without_reading_it(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm", make_dataset())
    absurd = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, 0xFFFFFFF0) + b"abc"
    path.write_bytes(path.read_bytes() + absurd)
    tracemalloc.start()
    with pytest.raises(InvalidInstance) as err:
        inspect(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert err.value.problem is Problem.MALFORMED
    assert "claims 4294967280 bytes" in err.value.detail
    assert peak < 2_000_000


def nested_sequences(depth: int) -> bytes:
    open_one = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    open_one += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close_one = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return open_one * depth + close_one * depth


def test_sequences_nested_hundreds_deep_are_malformed_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm", make_dataset(PixelData=None))
    path.write_bytes(path.read_bytes() + nested_sequences(500))
    with pytest.raises(InvalidInstance) as err:
        inspect(path)
    assert "nested too deep" in err.value.detail


def test_reasonably_nested_sequences_pass(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm", make_dataset(PixelData=None))
    path.write_bytes(path.read_bytes() + nested_sequences(20))
    assert inspect(path).sop_class_uid == CT_IMAGE


def test_defined_length_sequences_are_walked(tmp_path: Path) -> None:
    inner = Dataset()
    inner.CodeValue = "T-D0050"
    ds = make_dataset()
    ds.AnatomicRegionSequence = Sequence([inner, inner])
    path = write(tmp_path / "a.dcm", ds)
    assert inspect(path).sop_instance_uid == ds.SOPInstanceUID


def test_missing_uids_are_named(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm", make_dataset(SOPInstanceUID="1.2.3", StudyInstanceUID=None))
    data = path.read_bytes()
    # Drop the dataset's SOP Instance UID element; the file meta keeps its own copy.
    element = struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", 6) + b"1.2.3\0"
    path.write_bytes(
        data[: dataset_offset(data)] + data[dataset_offset(data) :].replace(element, b"")
    )
    with pytest.raises(InvalidInstance) as err:
        inspect(path)
    assert err.value.problem is Problem.MISSING_UID
    assert "sop_instance_uid" in err.value.detail and "study_uid" in err.value.detail


def test_a_sop_instance_uid_unlike_the_request_is_a_mismatch(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm", make_dataset())
    with pytest.raises(InvalidInstance) as err:
        inspect(path, expected_sop_instance_uid="1.2.3.4")
    assert err.value.problem is Problem.UID_MISMATCH


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_uid_that_could_traverse_paths_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm", make_dataset(StudyInstanceUID="1.2/../../etc"))
    with pytest.raises(InvalidInstance) as err:
        inspect(path)
    assert err.value.problem is Problem.MISSING_UID


def test_an_invalid_vr_is_malformed(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm", make_dataset())
    path.write_bytes(path.read_bytes() + struct.pack("<HH2sH", 0x0009, 0x1010, b"ZZ", 2) + b"ab")
    with pytest.raises(InvalidInstance, match="invalid VR"):
        inspect(path)


def test_a_file_without_the_dicm_prefix_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"\0" * 200)
    with pytest.raises(InvalidInstance, match="DICM"):
        inspect(path)


def test_a_deflated_instance_is_inflated_and_checked(tmp_path: Path) -> None:
    ds = make_dataset()
    path = write(tmp_path / "a.dcm", ds, DeflatedExplicitVRLittleEndian)
    assert inspect(path).sop_instance_uid == ds.SOPInstanceUID


def test_a_deflate_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instance, "MAX_INFLATED_BYTES", 1_000_000)
    path = write(tmp_path / "a.dcm", make_dataset(), DeflatedExplicitVRLittleEndian)
    data = path.read_bytes()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(b"\0" * 5_000_000) + compressor.flush()
    path.write_bytes(data[: dataset_offset(data)] + bomb)
    with pytest.raises(InvalidInstance, match=r"too large|VR|truncated|claims"):
        inspect(path)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_any_corruption_is_either_accepted_or_named_never_a_crash(
    tmp_path: Path, data: st.DataObject
) -> None:
    buffer = io.BytesIO()
    # Fixed UIDs: hypothesis needs the same input size on every run to replay a failure.
    ds = make_dataset(
        SOPInstanceUID="1.2.3.4", StudyInstanceUID="1.2.3.5", SeriesInstanceUID="1.2.3.6"
    )
    ds.AnatomicRegionSequence = Sequence([Dataset()])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dcmwrite(buffer, ds, enforce_file_format=True)
    raw = bytearray(buffer.getvalue())
    start = dataset_offset(bytes(raw))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(start, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(start, len(raw)))
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(bytes(raw[:cut]))
    with contextlib.suppress(InvalidInstance):
        inspect(path)


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
)
def test_a_file_cut_at_any_byte_passes_or_is_named_never_a_crash(
    tmp_path: Path, syntax: str
) -> None:
    data = write(tmp_path / "a.dcm", make_dataset(), syntax).read_bytes()
    path = tmp_path / "cut.dcm"
    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        with contextlib.suppress(InvalidInstance):
            inspect(path)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_any_corruption_of_the_file_meta_is_named_never_a_crash(
    tmp_path: Path, data: st.DataObject
) -> None:
    ds = make_dataset(
        SOPInstanceUID="1.2.3.4", StudyInstanceUID="1.2.3.5", SeriesInstanceUID="1.2.3.6"
    )
    raw = bytearray(write(tmp_path / "a.dcm", ds).read_bytes())
    meta_end = dataset_offset(bytes(raw))
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(128, meta_end - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(128, len(raw)))
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(bytes(raw[:cut]))
    with contextlib.suppress(InvalidInstance):
        inspect(path)
    with path.open("rb") as f, contextlib.suppress(InvalidInstance, ValueError):
        instance.layout(f, len(raw[:cut]), {0x00080018})
