"""A bounded local cache of instances fetched from the cloud, keyed by SOP Instance UID.

Each instance is written to a temporary name, fsynced and renamed into place (then its directory
is fsynced), so a file under its final name is always whole: a crash leaves at most a temporary
file, which the next start removes. A retrieval that was interrupted finds what it already
fetched and resumes from there.

Several processes share the directory (the agent and `dirigo retrieve`), and with it one index
and one limit: `index.sqlite` beside the files records each file's size and last use, and every
change to the files and the index happens in one IMMEDIATE transaction, so one process sees what
the other placed or removed, and the limit holds for both together. The index is only an index:
each open rebuilds it from the files (their modification time records their last use, so the
order survives a restart). A file in use is held by a shared `flock` on it; eviction takes only
the files it can lock exclusively, so neither process removes what the other is sending, and a
hold ends with its process however that ends.

When the cache passes its size limit, or the disk passes `spool.high_water` (`pressure`), the
least recently used files not in use go first: the spool's intake and uploads matter more than
a copy the archive still holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.spool import fsync_directory

logger = logging.getLogger(__name__)

SUFFIX = ".dcm"
PARTIAL = ".partial"
INDEX = "index.sqlite"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_PREAMBLE = 128
_BUSY_MS = 60_000
"""How long one process waits for the other's transaction on the index."""
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (uid TEXT PRIMARY KEY, size INTEGER, used REAL)",
    "CREATE INDEX IF NOT EXISTS entries_used ON entries (used)",
    # The bytes of every entry, kept by the triggers: summing the entries at every release
    # cost 2 ms per instance sent from a cache of 50,000.
    "CREATE TABLE IF NOT EXISTS total (bytes INTEGER NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries"
    " BEGIN UPDATE total SET bytes = bytes + NEW.size; END",
    "CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries"
    " BEGIN UPDATE total SET bytes = bytes - OLD.size; END",
    "CREATE TRIGGER IF NOT EXISTS entries_resized AFTER UPDATE OF size ON entries"
    " BEGIN UPDATE total SET bytes = bytes - OLD.size + NEW.size; END",
)
_RECORD = (
    "INSERT INTO entries VALUES (?, ?, ?)"
    " ON CONFLICT (uid) DO UPDATE SET size = excluded.size, used = excluded.used"
)
"""Record an instance's size and last use (an upsert, so the triggers see an update: a
REPLACE's delete fires no trigger)."""
_EVICT_BATCH = 64


class NotDicom(ValueError):
    """What was fetched is not a DICOM Part-10 file."""


