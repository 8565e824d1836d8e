"""The fast reader of a Part-10 file's head: always what pydicom reads, mostly without pydicom.

The reference is the reading the sending path did before: `pynetdicom.dsutils.split_dataset`
for the file meta and the data set's offset, `read_partial` up to (0008,0018) for the data set's
UIDs (not for a Deflated data set).
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_partial
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom.dsutils import split_dataset

from agent.part10 import FIRST_READ, Head, read_by_pydicom, read_fast, read_head
from tests.support import datasets

Outcome = Head | type[BaseException]
"""What reading a file gives: its head, or the type of what reading it raised."""

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
# pydicom reads mutated files with many a warning; what matters here is what it returns
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def pydicom_reading(path: Path) -> Outcome:
    """Return what the sending path read with pydicom before `agent.part10` existed (pydicom
    decodes values when asked, so what decoding raises is raised here too)."""
    try:
        meta, offset = split_dataset(path)
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        head = Dataset()
        if not deflated:
            with path.open("rb") as f:
                head = read_partial(f, stop_when=_past_sop_instance_uid)
        return Head(
            media_sop_class=_text(meta.get("MediaStorageSOPClassUID")),
            media_sop_instance=_text(meta.get("MediaStorageSOPInstanceUID")),
            transfer_syntax=_text(meta.get("TransferSyntaxUID")),
            offset=offset,
            sop_class=_text(head.get("SOPClassUID")),
            sop_instance=_text(head.get("SOPInstanceUID")),
            dataset_read=not deflated,
        )
    except Exception as exc:
        return type(exc)


def _past_sop_instance_uid(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag > 0x00080018)


def _text(value: object) -> str | None:
    return None if value is None else str(value).rstrip("\0 ")


def outcome(path: Path) -> Outcome:
    try:
        return read_head(path)
    except Exception as exc:
        return type(exc)


def assert_reads_as_pydicom(path: Path) -> Head | None:
    """Assert `read_head` gives what pydicom gives for `path`, and the fast path either does too
    or leaves the file to pydicom (always, when pydicom raises). Return the fast path's head."""
    expected = pydicom_reading(path)
    assert outcome(path) == expected
    fast = read_fast(path)
    if isinstance(expected, type):
        assert fast is None
    else:
        assert fast in (None, expected)
    return fast


def shipped_files() -> list[Path]:
    """Every file pydicom and pydicom-data ship for testing, DICOM or not."""
    folders = [datasets.pydicom_data_dir(), Path(pydicom.__file__).parent / "data" / "test_files"]
    return sorted(path for folder in folders for path in folder.rglob("*") if path.is_file())


@pytest.mark.parametrize(
    "path", shipped_files(), ids=lambda path: f"{path.parent.name}/{path.name}"
)
def test_every_test_file_reads_as_pydicom_reads_it(path: Path) -> None:
    assert_reads_as_pydicom(path)


COMMON = {
    "CT_small.dcm": ExplicitVRLittleEndian,
    "MR_small_implicit.dcm": ImplicitVRLittleEndian,
    "MR_small.dcm": ExplicitVRLittleEndian,
    "MR_small_bigendian.dcm": ExplicitVRBigEndian,
    "US1_UNCI.dcm": ExplicitVRLittleEndian,
    "rtdose.dcm": ImplicitVRLittleEndian,
    "emri_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",
    "US1_J2KR.dcm": "1.2.840.10008.1.2.4.90",
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",
    "emri_small_RLE.dcm": "1.2.840.10008.1.2.5",
    "SC_rgb_jpeg_dcmtk.dcm": JPEGBaseline8Bit,
    "image_dfl.dcm": DeflatedExplicitVRLittleEndian,
}


def test_the_common_files_take_the_fast_path() -> None:
    paths = {path.name: path for path in shipped_files()}
    for name, syntax in COMMON.items():
        head = assert_reads_as_pydicom(paths[name])
        assert head is not None, name
        assert head.transfer_syntax == syntax
        assert head.dataset_read == (syntax != DeflatedExplicitVRLittleEndian)
    fast = sum(read_fast(path) is not None for path in shipped_files())
    assert fast > 0.8 * len(shipped_files())  # 215 of 245 with pydicom 3.0 and pydicom-data 1.0


def test_every_sound_file_gives_what_dcmread_reads(tmp_path: Path) -> None:
    for path in datasets.real_files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        head = read_head(path)
        assert head.media_sop_instance == ds.file_meta.MediaStorageSOPInstanceUID
        assert head.transfer_syntax == ds.file_meta.TransferSyntaxUID
        if head.dataset_read:
            assert (head.sop_class, head.sop_instance) == (ds.SOPClassUID, ds.SOPInstanceUID)
        else:
            assert head.sop_class is head.sop_instance is None


