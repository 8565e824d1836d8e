"""Check one DICOM Part-10 file before Dirigo acknowledges it.

pydicom is lenient by design: it reads truncated files, seeks past element lengths that run
beyond the end of the file, and recurses once per nested sequence (so a few hundred levels raise
RecursionError). A gateway that acknowledges data to a PACS must instead prove the structure is
whole. This module walks the element headers iteratively, checking every length against its
enclosing container, bounding the nesting depth and the inflated size of deflated datasets, and
never reading a value it does not need: memory stays flat whatever the file claims. Pixel data and
other values are skipped, not decoded.
"""

from __future__ import annotations

import hashlib
import re
import struct
import tempfile
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

MAX_SEQUENCE_DEPTH = 64
"""Deepest sequence nesting accepted. Real structured reports stay well below this."""

MAX_INFLATED_BYTES = 2 * 1024**3
"""Largest dataset a Deflated Explicit VR Little Endian file may inflate to (a zip-bomb guard)."""

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"

_PREAMBLE = 128
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_TRANSFER_SYNTAX = 0x00020010
_MEDIA_SOP_INSTANCE = 0x00020003
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_VALID_VRS = _LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)
_UID_TAGS = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
}
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


class Problem(StrEnum):
    """Why an instance cannot be accepted; each maps to one DIMSE failure status."""

    MALFORMED = "malformed"
    MISSING_UID = "missing-uid"
    UID_MISMATCH = "uid-mismatch"