class InstanceCache:
    """Instances under `root` (`root/ab/UID.dcm`), at most `limit` bytes of them across every
    process using `root` (more only while files in use need it), fewer while `pressure()` says
    the disk is too full. Thread-safe."""

    def __init__(self, root: Path, limit: int, pressure: Callable[[], bool] | None = None) -> None:
        self.root = root
        self.limit = limit
        self.pressure = pressure or (lambda: False)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._holds: dict[str, tuple[int, int]] = {}
        """Per instance in use here: the descriptor holding its shared lock, and how many
        uses."""

    def open(self) -> InstanceCache:
        """Create the directory if needed, remove temporary files a crashed process left,
        rebuild the index from the files present and trim to the limit. Raise OSError if the
        directory or its index is unusable."""
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        try:
            db = self._connect()
        except sqlite3.OperationalError as exc:  # locked, unreadable: not ours to remove
            raise OSError(f"cannot open the cache index {self.root / INDEX}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # malformed (a crash: nothing is synced)
            logger.warning("the cache index %s is damaged (%s): made anew", self.root / INDEX, exc)
            for leftover in (INDEX, INDEX + "-journal", INDEX + "-wal", INDEX + "-shm"):
                (self.root / leftover).unlink(missing_ok=True)
            try:
                db = self._connect()
            except sqlite3.Error as again:
                raise OSError(
                    f"cannot open the cache index {self.root / INDEX}: {again}"
                ) from again
        self._db = db
        with self._lock, self._transaction() as index:
            _remove_orphans(self.root / "tmp")
            index.execute("DELETE FROM entries")
            index.execute("DELETE FROM total")
            index.execute("INSERT INTO total VALUES (0)")
            for path in self.root.glob("??/*" + SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    index.execute(
                        _RECORD, (path.name.removesuffix(SUFFIX), stat.st_size, stat.st_mtime)
                    )
            self._evict(index)
        return self

    def _connect(self) -> sqlite3.Connection:
        """Open the index. A rollback journal, not WAL: WAL maps its shared-memory file, and on
        a FUSE file system (LazyFS built on Debian 13) the first commit through that mapping
        killed the agent with SIGBUS; and nothing is synced (`synchronous=OFF`): the index is
        rebuilt from the files at every open, and one a crash damaged is made anew."""
        db = sqlite3.connect(
            self.root / INDEX,
            timeout=_BUSY_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            db.execute("PRAGMA journal_mode=TRUNCATE")
            db.execute("PRAGMA synchronous=OFF")
            for statement in _SCHEMA:
                db.execute(statement)
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            for fd, _uses in self._holds.values():
                os.close(fd)
            self._holds.clear()
            if self._db is not None:
                self._db.close()
                self._db = None

    @property
    def size(self) -> int:
        """Bytes the cache holds, in every process's files."""
        with self._lock, self._transaction() as index:
            return _total(index)

    def __contains__(self, sop_instance_uid: str) -> bool:
        with self._lock, self._transaction() as index:
            row = index.execute("SELECT 1 FROM entries WHERE uid = ?", (sop_instance_uid,))
            return row.fetchone() is not None

    def path(self, sop_instance_uid: str) -> Path:
        """Return where the instance is (or would be) kept. Raise ValueError if the UID is not
        a UID: it becomes a file name."""
        if not _UID.fullmatch(sop_instance_uid) or len(sop_instance_uid) > 64:
            raise ValueError(f"{sop_instance_uid!r} is not a UID")
        fan = hashlib.sha256(sop_instance_uid.encode("ascii")).hexdigest()[:2]
        return self.root / fan / (sop_instance_uid + SUFFIX)

    def get(self, sop_instance_uid: str) -> Path | None:
        """Return the cached file of an instance, marked used and kept from eviction (in every
        process) until `release`, or None if it is not here."""
        path = self.path(sop_instance_uid)
        now = time.time()
        with self._lock, self._transaction() as index:
            if not self._hold(sop_instance_uid, path):
                index.execute("DELETE FROM entries WHERE uid = ?", (sop_instance_uid,))
                return None
            fd, _uses = self._holds[sop_instance_uid]
            os.utime(fd, (now, now))
            size = os.fstat(fd).st_size
            index.execute(_RECORD, (sop_instance_uid, size, now))
        return path

    def put(self, sop_instance_uid: str, write: Callable[[BinaryIO], object]) -> Path:
        """Store an instance: `write` writes its Part-10 bytes into the file it is given.
        Return its path, kept from eviction until `release`. Nothing is kept if `write` raises
        (its exception propagates), nor if the bytes are not a Part-10 file (NotDicom)."""
        incoming = self.incoming(sop_instance_uid)
        try:
            write(incoming.file)
        except BaseException:
            incoming.abandon()
            raise
        return self.place(incoming)

    def incoming(self, sop_instance_uid: str) -> Incoming:
        """Return a new temporary file for an instance's Part-10 bytes, to `place` once they are
        written (or to `abandon`): writing and placing may then run on different threads, so
        that one placing (its fsyncs wait on the disk) overlaps the writing of the next."""
        final = self.path(sop_instance_uid)
        temporary = self.root / "tmp" / f"{sop_instance_uid}.{secrets.token_hex(4)}{PARTIAL}"
        out = temporary.open("x+b")
        fcntl.flock(out.fileno(), fcntl.LOCK_SH)  # not an orphan while it is written
        return Incoming(sop_instance_uid, final, temporary, out)

    def place(self, incoming: Incoming) -> Path:
        """Put the instance written into `incoming` under its final name, durably; return its
        path, kept from eviction until `release`. Raise NotDicom if the bytes are not a Part-10
        file, OSError if the disk fails; nothing is kept then."""
        try:
            with incoming.file as out:
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
                if os.pread(out.fileno(), 4, _PREAMBLE) != b"DICM":
                    raise NotDicom("the archive's answer is not a DICOM Part-10 file")
                final = incoming.final
                final.parent.mkdir(exist_ok=True)
                with self._lock, self._transaction() as index:
                    os.replace(incoming.temporary, final)
                    fsync_directory(final.parent)
                    if not self._hold(incoming.uid, final):
                        raise FileNotFoundError(f"{final} vanished as it was placed")
                    index.execute(_RECORD, (incoming.uid, size, time.time()))
                    self._evict(index)
        except BaseException:
            incoming.abandon()
            raise
        return final

    def release(self, sop_instance_uid: str) -> None:
        """End the hold `get` or `put` took on an instance; it may be evicted again."""
        with self._lock:
            fd, uses = self._holds.get(sop_instance_uid, (-1, 0))
            if uses > 1:
                self._holds[sop_instance_uid] = (fd, uses - 1)
                return
            if fd >= 0:
                del self._holds[sop_instance_uid]
                os.close(fd)
            if self._over():
                with self._transaction() as index:
                    self._evict(index)

    def scratch(self, sop_instance_uid: str) -> BinaryIO:
        """Return a new file under the cache (on the disk the high-water check watches), open
        for writing and reading, for a form of the instance made to send it (an inflated copy);
        no other process removes it as left over. The caller closes and unlinks it (its path
        is its `name`)."""
        self.path(sop_instance_uid)  # a UID, or ValueError: it becomes a file name
        name = f"{sop_instance_uid}.{secrets.token_hex(4)}{PARTIAL}"
        out = (self.root / "tmp" / name).open("x+b")
        fcntl.flock(out.fileno(), fcntl.LOCK_SH)
        return out

    def trim(self) -> None:
        """Evict what the limit or the disk's pressure asks for (the agent's housekeeping calls
        this, so a full disk empties the cache before anything else)."""
        try:
            with self._lock, self._transaction() as index:
                self._evict(index)
        except OSError as exc:
            logger.warning("could not trim the cache %s: %s", self.root, exc)

    # --- under self._lock ------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Yield the index inside an IMMEDIATE transaction: the other processes wait until it
        ends. Committed when the block ends, rolled back if it raises."""
        if self._db is None:
            raise OSError(f"the cache {self.root} is not open")
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise OSError(f"the cache index is unavailable: {exc}") from exc
        try:
            yield db
        except sqlite3.Error as exc:
            db.execute("ROLLBACK")
            raise OSError(f"the cache index failed: {exc}") from exc
        except BaseException:
            db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise OSError(f"the cache index failed: {exc}") from exc

    def _hold(self, uid: str, path: Path) -> bool:
        """Take (or add to) this process's shared lock on the instance's file; return False if
        there is no file."""
        fd, uses = self._holds.get(uid, (-1, 0))
        if fd >= 0:
            self._holds[uid] = (fd, uses + 1)
            return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        fcntl.flock(fd, fcntl.LOCK_SH)  # an evictor holds its exclusive lock only to unlink
        if os.fstat(fd).st_nlink == 0:  # evicted just before the lock was ours
            os.close(fd)
            return False
        self._holds[uid] = (fd, 1)
        return True

    def _evict(self, index: sqlite3.Connection) -> None:
        """Remove least recently used instances not in use, in any process, until the total
        fits the limit and the disk is no longer under pressure."""
        total = _total(index)
        pressed = self.pressure()
        kept = 0  # files in use, least recently used first: passed over
        while total > self.limit or pressed:
            rows = index.execute(
                "SELECT uid, size FROM entries ORDER BY used LIMIT ? OFFSET ?",
                (_EVICT_BATCH, kept),
            ).fetchall()
            if not rows:
                return
            for uid, size in rows:
                if total <= self.limit and not pressed:
                    return
                if uid in self._holds or not self._remove_unused(uid):
                    kept += 1
                    continue
                index.execute("DELETE FROM entries WHERE uid = ?", (uid,))
                total -= size
                if pressed:
                    pressed = self.pressure()

    def _over(self) -> bool:
        """Whether the cache is past its limit or the disk under pressure: one read of the
        total, outside any transaction (eviction checks again inside its own)."""
        if self._db is None:
            raise OSError(f"the cache {self.root} is not open")
        try:
            total = _total(self._db)
        except sqlite3.Error as exc:
            raise OSError(f"the cache index failed: {exc}") from exc
        return total > self.limit or self.pressure()

    def _remove_unused(self, uid: str) -> bool:
        """Unlink the instance's file unless a process holds it; return True if it is gone."""
        path = self.path(uid)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # in use by another process
            path.unlink(missing_ok=True)
            return True
        except OSError as exc:
            logger.warning("could not remove cached instance %s: %s", uid, exc)
            return False
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Incoming:
    """An instance being written into the cache (`InstanceCache.incoming`): `file` is open for
    writing at its start."""

    uid: str
    final: Path
    temporary: Path
    file: BinaryIO

    def abandon(self) -> None:
        """Drop what was written: nothing of it stays."""
        self.file.close()
        self.temporary.unlink(missing_ok=True)


def _total(index: sqlite3.Connection) -> int:
    row = index.execute("SELECT bytes FROM total").fetchone()
    return int(row[0]) if row is not None else 0


def _remove_orphans(tmp: Path) -> None:
    """Remove the temporary files no running put holds (their process died mid-write)."""
    for leftover in tmp.glob("*" + PARTIAL):
        try:
            fd = os.open(leftover, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            leftover.unlink(missing_ok=True)
        except BlockingIOError:
            continue  # another process is writing it
        finally:
            os.close(fd)
