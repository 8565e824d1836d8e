"""Pack a study part into one bundle: a tar of its Part-10 files behind a manifest, in zstd.

The bundle is a plain tar (PAX) inside one standard zstd frame, so `zstd -d | tar x` opens it.
Its first member is `manifest.json` (site, study, part, and per instance its UIDs, transfer
syntax, size and the sha256 of its dataset); the instances follow as `instances/NNNNNN.dcm`
(names never come from DICOM values). Everything streams: file → tar → zstd → disk, with the
bundle's sha256 taken on the way out, so memory does not grow with study size.

Each instance's dataset is hashed again as it is read and compared with the hash recorded when
it was received: a spool file damaged on disk stops the pack instead of going to the cloud.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from agent import __version__
from agent.instance import InvalidInstance, dataset_offset
from agent.spool import Spool
from agent.store.uploads import Bundle, PartFile

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_COPY_BLOCK = 1024 * 1024


class PackError(Exception):
    """A part cannot be packed: a spool file is missing, changed or unreadable."""


@dataclass(frozen=True)
class PartInfo:
    """Who and what a bundle is for, as its manifest and upload metadata say."""

    site: str
    study_uid: str
    part: int


@dataclass(frozen=True)
class Compression:
    """How to compress: `zstd` at `level` with `threads` (0: one per CPU), or `none`."""

    method: str = "zstd"
    level: int = 3
    threads: int = 0

    @property
    def format(self) -> str:
        return "dicom-tar+zstd" if self.method == "zstd" else "dicom-tar"

    @property
    def suffix(self) -> str:
        return ".tar.zst" if self.method == "zstd" else ".tar"


def manifest(info: PartInfo, files: Sequence[PartFile], compression: Compression) -> bytes:
    """Return the manifest of a bundle of `files`, as UTF-8 JSON."""
    document = {
        "manifest_version": MANIFEST_VERSION,
        "format": compression.format,
        "site": info.site,
        "study_uid": info.study_uid,
        "part": info.part,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "agent": f"dirigo {__version__}",
        "sha256_of": "each instance's dataset: the file after its File Meta group",
        "instances": [
            {
                "file": member_name(index),
                "sop_instance_uid": f.sop_instance_uid,
                "sop_class_uid": f.sop_class_uid,
                "transfer_syntax": f.transfer_syntax,
                "size": f.size,
                "sha256": f.sha256,
            }
            for index, f in enumerate(files, 1)
        ],
    }
    return (json.dumps(document, indent=1) + "\n").encode()


def member_name(index: int) -> str:
    return f"instances/{index:06d}.dcm"


def pack(
    spool: Spool, info: PartInfo, files: Sequence[PartFile], compression: Compression
) -> Bundle:
    """Pack `files` into a durable bundle in the spool and return it.

    Raise PackError if a file is missing, its size changed, or its dataset no longer has the
    recorded sha256; OSError if the bundle cannot be written (ENOSPC). Either way no bundle is
    left behind under a final name.
    """
    temporary, relative = spool.new_bundle(compression.suffix)
    try:
        with temporary.open("wb") as raw:
            sink = _HashingWriter(raw)
            _write_tar(sink, spool, info, files, compression)
            raw.flush()
        spool.commit_bundle(temporary, relative)
    except BaseException:
        spool.discard(temporary)
        raise
    return Bundle(relative, sink.size, sink.sha256.hexdigest(), compression.format, len(files))


def _write_tar(
    sink: _HashingWriter,
    spool: Spool,
    info: PartInfo,
    files: Sequence[PartFile],
    compression: Compression,
) -> None:
    if compression.method == "zstd":
        threads = compression.threads or -1  # -1: zstd uses one worker per CPU
        compressor = zstandard.ZstdCompressor(
            level=compression.level, threads=threads, write_checksum=True
        )
        with compressor.stream_writer(cast(BinaryIO, sink), closefd=False) as zstd_out:
            _tar_into(zstd_out, spool, info, files, compression)
    else:
        _tar_into(sink, spool, info, files, compression)


def _tar_into(
    out: object,
    spool: Spool,
    info: PartInfo,
    files: Sequence[PartFile],
    compression: Compression,
) -> None:
    spool_mtime = int(time.time())
    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_COPY_BLOCK
    ) as tar:  # type: ignore[call-overload]
        document = manifest(info, files, compression)
        entry = tarfile.TarInfo(MANIFEST)
        entry.size, entry.mtime, entry.mode = len(document), spool_mtime, 0o644
        tar.addfile(entry, io.BytesIO(document))
        for index, part_file in enumerate(files, 1):
            _add_instance(tar, spool, part_file, member_name(index), spool_mtime)


def _add_instance(
    tar: tarfile.TarFile, spool: Spool, part_file: PartFile, name: str, mtime: int
) -> None:
    path = spool.path(part_file.path)
    f, offset = _open_checked(path, part_file)
    with f:
        entry = tarfile.TarInfo(name)
        entry.size, entry.mtime, entry.mode = part_file.size, mtime, 0o644
        reader = _VerifyingReader(f, offset)
        tar.addfile(entry, cast(BinaryIO, reader))
    if reader.sha256.hexdigest() != part_file.sha256:
        raise PackError(
            f"{part_file.sop_instance_uid}: spool file {path} changed since it was received"
            " (its dataset's sha256 differs)"
        )


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through to `raw`."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()


class _VerifyingReader:
    """A read-only view of a spool file that re-hashes its dataset as tar copies it."""

    def __init__(self, f: BinaryIO, offset: int) -> None:
        self._f = f
        self._offset = offset
        self._position = 0
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        start = self._position
        self._position += len(data)
        if self._position > self._offset:
            self.sha256.update(data[max(self._offset - start, 0) :])
        return data


def _open_checked(path: Path, part_file: PartFile) -> tuple[BinaryIO, int]:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise PackError(f"{part_file.sop_instance_uid}: spool file {path} is missing") from None
    size = os.fstat(f.fileno()).st_size
    if size != part_file.size:
        f.close()
        raise PackError(
            f"{part_file.sop_instance_uid}: spool file {path} is {size} bytes,"
            f" {part_file.size} were received"
        )
    try:
        offset = dataset_offset(f, size)
    except InvalidInstance as exc:
        f.close()
        raise PackError(f"{part_file.sop_instance_uid}: spool file {path}: {exc}") from None
    f.seek(0)
    return f, offset
