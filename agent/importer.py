"""Importing DICOM files from disk (a CD, a folder, a USB stick) into the same pipeline as C-STORE.

Each file is copied into `incoming/` and handed to `Receiver.accept` as if it had arrived by
C-STORE from the calling AE `IMPORT`, so the checks, quarantine, duplicate detection and
durability are the receiver's own: a file counts as stored only once it is fsynced in the spool
and its row is committed. The agent may be running meanwhile (the database is shared in WAL
mode). Its periodic sweep of `incoming/` removes only files not written to for twice the DICOM
network timeout, and a copy in progress is written to continuously; but an agent that *starts*
removes everything in `incoming/` (and spool files with no row yet), so a start must not race an
import. A copy removed that way is reported as failed, never as stored.

A file without the Part-10 `DICM` prefix (a README, a viewer program on a CD) is skipped, not
quarantined: it was never DICOM. A `DICOMDIR` is only the CD's index and is passed over.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from agent.dimse import Status
from agent.receive import Arrival, Receiver, Reply
from agent.spool import Spool
from agent.store import Outcome

IMPORT_AE = "IMPORT"
"""The calling AE title imported instances are recorded with."""
LOCAL_ADDRESS = "local"
"""The address imported instances are recorded with."""
DICOMDIR = "DICOMDIR"

_CHUNK = 1024 * 1024
_PREFIX_END = 132  # a 128-byte preamble, then b"DICM"


class Result(StrEnum):
    """What became of one file."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"
    QUARANTINED = "quarantined"
    SKIPPED = "skipped"
    FAILED = "failed"


ACCEPTED = frozenset({Result.STORED, Result.DUPLICATE, Result.REPLACED})
"""Results after which the gateway holds the file's instance."""


@dataclass(frozen=True)
class Source:
    """A file to import and its size (for progress)."""

    path: Path
    size: int


@dataclass(frozen=True)
class Imported:
    """The fate of one file, with the reason when it was not accepted."""

    path: Path
    result: Result
    reason: str = ""


def collect(paths: Sequence[Path]) -> tuple[list[Source], list[Imported]]:
    """Return every file under `paths` (folders searched recursively, in name order) except
    DICOMDIR files, and, as skipped, every folder or file that could not be listed.

    Raise FileNotFoundError if a path given does not exist.
    """
    sources: list[Source] = []
    problems: list[Imported] = []

    def unreadable(exc: OSError) -> None:
        problems.append(
            Imported(Path(exc.filename), Result.SKIPPED, f"cannot read: {exc.strerror}")
        )

    for path in paths:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if not path.is_dir():
            _add(path, sources, problems)
            continue
        for root, dirs, files in os.walk(path, onerror=unreadable):
            dirs.sort()
            for name in sorted(files):
                _add(Path(root) / name, sources, problems)
    return sources, problems


def is_dicomdir(path: Path) -> bool:
    """Return whether `path` names a DICOMDIR, a CD's index rather than an instance."""
    # ISO 9660 mounts may show a version suffix: DICOMDIR;1, or DICOMDIR. with no extension.
    return path.name.upper().split(";")[0].rstrip(".") == DICOMDIR


def _add(path: Path, sources: list[Source], problems: list[Imported]) -> None:
    if is_dicomdir(path):
        return
    try:
        sources.append(Source(path, path.stat().st_size))
    except OSError as exc:
        problems.append(Imported(path, Result.SKIPPED, f"cannot read: {exc.strerror}"))


