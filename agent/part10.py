"""The head of a DICOM Part-10 file, read fast: what decides how a cached instance is sent.

Sending a cached instance (C-MOVE, C-GET) needs only a few facts from its file: the file meta's
Media Storage SOP Class and Instance UIDs and Transfer Syntax UID, the byte offset where the data
set starts (what `pynetdicom.dsutils.split_dataset` returns) and the data set's own SOP Class and
Instance UIDs (0008,0016 and 0008,0018). Reading them with pydicom (`read_file_meta_info`,
`split_dataset`, `read_partial(..., stop_when=past (0008,0018))`, several times per instance)
cost about 1 ms of CPU per instance in a warm 500-instance C-MOVE, whose GIL-bound sending path
has ~2.8 ms per instance in all. For one slice of the benchmark's 512x512 CT series (Explicit VR
Little Endian), `split_dataset` plus `read_partial` and the five UIDs decoded take ~260 us;
`read_head`, one `os.pread` of the first 8 KiB (`FIRST_READ`) and `struct`, takes ~18 us of
which ~12 us parsing: 14 times less (timeit, best of 7, warm page cache, on a loaded 2-core
machine).

The fast path reads the 128-byte preamble and `DICM`, the group 0002 elements (always Explicit
VR Little Endian; like pydicom it stops at the first tag whose group is not 0002, whatever the
group length (0002,0000) says), then the data set's elements in Implicit VR Little Endian,
Explicit VR Little Endian (and every other syntax pydicom reads as such, e.g. JPEG, JPEG-LS,
JPEG 2000, RLE) or Explicit VR Big Endian, until the first tag past (0008,0018). Values with a
defined length, sequences included, are skipped as pydicom skips them. A Deflated data set is
not read: its head gives the file meta facts and the offset only (`dataset_read` False).

Whenever the file holds anything the fast path does not read exactly as pydicom does (no
preamble or `DICM`, no Transfer Syntax UID, an undefined length, an unknown VR, a VR that
disagrees with the syntax, a command set group, a multi-valued UID, a Specific Character Set
pydicom would have to look up or correct, a file that ends before (0008,0018)'s successor,
pydicom's reading set to raise on invalid values...), `read_head` reads the file with pydicom
instead, so the result and the exceptions raised are always pydicom's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from struct import Struct
from typing import Any, BinaryIO

from pydicom import config
from pydicom.charset import default_encoding, python_encoding
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_partial, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

Source = int | str | os.PathLike[str]
"""An open file descriptor, or the path of a file."""

FIRST_READ = 8192
"""Bytes read at first: a whole head but for unusually long file meta or first elements."""
_MOST = 1024 * 1024
"""Past this many bytes of head the file is left to pydicom."""


@dataclass(frozen=True)
class Head:
    """What decides how a Part-10 file is sent. Each UID is the text pydicom reads (for a UID,
    without its padding), None when the element is absent; `offset` is where the data set
    starts. The data set's UIDs are read only if `dataset_read`: not for a Deflated data
    set, whose UIDs are then None."""

    media_sop_class: str | None
    """(0002,0002) Media Storage SOP Class UID."""
    media_sop_instance: str | None
    """(0002,0003) Media Storage SOP Instance UID."""
    transfer_syntax: str | None
    """(0002,0010) Transfer Syntax UID."""
    offset: int
    """The byte offset of the data set: of the first element past group 0002."""
    sop_class: str | None
    """(0008,0016) SOP Class UID of the data set."""
    sop_instance: str | None
    """(0008,0018) SOP Instance UID of the data set."""
    dataset_read: bool
    """False if the data set is Deflated and so was not read."""


def read_head(source: Source) -> Head:
    """Return the head of the Part-10 file at `source`: a path, or an open descriptor (read
    with `os.pread`; only if pydicom must read it is its offset moved, and then put back).
    Raise what pydicom raises reading it or decoding the UIDs (InvalidDicomError, EOFError,
    ValueError, NotImplementedError for an unknown VR...), and OSError if it cannot be read."""
    return read_fast(source) or read_by_pydicom(source)


def read_fast(source: Source) -> Head | None:
    """Return the head of the Part-10 file at `source`, read with `struct`, or None if the file
    holds anything this reading does not read exactly as pydicom does. Raise OSError if the
    file cannot be read."""
    with _descriptor(source) as fd:
        data = b""
        wanted = FIRST_READ
        while True:
            data += os.pread(fd, wanted - len(data), len(data))
            ended = len(data) < wanted  # a regular file reads short only at its end
            try:
                return _parse(data)
            except _Short as short:
                if ended or short.needed > _MOST:
                    return None  # the file ends first, or the head is huge
                wanted = min(max(short.needed, 2 * len(data)), _MOST)
            except _Unread:
                return None


def head_in(data: bytes) -> Head | None:
    """Return the head of a Part-10 file whose first bytes are `data`, read with `struct`, or
    None if they do not hold all of it or hold anything this reading leaves to pydicom."""
    try:
        return _parse(data)
    except (_Short, _Unread):
        return None


def read_by_pydicom(source: Source) -> Head:
    """Return the head of the Part-10 file at `source`, read as the sending path reads it with
    pydicom: the file meta and offset as `pynetdicom.dsutils.split_dataset` reads them, the
    data set's UIDs as `read_partial` does up to (0008,0018). Raise what pydicom raises."""
    with _binary(source) as fp:
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_past_0002)
        offset = fp.tell()
        syntax = _text(meta, "TransferSyntaxUID")
        if syntax == DeflatedExplicitVRLittleEndian:
            head = None
        else:
            fp.seek(0)
            head = read_partial(fp, stop_when=_past_sop_instance_uid)
    return Head(
        media_sop_class=_text(meta, "MediaStorageSOPClassUID"),
        media_sop_instance=_text(meta, "MediaStorageSOPInstanceUID"),
        transfer_syntax=syntax,
        offset=offset,
        sop_class=None if head is None else _text(head, "SOPClassUID"),
        sop_instance=None if head is None else _text(head, "SOPInstanceUID"),
        dataset_read=head is not None,
    )


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    return None if value is None else str(value).rstrip("\0 ")


