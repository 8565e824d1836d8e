"""Durable file placement under `data_dir`: spool, incoming area, quarantine, disk watermarks.

Layout (paths recorded in the store are relative to `data_dir`):

    incoming/          files being received; anything here at start-up was never acknowledged
    spool/00 … spool/ff/<random>.dcm
                       acknowledged instances; names are random, never taken from DICOM values
    quarantine/<time>-<random>.dcm (+ .json)
                       rejected input kept byte for byte, with the reason beside it
    bundles/<random>.tar.zst
                       packed study parts on their way to the cloud (`.partial` while packing)

A received file is renamed into its shard (`adopt`), then made durable (`settle`): its data
fsynced, then the shard directory fsynced so the rename itself survives power loss. Only then may
its row be committed and the sender see Success.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.instance import InvalidInstance, dataset_offset

logger = logging.getLogger(__name__)

INCOMING = "incoming"
SPOOL = "spool"
QUARANTINE = "quarantine"
BUNDLES = "bundles"
PARTIAL = ".partial"
AGENT_LOCK = "agent.lock"
"""Held exclusively by the running agent: one agent per data_dir."""
SWEEP_LOCK = "sweep.lock"
"""Held exclusively while the agent sweeps leftovers at start-up, shared by `dirigo send`
for its whole run, so a start-up never takes an import's files for a dead run's leftovers."""
_SHARDS = [f"{i:02x}" for i in range(256)]


@dataclass(frozen=True)
class DiskUsage:
    """Usage of the filesystem that holds `data_dir`."""

    total: int
    used: int
    free: int

    @property
    def percent(self) -> float:
        """Percent used as `df` reports it: blocks reserved for root count as unavailable,
        because the agent runs as an unprivileged user and cannot write into them."""
        usable = self.used + self.free
        return 100.0 * self.used / usable if usable else 100.0


@dataclass(frozen=True)
class Quarantined:
    """Rejected input kept in quarantine: its path relative to `data_dir`, and the sha256 and
    size of the whole file."""

    path: str
    sha256: str
    size: int


class SpoolFileError(Exception):
    """A spool file is missing, changed or unreadable: no retry helps, an operator must look.

    Not an OSError on purpose: raised from inside a request body, it must reach the caller as
    it is, not be taken by urllib3 or requests for a broken connection."""


def open_received(path: Path, sop_instance_uid: str, size: int) -> tuple[BinaryIO, int]:
    """Open a spool file for reading and return it with where its dataset starts, after
    checking it is there, still of the `size` received, and a Part-10 file. Raise
    SpoolFileError otherwise (other OSErrors as they come)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise SpoolFileError(f"{sop_instance_uid}: spool file {path} is missing") from None
    try:
        found = os.fstat(f.fileno()).st_size
        if found != size:
            raise SpoolFileError(
                f"{sop_instance_uid}: spool file {path} is {found} bytes, {size} were received"
            )
        offset = dataset_offset(f, found)
        f.seek(0)
    except InvalidInstance as exc:
        f.close()
        raise SpoolFileError(f"{sop_instance_uid}: spool file {path}: {exc}") from None
    except BaseException:
        f.close()
        raise
    return f, offset


class Locked(Exception):
    """A lock in data_dir is held by another process."""


