"""The upload worker loop: a fault nobody foresaw is recorded and backed off, never fatal."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.cloud import CloudHttp, TusClient
from agent.config import Settings, parse_config
from agent.spool import Spool
from agent.store import NewInstance, Store
from agent.upload import Uploader, UploadWorkers
from tests.support.net import wait_until

STUDY = "1.2.826.0.1.3680043.8.498.77"


@dataclass
class Worker:
    settings: Settings
    store: Store
    workers: UploadWorkers
    database: Path

    def job(self) -> tuple[Any, ...]:
        """The one job's row, read through a connection of its own, as an operator would."""
        connection = sqlite3.connect(self.database)
        try:
            row: tuple[Any, ...] = connection.execute(
                "SELECT state, attempts, last_error, next_attempt_at, updated_at FROM jobs"
            ).fetchone()
            return row
        finally:
            connection.close()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    """One real worker thread over a real store, with one stable study part due now."""
    settings = parse_config(
        {
            "site": "t",
            "data_dir": str(tmp_path),
            "cloud": {"upload_url": "http://127.0.0.1:9/files/"},
            "upload": {"retry_first": "30s", "retry_max": "10m", "concurrency": 1},
        }
    )
    spool = Spool(settings.data_dir, settings.spool.high_water)
    spool.prepare()
    database = tmp_path / "dirigo.db"
    store = Store.open(database)
    now = time.time()
    store.record_instance(
        NewInstance("1.1", "1.2.840.10008.5.1.4.1.1.2", STUDY, "1.2", "1.2.840.10008.1.2.1",
                    "spool/00/1.1.dcm", 10, "a" * 64, "MODALITY"),
        now - 120,
    )  # fmt: skip
    store.mark_stable(now - 60, settings.study.stable_after)
    http = CloudHttp.open(settings.cloud)
    client = TusClient(http, settings.cloud.upload_url)
    workers = UploadWorkers(Uploader(settings, store, spool, client, http), count=1)
    yield Worker(settings, store, workers, database)
    workers.stop(timeout=10)
    store.close()


def packing_raises(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Make every attempt to pack raise `error` (the fault is ours to choose, not a peer's)."""

    def pack(*args: object) -> None:
        raise error

    monkeypatch.setattr("agent.upload.pack", pack)


def failed_once(worker: Worker) -> tuple[Any, ...]:
    worker.workers.start()
    wait_until(lambda: worker.job()[0] == "failed", 30, what="the job recorded as failed")
    return worker.job()[1:]  # attempts, last_error, next_attempt_at, updated_at


def test_an_unexpected_error_records_last_error_backs_off_and_the_worker_lives_on(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    packing_raises(monkeypatch, RuntimeError("injected fault"))
    attempts, last_error, next_attempt_at, updated_at = failed_once(worker)
    assert attempts == 1
    assert last_error == "unexpected error: RuntimeError('injected fault')"
    assert 15 <= next_attempt_at - updated_at <= 30  # the first step of the backoff
    assert worker.workers.revive() == 0  # no worker thread died


def test_the_ten_thousandth_failed_attempt_waits_the_cap_instead_of_killing_the_worker(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    packing_raises(monkeypatch, OSError("input/output error"))
    connection = sqlite3.connect(worker.database)
    with connection:  # a job that has failed every ten minutes for two months
        connection.execute("UPDATE jobs SET attempts = 9999")
    connection.close()
    attempts, last_error, next_attempt_at, updated_at = failed_once(worker)
    assert attempts == 10_000
    assert last_error == "local I/O failed: input/output error"
    assert 300 <= next_attempt_at - updated_at <= 600
    assert worker.workers.revive() == 0


def test_a_worker_whose_claim_fails_says_so_and_keeps_running(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    worker.store.close()  # every claim now fails with a StoreError
    worker.workers.start()
    wait_until(
        lambda: "upload worker upload-1 failed; trying again in" in caplog.text,
        30,
        what="the failed claim in the log",
    )
    assert worker.workers.revive() == 0
