"""Looking after the database file itself, running agent or not: its integrity and its backup.

Both open their own connection, never through `Store.open` (which migrates): a check or a
backup changes nothing in the agent's database. In WAL mode a reader never blocks the agent's
writers, and sees one consistent snapshot for as long as its read transaction lasts.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from agent.store.errors import StoreError
from agent.store.schema import latest_version, schema_version

_BUSY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Integrity:
    """What `PRAGMA quick_check` found (["ok"] when nothing), and the schema versions."""

    problems: list[str]
    schema_version: int
    known_version: int

    @property
    def ok(self) -> bool:
        return self.problems == ["ok"]


@dataclass(frozen=True)
class Backup:
    """A finished backup: where, how many bytes, and the instance rows it holds."""

    path: Path
    size: int
    instances: int


@contextlib.contextmanager
def _opened(path: Path, mode: str) -> Iterator[sqlite3.Connection]:
    if not path.is_file():
        raise StoreError(f"no database at {path}")
    try:
        db = sqlite3.connect(
            f"file:{quote(str(path))}?mode={mode}",
            uri=True,
            timeout=_BUSY_TIMEOUT_S,
            isolation_level=None,
        )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database at {path}: {exc}") from exc
    try:
        yield db
    except sqlite3.Error as exc:
        raise StoreError(f"database at {path}: {exc}") from exc
    finally:
        db.close()


def check(path: Path) -> Integrity:
    """Run `PRAGMA quick_check` on the database at `path` and read its schema version.
    Raise StoreError if it cannot be opened or read at all."""
    with _opened(path, "ro") as db:
        problems = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
        version = schema_version(db)
    return Integrity(problems, version, latest_version())


def version_of(path: Path) -> int:
    """The schema version of the database at `path`, read without changing anything (0 when
    nothing was ever migrated). Raise StoreError if there is none or it cannot be read."""
    with _opened(path, "ro") as db:
        return schema_version(db)


def backup(path: Path, target: Path) -> Backup:
    """Copy the database at `path` into `target` with SQLite's online backup, consistent
    while the agent writes: one read snapshot, copied whole in one step.

    The copy is written beside `target` under a temporary name (mode 0600), checked with
    `PRAGMA quick_check`, fsynced and renamed over `target`, then the directory is fsynced:
    `target` is never a partial copy. It is a self-contained file (rollback journal, not
    WAL). Raise StoreError if the database cannot be read, OSError if `target` cannot be
    written, and StoreError if the copy fails its check.
    """
    temporary = target.with_name(f".{target.name}.partial-{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        with _opened(path, "rw") as source, _opened(temporary, "rw") as copy:
            # pages=-1: one step, so the copy is the snapshot of one read transaction even
            # though the agent keeps committing meanwhile (a stepped copy would restart).
            source.backup(copy, pages=-1)
            copy.execute("PRAGMA journal_mode = DELETE")
            problems = [str(row[0]) for row in copy.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreError(f"the backup failed its check: {'; '.join(problems[:3])}")
            (instances,) = copy.execute("SELECT count(*) FROM instances").fetchone()
        _flush(temporary)
        os.rename(temporary, target)
        _flush(target.parent, directory=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return Backup(target, target.stat().st_size, int(instances))


def _flush(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
