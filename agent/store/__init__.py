"""The agent's durable state in SQLite: studies, instances, quarantine, events and jobs.

This module holds all of the project's SQL. One connection serves the whole process: pynetdicom
runs every association in its own thread, so the connection is shared behind a lock, and every
write is one short `BEGIN IMMEDIATE` transaction (taking the write lock up front, so a
transaction never fails half-way with SQLITE_BUSY after it has read). The database runs in WAL
mode with `synchronous=FULL`, so a committed row survives power loss: the receiver answers a
C-STORE with Success only after `record_instance` has returned.

Work is claimed, not popped (litequeue's pattern): `claim_job` leases a job to an owner, and a
lease that expires without `complete_job` or `fail_job` is returned to `ready` by
`requeue_expired`.

Every time is passed in as `now` (epoch seconds), so callers and tests control the clock.
"""

from __future__ import annotations

import json
import math
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

from agent.store.records import InstanceState, JobState, Level, Outcome, StudyState, event
from agent.store.schema import MIGRATIONS, SCHEMA_MIGRATIONS_TABLE, Migration
from agent.store.uploads import Uploads

__all__ = [
    "MIGRATIONS",
    "UPLOAD",
    "InstanceState",
    "Job",
    "JobRecord",
    "JobState",
    "JobStateError",
    "KnownInstance",
    "Level",
    "Migration",
    "NewInstance",
    "Outcome",
    "RecordResult",
    "StatusSnapshot",
    "Store",
    "StoreError",
    "StudyState",
    "Uploads",
]

BUSY_TIMEOUT_MS = 10_000
_SYNCHRONOUS_FULL = 2


class StoreError(Exception):
    """The database cannot be opened, migrated or written; or a job is not held by its caller."""


class JobStateError(StoreError):
    """An operator asked for a job that does not exist, or for a change its state forbids."""


UPLOAD = "upload"
CANCELLED = "cancelled by operator"
"""The last error of a job an operator cancelled."""


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


@dataclass(frozen=True)
class Job:
    """A job leased to `lease_owner` until `lease_expires_at`."""

    id: int
    kind: str
    study_id: int
    study_uid: str
    part: int
    attempts: int
    lease_owner: str
    lease_expires_at: float