def _past_0002(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag.group != 2)


def _past_sop_instance_uid(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag > _SOP_INSTANCE_UID)


@contextlib.contextmanager
def _descriptor(source: Source) -> Iterator[int]:
    if isinstance(source, int):
        yield source
        return
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _binary(source: Source) -> Iterator[BinaryIO]:
    """Yield `source` open for reading after its preamble and `DICM` (raising
    InvalidDicomError if they are missing, as pydicom does). A descriptor is read through a
    duplicate whose shared offset is put back afterwards."""
    if not isinstance(source, int):
        with open(source, "rb") as fp:
            read_preamble(fp, False)
            yield fp
        return
    offset = os.lseek(source, 0, os.SEEK_CUR)
    try:
        with open(os.dup(source), "rb") as fp:
            fp.seek(0)
            read_preamble(fp, False)
            yield fp
    finally:
        os.lseek(source, offset, os.SEEK_SET)


class _Short(Exception):
    """The head runs past the bytes read so far: `needed` bytes are needed."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


class _Unread(Exception):
    """The head holds something the fast path leaves to pydicom."""


_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_SPECIFIC_CHARACTER_SET = 0x00080005
_ITEM_DELIMITATION = 0xFFFEE00D
_UNDEFINED = 0xFFFFFFFF
_PREAMBLE_END = 132
_VRS = frozenset(vr.encode() for vr in VR if len(vr) == 2)
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
_Unpack = Callable[[bytes, int], tuple[Any, ...]]
_LE_IMPLICIT = Struct("<HHL").unpack_from
# (element header, 4-byte length) in Explicit VR
_LITTLE: tuple[_Unpack, _Unpack] = (Struct("<HH2sH").unpack_from, Struct("<L").unpack_from)
_BIG: tuple[_Unpack, _Unpack] = (Struct(">HH2sH").unpack_from, Struct(">L").unpack_from)
# the file meta elements kept, by element number (group 0002)
_MEDIA_SOP_CLASS, _MEDIA_SOP_INSTANCE, _TRANSFER_SYNTAX = 0x0002, 0x0003, 0x0010


def _parse(data: bytes) -> Head:
    """Return the head in `data`, the file's first bytes. Raise _Short if it runs past them,
    _Unread if it holds what is left to pydicom."""
    if config.settings.reading_validation_mode == config.RAISE:
        raise _Unread  # pydicom would raise on invalid values, which this does not check
    if len(data) < _PREAMBLE_END:
        raise _Short(_PREAMBLE_END)
    if data[128:_PREAMBLE_END] != b"DICM":
        raise _Unread
    meta, offset = _file_meta(data)
    syntax = _uid(meta.get(_TRANSFER_SYNTAX))
    if syntax is None or syntax in PrivateTransferSyntaxes:
        raise _Unread  # pydicom guesses the encoding, or takes it from its own table
    media_sop_class = _uid(meta.get(_MEDIA_SOP_CLASS))
    media_sop_instance = _uid(meta.get(_MEDIA_SOP_INSTANCE))
    if syntax == DeflatedExplicitVRLittleEndian:
        return Head(media_sop_class, media_sop_instance, syntax, offset, None, None, False)
    if syntax == ImplicitVRLittleEndian:
        found = _implicit_dataset(data, offset)
    else:
        found = _explicit_dataset(data, offset, syntax != ExplicitVRBigEndian)
    _check_character_set(found.get(_SPECIFIC_CHARACTER_SET))
    return Head(
        media_sop_class,
        media_sop_instance,
        syntax,
        offset,
        _uid(found.get(_SOP_CLASS_UID)),
        _uid(found.get(_SOP_INSTANCE_UID)),
        True,
    )


def _file_meta(data: bytes) -> tuple[dict[int, bytes], int]:
    """Return the UI values of the group 0002 elements kept, by element number, and the offset
    of the first element past the group, as pydicom's reading of the file meta finds them."""
    meta: dict[int, bytes] = {}
    position = _PREAMBLE_END
    size = len(data)
    first = True
    while True:
        tag, vr, length, start = _explicit_header(data, position, _LITTLE)
        group, element = tag >> 16, tag & 0xFFFF
        if group != 2:
            if tag == _ITEM_DELIMITATION:
                raise _Unread  # pydicom stops past it, not at it
            if first:
                raise _Unread  # no file meta: pydicom guesses the syntax
            return meta, position
        # pydicom decodes the first element to check the group is Explicit VR (or else reads
        # it again as Implicit VR), and the group length to compare it
        if first and not (
            (element == 0 and vr == b"UL" and length == 4) or (element == 1 and vr == b"OB")
        ):
            raise _Unread
        if element == 0 and not (vr == b"UL" and length == 4):
            raise _Unread
        first = False
        if vr not in _VRS or length == _UNDEFINED:
            raise _Unread
        end = start + length
        if end > size:
            raise _Short(end)
        if element in (_MEDIA_SOP_CLASS, _MEDIA_SOP_INSTANCE, _TRANSFER_SYNTAX):
            if vr != b"UI":
                raise _Unread
            meta[element] = data[start:end]
        position = end


