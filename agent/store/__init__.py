"""The agent's durable state in SQLite: studies, instances, quarantine, events and jobs.

This package holds all of the project's SQL: this module the connection, its transactions,
instances and studies; `jobs` the job queue (`Store.jobs`); `uploads` the way of each study part
to the cloud (`Store.uploads`); `activity` what the status page shows (`Store.activity`); `audit`
the audit trail (`Store.audit`). One
connection serves the whole process: pynetdicom runs every association in its own thread, so the
connection is shared behind a lock, and every write is one short `BEGIN IMMEDIATE` transaction
(taking the write lock up front, so a transaction never fails half-way with SQLITE_BUSY after it
has read). The database runs in WAL mode with `synchronous=FULL`, so a committed row survives power
loss: the receiver answers a C-STORE with Success only after `record_instance` has returned.

Every time is passed in as `now` (epoch seconds), so callers and tests control the clock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent.store.activity import Activity, Bucket, PartSummary, Problem
from agent.store.audit import AuditEntry, AuditEvent, AuditOutcome, AuditRows
from agent.store.choices import Choices
from agent.store.errors import JobStateError, LeaseLost, SchemaError, StoreError
from agent.store.jobs import UPLOAD, Job, JobRecord, Jobs, Lease, enqueue, revive
from agent.store.quarantine import QuarantineEntry, QuarantineRows
from agent.store.records import InstanceState, JobState, Level, Outcome, StudyState, event
from agent.store.schema import (
    MIGRATIONS,
    SCHEMA_MIGRATIONS_TABLE,
    Migration,
    latest_version,
    outdated,
    schema_version,
    too_new,
)
from agent.store.uploads import Uploads

__all__ = [
    "MIGRATIONS",
    "UPLOAD",
    "Activity",
    "AuditEntry",
    "AuditEvent",
    "AuditOutcome",
    "AuditRows",
    "Bucket",
    "InstanceState",
    "Job",
    "JobRecord",
    "JobState",
    "JobStateError",
    "Jobs",
    "KnownInstance",
    "Lease",
    "LeaseLost",
    "Level",
    "Migration",
    "NewInstance",
    "Outcome",
    "PartSummary",
    "Problem",
    "QuarantineEntry",
    "QuarantineRows",
    "RecordResult",
    "SchemaError",
    "StatusSnapshot",
    "Store",
    "StoreError",
    "StudyState",
    "Uploads",
]

BUSY_TIMEOUT_MS = 10_000
_SYNCHRONOUS_FULL = 2


@dataclass(frozen=True)
class NewInstance:
    """An instance that is already durable in the spool, about to be recorded."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: str
    size: int
    sha256: str
    calling_ae: str


@dataclass(frozen=True)
class RecordResult:
    """What `record_instance` did.

    `obsolete_path` names a spool file that no row references any more; the caller deletes it
    after `record_instance` has returned (never before: until the commit, the old row still
    pointed at it). None means there is nothing to delete.
    """

    outcome: Outcome
    study_uid: str
    part: int
    obsolete_path: str | None


@dataclass(frozen=True)
class KnownInstance:
    """The current (not superseded) record of a SOP Instance UID."""

    sop_instance_uid: str
    sha256: str
    path: str
    size: int
    released: bool
    """The cloud holds its part (confirmed), or retention deleted the part's spool files:
    the spool copy is no longer needed."""


@dataclass(frozen=True)
class StatusSnapshot:
    """Counts for every state (0 included), the newest error event and the schema version."""

    studies: dict[str, int]
    instances: dict[str, int]
    jobs: dict[str, int]
    last_error: dict[str, Any] | None
    schema_version: int


@dataclass(frozen=True)
class _Current:
    """The current row of a SOP Instance UID, with the study part that holds it."""

    id: int
    sha256: str
    path: str
    size: int
    replaced_count: int
    study_id: int
    study_uid: str
    part: int
    part_state: str
    released: int
    """1 if the part is confirmed or its spool files were purged (see KnownInstance)."""


@dataclass(frozen=True)
class _Part:
    id: int
    study_uid: str
    part: int


