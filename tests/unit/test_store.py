"""The store: durable settings, migrations, every record_instance branch, job leases, status."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import store as store_module
from agent.store import (
    MIGRATIONS,
    JobState,
    JobStateError,
    Lease,
    Migration,
    NewInstance,
    Outcome,
    SchemaError,
    Store,
    StoreError,
    StudyState,
)

STUDY = "1.2.826.0.1.3680043.8.498.1"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.2"
UPLOAD = "upload"


def instance(
    sop_uid: str, sha256: str, path: str, study_uid: str = STUDY, series_uid: str = "1.2.3.4"
) -> NewInstance:
    return NewInstance(
        sop_instance_uid=sop_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax="1.2.840.10008.1.2.1",
        path=path,
        size=1234,
        sha256=sha256,
        calling_ae="MODALITY",
    )


def query(db_path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the database through a connection of its own, as an operator or a second process."""
    connection = sqlite3.connect(db_path)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def stable_job(store: Store, sop_uid: str = "1.1", now: float = 0.0) -> None:
    """Record one instance at `now` and close its part, leaving one ready upload job due at +60."""
    store.record_instance(instance(sop_uid, "a" * 64, f"spool/00/{sop_uid}.dcm"), now)
    assert store.mark_stable(now + 60, stable_after=60) != []


# -- opening and migrations -------------------------------------------------------------------


def test_open_puts_the_database_in_wal_mode_with_synchronous_full(
    store: Store, db_path: Path
) -> None:
    # The store's own connection: synchronous is a per-connection setting.
    assert store._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)
    assert store._db.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert store._db.execute("PRAGMA busy_timeout").fetchone() == (10_000,)
    # WAL is a property of the file: another process sees it too.
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]


def test_open_refuses_a_database_that_cannot_use_wal() -> None:
    # An in-memory database answers "memory" to journal_mode=WAL, as a filesystem without
    # shared memory support would answer "delete": SQLite refuses silently, the store must not.
    with pytest.raises(StoreError, match="refused WAL"):
        Store.open(Path(":memory:"))