# Part-10 files written by pydicom: random UIDs, random elements before (0008,0018)

UIDS = st.from_regex(r"[1-9][0-9]{0,8}(\.(0|[1-9][0-9]{0,8})){1,8}", fullmatch=True)
CHARACTER_SETS = st.sampled_from(
    ["", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6\\ISO 2022 IR 87", "GB18030", "ISO_IR 6"]
)
WORDS = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ", max_size=20)
PRIVATE_VALUES = {
    "OB": st.binary(max_size=300),
    "UN": st.binary(max_size=300),
    "OW": st.binary(max_size=150).map(lambda b: b + b),
    "OD": st.binary(min_size=8, max_size=8),
    "OF": st.binary(min_size=4, max_size=4),
    "OL": st.binary(min_size=4, max_size=4),
    "OV": st.binary(min_size=8, max_size=8),
    "UT": WORDS,
    "UC": WORDS,
    "UR": st.just("http://example.org/a"),
    "SV": st.integers(-(2**63), 2**63 - 1),
    "UV": st.integers(0, 2**64 - 1),
    "LO": WORDS,
    "SH": WORDS.map(lambda text: text[:16]),
    "DS": st.sampled_from(["1.5", "-2", "0"]),
    "US": st.integers(0, 65535),
    "FD": st.floats(allow_nan=False),
    "UI": UIDS,
    "SQ": st.lists(st.builds(Dataset), max_size=2).map(Sequence),
}


@st.composite
def part10_datasets(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    if draw(st.booleans()):
        ds.SpecificCharacterSet = draw(CHARACTER_SETS)
    if draw(st.booleans()):
        ds.ImageType = draw(
            st.lists(st.sampled_from(["ORIGINAL", "PRIMARY", "AXIAL"]), min_size=1, max_size=3)
        )
    if draw(st.booleans()):
        ds.InstanceCreationDate = "20261206"
    if draw(st.booleans()):
        ds.InstanceCreatorUID = draw(UIDS)
    for number, vr in enumerate(
        draw(st.lists(st.sampled_from(sorted(PRIVATE_VALUES)), max_size=6))
    ):
        ds.add_new(0x00071000 + number, vr, draw(PRIVATE_VALUES[vr]))
    if draw(st.booleans()):
        ds.SOPClassUID = draw(st.one_of(st.just(CT_IMAGE), st.just(""), UIDS))
    if draw(st.booleans()):
        ds.SOPInstanceUID = draw(st.one_of(st.just(""), UIDS))
    ds.StudyInstanceUID = draw(UIDS)
    ds.PatientName = "Test^Patient"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ds.get("SOPClassUID") or CT_IMAGE)
    same = [st.just(ds.SOPInstanceUID)] if ds.get("SOPInstanceUID") else []
    meta.MediaStorageSOPInstanceUID = draw(st.one_of(UIDS, *same))
    meta.TransferSyntaxUID = draw(
        st.sampled_from(
            [
                ImplicitVRLittleEndian,
                ExplicitVRLittleEndian,
                ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian,
                JPEGBaseline8Bit,
            ]
        )
    )
    if draw(st.booleans()):
        meta.SourceApplicationEntityTitle = "MODALITY"
    if draw(st.booleans()):  # a file meta longer than the first read
        meta.PrivateInformationCreatorUID = UID(draw(UIDS))
        meta.PrivateInformation = b"\x01" * draw(st.integers(0, 3 * FIRST_READ))
    ds.file_meta = meta
    return ds


def write(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def file(tmp_path: Path) -> Path:
    return tmp_path / "head.dcm"


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(part10_datasets())
def test_a_file_pydicom_writes_reads_as_pydicom_reads_it(file: Path, ds: Dataset) -> None:
    file.write_bytes(write(ds))
    fast = assert_reads_as_pydicom(file)
    undefined_lengths = any(element.VR == "SQ" for element in ds)  # pydicom writes them so
    if not undefined_lengths:
        assert fast is not None


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(part10_datasets(), st.data())
def test_a_mutated_or_cut_file_reads_as_pydicom_reads_it_or_both_raise(
    file: Path, ds: Dataset, data: st.DataObject
) -> None:
    raw = bytearray(write(ds))
    head_end = datasets.file_meta_length(_written(file, raw)) + 400
    for _ in range(data.draw(st.integers(0, 4))):
        raw[data.draw(st.integers(0, min(head_end, len(raw) - 1)))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(raw)), st.integers(0, min(head_end, len(raw)))))
    assert_reads_as_pydicom(_written(file, raw[:cut]))


def _written(file: Path, data: bytes | bytearray) -> Path:
    file.write_bytes(bytes(data))
    return file


# Hand-made heads: what pydicom does not write itself