class Store:
    """The one connection to the agent's database; safe to call from many threads."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._lock = threading.Lock()
        self.jobs = Jobs(self)
        self.uploads = Uploads(self)
        self.activity = Activity(self)
        self.quarantine = QuarantineRows(self)
        self.choices = Choices(self)
        self.audit = AuditRows(self)

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        create: bool = True,
        migrate: bool = False,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> Store:
        """Open the database at `path`; with `create`, create it (with the whole schema) if there
        is none. With `migrate`, bring an existing database's schema up to date.

        Only `dirigo run` and `dirigo migrate` migrate: an operator's command changes no schema
        behind the operator's back. Raise SchemaError if the schema is older than `migrations`
        bring it to and `migrate` is false, or if it is newer than they know (whatever
        `migrate` says). Raise StoreError if `create` is false and there is no database at
        `path`, if the database refuses WAL mode or `synchronous=FULL` (some network
        filesystems cannot share memory for WAL), or if a migration fails (a failed migration
        is rolled back whole, and is not recorded).
        """
        fresh = not path.exists()
        if fresh and not create:
            raise StoreError(f"no database at {path}")
        try:
            connection = _connect(path, create)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database at {path}: {exc}") from exc
        store = cls(connection)
        try:
            store._configure(path)
            store._check_schema(path, migrations, migrate=migrate or fresh)
        except BaseException:
            connection.close()
            raise
        return store

    def close(self) -> None:
        """Close the connection; the store cannot be used afterwards."""
        with self._lock:
            self._db.close()

    def _configure(self, path: Path) -> None:
        try:
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Read back: SQLite ignores a pragma it cannot honour instead of failing.
            synchronous = self._db.execute("PRAGMA synchronous").fetchone()[0]
            foreign_keys = self._db.execute("PRAGMA foreign_keys").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot configure database at {path}: {exc}") from exc
        if str(mode).lower() != "wal":
            raise StoreError(
                f"database at {path} refused WAL journal mode (got {mode!r}); "
                "put data_dir on a local filesystem"
            )
        if synchronous != _SYNCHRONOUS_FULL:
            raise StoreError(f"database at {path} refused synchronous=FULL (got {synchronous})")
        if foreign_keys != 1:
            raise StoreError(f"database at {path} refused foreign_keys=ON")

    def _check_schema(self, path: Path, migrations: Sequence[Migration], *, migrate: bool) -> None:
        known = latest_version(migrations)
        current = self._schema_version()
        if current > known:
            raise SchemaError(too_new(path, current, known))
        if current == known:
            return
        if not migrate:
            raise SchemaError(outdated(path, current, known))
        with self.write() as db:
            db.execute(SCHEMA_MIGRATIONS_TABLE)
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version > current:
                self._apply(migration)

    def _apply(self, migration: Migration) -> None:
        """Apply one migration and its record in one transaction (DDL is transactional in SQLite).

        Another process may have opened the same database concurrently (`dirigo status` while the
        daemon starts), so the version is checked again under the write lock.
        """
        try:
            with self.write() as db:
                if schema_version(db) >= migration.version:
                    return
                for statement in migration.statements:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
        except StoreError as exc:
            raise StoreError(
                f"migration {migration.version} ({migration.name}) failed: {exc}"
            ) from exc

    def _schema_version(self) -> int:
        with self.read() as db:
            return schema_version(db)

    # -- transactions ---------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one IMMEDIATE transaction under the lock; commit, or roll back on error.

        The store's own modules (`jobs`, `uploads`) write through this handle; nothing outside
        the package holds SQL. sqlite3 errors leave as StoreError, so callers handle one
        exception type.
        """
        with self._transaction("BEGIN IMMEDIATE") as db:
            yield db

    def check_writable(self) -> None:
        """Take the database's write lock and commit nothing. Raise StoreError if it cannot
        (locked for longer than the busy timeout, read-only, corrupt)."""
        with self.write():
            pass

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one read transaction, so several queries see one snapshot."""
        with self._transaction("BEGIN") as db:
            yield db

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute(begin)
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(str(exc)) from exc
                raise

    def _rollback(self) -> None:
        # SQLite rolls some failures back by itself (a full disk, for one); a second ROLLBACK
        # would then raise and hide the original error.
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- instances ------------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> KnownInstance | None:
        """Return the current (not superseded) record of `sop_instance_uid`, or None."""
        with self.read() as db:
            current = _current(db, sop_instance_uid)
        if current is None:
            return None
        return KnownInstance(
            sop_instance_uid, current.sha256, current.path, current.size, bool(current.released)
        )

    def record_instance(
        self, new: NewInstance, now: float, damaged: str | None = None
    ) -> RecordResult:
        """Record an instance already durable in the spool; return what was done.

        Identical content already current is a duplicate (the caller deletes `new.path`), unless
        the caller found its recorded copy `damaged` (missing, or not of its recorded size) and
        the part still needs it: then the new copy repairs the row, which now points at it (the
        caller deletes the damaged file), and the part's failed upload job is due again. New
        content goes into the study's open part, created as a new part if the latest one has
        closed. New content for a known SOP Instance UID replaces the old row in place if that row
        is still in an open part (the caller deletes the old file), or supersedes it if its part
        has closed (its file stays: the uploader owns it).
        """
        with self.write() as db:
            current = _current(db, new.sop_instance_uid)
            if current is not None and current.sha256 == new.sha256:
                if current.path == damaged and not current.released:
                    return _repair(db, current, new, now)
                return RecordResult(Outcome.DUPLICATE, current.study_uid, current.part, new.path)
            part = _open_part(db, new.study_uid, now)
            db.execute("UPDATE studies SET last_received_at = ? WHERE id = ?", (now, part.id))
            if current is None:
                _insert_instance(db, new, part.id, 0, now)
                return RecordResult(Outcome.STORED, part.study_uid, part.part, None)
            event(
                db,
                now,
                Level.WARNING,
                "replaced",
                f"replaced {new.sop_instance_uid} from {new.calling_ae}"
                f" ({current.sha256} → {new.sha256})",
                new.study_uid,
                new.sop_instance_uid,
            )
            if current.part_state == StudyState.OPEN:
                _replace_in_place(db, current, new, part.id, now)
                return RecordResult(Outcome.REPLACED, part.study_uid, part.part, current.path)
            db.execute("UPDATE instances SET superseded = 1 WHERE id = ?", (current.id,))
            _insert_instance(db, new, part.id, current.replaced_count + 1, now)
            return RecordResult(Outcome.REPLACED, part.study_uid, part.part, None)

    def record_quarantine(
        self,
        reason: str,
        path: str,
        calling_ae: str,
        sop_instance_uid: str | None,
        now: float,
        *,
        sha256: str | None = None,
        size: int = 0,
    ) -> str:
        """Record rejected input kept at `path` (relative to data_dir), and an error event;
        return the path of the copy kept. When the same sender's input with this `sha256` is
        already kept, count a repeat instead and return that copy's path (the caller deletes
        the one at `path`)."""
        with self.write() as db:
            kept, repeats = db.execute(
                "INSERT INTO quarantine (at, last_at, reason, path, calling_ae, sop_instance_uid,"
                " sha256, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (calling_ae, sha256) DO UPDATE SET repeats = repeats + 1,"
                " last_at = excluded.last_at RETURNING path, repeats",
                (now, now, reason, path, calling_ae, sop_instance_uid, sha256, size),
            ).fetchone()
            again = f" (again: {repeats + 1} times)" if repeats else ""
            event(
                db,
                now,
                Level.ERROR,
                "quarantined",
                f"quarantined input from {calling_ae} at {kept}{again}: {reason}",
                None,
                sop_instance_uid,
            )
        return str(kept)

    def trim_quarantine(self, before: float, max_bytes: int) -> list[str]:
        """Forget quarantined input last seen before `before`, then the oldest until the rest
        takes at most `max_bytes`; return the paths of the copies forgotten (the caller
        deletes them)."""
        with self.write() as db:
            old = db.execute(
                "DELETE FROM quarantine WHERE last_at < ? RETURNING path", (before,)
            ).fetchall()
            over = db.execute(
                "DELETE FROM quarantine WHERE id IN (SELECT id FROM (SELECT id, sum(size)"
                " OVER (ORDER BY last_at DESC, id DESC) AS kept FROM quarantine) WHERE kept > ?)"
                " RETURNING path",
                (max_bytes,),
            ).fetchall()
        return [path for (path,) in old + over]

    def referenced(self, paths: Collection[str]) -> set[str]:
        """Return those of `paths` an instance row references, superseded ones included."""
        with self.read() as db:
            rows = db.execute(
                "SELECT DISTINCT path FROM instances"
                " WHERE path IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted(paths)),),
            )
            return {path for (path,) in rows}

    def needed_copies(self) -> dict[str, str]:
        """Return {spool path: SOP Instance UID} of every current instance whose copy is still
        needed: its part is neither confirmed nor purged by retention."""
        with self.read() as db:
            rows = db.execute(
                "SELECT i.path, i.sop_instance_uid FROM instances i"
                " JOIN studies s ON s.id = i.study_id LEFT JOIN uploads u ON u.study_id = s.id"
                " WHERE i.superseded = 0 AND s.state != ? AND u.purged_at IS NULL",
                (StudyState.CONFIRMED,),
            )
            return dict(rows.fetchall())

    def quarantine_paths(self) -> set[str]:
        """Return the path of every quarantined copy a row records."""
        with self.read() as db:
            return {path for (path,) in db.execute("SELECT path FROM quarantine")}

    def spool_paths(self) -> set[str]:
        """Return every spool path an instance row references, superseded ones included."""
        with self.read() as db:
            return {path for (path,) in db.execute("SELECT path FROM instances")}

    # -- studies --------------------------------------------------------------------------

    def mark_stable(self, now: float, stable_after: float) -> list[tuple[str, int]]:
        """Close every open part quiet since `now - stable_after` (inclusive); return them.

        Each closed part gets state `stable`, an `upload` job due now, and an info event.
        """
        with self.write() as db:
            rows = db.execute(
                "UPDATE studies SET state = ?, stable_at = ?"
                " WHERE state = ? AND last_received_at <= ?"
                " RETURNING id, study_uid, part",
                (StudyState.STABLE, now, StudyState.OPEN, now - stable_after),
            ).fetchall()
            for study_id, study_uid, part in rows:
                enqueue(db, UPLOAD, study_id, now)
                event(db, now, Level.INFO, "stable", f"part {part} is stable", study_uid, None)
        return sorted((study_uid, part) for _, study_uid, part in rows)

    # -- operators ------------------------------------------------------------------------

    def status(self) -> StatusSnapshot:
        """Return counts per state (every state present, 0 included) and the newest error event.

        Instance counts are of current rows (a superseded version is not counted again);
        `quarantined` counts the quarantine table.
        """
        with self.read() as db:
            studies = _counts(db, "SELECT state, count(*) FROM studies GROUP BY state", StudyState)
            instances = _counts(
                db,
                "SELECT state, count(*) FROM instances WHERE superseded = 0 GROUP BY state",
                InstanceState,
            )
            (instances["quarantined"],) = db.execute("SELECT count(*) FROM quarantine").fetchone()
            jobs = _counts(db, "SELECT state, count(*) FROM jobs GROUP BY state", JobState)
            error = db.execute(
                "SELECT at, kind, message FROM events WHERE level = ?"
                " ORDER BY at DESC, id DESC LIMIT 1",
                (Level.ERROR,),
            ).fetchone()
            version = schema_version(db)
        last_error = None
        if error is not None:
            at = datetime.fromtimestamp(error[0], tz=UTC).isoformat()
            last_error = {"at": at, "kind": error[1], "message": error[2]}
        return StatusSnapshot(studies, instances, jobs, last_error, version)


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    # mode=rw: without `create`, never let a typo in data_dir leave an empty database behind.
    target = str(path) if create else f"file:{quote(str(path))}?mode=rw"
    return sqlite3.connect(
        target,
        uri=not create,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
    )


def _counts(db: sqlite3.Connection, query: str, states: type[StrEnum]) -> dict[str, int]:
    counts = {str(state): 0 for state in states}
    counts.update({state: count for state, count in db.execute(query)})
    return counts


def _current(db: sqlite3.Connection, sop_instance_uid: str) -> _Current | None:
    row = db.execute(
        "SELECT i.id, i.sha256, i.path, i.size, i.replaced_count, s.id, s.study_uid, s.part,"
        " s.state, s.state = ? OR u.purged_at IS NOT NULL"
        " FROM instances i JOIN studies s ON s.id = i.study_id"
        " LEFT JOIN uploads u ON u.study_id = s.id"
        " WHERE i.sop_instance_uid = ? AND i.superseded = 0",
        (StudyState.CONFIRMED, sop_instance_uid),
    ).fetchone()
    return None if row is None else _Current(*row)


def _repair(
    db: sqlite3.Connection, current: _Current, new: NewInstance, now: float
) -> RecordResult:
    """Point a row whose spool copy is lost at a new copy of the same content; revive the
    part's failed jobs (they failed on that copy)."""
    db.execute(
        "UPDATE instances SET path = ?, size = ? WHERE id = ?", (new.path, new.size, current.id)
    )
    revived = revive(db, current.study_id, now)
    again = f"; upload job {', '.join(map(str, revived))} is due again" if revived else ""
    event(
        db,
        now,
        Level.WARNING,
        "repaired",
        f"repaired {new.sop_instance_uid} from {new.calling_ae}: its spool copy {current.path}"
        f" was missing or damaged{again}",
        current.study_uid,
        new.sop_instance_uid,
    )
    return RecordResult(Outcome.REPAIRED, current.study_uid, current.part, current.path)