@dataclass(frozen=True)
class JobRecord:
    """A job as an operator sees it, whatever its state. Times are epoch seconds; a failed job
    with no `next_attempt_at` has failed for good (until an operator retries it)."""

    id: int
    kind: str
    state: JobState
    study_uid: str
    part: int
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    lease_owner: str | None
    lease_expires_at: float | None
    updated_at: float


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
    replaced_count: int
    study_id: int
    study_uid: str
    part: int
    part_state: str


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
        self.uploads = Uploads(self)

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: Path, *, create: bool = True, migrations: Sequence[Migration] = MIGRATIONS
    ) -> Store:
        """Open (and, with `create`, create) the database at `path` and bring its schema up to date.

        Raise StoreError if `create` is false and there is no database at `path`, if the database
        refuses WAL mode or `synchronous=FULL` (some network filesystems cannot share memory for
        WAL), if its schema is newer than this code knows, or if a migration fails (a failed
        migration is rolled back whole, and is not recorded).
        """
        if not create and not path.is_file():
            raise StoreError(f"no database at {path}")
        try:
            connection = _connect(path, create)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database at {path}: {exc}") from exc
        store = cls(connection)
        try:
            store._configure(path)
            store._migrate(migrations)
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

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        known = max((m.version for m in migrations), default=0)
        with self._write() as db:
            db.execute(SCHEMA_MIGRATIONS_TABLE)
        current = self._schema_version()
        if current > known:
            raise StoreError(
                f"database schema version {current} is newer than this Dirigo knows ({known}); "
                "upgrade Dirigo or restore a database written by this version"
            )
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version > current:
                self._apply(migration)

    def _apply(self, migration: Migration) -> None:
        """Apply one migration and its record in one transaction (DDL is transactional in SQLite).

        Another process may have opened the same database concurrently (`dirigo status` while the
        daemon starts), so the version is checked again under the write lock.
        """
        try:
            with self._write() as db:
                if _version(db) >= migration.version:
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
        with self._read() as db:
            return _version(db)

    # -- transactions ---------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one IMMEDIATE transaction under the lock; commit, or roll back on error.

        sqlite3 errors leave as StoreError, so callers handle one exception type.
        """
        with self._transaction("BEGIN IMMEDIATE") as db:
            yield db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
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
        with self._read() as db:
            row = db.execute(
                "SELECT sop_instance_uid, sha256, path FROM instances"
                " WHERE sop_instance_uid = ? AND superseded = 0",
                (sop_instance_uid,),
            ).fetchone()
        return None if row is None else KnownInstance(*row)

    def record_instance(self, new: NewInstance, now: float) -> RecordResult:
        """Record an instance already durable in the spool; return what was done.

        Identical content already current is a duplicate (the caller deletes `new.path`). New
        content goes into the study's open part, created as a new part if the latest one has
        closed. New content for a known SOP Instance UID replaces the old row in place if that row
        is still in an open part (the caller deletes the old file), or supersedes it if its part
        has closed (its file stays: the uploader owns it).
        """
        with self._write() as db:
            current = _current(db, new.sop_instance_uid)
            if current is not None and current.sha256 == new.sha256:
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
        self, reason: str, path: str, calling_ae: str, sop_instance_uid: str | None, now: float
    ) -> None:
        """Record rejected input kept at `path` (relative to data_dir), and an error event."""
        with self._write() as db:
            db.execute(
                "INSERT INTO quarantine (at, reason, path, calling_ae, sop_instance_uid)"
                " VALUES (?, ?, ?, ?, ?)",
                (now, reason, path, calling_ae, sop_instance_uid),
            )
            event(
                db,
                now,
                Level.ERROR,
                "quarantined",
                f"quarantined input from {calling_ae} at {path}: {reason}",
                None,
                sop_instance_uid,
            )

    def spool_paths(self) -> set[str]:
        """Return every spool path an instance row references, superseded ones included."""
        with self._read() as db:
            return {path for (path,) in db.execute("SELECT path FROM instances")}

    # -- studies --------------------------------------------------------------------------

    def mark_stable(self, now: float, stable_after: float) -> list[tuple[str, int]]:
        """Close every open part quiet since `now - stable_after` (inclusive); return them.

        Each closed part gets state `stable`, an `upload` job due now, and an info event.
        """
        with self._write() as db:
            rows = db.execute(
                "UPDATE studies SET state = ?, stable_at = ?"
                " WHERE state = ? AND last_received_at <= ?"
                " RETURNING id, study_uid, part",
                (StudyState.STABLE, now, StudyState.OPEN, now - stable_after),
            ).fetchall()
            for study_id, study_uid, part in rows:
                db.execute(
                    "INSERT INTO jobs (kind, study_id, state, next_attempt_at, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (UPLOAD, study_id, JobState.READY, now, now, now),
                )
                event(db, now, Level.INFO, "stable", f"part {part} is stable", study_uid, None)
        return sorted((study_uid, part) for _, study_uid, part in rows)

    # -- jobs -----------------------------------------------------------------------------

    def requeue_expired(self, now: float, *, every_claim: bool = False) -> int:
        """Return every claimed job whose lease expired by `now` (with `every_claim`, every
        claimed job: at start-up they all belong to a run that is over) to `ready`, due now;
        return how many."""
        expired_by = math.inf if every_claim else now
        with self._write() as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires_at = NULL,"
                " next_attempt_at = ?, updated_at = ?"
                " WHERE state = ? AND lease_expires_at <= ?"
                " RETURNING id, kind, (SELECT study_uid FROM studies WHERE id = study_id)",
                (JobState.READY, now, now, JobState.CLAIMED, expired_by),
            ).fetchall()
            for job_id, kind, study_uid in rows:
                message = f"{kind} job {job_id}: lease expired, requeued"
                event(db, now, Level.WARNING, "lease_expired", message, study_uid, None)
        return len(rows)

    def claim_job(self, kind: str, owner: str, lease_seconds: float, now: float) -> Job | None:
        """Lease the job of `kind` due soonest to `owner` for `lease_seconds`; None if none is due.

        Due means `ready`, or `failed` with a next attempt time that has come (a permanent
        failure has none). The claim counts as an attempt.
        """
        with self._write() as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, lease_owner = ?,"
                " lease_expires_at = ?, updated_at = ?"
                " WHERE id = (SELECT id FROM jobs WHERE kind = ?"
                "   AND state IN (?, ?) AND coalesce(next_attempt_at, 0) <= ?"
                "   AND NOT (state = ? AND next_attempt_at IS NULL)"
                "   ORDER BY next_attempt_at, id LIMIT 1)"
                " RETURNING id, kind, study_id, attempts, lease_owner, lease_expires_at",
                (
                    JobState.CLAIMED,
                    owner,
                    now + lease_seconds,
                    now,
                    kind,
                    JobState.READY,
                    JobState.FAILED,
                    now,
                    JobState.FAILED,
                ),
            ).fetchall()
            if not rows:
                return None
            job_id, job_kind, study_id, attempts, lease_owner, expires = rows[0]
            study_uid, part = db.execute(
                "SELECT study_uid, part FROM studies WHERE id = ?", (study_id,)
            ).fetchone()
        return Job(job_id, job_kind, study_id, study_uid, part, attempts, lease_owner, expires)

    def renew_lease(self, job_id: int, owner: str, lease_seconds: float, now: float) -> bool:
        """Extend `owner`'s lease on a job to `now + lease_seconds`; False if it is not held.

        A lease that has expired is still held until `requeue_expired` takes it back.
        """
        with self._write() as db:
            changed = db.execute(
                "UPDATE jobs SET lease_expires_at = ?, updated_at = ?"
                " WHERE id = ? AND state = ? AND lease_owner = ?",
                (now + lease_seconds, now, job_id, JobState.CLAIMED, owner),
            ).rowcount
        return changed == 1

    def release_job(self, job_id: int, owner: str, now: float) -> None:
        """Give a claimed job back to `ready`, due now, without counting the attempt (the agent
        is stopping). A job `owner` no longer holds is left alone."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET state = ?, attempts = max(attempts - 1, 0), lease_owner = NULL,"
                " lease_expires_at = NULL, next_attempt_at = ?, updated_at = ?"
                " WHERE id = ? AND state = ? AND lease_owner = ?",
                (JobState.READY, now, now, job_id, JobState.CLAIMED, owner),
            )

    def complete_job(self, job_id: int, owner: str, now: float) -> None:
        """Mark a job done. Raise StoreError if `owner` no longer holds its lease."""
        with self._write() as db:
            changed = db.execute(
                "UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires_at = NULL,"
                " next_attempt_at = NULL, last_error = NULL, updated_at = ?"
                " WHERE id = ? AND state = ? AND lease_owner = ?",
                (JobState.DONE, now, job_id, JobState.CLAIMED, owner),
            ).rowcount
            if changed != 1:
                raise StoreError(f"job {job_id} is not held by {owner}")

    def fail_job(
        self, job_id: int, owner: str, error: str, next_attempt_at: float | None, now: float
    ) -> None:
        """Record a failed attempt; retry at `next_attempt_at`, or never if it is None.

        A permanent failure stays `failed` until an operator retries it, and is an error event
        (shown as `last_error`); a retryable one is a warning. Raise StoreError if `owner` no
        longer holds the job's lease.
        """
        with self._write() as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires_at = NULL,"
                " next_attempt_at = ?, last_error = ?, updated_at = ?"
                " WHERE id = ? AND state = ? AND lease_owner = ?"
                " RETURNING kind, attempts, (SELECT study_uid FROM studies WHERE id = study_id)",
                (JobState.FAILED, next_attempt_at, error, now, job_id, JobState.CLAIMED, owner),
            ).fetchall()
            if not rows:
                raise StoreError(f"job {job_id} is not held by {owner}")
            kind, attempts, study_uid = rows[0]
            level = Level.ERROR if next_attempt_at is None else Level.WARNING
            retry = "permanently" if next_attempt_at is None else "will retry"
            message = f"{kind} job {job_id} attempt {attempts} failed ({retry}): {error}"
            event(db, now, level, f"{kind}_failed", message, study_uid, None)

    def retry_jobs(self, job_ids: Sequence[int], now: float) -> list[JobRecord]:
        """Make every job in `job_ids` ready and due `now`, keeping its attempts; return them.

        Only a failed or ready job can be retried. All or nothing: raise JobStateError, naming
        every offending id, if one does not exist, is done or is claimed by a worker. Each retry
        is an info event.
        """
        allowed = (JobState.FAILED, JobState.READY)
        with self._write() as db:
            before = _jobs_for_action(
                db, job_ids, allowed, "only a failed or ready job can be retried"
            )
            for job in before:
                db.execute(
                    "UPDATE jobs SET state = ?, next_attempt_at = ?, lease_owner = NULL,"
                    " lease_expires_at = NULL, updated_at = ? WHERE id = ?",
                    (JobState.READY, now, now, job.id),
                )
                message = (
                    f"{job.kind} job {job.id} retried by operator"
                    f" (was {job.state}, {job.attempts} attempt(s) so far)"
                )
                event(db, now, Level.INFO, "job_retried", message, job.study_uid, None)
            return _job_records(db, _BY_IDS, _ids(job_ids))

    def cancel_jobs(self, job_ids: Sequence[int], now: float) -> list[JobRecord]:
        """Fail every job in `job_ids` for good with the error "cancelled by operator"; return
        them.

        Any job not done can be cancelled. A claimed job loses its lease: its worker can no
        longer renew, complete or fail it. All or nothing: raise JobStateError, naming every
        offending id, if one does not exist or is done. Each cancellation is an info event.
        """
        allowed = (JobState.READY, JobState.CLAIMED, JobState.FAILED)
        with self._write() as db:
            before = _jobs_for_action(db, job_ids, allowed, "a done job cannot be cancelled")
            for job in before:
                db.execute(
                    "UPDATE jobs SET state = ?, next_attempt_at = NULL, lease_owner = NULL,"
                    " lease_expires_at = NULL, last_error = ?, updated_at = ? WHERE id = ?",
                    (JobState.FAILED, CANCELLED, now, job.id),
                )
                held = f", claimed by {job.lease_owner}" if job.state == JobState.CLAIMED else ""
                message = f"{job.kind} job {job.id} cancelled by operator (was {job.state}{held})"
                event(db, now, Level.INFO, "job_cancelled", message, job.study_uid, None)
            return _job_records(db, _BY_IDS, _ids(job_ids))

    # -- operators ------------------------------------------------------------------------

    def list_jobs(self, states: Collection[JobState] = tuple(JobState)) -> list[JobRecord]:
        """Return the jobs in `states` (every state by default), oldest first."""
        with self._read() as db:
            return _job_records(
                db, "j.state IN (SELECT value FROM json_each(?))", json.dumps(list(states))
            )

    def failed_jobs(self) -> list[JobRecord]:
        """Return every failed job: those failed for good first (they need an operator), then
        by their next attempt time."""
        with self._read() as db:
            return _job_records(
                db,
                "j.state = ?",
                JobState.FAILED,
                order="j.next_attempt_at IS NOT NULL, j.next_attempt_at, j.id",
            )

    def status(self) -> StatusSnapshot:
        """Return counts per state (every state present, 0 included) and the newest error event.

        Instance counts are of current rows (a superseded version is not counted again);
        `quarantined` counts the quarantine table.
        """
        with self._read() as db:
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
            version = _version(db)
        last_error = None
        if error is not None:
            at = datetime.fromtimestamp(error[0], tz=UTC).isoformat()
            last_error = {"at": at, "kind": error[1], "message": error[2]}
        return StatusSnapshot(studies, instances, jobs, last_error, version)


