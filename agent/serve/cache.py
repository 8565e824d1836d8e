"""A bounded local cache of instances fetched from the cloud, keyed by SOP Instance UID.

Each instance is written to a temporary name, fsynced and renamed into place (then its directory
is fsynced), so a file under its final name is always whole: a crash leaves at most a temporary
file, which the next start removes. A retrieval that was interrupted finds what it already
fetched and resumes from there. When the cache passes its size limit, the least recently used
files go first (their modification time records their last use, so the order survives a
restart); files in use by a retrieval in progress are kept.

Several processes may share the directory (the agent and `dirigo retrieve`): each keeps its own
index of it, and a file another removed is simply fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.spool import fsync_directory

logger = logging.getLogger(__name__)

SUFFIX = ".dcm"
PARTIAL = ".partial"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_PREAMBLE = 128


class NotDicom(ValueError):
    """What was fetched is not a DICOM Part-10 file."""


@dataclass
class _Entry:
    size: int
    used: float


class InstanceCache:
    """Instances under `root` (`root/ab/UID.dcm`), at most `limit` bytes of them (more only
    while files in use need it). Thread-safe."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._pins: Counter[str] = Counter()
        self._total = 0

    def open(self) -> InstanceCache:
        """Create the directory if needed, remove temporary files a crash left, index the
        instances present and trim to the limit. Raise OSError if the directory is unusable."""
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        for leftover in (self.root / "tmp").glob("*" + PARTIAL):
            leftover.unlink(missing_ok=True)
        entries: dict[str, _Entry] = {}
        for path in self.root.glob("??/*" + SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                entries[path.name.removesuffix(SUFFIX)] = _Entry(stat.st_size, stat.st_mtime)
        with self._lock:
            self._entries = entries
            self._total = sum(entry.size for entry in entries.values())
            self._evict()
        return self

    @property
    def size(self) -> int:
        """Bytes the cache holds, as far as this process knows."""
        with self._lock:
            return self._total

    def __contains__(self, sop_instance_uid: str) -> bool:
        with self._lock:
            return sop_instance_uid in self._entries

    def path(self, sop_instance_uid: str) -> Path:
        """Return where the instance is (or would be) kept. Raise ValueError if the UID is not
        a UID: it becomes a file name."""
        if not _UID.fullmatch(sop_instance_uid) or len(sop_instance_uid) > 64:
            raise ValueError(f"{sop_instance_uid!r} is not a UID")
        fan = hashlib.sha256(sop_instance_uid.encode("ascii")).hexdigest()[:2]
        return self.root / fan / (sop_instance_uid + SUFFIX)

    def get(self, sop_instance_uid: str) -> Path | None:
        """Return the cached file of an instance, marked used and kept from eviction until
        `release`, or None if it is not here."""
        path = self.path(sop_instance_uid)
        now = time.time()
        with self._lock:
            self._forget(sop_instance_uid)
            try:
                os.utime(path, (now, now))
                size = path.stat().st_size
            except FileNotFoundError:
                return None
            self._entries[sop_instance_uid] = _Entry(size, now)
            self._total += size
            self._pins[sop_instance_uid] += 1
        return path

    def put(self, sop_instance_uid: str, write: Callable[[BinaryIO], object]) -> Path:
        """Store an instance: `write` writes its Part-10 bytes into the file it is given.
        Return its path, kept from eviction until `release`. Nothing is kept if `write` raises
        (its exception propagates), nor if the bytes are not a Part-10 file (NotDicom)."""
        final = self.path(sop_instance_uid)
        temporary = self.root / "tmp" / f"{sop_instance_uid}.{secrets.token_hex(4)}{PARTIAL}"
        try:
            with temporary.open("xb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
            _check_part10(temporary)
            final.parent.mkdir(exist_ok=True)
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_directory(final.parent)
        with self._lock:
            self._forget(sop_instance_uid)
            self._entries[sop_instance_uid] = _Entry(size, time.time())
            self._total += size
            self._pins[sop_instance_uid] += 1
            self._evict()
        return final

    def release(self, sop_instance_uid: str) -> None:
        """End the hold `get` or `put` took on an instance; it may be evicted again."""
        with self._lock:
            self._pins[sop_instance_uid] -= 1
            if self._pins[sop_instance_uid] <= 0:
                del self._pins[sop_instance_uid]
            self._evict()

    def _forget(self, sop_instance_uid: str) -> None:
        entry = self._entries.pop(sop_instance_uid, None)
        if entry is not None:
            self._total -= entry.size

    def _evict(self) -> None:
        """Remove least recently used instances not in use until the total fits the limit."""
        if self._total <= self.limit:
            return
        for uid, _entry in sorted(self._entries.items(), key=lambda item: item[1].used):
            if self._total <= self.limit:
                break
            if self._pins[uid]:
                continue
            try:
                self.path(uid).unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("could not remove cached instance %s: %s", uid, exc)
                continue
            self._forget(uid)


def _check_part10(path: Path) -> None:
    with path.open("rb") as f:
        f.seek(_PREAMBLE)
        if f.read(4) != b"DICM":
            raise NotDicom("the archive's answer is not a DICOM Part-10 file")