def _open_part(db: sqlite3.Connection, study_uid: str, now: float) -> _Part:
    """Return the study's open part, creating the next part if the latest one has closed."""
    row = db.execute(
        "SELECT id, part, state FROM studies WHERE study_uid = ? ORDER BY part DESC LIMIT 1",
        (study_uid,),
    ).fetchone()
    if row is not None and row[2] == StudyState.OPEN:
        return _Part(row[0], study_uid, row[1])
    part = 1 if row is None else row[1] + 1
    (study_id,) = db.execute(
        "INSERT INTO studies (study_uid, part, state, first_received_at, last_received_at)"
        " VALUES (?, ?, ?, ?, ?) RETURNING id",
        (study_uid, part, StudyState.OPEN, now, now),
    ).fetchone()
    return _Part(study_id, study_uid, part)


def _insert_instance(
    db: sqlite3.Connection, new: NewInstance, study_id: int, replaced_count: int, now: float
) -> None:
    db.execute(
        "INSERT INTO instances (study_id, sop_instance_uid, sop_class_uid, series_uid,"
        " transfer_syntax, path, size, sha256, state, calling_ae, received_at, replaced_count)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            study_id,
            new.sop_instance_uid,
            new.sop_class_uid,
            new.series_uid,
            new.transfer_syntax,
            new.path,
            new.size,
            new.sha256,
            InstanceState.RECEIVED,
            new.calling_ae,
            now,
            replaced_count,
        ),
    )


def _replace_in_place(
    db: sqlite3.Connection, current: _Current, new: NewInstance, study_id: int, now: float
) -> None:
    """Overwrite a row in an open part with new content.

    The new content may name another study (a corrected Study Instance UID); the row then moves
    to that study's open part, and the part it left is dropped if that left it empty, so no empty
    part is ever marked stable and uploaded.
    """
    db.execute(
        "UPDATE instances SET study_id = ?, sop_class_uid = ?, series_uid = ?,"
        " transfer_syntax = ?, path = ?, size = ?, sha256 = ?, calling_ae = ?, received_at = ?,"
        " replaced_count = replaced_count + 1 WHERE id = ?",
        (
            study_id,
            new.sop_class_uid,
            new.series_uid,
            new.transfer_syntax,
            new.path,
            new.size,
            new.sha256,
            new.calling_ae,
            now,
            current.id,
        ),
    )
    if current.study_id != study_id:
        db.execute(
            "DELETE FROM studies WHERE id = ?"
            " AND NOT EXISTS (SELECT 1 FROM instances WHERE study_id = ?)",
            (current.study_id, current.study_id),
        )