_BY_IDS = "j.id IN (SELECT value FROM json_each(?))"
"""Jobs whose id is in a JSON array (one parameter, however many ids)."""


def _job_records(
    db: sqlite3.Connection, where: str, param: object, *, order: str = "j.id"
) -> list[JobRecord]:
    rows = db.execute(
        "SELECT j.id, j.kind, j.state, s.study_uid, s.part, j.attempts, j.next_attempt_at,"
        " j.last_error, j.lease_owner, j.lease_expires_at, j.updated_at"
        f" FROM jobs j JOIN studies s ON s.id = j.study_id WHERE {where} ORDER BY {order}",
        (param,),
    ).fetchall()
    return [JobRecord(job_id, kind, JobState(state), *rest) for job_id, kind, state, *rest in rows]


def _ids(job_ids: Sequence[int]) -> str:
    return json.dumps([int(job_id) for job_id in job_ids])


def _jobs_for_action(
    db: sqlite3.Connection, job_ids: Sequence[int], allowed: Sequence[JobState], rule: str
) -> list[JobRecord]:
    """Return the jobs `job_ids` names, once each; raise JobStateError naming every id that
    does not exist or whose state is not in `allowed` (and the `rule` that forbids it)."""
    found = {job.id: job for job in _job_records(db, _BY_IDS, _ids(job_ids))}
    missing = [f"there is no job {i}" for i in dict.fromkeys(job_ids) if i not in found]
    forbidden = [f"job {j.id} is {j.state}" for j in found.values() if j.state not in allowed]
    if forbidden:
        forbidden[-1] += f" ({rule})"
    if missing or forbidden:
        raise JobStateError("; ".join([*missing, *forbidden]) + "; nothing was changed")
    return [found[job_id] for job_id in dict.fromkeys(job_ids)]


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


def _version(db: sqlite3.Connection) -> int:
    (version,) = db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(version)


def _counts(db: sqlite3.Connection, query: str, states: type[StrEnum]) -> dict[str, int]:
    counts = {str(state): 0 for state in states}
    counts.update({state: count for state, count in db.execute(query)})
    return counts


def _current(db: sqlite3.Connection, sop_instance_uid: str) -> _Current | None:
    row = db.execute(
        "SELECT i.id, i.sha256, i.path, i.replaced_count, s.id, s.study_uid, s.part, s.state"
        " FROM instances i JOIN studies s ON s.id = i.study_id"
        " WHERE i.sop_instance_uid = ? AND i.superseded = 0",
        (sop_instance_uid,),
    ).fetchone()
    return None if row is None else _Current(*row)


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