class Importer:
    """Copies files into `incoming/` and lets the receiver accept them, one at a time."""

    def __init__(self, spool: Spool, receiver: Receiver) -> None:
        self.spool = spool
        self.receiver = receiver
        self.observed: Callable[[Reply], None] | None = None
        """Told the receiver's reply to each file it accepted or refused (the audit trail)."""

    def import_file(self, path: Path, progress: Callable[[int], None] | None = None) -> Imported:
        """Import one file; return what became of it. `progress` is called with the bytes of
        each chunk copied. Never raises for a problem with the file or the disk: that is the
        result."""
        if self.spool.above_high_water():
            return Imported(path, Result.FAILED, "gateway disk above high-water mark")
        copy: Path | None = None
        try:
            try:
                copy = self._copy(path, progress or _ignore)
            except _NotDicom:
                return Imported(path, Result.SKIPPED, "not a DICOM Part-10 file")
            except _ReadError as exc:
                return Imported(path, Result.SKIPPED, f"cannot read: {exc.strerror}")
            except OSError as exc:
                return Imported(path, Result.FAILED, f"cannot copy into incoming/: {exc.strerror}")
            if not copy.exists():
                reason = "its copy was removed from incoming/ (did the agent start?); send it again"
                return Imported(path, Result.FAILED, reason)
            reply = self.receiver.accept(Arrival(copy, IMPORT_AE, LOCAL_ADDRESS, None))
            if self.observed is not None:
                self.observed(reply)
        finally:
            # accept() always consumes the copy; this covers an interrupted copy.
            if copy is not None:
                self.spool.discard(copy)
        if reply.status == Status.SUCCESS and reply.outcome is not None:
            # A repaired instance counts as stored: this file is now the copy the gateway holds.
            result = Result.STORED if reply.outcome is Outcome.REPAIRED else Result(reply.outcome)
            return Imported(path, result)
        if reply.quarantined:
            return Imported(path, Result.QUARANTINED, reply.comment)
        return Imported(path, Result.FAILED, reply.comment or f"status 0x{reply.status:04X}")

    def _copy(self, path: Path, progress: Callable[[int], None]) -> Path:
        """Copy `path` into a new file in `incoming/` and return that file's path.

        Raise _NotDicom (nothing copied) if it lacks the Part-10 prefix, _ReadError if reading
        fails, OSError if writing does. The copy gets a fresh modification time (never the
        source's), so the agent's sweep of stale receives leaves it alone.
        """
        try:
            source = path.open("rb")
        except OSError as exc:
            raise _ReadError(exc.errno, exc.strerror) from exc
        with source:
            chunk = _read(source)
            if len(chunk) < _PREFIX_END or chunk[128:_PREFIX_END] != b"DICM":
                raise _NotDicom
            fd, name = tempfile.mkstemp(prefix="import-", suffix=".dcm", dir=self.spool.incoming)
            copy = Path(name)
            try:
                with os.fdopen(fd, "wb") as target:
                    while chunk:
                        target.write(chunk)
                        progress(len(chunk))
                        chunk = _read(source)
            except BaseException:
                self.spool.discard(copy)
                raise
        return copy


def _read(source: BinaryIO) -> bytes:
    try:
        return source.read(_CHUNK)
    except OSError as exc:
        raise _ReadError(exc.errno, exc.strerror) from exc


def _ignore(size: int) -> None:
    pass


class _NotDicom(Exception):
    """The file has no Part-10 prefix."""


class _ReadError(OSError):
    """Reading the source failed (unlike writing the copy, which is the gateway's problem)."""


@dataclass
class Tally:
    """Counts of results, with the reasons for files not accepted, for the summary line."""

    counts: Counter[Result] = field(default_factory=Counter)
    reasons: dict[Result, Counter[str]] = field(default_factory=dict)

    def add(self, imported: Imported) -> None:
        self.counts[imported.result] += 1
        if imported.reason:
            self.reasons.setdefault(imported.result, Counter())[imported.reason] += 1

    @property
    def files(self) -> int:
        return sum(self.counts.values())

    @property
    def ok(self) -> bool:
        """True when every file was stored, replaced or a duplicate."""
        return all(result in ACCEPTED for result in +self.counts)

    def summary(self) -> str:
        """Return one line: each result's count, with the reasons for those not accepted."""
        parts = []
        for result in Result:
            text = f"{self.counts[result]} {result}"
            reasons = self.reasons.get(result)
            if reasons:
                text += " (" + "; ".join(_times(reason, n) for reason, n in reasons.items()) + ")"
            parts.append(text)
        return f"{self.files} file(s): " + ", ".join(parts)


def _times(reason: str, count: int) -> str:
    return reason if count == 1 else f"{reason}: {count} files"