def explicit(tag: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    length = len(value) if length is None else length
    header = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr)
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return header + struct.pack("<HL", 0, length) + value
    return header + struct.pack("<H", length) + value


def part10(meta: bytes, *, group_length: int | None = None) -> bytes:
    length = len(meta) if group_length is None else group_length
    return b"\0" * 128 + b"DICM" + explicit(0x00020000, b"UL", struct.pack("<L", length)) + meta


META = (
    explicit(0x00020001, b"OB", b"\0\1")
    + explicit(0x00020002, b"UI", CT_IMAGE.encode())
    + explicit(0x00020003, b"UI", b"1.2.3.4\0")
    + explicit(0x00020010, b"UI", ExplicitVRLittleEndian.encode() + b"\0")
)
ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 10) + explicit(0x00100010, b"PN", b"A^B ")
SOP_UIDS = explicit(0x00080016, b"UI", CT_IMAGE.encode()) + explicit(
    0x00080018, b"UI", b"1.2.3.4\0"
)
REST = explicit(0x00100010, b"PN", b"Test^Patient") + explicit(0x7FE00010, b"OB", b"\0" * 16)


def test_a_defined_length_sequence_before_the_sop_uids_is_skipped_as_pydicom_skips_it(
    file: Path,
) -> None:
    sequence = explicit(0x00080006, b"SQ", ITEM)  # (0008,0006) Language Code Sequence
    head = assert_reads_as_pydicom(_written(file, part10(META) + sequence + SOP_UIDS + REST))
    assert head is not None
    assert (head.sop_class, head.sop_instance) == (CT_IMAGE, "1.2.3.4")


def test_an_undefined_length_sequence_before_the_sop_uids_is_left_to_pydicom(file: Path) -> None:
    delimiter = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    sequence = explicit(0x00080006, b"SQ", ITEM + delimiter, length=0xFFFFFFFF)
    assert (
        assert_reads_as_pydicom(_written(file, part10(META) + sequence + SOP_UIDS + REST)) is None
    )
    assert read_head(file).sop_instance == "1.2.3.4"


@pytest.mark.parametrize("group_length", [0, 10, len(META) - 1, len(META) + 20, 100_000])
def test_a_wrong_group_length_is_read_past_as_pydicom_reads_past_it(
    file: Path, group_length: int
) -> None:
    data = part10(META, group_length=group_length) + SOP_UIDS + REST
    head = assert_reads_as_pydicom(_written(file, data))
    assert head is not None
    assert head.offset == 132 + 12 + len(META)


@pytest.mark.parametrize("value", [b"", b"\1\0", b"\1\0\0", b"\1\0\0\0\0"])
@pytest.mark.parametrize("first", [True, False])
def test_a_group_length_of_another_size_reads_or_raises_as_pydicom(
    file: Path, value: bytes, first: bool
) -> None:
    """pydicom decodes (0002,0000) wherever it is, and raises unless it is empty or 4 bytes."""
    group_length = explicit(0x00020000, b"UL", value)
    meta = group_length + META if first else META[:14] + group_length + META[14:]
    assert_reads_as_pydicom(_written(file, b"\0" * 128 + b"DICM" + meta + SOP_UIDS + REST))


def test_uid_padding_is_stripped_as_pydicom_strips_it(file: Path) -> None:
    uids = explicit(0x00080016, b"UI", b"1.2.840 \0") + explicit(0x00080018, b"UI", b"1.2.3\0\0\0")
    head = assert_reads_as_pydicom(_written(file, part10(META) + uids + REST))
    assert head is not None
    assert (head.sop_class, head.sop_instance) == ("1.2.840", "1.2.3")


def test_an_empty_or_absent_uid_is_told_apart(file: Path) -> None:
    uids = explicit(0x00080018, b"UI", b"")
    head = assert_reads_as_pydicom(_written(file, part10(META) + uids + REST))
    assert head is not None
    assert (head.sop_class, head.sop_instance) == (None, "")


def test_a_file_without_dicm_raises_as_pydicom_does(file: Path) -> None:
    _written(file, b"\0" * 200)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        read_head(file)


def test_a_descriptor_reads_as_its_path_and_keeps_its_offset(file: Path) -> None:
    delimiter = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    slow = explicit(0x00080006, b"SQ", ITEM + delimiter, length=0xFFFFFFFF)
    for data in (part10(META) + SOP_UIDS + REST, part10(META) + slow + SOP_UIDS + REST):
        _written(file, data)
        fd = os.open(file, os.O_RDONLY)
        try:
            os.lseek(fd, 7, os.SEEK_SET)
            assert read_head(fd) == read_head(file) == read_by_pydicom(fd)
            assert os.lseek(fd, 0, os.SEEK_CUR) == 7
        finally:
            os.close(fd)


def test_a_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_head(tmp_path / "absent.dcm")