class InvalidInstance(Exception):
    """The file is not a whole, well-formed instance; `problem` says which kind of wrong."""

    def __init__(self, problem: Problem, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


@dataclass(frozen=True)
class InstanceHeader:
    """What Dirigo records about a checked instance. UIDs only: no patient data."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    size: int
    sha256: str
    """sha256 of everything after the File Meta group: the dataset as the sender encoded it."""


@dataclass(frozen=True)
class Element:
    """Where one element sits in a file: its header at `offset`, its value at `value_offset`."""

    tag: int
    vr: bytes | None
    """None in Implicit VR datasets."""
    offset: int
    value_offset: int
    length: int
    """0xFFFFFFFF: undefined (a sequence, or encapsulated pixel data)."""

    @property
    def end(self) -> int:
        return self.value_offset + self.length


@dataclass(frozen=True)
class Layout:
    """Where a Part-10 file's parts are: its File Meta elements in order, where the dataset
    starts, and the top-level elements asked for."""

    transfer_syntax: str
    meta: tuple[Element, ...]
    dataset_offset: int
    elements: dict[int, Element]


@dataclass
class _Frame:
    kind: str  # "dataset" | "item" | "sequence" | "fragments"
    end: int | None  # None while undefined length (closed by a delimiter)
    limit: int  # no element inside may reach past this offset
    implicit: bool


def inspect(path: Path, expected_sop_instance_uid: str | None = None) -> InstanceHeader:
    """Given a Part-10 file, check its structure and return its identifying UIDs and dataset hash.

    Raise InvalidInstance if it is truncated or malformed, lacks a required UID, or its SOP Instance
    UID differs from `expected_sop_instance_uid` (the one the C-STORE request announced).
    """
    size = path.stat().st_size
    with path.open("rb", buffering=64 * 1024) as f:
        transfer_syntax, meta_uid, offset = _read_meta(f, size)
        uids = _walk_dataset(f, offset, size, transfer_syntax)
    with path.open("rb") as data:
        data.seek(offset)
        sha256 = hashlib.file_digest(data, "sha256").hexdigest()
    missing = [name for name in _UID_TAGS.values() if name not in uids]
    if missing:
        raise InvalidInstance(Problem.MISSING_UID, f"dataset has no {', '.join(missing)}")
    expected = expected_sop_instance_uid or meta_uid
    if expected and uids["sop_instance_uid"] != expected.rstrip("\0 "):
        raise InvalidInstance(
            Problem.UID_MISMATCH,
            f"SOP Instance UID in the dataset ({uids['sop_instance_uid']}) "
            f"differs from the one announced ({expected})",
        )
    return InstanceHeader(transfer_syntax=transfer_syntax, size=size, sha256=sha256, **uids)


def layout(f: BinaryIO, size: int, tags: Collection[int]) -> Layout:
    """Given a Part-10 file (any seekable binary file object, an mmap too), check its structure
    as `inspect` does and return where its File Meta elements and its top-level `tags` are.

    Raise InvalidInstance if it is malformed; ValueError for a deflated dataset, whose element
    positions are not positions in the file.
    """
    meta, dataset = _meta_elements(f, size)
    transfer_syntax = _meta_uids(f, meta)[0]
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
        raise ValueError("a deflated dataset has no element positions in its file")
    elements: dict[int, Element] = {}
    _walk(f, dataset, size, transfer_syntax, (frozenset(tags), elements))
    return Layout(transfer_syntax, tuple(meta), dataset, elements)


def dataset_offset(f: BinaryIO, size: int) -> int:
    """Return where the dataset starts in a Part-10 file (after its File Meta group), the
    start of what `InstanceHeader.sha256` covers. Raise InvalidInstance if the meta is bad."""
    return _read_meta(f, size)[2]


def _read_meta(f: BinaryIO, size: int) -> tuple[str, str | None, int]:
    """Return (transfer syntax, media SOP Instance UID, dataset offset) from the File Meta."""
    meta, dataset = _meta_elements(f, size)
    return (*_meta_uids(f, meta), dataset)


def _meta_elements(f: BinaryIO, size: int) -> tuple[list[Element], int]:
    """Return the File Meta elements (always Explicit VR Little Endian) and where they end."""
    f.seek(_PREAMBLE)
    if f.read(4) != b"DICM":
        raise InvalidInstance(Problem.MALFORMED, "not a DICOM Part-10 file (no DICM prefix)")
    pos = _PREAMBLE + 4
    elements: list[Element] = []
    while pos + 8 <= size:
        f.seek(pos)
        head = f.read(8)
        group, element = struct.unpack("<HH", head[:4])
        if group != 0x0002:
            break
        vr = head[4:6]
        if vr in _LONG_VRS:
            if pos + 12 > size:
                raise InvalidInstance(Problem.MALFORMED, f"File Meta is truncated at byte {pos}")
            (length,) = struct.unpack("<I", f.read(4))
            start = pos + 12
        else:
            (length,) = struct.unpack("<H", head[6:8])
            start = pos + 8
        if length == _UNDEFINED or start + length > size:
            raise InvalidInstance(Problem.MALFORMED, "File Meta element runs past the end of file")
        elements.append(Element(group << 16 | element, vr, pos, start, length))
        pos = start + length
    return elements, pos


def _meta_uids(f: BinaryIO, meta: list[Element]) -> tuple[str, str | None]:
    """Return (transfer syntax, media SOP Instance UID) from the File Meta elements."""
    values = {
        e.tag: _read_uid(f, e.value_offset, e.length, e.tag)
        for e in meta
        if e.tag in (_TRANSFER_SYNTAX, _MEDIA_SOP_INSTANCE)
    }
    if _TRANSFER_SYNTAX not in values:
        raise InvalidInstance(Problem.MALFORMED, "File Meta has no Transfer Syntax UID")
    return values[_TRANSFER_SYNTAX], values.get(_MEDIA_SOP_INSTANCE)


def _walk_dataset(f: BinaryIO, offset: int, size: int, transfer_syntax: str) -> dict[str, str]:
    if transfer_syntax != DEFLATED_EXPLICIT_VR_LE:
        return _walk(f, offset, size, transfer_syntax)
    with tempfile.TemporaryFile() as inflated:
        _inflate(f, offset, inflated)
        inflated_size = inflated.seek(0, 2)
        return _walk(inflated, 0, inflated_size, transfer_syntax)


def _inflate(src: BinaryIO, offset: int, dst: BinaryIO) -> None:
    src.seek(offset)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    try:
        while chunk := src.read(1024 * 1024):
            # max_length bounds each step's output, so a bomb cannot inflate in one call.
            data = inflater.decompress(chunk, 1024 * 1024)
            while data:
                written += len(data)
                if written > MAX_INFLATED_BYTES:
                    raise InvalidInstance(Problem.MALFORMED, "deflated dataset inflates too large")
                dst.write(data)
                data = inflater.decompress(inflater.unconsumed_tail, 1024 * 1024)
    except zlib.error as exc:
        raise InvalidInstance(Problem.MALFORMED, f"deflated dataset is corrupt: {exc}") from exc


def _walk(
    f: BinaryIO,
    offset: int,
    size: int,
    transfer_syntax: str,
    collect: tuple[frozenset[int], dict[int, Element]] | None = None,
) -> dict[str, str]:
    """Walk every element header from `offset` to `size`; return the top-level UIDs found.
    With `collect` (tags, found), also record where each top-level element of `tags` is."""
    endian = ">" if transfer_syntax == EXPLICIT_VR_BE else "<"
    u16, u32 = struct.Struct(endian + "H"), struct.Struct(endian + "I")
    stack = [_Frame("dataset", size, size, transfer_syntax == IMPLICIT_VR_LE)]
    uids: dict[str, str] = {}
    depth = 0
    pos = offset
    while stack:
        frame = stack[-1]
        if frame.end is not None and pos >= frame.end:
            if pos > frame.end:
                raise InvalidInstance(Problem.MALFORMED, f"element overruns its container at {pos}")
            depth -= frame.kind == "sequence"
            stack.pop()
            continue
        if pos + 8 > frame.limit:
            raise InvalidInstance(Problem.MALFORMED, f"dataset is truncated at byte {pos}")
        f.seek(pos)
        head = f.read(8)
        tag = u16.unpack(head[:2])[0] << 16 | u16.unpack(head[2:4])[0]
        if frame.kind in ("sequence", "fragments"):
            pos, depth = _step_in_sequence(stack, frame, tag, u32.unpack(head[4:])[0], pos, depth)
            continue
        if tag == _ITEM_END and frame.kind == "item" and frame.end is None:
            stack.pop()
            pos += 8
            continue
        if tag >> 16 == 0xFFFE:
            raise InvalidInstance(Problem.MALFORMED, f"unexpected delimiter {_tag(tag)} at {pos}")
        vr, length, start = _element_header(f, frame, head, u16, u32, pos)
        if collect is not None and len(stack) == 1 and tag in collect[0]:
            collect[1][tag] = Element(tag, vr, pos, start, length)
        if length == _UNDEFINED:
            kind = "fragments" if tag == _PIXEL_DATA and vr in (b"OB", b"OW") else "sequence"
            if kind == "sequence" and not (frame.implicit or vr in (b"SQ", b"UN")):
                raise InvalidInstance(Problem.MALFORMED, f"{_tag(tag)} {vr!r} has undefined length")
            depth += kind == "sequence"
            if depth > MAX_SEQUENCE_DEPTH:
                raise InvalidInstance(Problem.MALFORMED, "sequences nested too deep")
            # Undefined-length UN is a sequence encoded in Implicit VR Little Endian (PS3.5 6.2.2).
            implicit = frame.implicit or vr == b"UN"
            stack.append(_Frame(kind, None, frame.limit, implicit))
            pos = start
            continue
        if start + length > frame.limit:
            raise InvalidInstance(
                Problem.MALFORMED,
                f"element {_tag(tag)} claims {length} bytes, only {frame.limit - start} remain",
            )
        if vr == b"SQ":
            depth += 1
            if depth > MAX_SEQUENCE_DEPTH:
                raise InvalidInstance(Problem.MALFORMED, "sequences nested too deep")
            stack.append(_Frame("sequence", start + length, start + length, frame.implicit))
            pos = start
            continue
        if len(stack) == 1 and tag in _UID_TAGS:
            uids[_UID_TAGS[tag]] = _read_uid(f, start, length, tag)
        pos = start + length
    return uids


def _element_header(
    f: BinaryIO, frame: _Frame, head: bytes, u16: struct.Struct, u32: struct.Struct, pos: int
) -> tuple[bytes | None, int, int]:
    """Return (VR or None when implicit, value length, value offset) of the element at `pos`."""
    if frame.implicit:
        return None, u32.unpack(head[4:])[0], pos + 8
    vr = head[4:6]
    if vr not in _VALID_VRS:
        raise InvalidInstance(Problem.MALFORMED, f"invalid VR {vr!r} at byte {pos}")
    if vr not in _LONG_VRS:
        return vr, u16.unpack(head[6:8])[0], pos + 8
    if pos + 12 > frame.limit:
        raise InvalidInstance(Problem.MALFORMED, f"dataset is truncated at byte {pos}")
    return vr, u32.unpack(f.read(4))[0], pos + 12


def _step_in_sequence(
    stack: list[_Frame], frame: _Frame, tag: int, length: int, pos: int, depth: int
) -> tuple[int, int]:
    """Handle the item or delimiter at `pos` inside a sequence; return the new (pos, depth)."""
    if tag == _SEQUENCE_END and frame.end is None:
        stack.pop()
        return pos + 8, depth - (frame.kind == "sequence")
    if tag != _ITEM:
        raise InvalidInstance(Problem.MALFORMED, f"expected an item, found {_tag(tag)} at {pos}")
    start = pos + 8
    if length == _UNDEFINED:
        if frame.kind == "fragments":
            raise InvalidInstance(Problem.MALFORMED, "pixel data fragment has undefined length")
        stack.append(_Frame("item", None, frame.limit, frame.implicit))
        return start, depth
    if start + length > frame.limit:
        raise InvalidInstance(
            Problem.MALFORMED, f"item claims {length} bytes, only {frame.limit - start} remain"
        )
    if frame.kind == "sequence":
        stack.append(_Frame("item", start + length, start + length, frame.implicit))
        return start, depth
    return start + length, depth


def _read_uid(f: BinaryIO, start: int, length: int, tag: int) -> str:
    if length > 64:
        raise InvalidInstance(
            Problem.MALFORMED, f"{_tag(tag)} is {length} bytes; a UID is at most 64"
        )
    f.seek(start)
    value = f.read(length).rstrip(b"\0 ").decode("ascii", errors="replace")
    if not _UID_PATTERN.fullmatch(value):
        raise InvalidInstance(Problem.MISSING_UID, f"{_tag(tag)} is not a valid UID: {value!r}")
    return value


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