def test_open_refuses_a_database_that_ignores_synchronous_full(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_connect = store_module._connect

    def connect_ignoring_synchronous(path: Path, create: bool) -> sqlite3.Connection:
        # SQLite ignores a pragma it will not apply; this stands in for such a build.
        return _SynchronousNormal(real_connect(path, create))  # type: ignore[return-value]

    monkeypatch.setattr(store_module, "_connect", connect_ignoring_synchronous)
    with pytest.raises(StoreError, match="synchronous=FULL"):
        Store.open(db_path)


class _SynchronousNormal:
    """A connection whose `synchronous` pragma stays at NORMAL, as on a build that forces it."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.startswith("PRAGMA synchronous"):
            return self._connection.execute("SELECT 1")
        return self._connection.execute(sql, *args)

    def close(self) -> None:
        self._connection.close()


def test_open_without_create_refuses_a_missing_database_and_creates_none(db_path: Path) -> None:
    with pytest.raises(StoreError, match="no database at"):
        Store.open(db_path, create=False)
    assert not db_path.exists()


def test_open_without_create_opens_an_existing_database(db_path: Path) -> None:
    Store.open(db_path).close()
    reopened = Store.open(db_path, create=False)
    assert reopened.status().schema_version == MIGRATIONS[-1].version
    reopened.close()


def test_migrations_are_recorded_once_and_reopening_applies_nothing(db_path: Path) -> None:
    Store.open(db_path).close()
    first = query(db_path, "SELECT version, name, applied_at FROM schema_migrations")
    Store.open(db_path).close()
    assert query(db_path, "SELECT version, name, applied_at FROM schema_migrations") == first
    assert [(version, name) for version, name, _ in first] == [
        (m.version, m.name) for m in MIGRATIONS
    ]


def test_a_new_migration_is_applied_to_an_existing_database(db_path: Path) -> None:
    Store.open(db_path).close()
    added = Migration(len(MIGRATIONS) + 1, "add a column", ("ALTER TABLE jobs ADD note TEXT",))
    Store.open(db_path, migrations=(*MIGRATIONS, added), migrate=True).close()
    versions = query(db_path, "SELECT version FROM schema_migrations ORDER BY version")
    assert versions[-1] == (added.version,)
    assert ("note",) in query(db_path, "SELECT name FROM pragma_table_info('jobs')")


def test_an_existing_database_is_migrated_only_when_asked(db_path: Path) -> None:
    Store.open(db_path).close()
    added = Migration(len(MIGRATIONS) + 1, "add a column", ("ALTER TABLE jobs ADD note TEXT",))
    current = MIGRATIONS[-1].version
    with pytest.raises(
        SchemaError,
        match=rf"has schema version {current}, this Dirigo needs {added.version}: "
        r"run `dirigo migrate`",
    ):
        Store.open(db_path, migrations=(*MIGRATIONS, added))
    assert query(db_path, "SELECT max(version) FROM schema_migrations") == [(current,)]
    assert ("note",) not in query(db_path, "SELECT name FROM pragma_table_info('jobs')")


def test_a_new_database_is_created_with_the_whole_schema_without_asking(db_path: Path) -> None:
    Store.open(db_path).close()
    assert query(db_path, "SELECT max(version) FROM schema_migrations") == [
        (MIGRATIONS[-1].version,)
    ]


def test_a_failing_migration_leaves_no_partial_schema_and_no_record(db_path: Path) -> None:
    bad = Migration(
        len(MIGRATIONS) + 1,
        "half good",
        ("CREATE TABLE half (id INTEGER PRIMARY KEY)", "CREATE TABLE broken (oops"),
    )
    with pytest.raises(StoreError, match="half good"):
        Store.open(db_path, migrations=(*MIGRATIONS, bad), migrate=True)
    tables = {name for (name,) in query(db_path, "SELECT name FROM sqlite_master")}
    assert "half" not in tables
    assert "studies" in tables  # the good migrations before it stay applied
    recorded = query(db_path, "SELECT version FROM schema_migrations")
    assert (bad.version,) not in recorded


def test_a_newer_schema_version_is_refused_with_a_clear_message(db_path: Path) -> None:
    Store.open(db_path).close()
    connection = sqlite3.connect(db_path)
    with connection:
        connection.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'future', 0)"
        )
    connection.close()
    with pytest.raises(SchemaError, match="schema version 99, newer than this Dirigo knows"):
        Store.open(db_path)
    with pytest.raises(SchemaError, match="schema version 99, newer than this Dirigo knows"):
        Store.open(db_path, migrate=True)


def test_migration_versions_are_strictly_increasing() -> None:
    versions = [m.version for m in MIGRATIONS]
    assert versions == sorted(set(versions))
    assert versions[0] == 1


def test_a_closed_store_raises_store_error(db_path: Path) -> None:
    closed = Store.open(db_path)
    closed.close()
    with pytest.raises(StoreError):
        closed.find_instance("1.1")


# -- record_instance --------------------------------------------------------------------------


def test_record_instance_stores_a_new_instance_in_part_one(store: Store, db_path: Path) -> None:
    result = store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 10.0)
    assert (result.outcome, result.study_uid, result.part) == (Outcome.STORED, STUDY, 1)
    assert result.obsolete_path is None
    known = store.find_instance("1.1")
    assert known is not None
    assert (known.sha256, known.path) == ("a" * 64, "spool/00/a.dcm")
    assert query(db_path, "SELECT state, first_received_at, last_received_at FROM studies") == [
        ("open", 10.0, 10.0)
    ]
    assert query(db_path, "SELECT state, replaced_count FROM instances") == [("received", 0)]


def test_record_instance_of_identical_content_is_a_duplicate_that_changes_nothing(
    store: Store, db_path: Path
) -> None:
    store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 10.0)
    result = store.record_instance(instance("1.1", "a" * 64, "spool/01/b.dcm"), 20.0)
    assert result.outcome is Outcome.DUPLICATE
    assert (result.study_uid, result.part) == (STUDY, 1)
    assert result.obsolete_path == "spool/01/b.dcm"  # the caller's fresh copy is redundant
    assert store.spool_paths() == {"spool/00/a.dcm"}
    assert query(db_path, "SELECT last_received_at FROM studies") == [(10.0,)]
    assert query(db_path, "SELECT count(*) FROM events") == [(0,)]


def test_record_instance_of_a_resent_study_after_it_closed_opens_no_new_part(
    store: Store, db_path: Path
) -> None:
    store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 0.0)
    store.mark_stable(60.0, stable_after=60)
    result = store.record_instance(instance("1.1", "a" * 64, "spool/01/b.dcm"), 100.0)
    assert (result.outcome, result.part) == (Outcome.DUPLICATE, 1)
    assert query(db_path, "SELECT part, state FROM studies") == [(1, "stable")]


def test_record_instance_with_new_content_in_an_open_part_replaces_the_row_in_place(
    store: Store, db_path: Path
) -> None:
    store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 10.0)
    result = store.record_instance(instance("1.1", "b" * 64, "spool/01/b.dcm"), 20.0)
    assert (result.outcome, result.part) == (Outcome.REPLACED, 1)
    assert result.obsolete_path == "spool/00/a.dcm"
    assert query(db_path, "SELECT sha256, path, replaced_count, superseded FROM instances") == [
        ("b" * 64, "spool/01/b.dcm", 1, 0)
    ]
    assert store.spool_paths() == {"spool/01/b.dcm"}
    assert query(db_path, "SELECT last_received_at FROM studies") == [(20.0,)]
    [(level, kind, message)] = query(db_path, "SELECT level, kind, message FROM events")
    assert (level, kind) == ("warning", "replaced")
    assert f"{'a' * 64} → {'b' * 64}" in message


def test_record_instance_with_new_content_for_a_closed_part_supersedes_the_old_row(
    store: Store, db_path: Path
) -> None:
    store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 0.0)
    store.mark_stable(60.0, stable_after=60)
    result = store.record_instance(instance("1.1", "b" * 64, "spool/01/b.dcm"), 100.0)
    assert (result.outcome, result.part) == (Outcome.REPLACED, 2)
    assert result.obsolete_path is None  # the old file belongs to the closed part's upload
    rows = query(
        db_path,
        "SELECT s.part, i.sha256, i.replaced_count, i.superseded"
        " FROM instances i JOIN studies s ON s.id = i.study_id ORDER BY i.id",
    )
    assert rows == [(1, "a" * 64, 0, 1), (2, "b" * 64, 1, 0)]
    assert store.spool_paths() == {"spool/00/a.dcm", "spool/01/b.dcm"}
    known = store.find_instance("1.1")
    assert known is not None and known.sha256 == "b" * 64
    assert query(db_path, "SELECT kind FROM events WHERE level = 'warning'") == [("replaced",)]


def test_a_late_instance_after_the_study_went_stable_opens_part_two(
    store: Store, db_path: Path
) -> None:
    store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 0.0)
    assert store.mark_stable(60.0, stable_after=60) == [(STUDY, 1)]
    late = store.record_instance(instance("1.2", "b" * 64, "spool/00/b.dcm"), 70.0)
    also_late = store.record_instance(instance("1.3", "c" * 64, "spool/00/c.dcm"), 75.0)
    assert (late.outcome, late.part, also_late.part) == (Outcome.STORED, 2, 2)
    assert store.mark_stable(135.0, stable_after=60) == [(STUDY, 2)]
    third = store.record_instance(instance("1.4", "d" * 64, "spool/00/d.dcm"), 200.0)
    assert third.part == 3
    assert query(db_path, "SELECT part, state, first_received_at FROM studies ORDER BY part") == [
        (1, "stable", 0.0),
        (2, "stable", 70.0),
        (3, "open", 200.0),
    ]


def test_record_instance_moving_to_another_study_drops_the_part_it_emptied(
    store: Store, db_path: Path
) -> None:
    store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 0.0)
    corrected = instance("1.1", "b" * 64, "spool/00/b.dcm", study_uid=OTHER_STUDY)
    result = store.record_instance(corrected, 5.0)
    assert (result.outcome, result.study_uid, result.part) == (Outcome.REPLACED, OTHER_STUDY, 1)
    assert result.obsolete_path == "spool/00/a.dcm"
    assert query(db_path, "SELECT study_uid, part, state FROM studies") == [
        (OTHER_STUDY, 1, "open")
    ]
    # No empty part is left to be marked stable and uploaded.
    assert store.mark_stable(100.0, stable_after=60) == [(OTHER_STUDY, 1)]


def test_record_quarantine_keeps_the_reason_and_an_error_event(store: Store, db_path: Path) -> None:
    store.record_quarantine("truncated file", "quarantine/x.dcm", "CT1", "1.9", 1_700_000_000.0)
    store.record_quarantine("no SOP UID", "quarantine/y.dcm", "CT1", None, 1_700_000_001.0)
    assert query(db_path, "SELECT reason, path, calling_ae, sop_instance_uid FROM quarantine") == [
        ("truncated file", "quarantine/x.dcm", "CT1", "1.9"),
        ("no SOP UID", "quarantine/y.dcm", "CT1", None),
    ]
    status = store.status()
    assert status.instances["quarantined"] == 2
    assert status.last_error is not None
    assert status.last_error["kind"] == "quarantined"
    assert "no SOP UID" in status.last_error["message"]
    assert status.last_error["at"] == "2023-11-14T22:13:21+00:00"


# -- mark_stable ------------------------------------------------------------------------------


def test_mark_stable_closes_a_part_exactly_when_it_has_been_quiet_for_stable_after(
    store: Store, db_path: Path
) -> None:
    store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 0.0)
    store.record_instance(instance("1.2", "b" * 64, "spool/00/b.dcm"), 50.0)
    assert store.mark_stable(109.999, stable_after=60) == []
    assert store.mark_stable(110.0, stable_after=60) == [(STUDY, 1)]
    assert store.mark_stable(500.0, stable_after=60) == []  # already closed
    assert query(db_path, "SELECT state, stable_at FROM studies") == [("stable", 110.0)]


def test_mark_stable_creates_one_ready_upload_job_due_now_and_an_info_event(
    store: Store, db_path: Path
) -> None:
    store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 0.0)
    store.record_instance(instance("2.1", "b" * 64, "spool/00/b.dcm", OTHER_STUDY), 30.0)
    assert store.mark_stable(100.0, stable_after=60) == [(STUDY, 1), (OTHER_STUDY, 1)]
    jobs = query(db_path, "SELECT kind, state, attempts, next_attempt_at FROM jobs")
    assert jobs == [(UPLOAD, "ready", 0, 100.0)] * 2
    events = query(db_path, "SELECT level, kind, study_uid FROM events ORDER BY study_uid")
    assert events == [("info", "stable", STUDY), ("info", "stable", OTHER_STUDY)]


# -- jobs -------------------------------------------------------------------------------------


def test_claim_job_returns_none_when_nothing_is_due(store: Store) -> None:
    assert store.jobs.claim(UPLOAD, "w1", 30, now=0.0) is None
    stable_job(store)  # due at 60
    assert store.jobs.claim(UPLOAD, "w1", 30, now=59.0) is None
    assert store.jobs.claim("pack", "w1", 30, now=60.0) is None  # another kind


def test_claim_job_leases_the_job_and_counts_the_attempt(store: Store) -> None:
    stable_job(store)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=61.0)
    assert job is not None
    assert (job.kind, job.study_uid, job.part, job.attempts) == (UPLOAD, STUDY, 1, 1)
    assert (job.lease.owner, job.lease_expires_at) == ("w1", 91.0)
    assert store.jobs.claim(UPLOAD, "w2", 30, now=62.0) is None  # held by w1
    assert store.status().jobs["claimed"] == 1


def test_claim_job_takes_the_job_due_soonest_first(store: Store) -> None:
    store.record_instance(instance("2.1", "b" * 64, "spool/00/b.dcm", OTHER_STUDY), 10.0)
    store.mark_stable(70.0, stable_after=60)
    store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 0.0)
    store.mark_stable(80.0, stable_after=60)
    first = store.jobs.claim(UPLOAD, "w1", 30, now=100.0)
    second = store.jobs.claim(UPLOAD, "w1", 30, now=100.0)
    assert first is not None and second is not None
    assert (first.study_uid, second.study_uid) == (OTHER_STUDY, STUDY)


def test_complete_job_marks_it_done_for_the_lease_holder(store: Store, db_path: Path) -> None:
    stable_job(store)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=60.0)
    assert job is not None
    store.jobs.complete(Lease(job.id, "w1", 30), now=70.0)
    assert query(db_path, "SELECT state, lease_owner, updated_at FROM jobs") == [
        ("done", None, 70.0)
    ]
    assert store.jobs.claim(UPLOAD, "w1", 30, now=1000.0) is None


def test_a_competing_owner_cannot_complete_fail_or_renew_another_owners_job(
    store: Store, db_path: Path
) -> None:
    stable_job(store)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=60.0)
    assert job is not None
    with pytest.raises(StoreError, match="not held by w2"):
        store.jobs.complete(Lease(job.id, "w2", 30), now=65.0)
    with pytest.raises(StoreError, match="not held by w2"):
        store.jobs.fail(Lease(job.id, "w2", 30), "boom", next_attempt_at=100.0, now=65.0)
    assert store.jobs.renew(Lease(job.id, "w2", 30), now=65.0) is False
    assert query(db_path, "SELECT state, lease_owner, lease_expires_at FROM jobs") == [
        ("claimed", "w1", 90.0)
    ]


def test_renew_lease_extends_the_lease_so_requeue_leaves_the_job_alone(
    store: Store, db_path: Path
) -> None:
    stable_job(store)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=60.0)
    assert job is not None
    assert store.jobs.renew(Lease(job.id, "w1", 30), now=80.0) is True
    assert store.jobs.requeue_expired(now=90.0) == 0  # the original expiry
    assert query(db_path, "SELECT state, lease_expires_at FROM jobs") == [("claimed", 110.0)]


def test_requeue_expired_returns_an_expired_lease_to_ready_and_the_old_owner_loses_it(
    store: Store, db_path: Path
) -> None:
    stable_job(store)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=60.0)
    assert job is not None
    assert store.jobs.requeue_expired(now=89.9) == 0
    assert store.jobs.requeue_expired(now=90.0) == 1
    assert query(db_path, "SELECT state, lease_owner FROM jobs") == [("ready", None)]
    assert query(db_path, "SELECT level, kind FROM events WHERE kind = 'lease_expired'") == [
        ("warning", "lease_expired")
    ]
    again = store.jobs.claim(UPLOAD, "w2", 30, now=91.0)
    assert again is not None and (again.id, again.attempts) == (job.id, 2)
    assert store.jobs.renew(Lease(job.id, "w1", 30), now=92.0) is False
    with pytest.raises(StoreError):
        store.jobs.complete(Lease(job.id, "w1", 30), now=92.0)
    store.jobs.complete(Lease(job.id, "w2", 30), now=93.0)


def test_fail_job_with_a_next_attempt_time_makes_it_due_again_then(
    store: Store, db_path: Path
) -> None:
    stable_job(store)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=60.0)
    assert job is not None
    store.jobs.fail(Lease(job.id, "w1", 30), "cloud answered 503", next_attempt_at=120.0, now=65.0)
    assert query(db_path, "SELECT state, last_error, next_attempt_at, lease_owner FROM jobs") == [
        ("failed", "cloud answered 503", 120.0, None)
    ]
    assert store.jobs.claim(UPLOAD, "w1", 30, now=119.0) is None
    retry = store.jobs.claim(UPLOAD, "w1", 30, now=120.0)
    assert retry is not None and retry.attempts == 2
    assert store.status().last_error is None  # a retryable failure is a warning


def test_fail_job_without_a_next_attempt_time_fails_it_for_good(store: Store) -> None:
    stable_job(store)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=60.0)
    assert job is not None
    store.jobs.fail(
        Lease(job.id, "w1", 30), "cloud refused the bundle (400)", next_attempt_at=None, now=70.0
    )
    assert store.jobs.claim(UPLOAD, "w1", 30, now=1e12) is None
    assert store.jobs.requeue_expired(now=1e12) == 0
    status = store.status()
    assert status.jobs["failed"] == 1
    assert status.last_error is not None
    assert status.last_error["kind"] == "upload_failed"
    assert "cloud refused the bundle (400)" in status.last_error["message"]


# -- operator actions on jobs -----------------------------------------------------------------


def failed_job(store: Store, sop_uid: str, error: str, next_attempt_at: float | None) -> int:
    """Make one job for a new study part and fail its first attempt; return its id."""
    study = f"1.2.826.0.1.3680043.8.498.{sop_uid}"
    store.record_instance(instance(sop_uid, "f" * 64, f"spool/00/{sop_uid}.dcm", study), 0.0)
    store.mark_stable(60.0, stable_after=60)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=60.0)
    assert job is not None and job.study_uid == study
    store.jobs.fail(Lease(job.id, "w1", 30), error, next_attempt_at, now=61.0)
    return job.id


def test_list_jobs_returns_jobs_in_the_states_asked_for_with_their_study_part(
    store: Store,
) -> None:
    failed = failed_job(store, "2.1", "cloud answered 503", next_attempt_at=200.0)
    stable_job(store, now=100.0)
    every = store.jobs.in_states()
    assert [(j.id, j.state) for j in every] == [(failed, JobState.FAILED), (2, JobState.READY)]
    (only_failed,) = store.jobs.in_states([JobState.FAILED])
    assert only_failed.id == failed
    assert only_failed.study_uid == "1.2.826.0.1.3680043.8.498.2.1" and only_failed.part == 1
    assert (only_failed.attempts, only_failed.last_error) == (1, "cloud answered 503")
    assert (only_failed.next_attempt_at, only_failed.lease_owner) == (200.0, None)
    assert store.jobs.in_states([JobState.DONE, JobState.CLAIMED]) == []


def test_failed_jobs_lists_permanent_failures_first_then_by_next_attempt(store: Store) -> None:
    later = failed_job(store, "3.1", "timeout", next_attempt_at=500.0)
    sooner = failed_job(store, "3.2", "timeout", next_attempt_at=100.0)
    permanent = failed_job(store, "3.3", "refused (400)", next_attempt_at=None)
    assert [j.id for j in store.jobs.failed()] == [permanent, sooner, later]


def test_retry_makes_a_failed_job_ready_and_due_now_keeping_its_attempts(
    store: Store, db_path: Path
) -> None:
    job_id = failed_job(store, "4.1", "refused (400)", next_attempt_at=None)
    (retried,) = store.jobs.retry([job_id], now=100.0)
    assert (retried.state, retried.next_attempt_at, retried.attempts) == ("ready", 100.0, 1)
    again = store.jobs.claim(UPLOAD, "w2", 30, now=100.0)
    assert again is not None and (again.id, again.attempts) == (job_id, 2)
    assert query(db_path, "SELECT level, message FROM events WHERE kind = 'job_retried'") == [
        ("info", f"upload job {job_id} retried by operator (was failed, 1 attempt(s) so far)")
    ]


def test_retry_of_a_ready_job_makes_it_due_now(store: Store) -> None:
    stable_job(store)  # due at 60
    (retried,) = store.jobs.retry([1], now=10.0)
    assert (retried.state, retried.next_attempt_at) == ("ready", 10.0)
    assert store.jobs.claim(UPLOAD, "w1", 30, now=10.0) is not None


def test_retry_of_an_unknown_done_or_claimed_job_changes_nothing_and_names_each(
    store: Store, db_path: Path
) -> None:
    failed = failed_job(store, "5.1", "timeout", next_attempt_at=900.0)
    done = failed_job(store, "5.2", "timeout", next_attempt_at=61.0)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=61.0)
    assert job is not None and job.id == done
    store.jobs.complete(Lease(done, "w1", 30), now=62.0)
    claimed = failed_job(store, "5.3", "timeout", next_attempt_at=63.0)
    assert store.jobs.claim(UPLOAD, "w1", 30, now=63.0) is not None
    before = query(db_path, "SELECT * FROM jobs ORDER BY id")
    with pytest.raises(JobStateError) as raised:
        store.jobs.retry([failed, 99, done, claimed], now=70.0)
    message = str(raised.value)
    assert "there is no job 99" in message
    assert f"job {done} is done" in message and f"job {claimed} is claimed" in message
    assert "(only a failed or ready job can be retried)" in message
    assert "nothing was changed" in message
    assert query(db_path, "SELECT * FROM jobs ORDER BY id") == before
    assert query(db_path, "SELECT count(*) FROM events WHERE kind = 'job_retried'") == [(0,)]


def test_cancel_fails_a_ready_job_for_good_with_an_info_event(store: Store, db_path: Path) -> None:
    stable_job(store)
    (cancelled,) = store.jobs.cancel([1], now=70.0)
    assert cancelled.state == "failed" and cancelled.next_attempt_at is None
    assert cancelled.last_error == "cancelled by operator"
    assert store.jobs.claim(UPLOAD, "w1", 30, now=1e12) is None
    assert [j.id for j in store.jobs.failed()] == [1]
    assert query(db_path, "SELECT level, message FROM events WHERE kind = 'job_cancelled'") == [
        ("info", "upload job 1 cancelled by operator (was ready)")
    ]
    assert store.status().last_error is None  # an operator's choice is not an error


def test_cancel_of_a_claimed_job_takes_its_lease_away_from_the_worker(
    store: Store, db_path: Path
) -> None:
    stable_job(store)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=60.0)
    assert job is not None
    store.jobs.cancel([job.id], now=65.0)
    assert store.jobs.renew(Lease(job.id, "w1", 30), now=66.0) is False
    with pytest.raises(StoreError, match="not held by w1"):
        store.jobs.complete(Lease(job.id, "w1", 30), now=67.0)
    with pytest.raises(StoreError, match="not held by w1"):
        store.jobs.fail(Lease(job.id, "w1", 30), "boom", next_attempt_at=100.0, now=67.0)
    store.jobs.release(Lease(job.id, "w1", 30), now=68.0)  # a worker stopping leaves it alone too
    assert store.jobs.requeue_expired(now=1e12, every_claim=True) == 0
    assert query(db_path, "SELECT state, last_error, lease_owner, next_attempt_at FROM jobs") == [
        ("failed", "cancelled by operator", None, None)
    ]
    (message,) = query(db_path, "SELECT message FROM events WHERE kind = 'job_cancelled'")[0]
    assert message == f"upload job {job.id} cancelled by operator (was claimed, claimed by w1)"


def test_a_cancelled_job_can_be_retried_and_keeps_its_attempts(store: Store) -> None:
    job_id = failed_job(store, "6.1", "timeout", next_attempt_at=300.0)
    store.jobs.cancel([job_id], now=70.0)
    store.jobs.retry([job_id], now=80.0)
    again = store.jobs.claim(UPLOAD, "w1", 30, now=80.0)
    assert again is not None and (again.id, again.attempts) == (job_id, 2)


def test_cancel_of_an_unknown_or_done_job_changes_nothing(store: Store, db_path: Path) -> None:
    stable_job(store)
    job = store.jobs.claim(UPLOAD, "w1", 30, now=60.0)
    assert job is not None
    store.jobs.complete(Lease(job.id, "w1", 30), now=61.0)
    with pytest.raises(JobStateError, match=r"no job 7; job 1 is done \(a done job cannot be"):
        store.jobs.cancel([7, 1], now=70.0)
    assert query(db_path, "SELECT state, last_error FROM jobs") == [("done", None)]
    assert query(db_path, "SELECT count(*) FROM events WHERE kind = 'job_cancelled'") == [(0,)]


def test_an_operator_cancelling_from_another_connection_stops_the_agent_claiming_it(
    db_path: Path,
) -> None:
    agent = Store.open(db_path)
    operator = Store.open(db_path, create=False)  # `dirigo queue cancel` while the agent runs
    try:
        stable_job(agent)
        (cancelled,) = operator.jobs.cancel([1], now=70.0)
        assert cancelled.last_error == "cancelled by operator"
        assert agent.jobs.claim(UPLOAD, "w1", 30, now=1e12) is None
        assert [j.id for j in agent.jobs.failed()] == [1]
    finally:
        operator.close()
        agent.close()


# -- concurrency ------------------------------------------------------------------------------


def test_two_threads_recording_500_instances_each_concurrently_lose_none(
    store: Store, db_path: Path
) -> None:
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def record(thread: int) -> None:
        start.wait()
        try:
            for n in range(500):
                uid = f"1.{thread}.{n}"
                result = store.record_instance(instance(uid, uid, f"spool/{uid}.dcm"), float(n))
                assert result.outcome is Outcome.STORED
        except BaseException as exc:  # surfaced by the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(t,)) for t in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert query(db_path, "SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances") == [
        (1000, 1000)
    ]
    assert len(store.spool_paths()) == 1000
    assert query(db_path, "SELECT part FROM studies") == [(1,)]


# -- status -----------------------------------------------------------------------------------


def test_status_of_an_empty_database_lists_every_state_at_zero(store: Store) -> None:
    status = store.status()
    assert status.studies == {state: 0 for state in StudyState}
    assert status.instances == {"received": 0, "packed": 0, "sent": 0, "quarantined": 0}
    assert status.jobs == {"ready": 0, "claimed": 0, "done": 0, "failed": 0}
    assert status.last_error is None
    assert status.schema_version == MIGRATIONS[-1].version


def test_status_counts_current_rows_in_each_state(store: Store) -> None:
    store.record_instance(instance("1.1", "a" * 64, "spool/00/a.dcm"), 0.0)
    store.record_instance(instance("1.2", "b" * 64, "spool/00/b.dcm"), 0.0)
    store.mark_stable(60.0, stable_after=60)
    store.record_instance(instance("1.1", "c" * 64, "spool/00/c.dcm"), 70.0)  # supersedes
    store.jobs.claim(UPLOAD, "w1", 30, now=80.0)
    status = store.status()
    assert status.studies["open"] == 1 and status.studies["stable"] == 1
    assert status.instances["received"] == 2  # the superseded version is not counted again
    assert status.jobs["claimed"] == 1 and status.jobs["ready"] == 0


# -- property ---------------------------------------------------------------------------------

# Each step: which of three SOP UIDs, which of three contents, and whether the study then closes.
STEPS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 2), st.booleans()), min_size=1, max_size=25
)


@settings(max_examples=60, deadline=None)
@given(steps=STEPS)
def test_any_sequence_of_records_leaves_one_current_row_per_uid_with_the_last_content(
    steps: list[tuple[int, int, bool]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "dirigo.sqlite3"
        store = Store.open(path)
        try:
            last: dict[str, str] = {}
            kept: set[str] = set()
            for n, (uid_index, content, close) in enumerate(steps):
                uid, sha = f"1.{uid_index}", f"{content:064d}"
                result = store.record_instance(instance(uid, sha, f"spool/{n}.dcm"), float(n))
                kept.add(f"spool/{n}.dcm")
                kept.discard(result.obsolete_path or "")
                last[uid] = sha
                if close:
                    store.mark_stable(float(n), stable_after=0)
            current = query(
                path, "SELECT sop_instance_uid, sha256 FROM instances WHERE superseded = 0"
            )
            assert sorted(current) == sorted(last.items())
            for uid, sha in last.items():
                known = store.find_instance(uid)
                assert known is not None and known.sha256 == sha
            # Every obsolete path is unreferenced (safe to delete); every other file is kept.
            assert store.spool_paths() == kept
        finally:
            store.close()


def test_quarantine_rows_from_before_migration_4_keep_their_time_and_never_merge(
    db_path: Path,
) -> None:
    old = Store.open(db_path, migrations=MIGRATIONS[:3])
    with old.write() as db:
        for name in ("x", "y"):
            db.execute(
                "INSERT INTO quarantine (at, reason, path, calling_ae) VALUES (?, ?, ?, ?)",
                (1_700_000_000.0, "truncated", f"quarantine/{name}.dcm", "CT1"),
            )
    old.close()
    store = Store.open(db_path, migrate=True)
    try:
        kept = store.record_quarantine(
            "truncated", "quarantine/z.dcm", "CT1", None, 1_700_000_100.0, sha256="a" * 64
        )
        assert kept == "quarantine/z.dcm"
        assert query(db_path, "SELECT path, last_at, repeats FROM quarantine ORDER BY id") == [
            ("quarantine/x.dcm", 1_700_000_000.0, 0),
            ("quarantine/y.dcm", 1_700_000_000.0, 0),
            ("quarantine/z.dcm", 1_700_000_100.0, 0),
        ]
        assert store.trim_quarantine(1_700_000_050.0, 2**30) == [
            "quarantine/x.dcm",
            "quarantine/y.dcm",
        ]
    finally:
        store.close()
