"""The SQL of the job queue: enqueue, claim under a lease, renew, complete, fail, requeue.

`Store.jobs` is the one instance, sharing the store's connection and lock. Work is claimed, not
popped (litequeue's pattern): `claim` leases a job to an owner, and a lease that expires without
`complete` or `fail` is returned to `ready` by `requeue_expired`. A job goes
`ready → claimed → done | failed`; a failed job with a next attempt time is due again then.

Every write a worker makes on behalf of a job names its `Lease` and checks, in the same
transaction, that the owner still holds it (`hold`); an operator's cancellation or an expiry
requeued by the agent takes the lease away, and every later write of the old owner fails.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.store.errors import JobStateError, LeaseLost
from agent.store.records import JobState, Level, event

if TYPE_CHECKING:
    from agent.store import Store

UPLOAD = "upload"
CANCELLED = "cancelled by operator"
"""The last error of a job an operator cancelled."""


@dataclass(frozen=True)
class Lease:
    """`owner`'s claim on job `job_id`, renewed for `seconds` at a time while it works."""

    job_id: int
    owner: str
    seconds: float


@dataclass(frozen=True)
class Job:
    """A job claimed under `lease`, which expires at `lease_expires_at` unless renewed."""

    id: int
    kind: str
    study_id: int
    study_uid: str
    part: int
    attempts: int
    lease: Lease
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


class Jobs:
    """The job queue; every method is one short transaction."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # -- workers --------------------------------------------------------------------------

    def claim(self, kind: str, owner: str, lease_seconds: float, now: float) -> Job | None:
        """Lease the job of `kind` due soonest to `owner` for `lease_seconds`; None if none is due.

        Due means `ready`, or `failed` with a next attempt time that has come (a permanent
        failure has none). The claim counts as an attempt.
        """
        with self._store.write() as db:
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
        lease = Lease(job_id, lease_owner, lease_seconds)
        return Job(job_id, job_kind, study_id, study_uid, part, attempts, lease, expires)

    def renew(self, lease: Lease, now: float) -> bool:
        """Extend the lease to `now + lease.seconds`; False if its owner no longer holds it.

        A lease that has expired is still held until `requeue_expired` takes it back.
        """
        with self._store.write() as db:
            return _renewed(db, lease, now)

    def release(self, lease: Lease, now: float) -> None:
        """Give a claimed job back to `ready`, due now, without counting the attempt (the agent
        is stopping). A job the lease's owner no longer holds is left alone."""
        with self._store.write() as db:
            db.execute(
                "UPDATE jobs SET state = ?, attempts = max(attempts - 1, 0), lease_owner = NULL,"
                " lease_expires_at = NULL, next_attempt_at = ?, updated_at = ?"
                " WHERE id = ? AND state = ? AND lease_owner = ?",
                (JobState.READY, now, now, lease.job_id, JobState.CLAIMED, lease.owner),
            )

    def complete(self, lease: Lease, now: float) -> None:
        """Mark a job done. Raise LeaseLost if the lease's owner no longer holds it."""
        with self._store.write() as db:
            changed = db.execute(
                "UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires_at = NULL,"
                " next_attempt_at = NULL, last_error = NULL, updated_at = ?"
                " WHERE id = ? AND state = ? AND lease_owner = ?",
                (JobState.DONE, now, lease.job_id, JobState.CLAIMED, lease.owner),
            ).rowcount
            if changed != 1:
                raise LeaseLost(_not_held(lease))

    def fail(self, lease: Lease, error: str, next_attempt_at: float | None, now: float) -> None:
        """Record a failed attempt; retry at `next_attempt_at`, or never if it is None.

        A permanent failure stays `failed` until an operator retries it, and is an error event
        (shown as `last_error`); a retryable one is a warning. Raise LeaseLost if the lease's
        owner no longer holds the job.
        """
        with self._store.write() as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires_at = NULL,"
                " next_attempt_at = ?, last_error = ?, updated_at = ?"
                " WHERE id = ? AND state = ? AND lease_owner = ?"
                " RETURNING kind, attempts, (SELECT study_uid FROM studies WHERE id = study_id)",
                (
                    JobState.FAILED,
                    next_attempt_at,
                    error,
                    now,
                    lease.job_id,
                    JobState.CLAIMED,
                    lease.owner,
                ),
            ).fetchall()
            if not rows:
                raise LeaseLost(_not_held(lease))
            kind, attempts, study_uid = rows[0]
            level = Level.ERROR if next_attempt_at is None else Level.WARNING
            retry = "permanently" if next_attempt_at is None else "will retry"
            message = f"{kind} job {lease.job_id} attempt {attempts} failed ({retry}): {error}"
            event(db, now, level, f"{kind}_failed", message, study_uid, None)

    def requeue_expired(self, now: float, *, every_claim: bool = False) -> int:
        """Return every claimed job whose lease expired by `now` (with `every_claim`, every
        claimed job: at start-up they all belong to a run that is over) to `ready`, due now;
        return how many."""
        expired_by = math.inf if every_claim else now
        with self._store.write() as db:
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

    # -- operators ------------------------------------------------------------------------

    def retry(self, job_ids: Sequence[int], now: float) -> list[JobRecord]:
        """Make every job in `job_ids` ready and due `now`, keeping its attempts; return them.

        Only a failed or ready job can be retried. All or nothing: raise JobStateError, naming
        every offending id, if one does not exist, is done or is claimed by a worker. Each retry
        is an info event.
        """
        allowed = (JobState.FAILED, JobState.READY)
        with self._store.write() as db:
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

    def cancel(self, job_ids: Sequence[int], now: float) -> list[JobRecord]:
        """Fail every job in `job_ids` for good with the error "cancelled by operator"; return
        them.

        Any job not done can be cancelled. A claimed job loses its lease: its worker can no
        longer renew, complete or fail it. All or nothing: raise JobStateError, naming every
        offending id, if one does not exist or is done. Each cancellation is an info event.
        """
        allowed = (JobState.READY, JobState.CLAIMED, JobState.FAILED)
        with self._store.write() as db:
            before = _jobs_for_action(db, job_ids, allowed, "a done job cannot be cancelled")
            for job in before:
                db.execute(
                    "UPDATE jobs SET state = ?, next_attempt_at = NULL, lease_owner = NULL,"
                    " lease_expires_at = NULL, last_error = ?, updated_at = ? WHERE id = ?",
                    (JobState.FAILED, CANCELLED, now, job.id),
                )
                held_by = f", claimed by {job.lease_owner}" if job.state == JobState.CLAIMED else ""
                message = (
                    f"{job.kind} job {job.id} cancelled by operator (was {job.state}{held_by})"
                )
                event(db, now, Level.INFO, "job_cancelled", message, job.study_uid, None)
            return _job_records(db, _BY_IDS, _ids(job_ids))

    def in_states(self, states: Collection[JobState] = tuple(JobState)) -> list[JobRecord]:
        """Return the jobs in `states` (every state by default), oldest first."""
        with self._store.read() as db:
            return _job_records(
                db, "j.state IN (SELECT value FROM json_each(?))", json.dumps(list(states))
            )

    def failed(self) -> list[JobRecord]:
        """Return every failed job: those failed for good first (they need an operator), then
        by their next attempt time."""
        with self._store.read() as db:
            return _job_records(
                db,
                "j.state = ?",
                JobState.FAILED,
                order="j.next_attempt_at IS NOT NULL, j.next_attempt_at, j.id",
            )


