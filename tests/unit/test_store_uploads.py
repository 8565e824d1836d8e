"""Upload bookkeeping: every write a worker makes for a part is made only under its job's lease."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.store import UPLOAD, Job, LeaseLost, NewInstance, Store
from agent.store.uploads import Bundle, Uploads

STUDY = "1.2.826.0.1.3680043.8.498.5"
BUNDLE = Bundle("bundles/b.tar.zst", 100, "b" * 64, "dicom-tar+zstd", 1)

Write = Callable[[Uploads, Job, float], None]
WRITES: dict[str, Write] = {
    "begin_attempt": lambda u, job, now: u.begin_attempt(job.study_id, job.lease, now),
    "record_bundle": lambda u, job, now: u.record_bundle(job.study_id, BUNDLE, job.lease, now),
    "forget_bundle": lambda u, job, now: u.forget_bundle(job.study_id, "gone", job.lease, now),
    "record_url": lambda u, job, now: u.record_url(job.study_id, "http://t/1", job.lease, now),
    "record_sending": lambda u, job, now: u.record_sending(job.study_id, 50, job.lease, now),
    "record_offset": lambda u, job, now: u.record_offset(job.study_id, 50, job.lease, now),
    "advance": lambda u, job, now: u.advance(job.study_id, 50, 100, job.lease, now),
    "record_stored": lambda u, job, now: u.record_stored(job.study_id, ["1.1"], job.lease, now),
    "mark_sent": lambda u, job, now: u.mark_sent(job.study_id, job.lease, now),
    "mark_confirmed": lambda u, job, now: u.mark_confirmed(job.study_id, job.lease, now),
}


@pytest.fixture
def job(store: Store) -> Job:
    """A claimed upload job (lease of 30 s from 60) whose part has an upload row."""
    new = NewInstance(
        "1.1", "1.2.3", STUDY, "1.2", "1.2.840.10008.1.2.1", "spool/1.1", 10, "a" * 64, "AE"
    )
    store.record_instance(new, 0.0)
    store.mark_stable(60.0, stable_after=60)
    claimed = store.jobs.claim(UPLOAD, "w1", 30, now=60.0)
    assert claimed is not None
    store.uploads.begin_attempt(claimed.study_id, claimed.lease, 60.0)
    return claimed


def everything(db_path: Path) -> list[list[tuple[Any, ...]]]:
    connection = sqlite3.connect(db_path)
    try:
        tables = ("jobs", "studies", "instances", "uploads", "events")
        return [connection.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables]
    finally:
        connection.close()


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_a_write_by_a_worker_whose_job_was_cancelled_raises_lease_lost_and_changes_nothing(
    store: Store, db_path: Path, job: Job, write: Write
) -> None:
    store.jobs.cancel([job.id], now=70.0)
    before = everything(db_path)
    with pytest.raises(LeaseLost, match=f"job {job.id} is not held by w1"):
        write(store.uploads, job, 71.0)
    assert everything(db_path) == before


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_a_write_by_a_worker_whose_lease_was_requeued_raises_lease_lost(
    store: Store, job: Job, write: Write
) -> None:
    assert store.jobs.requeue_expired(now=90.0) == 1
    again = store.jobs.claim(UPLOAD, "w2", 30, now=91.0)
    assert again is not None and again.id == job.id
    with pytest.raises(LeaseLost):
        write(store.uploads, job, 92.0)


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_a_write_by_the_lease_holder_renews_the_lease(
    store: Store, db_path: Path, job: Job, write: Write
) -> None:
    write(store.uploads, job, 85.0)
    assert store.jobs.requeue_expired(now=114.9) == 0  # 85 + 30, not 60 + 30
    assert store.jobs.requeue_expired(now=115.0) == 1