def _implicit_dataset(data: bytes, position: int) -> dict[int, bytes]:
    """Return the values of the data set's elements kept (`_KEPT`), read in Implicit VR
    Little Endian from `position` up to the first tag past (0008,0018)."""
    _check_start(data, position, implicit=True)
    found: dict[int, bytes] = {}
    size = len(data)
    while True:
        if position + 8 > size:
            raise _Short(position + 8)
        group, element, length = _LE_IMPLICIT(data, position)
        tag = group << 16 | element
        if tag > _SOP_INSTANCE_UID:
            return found
        if length == _UNDEFINED:
            raise _Unread  # an undefined length sequence or value pydicom reads through
        end = position + 8 + length
        if end > size:
            raise _Short(end)
        if tag in _KEPT:
            found[tag] = data[position + 8 : end]
        position = end


def _explicit_dataset(data: bytes, position: int, little: bool) -> dict[int, bytes]:
    """Return the values of the data set's elements kept (`_KEPT`), read in Explicit VR
    (Little Endian if `little`, else Big Endian) from `position` up to the first tag past
    (0008,0018)."""
    _check_start(data, position, implicit=False)
    encoding = _LITTLE if little else _BIG
    found: dict[int, bytes] = {}
    size = len(data)
    while True:
        tag, vr, length, start = _explicit_header(data, position, encoding)
        if tag > _SOP_INSTANCE_UID:
            return found
        if vr not in _VRS or length == _UNDEFINED:
            raise _Unread  # pydicom reads it as Implicit VR, or reads through it
        end = start + length
        if end > size:
            raise _Short(end)
        if tag in _KEPT:
            if vr != _KEPT[tag]:
                raise _Unread  # pydicom would decode it by the VR it has
            found[tag] = data[start:end]
        position = end