class Spool:
    """Owns every file under `data_dir` except the database."""

    def __init__(self, data_dir: Path, high_water: float) -> None:
        self.data_dir = data_dir
        self.high_water = high_water
        self.incoming = data_dir / INCOMING
        self.quarantine_dir = data_dir / QUARANTINE
        self.bundles = data_dir / BUNDLES

    def prepare(self) -> None:
        """Create the directory layout (idempotent) and make its creation durable."""
        created = []
        layout = (self.incoming, self.quarantine_dir, self.data_dir / SPOOL, self.bundles)
        for directory in (self.data_dir, *layout):
            if not directory.is_dir():
                # 0700: patient data, for the agent's user alone (whatever the umask).
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                directory.chmod(0o700)
                created.append(directory)
        for shard in _SHARDS:
            path = self.data_dir / SPOOL / shard
            if not path.is_dir():
                path.mkdir(exist_ok=True)
                created.append(path)
        for directory in {p.parent for p in created} | set(created):
            fsync_directory(directory)

    def check_writable(self) -> None:
        """Write, fsync and remove a small file in `incoming/`, where every arrival lands first.
        Raise OSError if the spool cannot take a file (read-only, full, gone)."""
        probe = self.incoming / f".writable-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"probe")
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            probe.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, name: str, *, exclusive: bool, wait: bool) -> Iterator[None]:
        """Hold the advisory lock file `name` in data_dir (flock: released when the process
        dies, however it dies). Raise Locked if `wait` is false and another process holds it."""
        fd = os.open(self.data_dir / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Locked(f"{self.data_dir / name} is held by another process") from None
            yield
        finally:
            os.close(fd)

    def disk_usage(self) -> DiskUsage:
        usage = shutil.disk_usage(self.data_dir)
        return DiskUsage(total=usage.total, used=usage.used, free=usage.free)

    def above_high_water(self, pending: int = 0) -> bool:
        """Return True when the disk is at or above `spool.high_water`.

        `pending` bytes (an arrival already written to `incoming/`) are left out, so that the
        receiver refuses exactly when `dirigo status` says it is not accepting.
        """
        usage = self.disk_usage()
        used = max(usage.used - pending, 0)
        return DiskUsage(usage.total, used, usage.free + pending).percent >= self.high_water

    def flush(self, received: Path) -> None:
        """fsync a received file's data. Raise OSError (ENOSPC, EIO) if it cannot be durable."""
        fd = os.open(received, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def adopt(self, received: Path) -> str:
        """Rename a received file into a spool shard (not yet durable); return its relative path.

        Until `settle` returns, a crash may leave the file unreferenced: the start-up sweep
        removes such files, and nothing was acknowledged for them.
        """
        name = uuid.uuid4().hex
        relative = f"{SPOOL}/{name[:2]}/{name}.dcm"
        os.rename(received, self.data_dir / relative)
        return relative

    def settle(self, relative: str) -> None:
        """Make an adopted file durable: fsync its data, then its shard directory.

        On ext4 and XFS the file's fsync commits the rename in the same journal transaction,
        which leaves the directory's fsync almost nothing to do; it stays, because POSIX
        promises the rename's durability only through it.
        """
        self.flush(self.data_dir / relative)
        fsync_directory((self.data_dir / relative).parent)

    def path(self, relative: str) -> Path:
        return self.data_dir / relative

    def intact(self, relative: str, size: int) -> bool:
        """Return True if the spool file is there with the `size` it was recorded with."""
        try:
            return os.stat(self.data_dir / relative).st_size == size
        except FileNotFoundError:
            return False

    def remove(self, relative: str) -> None:
        """Delete a spool file that no row references, by its path relative to `data_dir`."""
        self.discard(self.data_dir / relative)

    def discard(self, received: Path) -> None:
        """Delete a file that will not be kept (missing is fine)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(received)

    def quarantine(self, received: Path, reason: str, details: dict[str, object]) -> Quarantined:
        """Move rejected input into quarantine with a JSON note of why; return where it is and
        what it holds.

        Not fsynced: nothing was acknowledged, so a crash losing it loses nothing promised.
        """
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{uuid.uuid4().hex[:12]}"
        target = self.quarantine_dir / f"{name}.dcm"
        os.rename(received, target)
        with target.open("rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
            size = os.fstat(f.fileno()).st_size
        note = {"reason": reason, "quarantined_at": stamp, "sha256": sha256, **details}
        (self.quarantine_dir / f"{name}.json").write_text(json.dumps(note, indent=2) + "\n")
        return Quarantined(f"{QUARANTINE}/{name}.dcm", sha256, size)

    def release_quarantined(self, relative: str) -> None:
        """Delete a quarantined copy and its note (missing is fine)."""
        self.remove(relative)
        self.remove(str(Path(relative).with_suffix(".json")))

    def new_bundle(self, suffix: str) -> tuple[Path, str]:
        """Return a temporary path to pack a bundle into, and the relative path it will have."""
        name = f"{uuid.uuid4().hex}{suffix}"
        return self.bundles / f"{name}{PARTIAL}", f"{BUNDLES}/{name}"

    def commit_bundle(self, temporary: Path, relative: str) -> None:
        """Make a packed bundle durable under its final name: fsync, rename, fsync the directory.
        A crash before this leaves only a `.partial` file, which is never uploaded."""
        self.flush(temporary)
        os.rename(temporary, self.data_dir / relative)
        fsync_directory(self.bundles)

    def sweep_bundles(self, referenced: Iterable[str]) -> int:
        """Delete partial bundles and bundles no upload refers to; return how many."""
        known = set(referenced)
        removed = 0
        for entry in os.scandir(self.bundles):
            if f"{BUNDLES}/{entry.name}" not in known:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        if removed:
            logger.warning("removed %d bundle file(s) no upload refers to", removed)
        return removed

    def sweep_incoming(self, older_than: float, now: float) -> int:
        """Delete incoming files not written to for `older_than` seconds; return how many.

        A live association writes its file continuously or is closed by its idle timeout, so
        such a file is a receive that ended without pynetdicom cleaning up after it.
        """
        removed = 0
        for entry in os.scandir(self.incoming):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < now - older_than:
                    os.unlink(entry.path)
                    removed += 1
        if removed:
            logger.warning("removed %d stale partial receive(s) from incoming/", removed)
        return removed

    def sweep_quarantine(self, recorded: Iterable[str]) -> int:
        """Delete quarantined copies (and notes) no quarantine row records; return how many
        copies. Such a copy was moved in by a run that died, or failed to record it, before
        its row was committed: outside the rows, no limit on the quarantine would count it."""
        known = set(recorded)
        removed = 0
        for entry in os.scandir(self.quarantine_dir):
            copy = f"{QUARANTINE}/{Path(entry.name).with_suffix('.dcm')}"
            if copy not in known:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += entry.name.endswith(".dcm")
        if removed:
            logger.warning("removed %d quarantined file(s) no row records", removed)
        return removed

    def lost(self, needed: Mapping[str, str]) -> list[str]:
        """Given {spool path: SOP Instance UID} of copies still needed, return the UIDs of
        those whose file is gone, and log them: their parts cannot be packed until the
        sender sends them again, which repairs them (`agent.receive`)."""
        gone = [uid for path, uid in needed.items() if not (self.data_dir / path).is_file()]
        if gone:
            logger.error(
                "%d acknowledged instance(s) have lost their spool copy (%s%s); their parts"
                " cannot be packed until the sender sends them again, which repairs them",
                len(gone),
                ", ".join(gone[:3]),
                ", …" if len(gone) > 3 else "",
            )
        return gone

    def sweep(self, referenced: Iterable[str]) -> int:
        """Delete files that were never acknowledged; return how many.

        At start-up, anything in `incoming/` is a receive that was cut off, and a spool file no
        row references was renamed but never committed: the sender saw no Success for either.
        """
        removed = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink()
            removed += 1
        known = set(referenced)
        for shard in _SHARDS:
            for entry in os.scandir(self.data_dir / SPOOL / shard):
                if f"{SPOOL}/{shard}/{entry.name}" not in known:
                    os.unlink(entry.path)
                    removed += 1
        if removed:
            logger.warning("removed %d unacknowledged file(s) left by an interrupted run", removed)
        return removed


def fsync_directory(directory: Path) -> None:
    """fsync a directory so that entries created or renamed in it survive power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
