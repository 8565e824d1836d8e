"""Watch folders: files dropped into a folder are imported like `dirigo send`, then moved away.

A radiology clerk copies a CD, or another hospital's export, into a watched folder. Each entry at
the folder's top level is one delivery: a file is taken once its size and modification time have
not changed for `watch.settle`; a directory once nothing anywhere in it has changed for that long
(so a CD being copied is taken whole, with its DICOMDIR); a watched folder with a DICOMDIR at its
top (a mounted CD) is one delivery itself. A directory holding a DICOMDIR is the
file set that DICOMDIR lists: the files it names are imported, any other file below it is
rejected. Names starting with a dot are left alone: rsync, Samba and macOS write temporary and
metadata files under such names.

"Can be opened exclusively" is, on Linux, a non-blocking `flock` on the file: it fails while a
writer that locks (Samba with strict locking, rsync --inplace with a lock, a cooperating script)
holds the file. Linux has no mandatory locks and no cheap way to see that another process has a
file open for writing, so a writer that neither locks nor pauses is caught by the settle time.

Each file goes through `Importer.import_file`, the receiver's own durable acceptance, and only
then moves: accepted to `done/`, refused (not DICOM, broken, quarantined) to `rejected/` with a
`<name>.reason` text beside it, each keeping its path relative to the watched folder (a name
taken already gets a `~N` suffix). The order is the promise: accept (fsynced, committed) → rename
(then fsync both directories). A crash between the two leaves the file where it was; the next
run imports it again, and acceptance of identical content is a duplicate: no second row, no
second part. A failure that is the gateway's (disk above high water, database busy) leaves the
file in place for a later try. From a folder that cannot be written to (a read-only mount) files
are copied instead, and a ledger in data_dir records each one taken (see `_Ledger`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.fileset import FileSet
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from agent.config import WatchDir, WatchSettings
from agent.importer import ACCEPTED, Importer, Result, is_dicomdir
from agent.liveness import Liveness
from agent.spool import fsync_directory

logger = logging.getLogger(__name__)

PART = "watch"
"""The name the import thread has, and reports progress under (`/healthz`)."""
REASON_SUFFIX = ".reason"
RESCAN = 30.0
"""Seconds between scans with no event: an overflowing inotify queue drops events."""
MIN_SCAN_INTERVAL = 0.25
"""A burst of events (a CD being copied) leads to one scan per this many seconds at most."""

Signature = tuple[tuple[str, int, int], ...]
"""What a delivery looks like now: (relative path, size, mtime in ns) of each of its files."""


class FolderWatch:
    """Watches `watch.dirs` with watchdog and imports each settled delivery, in a thread of its
    own; the supervisor calls `revive` to restart that thread if it dies."""

    def __init__(
        self,
        settings: WatchSettings,
        importer: Importer,
        liveness: Liveness | None = None,
        deadline: float = 0.0,
    ) -> None:
        self.settings = settings
        self.importer = importer
        self.liveness = liveness
        self.deadline = deadline
        """Seconds the thread may go without progress before `liveness` reports it."""
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self._watched: set[Path] = set()
        self._ledgers: dict[Path, _Ledger] = {}
        """The read-only folders (a mounted CD), whose files are copied out, not moved."""
        self._pending: dict[Path, tuple[Signature, float]] = {}
        self._reported: dict[Path, str] = {}

    def start(self) -> None:
        """Start the observer and the import thread; the first scan takes what is already there."""
        self._observer = self._new_observer()
        self._observer.start()
        self._watched = set()
        self._wake.set()
        self._thread = threading.Thread(target=self._loop, name=PART, daemon=True)
        if self.liveness is not None:
            # Not essential: a share or CD mount that hangs keeps this thread stuck whatever
            # systemd does, and a restart would cut off the DICOM receive that still works.
            self.liveness.watch(PART, self.deadline, self._thread, essential=False)
        self._thread.start()

    def _new_observer(self) -> BaseObserver:
        if self.settings.poll:
            return PollingObserver(timeout=min(self.settings.settle / 2, 2.0))
        return Observer()

    def alive(self) -> bool:
        """Return whether the import thread and its observer are running."""
        return bool(
            self._thread is not None
            and self._thread.is_alive()
            and self._observer is not None
            and self._observer.is_alive()
        )

    def revive(self) -> bool:
        """Restart the thread and the observer if either died; return whether they had."""
        if self._stop.is_set() or self._thread is None or self.alive():
            return False
        logger.error("the watch folder thread died; restarting it")
        self._stop_observer(5.0)
        self.start()
        return True

    def stop(self, timeout: float) -> None:
        """Stop after the file in hand (at most `timeout` seconds' wait)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.liveness is not None:
            self.liveness.unwatch(PART)
        self._stop_observer(timeout)

    def _stop_observer(self, timeout: float) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None

    def _loop(self) -> None:
        # Idle, it still loops every second (a beat for /healthz) and scans every RESCAN.
        next_rescan = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(min(self.settings.settle / 4, 1.0))
            self._wake.clear()
            now = time.monotonic()
            if woken or self._pending or now >= next_rescan:
                self.scan(now)
                next_rescan = now + RESCAN
            self._beat()
            self._stop.wait(MIN_SCAN_INTERVAL)

    def _beat(self, _copied: int = 0) -> None:
        if self.liveness is not None:
            self.liveness.beat(PART)

    def scan(self, now: float) -> None:
        """Look at every watched folder; import each delivery unchanged for `watch.settle`."""
        seen: set[Path] = set()
        for folder in self.settings.dirs:
            if not self._watch(folder):
                continue
            for entry in _deliveries(folder.path):
                if self._stop.is_set():
                    return
                signature = _signature(entry)
                if self._all_taken(folder, signature):
                    continue
                seen.add(entry)
                previous = self._pending.get(entry)
                if previous is None or previous[0] != signature:
                    self._pending[entry] = (signature, now)
                elif now - previous[1] >= self.settings.settle:
                    if self._take_settled(folder, entry):
                        del self._pending[entry]
                        seen.discard(entry)
                    else:  # the next try after another settle time, not at the next scan
                        self._pending[entry] = (signature, now)
        for gone in set(self._pending) - seen:
            del self._pending[gone]

    def _watch(self, folder: WatchDir) -> bool:
        """Schedule the observer on `folder` once it exists; return whether it is watched.

        A share not mounted yet is watched once it appears (checked at each scan)."""
        if folder.path in self._watched:
            return True
        problem = _unusable(folder)
        if problem is not None:
            self._report(folder.path, f"watch folder {folder.path} is not usable: {problem}")
            return False
        if _read_only(folder.path):
            name = hashlib.sha256(str(folder.path).encode()).hexdigest()[:16] + ".taken"
            ledger = _Ledger(self.importer.spool.data_dir / "watch" / name, folder.path)
            self._ledgers[folder.path] = ledger
            logger.info("%s is read-only: files are copied out, not moved", folder.path)
        if self._observer is not None:  # None when scans are driven by hand (tests)
            self._observer.schedule(_Wake(self._wake), str(folder.path), recursive=True)
        self._watched.add(folder.path)
        self._reported.pop(folder.path, None)
        logger.info("watching %s (done: %s, rejected: %s)", *_folders(folder))
        return True

    def _taken(self, folder: WatchDir, path: Path) -> bool:
        """Return whether `path`, in a read-only folder, was taken already."""
        ledger = self._ledgers.get(folder.path)
        return ledger is not None and ledger.holds_file(path)

    def _all_taken(self, folder: WatchDir, signature: Signature) -> bool:
        """Return whether every file of a delivery in a read-only folder was taken already."""
        ledger = self._ledgers.get(folder.path)
        return ledger is not None and all(
            ledger.holds(Path(path), size, mtime) for path, size, mtime in signature
        )

    def _report(self, key: Path, message: str) -> None:
        """Log `message` once until it changes (a scan every second must not flood the log)."""
        if self._reported.get(key) != message:
            self._reported[key] = message
            logger.error("%s", message)

    def _take_settled(self, folder: WatchDir, entry: Path) -> bool:
        """Take `entry`; return whether it is finished. A file that could not be moved (done/
        not writable, a full disk) stays, logged once, and is accepted again (a duplicate) at
        the next try."""
        try:
            return self._take(folder, entry)
        except OSError as exc:
            self._report(entry, f"watch: cannot take {entry}, will retry: {exc}")
            return False

    def _take(self, folder: WatchDir, entry: Path) -> bool:
        """Import one settled delivery; return whether it is finished (nothing of it left)."""
        if not entry.is_dir():
            return self._take_file(folder, entry)
        files = sorted(path for path in _files(entry))
        sets: dict[Path, set[Path] | None] = {}
        for path in files:
            if is_dicomdir(path):
                sets[path.parent] = self._file_set(folder, path, files)
        finished = True
        for path in files:
            if self._stop.is_set():
                return False
            if is_dicomdir(path) or self._taken(folder, path):
                continue
            owner = _governing(sets, path)
            if owner is None or path in owner[1]:
                finished = self._take_file(folder, path) and finished
            else:
                where = owner[0].relative_to(folder.path) / "DICOMDIR"
                self._reject(folder, path, f"not in the file set {where} lists")
        if not finished:
            return False
        for directory, listed in sets.items():
            index = next(p for p in files if p.parent == directory and is_dicomdir(p))
            if listed is not None and index.exists() and not self._taken(folder, index):
                self._move(folder, index, folder.done)
        if folder.path not in self._ledgers:
            _remove_empty(entry, keep=folder.path)
        return True

    def _file_set(self, folder: WatchDir, index: Path, files: list[Path]) -> set[Path] | None:
        """Return the files `index` (a DICOMDIR) lists, matched to `files` ignoring case (ISO
        9660 mounts may show lower case); None, with the DICOMDIR rejected, if it is unreadable.
        """
        try:
            file_set = FileSet(dcmread(index))
            named = [Path(instance.path) for instance in file_set]
        except Exception as exc:  # pydicom raises whatever a malformed DICOMDIR provokes
            # (NotImplementedError for an unknown VR, struct.error for a cut header, ...)
            if not self._taken(folder, index):
                self._reject(folder, index, f"unreadable DICOMDIR: {exc}")
            return None
        actual = {str(path).lower(): path for path in files}
        listed = {actual.get(str(path).lower(), path) for path in named}
        missing = [path for path in listed if not path.exists()]
        if missing:
            logger.info(
                "%s lists %d file(s) that are not there (taken already, or missing from the copy)",
                index,
                len(missing),
            )
        return listed

    def _take_file(self, folder: WatchDir, path: Path) -> bool:
        """Import one file if it can be locked; move it; return whether it is gone from the
        watched folder."""
        if self._taken(folder, path):
            return True
        with _locked(path) as locked:
            if not locked:
                return not path.exists()
            imported = self.importer.import_file(path, self._beat)
            if imported.result in ACCEPTED:
                self._move(folder, path, folder.done)
                logger.info("watch: %s %s", imported.result, path)
                return True
            if imported.result is Result.FAILED:
                # The gateway's problem, not the file's: it stays for the next try.
                self._report(path, f"watch: {path} not imported, will retry: {imported.reason}")
                return False
            self._reject(folder, path, f"{imported.result}: {imported.reason}")
            return True

    def _reject(self, folder: WatchDir, path: Path, reason: str) -> None:
        """Move `path` to `rejected/` and write its reason beside it."""
        target = self._move(folder, path, folder.rejected)
        _write_durably(target.with_name(target.name + REASON_SUFFIX), reason + "\n")
        logger.warning("watch: rejected %s: %s", path, reason)

    def _move(self, folder: WatchDir, path: Path, root: Path) -> Path:
        """Move `path` to the same relative place under `root` (from a read-only folder: copy
        it there, then record it as taken); return where it went."""
        self._reported.pop(path, None)
        target = _free_name(root / path.relative_to(folder.path))
        ledger = self._ledgers.get(folder.path)
        if ledger is None:
            return move(path, target)
        _make_dirs(target.parent)
        _copy_durably(path, target)
        ledger.add(path)
        return target


class _Ledger:
    """The files taken from one read-only folder, which stay there: each as its path below the
    folder, size and modification time, one JSON line appended and fsynced per file once it is
    copied out. A CD put in again is passed over; one with other files (or the same names,
    other times) is taken. A crash between the copy and the line copies that file once more."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.path = path
        self.folder = folder
        self._taken: set[tuple[str, int, int]] = set()
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                relative, size, mtime = json.loads(line)
            except (ValueError, TypeError):
                continue  # the last line, cut short by a crash: that file is taken again
            self._taken.add((str(relative), int(size), int(mtime)))

    def holds(self, file: Path, size: int, mtime_ns: int) -> bool:
        return (str(file.relative_to(self.folder)), size, mtime_ns) in self._taken

    def holds_file(self, file: Path) -> bool:
        st = file.stat()
        return self.holds(file, st.st_size, st.st_mtime_ns)

    def add(self, file: Path) -> None:
        st = file.stat()
        entry = (str(file.relative_to(self.folder)), st.st_size, st.st_mtime_ns)
        if not self.path.parent.is_dir():
            # 0700 as the rest of data_dir: a CD's folder names may carry a patient's name.
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            self.path.parent.chmod(0o700)
            fsync_directory(self.path.parent.parent)
        with self.path.open("a") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()
            os.fsync(out.fileno())
        fsync_directory(self.path.parent)
        self._taken.add(entry)


class _Wake(FileSystemEventHandler):
    """Any change under a watched folder wakes the import thread (which then scans)."""

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.wake.set()


def move(source: Path, target: Path) -> Path:
    """Move `source` to `target` durably (rename, or copy + fsync across file systems), then
    fsync both directories; return `target`."""
    _make_dirs(target.parent)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_durably(source, target)
        source.unlink()
    fsync_directory(target.parent)
    fsync_directory(source.parent)
    return target


def _copy_durably(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a temporary file, fsynced, then renamed into place."""
    fd, name = tempfile.mkstemp(prefix=".moving-", dir=target.parent)
    with os.fdopen(fd, "wb") as copy, source.open("rb") as original:
        shutil.copyfileobj(original, copy)
        copy.flush()
        os.fsync(copy.fileno())
    os.rename(name, target)
    fsync_directory(target.parent)


def _make_dirs(directory: Path) -> None:
    """Create `directory` and its missing parents, each made durable in its parent."""
    if directory.is_dir():
        return
    _make_dirs(directory.parent)
    with contextlib.suppress(FileExistsError):
        directory.mkdir()
    fsync_directory(directory.parent)


def _free_name(target: Path) -> Path:
    """Return `target`, or `target~N` with the smallest N free, if a file has the name already
    (another CD with the same file names)."""
    candidate, n = target, 0
    while candidate.exists() or candidate.with_name(candidate.name + REASON_SUFFIX).exists():
        n += 1
        candidate = target.with_name(f"{target.name}~{n}")
    return candidate


def _write_durably(path: Path, text: str) -> None:
    fd, name = tempfile.mkstemp(prefix=".reason-", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.rename(name, path)
    fsync_directory(path.parent)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold a non-blocking exclusive flock on `path` while in the block; yield False if another
    process holds a lock on it or it is gone."""
    try:
        # O_NONBLOCK: a FIFO must not hang the thread (regular files ignore the flag).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _unusable(folder: WatchDir) -> str | None:
    """Return why files cannot be taken from `folder`, or None if they can."""
    if not folder.path.is_dir():
        return "not a directory (not mounted yet?)"
    if not os.access(folder.path, os.R_OK | os.X_OK):
        return "not readable"
    return None


def _read_only(directory: Path) -> bool:
    """Return whether files cannot be moved out of `directory` (a read-only mount, or no
    write permission): then they are copied."""
    read_only_mount = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    return read_only_mount or not os.access(directory, os.W_OK | os.X_OK)


def _folders(folder: WatchDir) -> tuple[Path, Path, Path]:
    return folder.path, folder.done, folder.rejected


def _deliveries(directory: Path) -> list[Path]:
    """Return the deliveries in a watched folder: each entry at its top, or the folder itself
    when a DICOMDIR lies there (a mounted CD, or a CD's contents copied in)."""
    entries = _entries(directory)
    if any(is_dicomdir(entry) and entry.is_file() for entry in entries):
        return [directory]
    return entries


def _entries(directory: Path) -> list[Path]:
    """Return the files and directories at the top of `directory`, skipping dot names,
    symbolic links and special files (a FIFO, a socket)."""
    try:
        with os.scandir(directory) as it:
            return sorted(
                Path(e.path)
                for e in it
                if not e.name.startswith(".")
                and (e.is_file(follow_symlinks=False) or e.is_dir(follow_symlinks=False))
            )
    except OSError as exc:
        logger.error("cannot list watch folder %s: %s", directory, exc.strerror)
        return []


def _files(directory: Path) -> Iterator[Path]:
    """Yield every regular file below `directory`, skipping dot names and symbolic links."""
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                yield path


def _signature(entry: Path) -> Signature:
    paths = [entry] if not entry.is_dir() else list(_files(entry))
    found = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        found.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(found)


def _governing(sets: dict[Path, set[Path] | None], path: Path) -> tuple[Path, set[Path]] | None:
    """Return the directory and file set of the nearest DICOMDIR above `path`, or None if none
    governs it (no DICOMDIR, or an unreadable one: then each file is imported on its own)."""
    owners = [(d, listed) for d, listed in sets.items() if path.is_relative_to(d) and listed]
    return max(owners, key=lambda owner: len(owner[0].parts)) if owners else None


def _remove_empty(top: Path, keep: Path) -> None:
    """Remove `top` and the directories below it that are empty now, except `keep` (the
    watched folder itself)."""
    for root, _dirs, _names in os.walk(top, topdown=False):
        if Path(root) == keep:
            continue
        with contextlib.suppress(OSError):  # not empty: a dot file, or a file left to retry
            os.rmdir(root)