def _explicit_header(
    data: bytes, position: int, encoding: tuple[_Unpack, _Unpack]
) -> tuple[int, bytes, int, int]:
    """Return the tag, VR, value length and value offset of the Explicit VR element at
    `position`, its tag and lengths unpacked by `encoding`'s (header, 4-byte length). Like
    pydicom, read the 4-byte length of a VR that has one before looking at the tag."""
    header, long_length = encoding
    start = position + 8
    if start > len(data):
        raise _Short(start)
    group, element, vr, length = header(data, position)
    if vr in _LONG_VRS:
        start += 4
        if start > len(data):
            raise _Short(start)
        (length,) = long_length(data, position + 8)
    return group << 16 | element, vr, length, start


_KEPT = {_SPECIFIC_CHARACTER_SET: b"CS", _SOP_CLASS_UID: b"UI", _SOP_INSTANCE_UID: b"UI"}
"""The data set elements kept, with the VR pydicom decodes them by."""


def _check_start(data: bytes, position: int, *, implicit: bool) -> None:
    """Raise _Unread unless the data set at `position` starts as pydicom expects of its syntax:
    not with a command set (group 0000, which pydicom reads as such), and with a first
    element whose VR field looks implicit or explicit as the syntax says (else pydicom
    switches, or stops at once)."""
    _need(data, position + 8)
    group = data[position] | data[position + 1] << 8  # pydicom reads it in Little Endian
    looks_explicit = 0x40 < data[position + 4] < 0x5B and 0x40 < data[position + 5] < 0x5B
    if group == 0 or looks_explicit == implicit:
        raise _Unread


def _check_character_set(value: bytes | None) -> None:
    """Raise _Unread unless each term of Specific Character Set `value` is one pydicom knows
    as it is: anything else pydicom corrects or looks up, and that may warn or raise."""
    if value is None:
        return
    terms = value.decode(default_encoding).rstrip(" \0").split("\\")
    if not all(term in python_encoding for term in terms):
        raise _Unread


def _uid(value: bytes | None) -> str | None:
    """Return the text pydicom reads from UI `value` (less any padding), None if absent."""
    if value is None:
        return None
    if b"\\" in value:
        raise _Unread  # several values
    # as pydicom.values.convert_UI and pydicom.uid.UID strip it, then Head's own stripping
    return value.decode(default_encoding).rstrip("\0 ").strip().rstrip("\0 ")


def _need(data: bytes, end: int) -> None:
    if end > len(data):
        raise _Short(end)
