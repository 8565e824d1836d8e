"""Instances sent from their files, never held in memory whole.

An instance the destination takes in the syntax the archive holds it in goes from its cached
file: `OnDisk` is the small dataset that stands for it (the UIDs and the syntax, for pynetdicom
and the logs), and `agent.pynetdicom_internals.send_from_files` makes an association send such
a dataset's file block by block. A Deflated instance is inflated into a file first (`inflate`),
under the cache where the disk's high-water check sees it, never into memory.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian

from agent.part10 import Head

BLOCK = 1024 * 1024
"""Bytes read, and at most written, at a time while inflating."""
_PREAMBLE = b"\0" * 128 + b"DICM"


class OnDisk(Dataset):
    """A dataset that stands for the Part-10 file at `path`, whose head is `head`: it holds only
    SOP Class UID, SOP Instance UID and the file meta's Transfer Syntax UID; its C-STORE sends
    the file."""

    def __init__(self, path: Path, head: Head) -> None:
        super().__init__()
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = UID(head.transfer_syntax or "")
        self.SOPClassUID = head.media_sop_class
        self.SOPInstanceUID = head.media_sop_instance
        self.file_path = path
        self.file_head = head


def file_of(dataset: Any) -> tuple[Path, Head] | None:
    """Return the file an `OnDisk` dataset stands for and its head, None for any other
    dataset."""
    return (dataset.file_path, dataset.file_head) if isinstance(dataset, OnDisk) else None


def inflate(source: Path, offset: int, meta: Dataset, out: BinaryIO) -> None:
    """Write into `out` the Explicit VR Little Endian Part-10 file of the Deflated one at
    `source`, whose dataset starts at `offset` and whose file meta is `meta`: block by block,
    never more than a block of inflated bytes in memory. Raise zlib.error if the deflate
    stream is corrupt or cut short, OSError if reading or writing fails."""
    plain = FileMetaDataset(meta)
    plain.TransferSyntaxUID = ExplicitVRLittleEndian
    out.write(_PREAMBLE)
    target = DicomFileLike(out)
    target.is_little_endian, target.is_implicit_VR = True, False
    write_file_meta_info(target, plain, enforce_standard=True)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    with source.open("rb") as deflated:
        deflated.seek(offset)
        while not inflater.eof and (pending := deflated.read(BLOCK)):
            while pending and not inflater.eof:  # bytes after the stream's end are padding
                inflated = inflater.decompress(pending, BLOCK)
                if not inflated and inflater.unconsumed_tail == pending:
                    raise zlib.error("the deflated dataset does not inflate")
                out.write(inflated)
                pending = inflater.unconsumed_tail
        while not inflater.eof and (rest := inflater.flush(BLOCK)):
            out.write(rest)
    if not inflater.eof:
        raise zlib.error("the deflated dataset is cut short")
    out.flush()