def enqueue(db: sqlite3.Connection, kind: str, study_id: int, now: float) -> None:
    """Add a job of `kind` for a study part, ready and due `now`, inside the caller's write."""
    db.execute(
        "INSERT INTO jobs (kind, study_id, state, next_attempt_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (kind, study_id, JobState.READY, now, now, now),
    )


def revive(db: sqlite3.Connection, study_id: int, now: float) -> list[int]:
    """Make a study part's failed jobs ready and due `now`, inside the caller's write (a
    spool file they failed on has been repaired); return their ids. A job an operator
    cancelled stays cancelled."""
    rows = db.execute(
        "UPDATE jobs SET state = ?, next_attempt_at = ?, updated_at = ?"
        " WHERE study_id = ? AND state = ? AND coalesce(last_error, '') != ? RETURNING id",
        (JobState.READY, now, now, study_id, JobState.FAILED, CANCELLED),
    ).fetchall()
    return [job_id for (job_id,) in rows]


def hold(db: sqlite3.Connection, lease: Lease, now: float) -> None:
    """Renew `lease` to `now + lease.seconds` inside the caller's write transaction. Raise
    LeaseLost (so that transaction rolls back, writing nothing) if its owner no longer holds
    the job."""
    if not _renewed(db, lease, now):
        raise LeaseLost(_not_held(lease))


def _renewed(db: sqlite3.Connection, lease: Lease, now: float) -> bool:
    changed = db.execute(
        "UPDATE jobs SET lease_expires_at = ?, updated_at = ?"
        " WHERE id = ? AND state = ? AND lease_owner = ?",
        (now + lease.seconds, now, lease.job_id, JobState.CLAIMED, lease.owner),
    ).rowcount
    return bool(changed == 1)


def _not_held(lease: Lease) -> str:
    return f"job {lease.job_id} is not held by {lease.owner}"


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
