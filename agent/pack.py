"""Pack a study part into one bundle: a tar of its Part-10 files, then a manifest, in zstd.

The bundle is a plain tar (PAX) inside one standard zstd frame, so `zstd -d | tar x` opens it.
The instances come first as `instances/NNNNNN.dcm` (names never come from DICOM values), each
carrying its own facts in PAX extended headers (`FACTS`: the sha256 of its dataset, its SOP
Instance UID and transfer syntax; for a transcoded file also the original's syntax, size and
sha256), so a reader verifies each member as it streams. The last member is `manifest.json`, a
summary (site, study, part, and per instance the same facts). Everything streams: file → tar →
zstd → disk, with the bundle's sha256 taken on the way out, so memory does not grow with study
size. With transcoding, each instance goes into the tar as soon as its re-encoding is done (in
order), while the workers re-encode the next ones: packing overlaps transcoding.

Each instance's dataset is hashed again as it is read and compared with the hash recorded when
it was received: a spool file damaged on disk stops the pack instead of going to the cloud.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from agent import __version__
from agent.spool import Spool, SpoolFileError, open_received
from agent.store.uploads import Bundle, PartFile
from agent.transcode import AsItCame, Outcome, Source, Transcoded, Transcoder

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
"""2: the instances first, each with its facts in PAX headers, the manifest last.
(1, the first layout: the manifest first, no PAX facts; the cloud's ingest still reads it.)"""
PAX_PREFIX = "DIRIGO."
"""The namespace of the PAX extended header records Dirigo adds to each instance member."""
FACTS = ("sha256", "sop_instance_uid", "sop_class_uid", "transfer_syntax")
"""An instance member's PAX records, each `DIRIGO.<fact>`, as in its manifest entry. A
transcoded file adds `DIRIGO.original.transfer_syntax`, `.size` and `.sha256`."""
_COPY_BLOCK = 1024 * 1024


def _go_on() -> None:
    """The check of a pack nobody stops."""


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
    """How to compress: `zstd` at `level` with `threads` (0: one per CPU), or `none`; and
    whether to re-encode uncompressed pixel data losslessly first (`jpeg-ls`, `htj2k`)."""

    method: str = "zstd"
    level: int = 3
    threads: int = 0
    transcode: str = "none"

    @property
    def format(self) -> str:
        return "dicom-tar+zstd" if self.method == "zstd" else "dicom-tar"

    @property
    def suffix(self) -> str:
        return ".tar.zst" if self.method == "zstd" else ".tar"


def manifest(
    info: PartInfo,
    files: Sequence[PartFile],
    compression: Compression,
    outcomes: Sequence[Outcome | None] | None = None,
) -> bytes:
    """Return the manifest of a bundle of `files` (with their transcoding `outcomes`, if any),
    as UTF-8 JSON."""
    outcomes = outcomes or [None] * len(files)
    document = {
        "manifest_version": MANIFEST_VERSION,
        "format": compression.format,
        "site": info.site,
        "study_uid": info.study_uid,
        "part": info.part,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "agent": f"dirigo {__version__}",
        "sha256_of": "each instance's dataset: the file after its File Meta group",
        "transcode": compression.transcode,
        "instances": [
            _entry(index, f, outcome)
            for index, (f, outcome) in enumerate(zip(files, outcomes, strict=True), 1)
        ],
    }
    return (json.dumps(document, indent=1) + "\n").encode()


def _entry(index: int, f: PartFile, outcome: Outcome | None) -> dict[str, object]:
    entry: dict[str, object] = {
        "file": member_name(index),
        "sop_instance_uid": f.sop_instance_uid,
        "sop_class_uid": f.sop_class_uid,
        "transfer_syntax": f.transfer_syntax,
        "size": f.size,
        "sha256": f.sha256,
    }
    if isinstance(outcome, Transcoded):
        original = {k: entry[k] for k in ("transfer_syntax", "size", "sha256")}
        entry.update(
            transfer_syntax=outcome.transfer_syntax,
            size=outcome.size,
            sha256=outcome.sha256,
            original=original,
        )
    elif isinstance(outcome, AsItCame):
        entry["not_transcoded"] = outcome.reason
    return entry


def member_facts(entry: dict[str, object]) -> dict[str, str]:
    """Given an instance's manifest entry, return the PAX extended header records its tar
    member carries: each of `FACTS` as `DIRIGO.<fact>`, and for a transcoded file the
    original's as `DIRIGO.original.<fact>`."""
    facts = {f"{PAX_PREFIX}{key}": str(entry[key]) for key in FACTS}
    original = entry.get("original")
    if isinstance(original, dict):
        facts.update({f"{PAX_PREFIX}original.{k}": str(v) for k, v in original.items()})
    return facts


def sent_hashes(path: Path, bundle_format: str) -> dict[str, str]:
    """Return what a bundle file's manifest records of each instance: the sha256 of its
    dataset as packed (after any transcoding), by SOP Instance UID. Streams the bundle up to
    its manifest (the last member; the first in bundles of the first layout). Raise PackError
    if it holds no manifest that can be read; OSError if the file cannot be read."""
    with path.open("rb") as raw:
        compressed = bundle_format == Compression("zstd").format
        source = zstandard.ZstdDecompressor().stream_reader(raw) if compressed else raw
        try:
            with tarfile.open(fileobj=source, mode="r|") as tar:
                for member in tar:
                    f = tar.extractfile(member) if member.name == MANIFEST else None
                    if f is not None:
                        document = json.load(f)
                        return {e["sop_instance_uid"]: e["sha256"] for e in document["instances"]}
        except (tarfile.TarError, zstandard.ZstdError, ValueError, KeyError, TypeError) as exc:
            raise PackError(f"bundle {path}: cannot read its manifest: {exc}") from None
    raise PackError(f"bundle {path} has no {MANIFEST}")


def member_name(index: int) -> str:
    return f"instances/{index:06d}.dcm"


def pack(
    spool: Spool,
    info: PartInfo,
    files: Sequence[PartFile],
    compression: Compression,
    check: Callable[[], None] = _go_on,
) -> Bundle:
    """Pack `files` into a durable bundle in the spool and return it.

    `check` is called between blocks and files (a study can take minutes to pack) and before
    the bundle is made durable; whatever it raises ends the pack, leaving nothing behind (the
    upload worker's lease was lost, say).
    Raise PackError if a file is missing, its size changed, or its dataset no longer has the
    recorded sha256; OSError if the bundle cannot be written (ENOSPC). Either way no bundle is
    left behind under a final name.
    """
    temporary, relative = spool.new_bundle(compression.suffix)
    try:
        with temporary.open("wb") as raw:
            sink = _HashingWriter(raw)
            _write_tar(sink, spool, info, files, compression, check)
            raw.flush()
        # zstd's worker threads take in up to a whole job (megabytes) before compressing it,
        # so the checks between blocks can all pass before the slow part of a small pack.
        check()
        spool.commit_bundle(temporary, relative)
    except BaseException:
        spool.discard(temporary)
        raise
    return Bundle(relative, sink.size, sink.sha256.hexdigest(), compression.format, len(files))


def _outcomes(
    spool: Spool, files: Sequence[PartFile], compression: Compression, check: Callable[[], None]
) -> Generator[tuple[PartFile, Outcome | None], None, None]:
    """Yield each file with its transcoding outcome (None without transcoding), in order, as
    soon as it is known: the workers re-encode the next files meanwhile. Every re-encoded
    temporary beside the bundle is deleted when this ends, however it ends (the caller has
    copied each into the tar by then). Raise PackError if a source changed since it was
    received."""
    if compression.transcode == "none":
        yield from ((f, None) for f in files)
        return
    sources = [
        Source(str(spool.path(f.path)), str(spool.new_bundle(".dcm")[0]), f.sha256) for f in files
    ]
    count = 0
    try:
        with Transcoder(compression.transcode, compression.threads) as transcoder:
            for part_file, outcome in zip(files, transcoder.run(sources), strict=True):
                check()
                if isinstance(outcome, AsItCame) and outcome.changed:
                    raise PackError(f"{part_file.sop_instance_uid}: spool file {outcome.reason}")
                count += isinstance(outcome, Transcoded)
                yield part_file, outcome
                if isinstance(outcome, Transcoded):
                    spool.discard(Path(outcome.path))
    finally:
        # After the pool has shut down: files in flight when a pack stopped are written by now.
        for source in sources:
            spool.discard(Path(source.target))
    logger.info("transcoded %d of %d instance(s) to %s", count, len(files), compression.transcode)


def _write_tar(
    sink: _HashingWriter,
    spool: Spool,
    info: PartInfo,
    files: Sequence[PartFile],
    compression: Compression,
    check: Callable[[], None],
) -> None:
    if compression.method == "zstd":
        threads = compression.threads or -1  # -1: zstd uses one worker per CPU
        compressor = zstandard.ZstdCompressor(
            level=compression.level, threads=threads, write_checksum=True
        )
        with compressor.stream_writer(cast(BinaryIO, sink), closefd=False) as zstd_out:
            _tar_into(zstd_out, spool, info, files, compression, check)
    else:
        _tar_into(sink, spool, info, files, compression, check)


def _tar_into(
    out: object,
    spool: Spool,
    info: PartInfo,
    files: Sequence[PartFile],
    compression: Compression,
    check: Callable[[], None],
) -> None:
    spool_mtime = int(time.time())
    outcomes: list[Outcome | None] = []
    # Mode "w", not the stream mode "w|": the stream mode copies its write buffer over and
    # over (measured: packing at half the speed). Nothing seeks: the output only needs tell().
    in_order = contextlib.closing(_outcomes(spool, files, compression, check))
    with (
        in_order as results,
        tarfile.open(  # type: ignore[call-overload]
            fileobj=out, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_BLOCK
        ) as tar,
    ):
        for index, (part_file, outcome) in enumerate(results, 1):
            outcomes.append(outcome)
            packed = part_file
            if isinstance(outcome, Transcoded):
                packed = PartFile(
                    part_file.sop_instance_uid,
                    part_file.sop_class_uid,
                    outcome.transfer_syntax,
                    outcome.path,
                    outcome.size,
                    outcome.sha256,
                )
            facts = member_facts(_entry(index, part_file, outcome))
            _add_instance(tar, spool, packed, member_name(index), facts, spool_mtime, check)
        document = manifest(info, files, compression, outcomes)
        entry = tarfile.TarInfo(MANIFEST)
        entry.size, entry.mtime, entry.mode = len(document), spool_mtime, 0o644
        tar.addfile(entry, io.BytesIO(document))


def _add_instance(
    tar: tarfile.TarFile,
    spool: Spool,
    part_file: PartFile,
    name: str,
    facts: dict[str, str],
    mtime: int,
    check: Callable[[], None],
) -> None:
    path = spool.path(part_file.path)
    try:
        f, offset = open_received(path, part_file.sop_instance_uid, part_file.size)
    except SpoolFileError as exc:
        raise PackError(str(exc)) from None
    with f:
        entry = tarfile.TarInfo(name)
        entry.size, entry.mtime, entry.mode = part_file.size, mtime, 0o644
        entry.pax_headers = facts
        reader = _VerifyingReader(f, offset, check)
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

    def tell(self) -> int:
        return self.size

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()


class _VerifyingReader:
    """A read-only view of a spool file that re-hashes its dataset as tar copies it, calling
    `check` before every block."""

    def __init__(self, f: BinaryIO, offset: int, check: Callable[[], None]) -> None:
        self._f = f
        self._offset = offset
        self._check = check
        self._position = 0
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        self._check()
        data = self._f.read(size)
        start = self._position
        self._position += len(data)
        if self._position > self._offset:
            self.sha256.update(data[max(self._offset - start, 0) :])
        return data
