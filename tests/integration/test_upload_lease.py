"""A job's lease outlasts every long step of its worker, and a worker that lost it stops at once.

The worker here is the agent's own (`Uploader.run_once`) with a lease of two seconds,
while a housekeeping thread returns expired leases to the queue as the daemon does. The long
steps are real: zstd at level 19 over a few MB of pixel data, one PATCH (to the real tus server)
or one STOW-RS batch (to a real Orthanc) through a link squeezed to a few hundred kB/s by the
fault proxy.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.cloud import CloudHttp, TusClient
from agent.config import parse_config
from agent.importer import Importer, Result
from agent.receive import Receiver
from agent.spool import Spool
from agent.store import Store
from agent.upload import Uploader
from tests.support import datasets
from tests.support.faultproxy import FaultProxy
from tests.support.net import wait_until
from tests.support.orthanc import Orthanc
from tests.support.tus import TusServer

TusFactory = Callable[..., TusServer]
OrthancFactory = Callable[..., Orthanc]

LEASE = 2.0
"""Seconds; every long step below takes well over this (and says so if it did not). Not less:
each renewal is a commit, and a commit on a disk other tests keep busy can take a second."""

SLOW = {"compression_level": 19, "compression_threads": 1}
"""Packing at about a megabyte a second: zstd's slowest level on one thread."""


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 3 MB multi-frame instance: six seconds through the squeezed link."""
    return datasets.large_instance(tmp_path_factory.mktemp("big") / "big.dcm", 3 * 2**20, seed=9)


@pytest.fixture(scope="module")
def bigger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 12 MB multi-frame instance: five seconds or more to pack at the slowest level."""
    path = tmp_path_factory.mktemp("bigger") / "bigger.dcm"
    return datasets.large_instance(path, 12 * 2**20, seed=10)


@dataclass
class Site:
    """An agent's store, spool and upload worker, driven from the test thread."""

    spool: Spool
    store: Store
    uploader: Uploader
    database: Path

    def receive(self, path: Path) -> None:
        """Receive `path` two minutes ago and close its part: one upload job is due now."""
        receiver = Receiver(self.spool, self.store, clock=lambda: time.time() - 120)
        try:
            assert Importer(self.spool, receiver).import_file(path).result is Result.STORED
        finally:
            receiver.close()
        assert self.store.mark_stable(time.time(), stable_after=60) != []

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Read the database through a connection of its own, as an operator would."""
        connection = sqlite3.connect(self.database)
        try:
            return connection.execute(sql).fetchall()
        finally:
            connection.close()

    def run_once(self) -> float:
        """Run one job to its end; return how long it took."""
        started = time.monotonic()
        assert self.uploader.run_once("worker-1")
        return time.monotonic() - started


@contextmanager
def site(data_dir: Path, cloud: str | dict[str, str | None], **upload: object) -> Iterator[Site]:
    """An agent uploading to `cloud` (its tus endpoint, or its `cloud` settings)."""
    settings = parse_config(
        {
            "site": "lease-test",
            "data_dir": str(data_dir),
            "cloud": {"upload_url": cloud} if isinstance(cloud, str) else cloud,
            "upload": {"compression": "zstd", "chunk_size": "8MiB", **upload},
        }
    )
    spool = Spool(settings.data_dir, settings.spool.high_water)
    spool.prepare()
    database = data_dir / "dirigo.db"
    store = Store.open(database)
    http = CloudHttp.open(settings.cloud)
    client = TusClient(http, settings.cloud.upload_url)
    uploader = Uploader(settings, store, spool, client, http, lease_seconds=LEASE)
    try:
        yield Site(spool, store, uploader, database)
    finally:
        store.close()


@contextmanager
def housekeeping(store: Store) -> Iterator[None]:
    """Return expired leases to the queue, as the daemon's housekeeping does (more often)."""
    done = threading.Event()

    def requeue() -> None:
        while not done.wait(0.05):
            store.jobs.requeue_expired(time.time())

    thread = threading.Thread(target=requeue, name="housekeeping", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def done_under_one_lease(agent: Site, slow_step: str, state: str = "sent") -> None:
    """Run the job while housekeeping requeues expired leases: it must go through on its first
    attempt, its lease never expiring, and leave the part in `state`."""
    with housekeeping(agent.store):
        took = agent.run_once()
    assert took > 1.5 * LEASE, f"{slow_step} took {took:.1f}s, too quick to outlast the lease"
    assert agent.rows("SELECT state, attempts FROM jobs") == [("done", 1)]
    assert agent.rows("SELECT kind FROM events WHERE kind = 'lease_expired'") == []
    assert agent.rows("SELECT state FROM studies") == [(state,)]


def sent_once_under_one_lease(agent: Site, tus: TusServer, slow_step: str) -> None:
    """As `done_under_one_lease`, and the part reached the tus server once."""
    done_under_one_lease(agent, slow_step)
    (upload,) = tus.uploads()
    assert upload.complete


def test_packing_for_longer_than_the_lease_keeps_the_job_and_sends_the_part_once(
    tmp_data_dir: Path, tus_server: TusFactory, bigger: Path
) -> None:
    tus = tus_server()
    with site(tmp_data_dir, tus.url, **SLOW) as agent:
        agent.receive(bigger)
        sent_once_under_one_lease(agent, tus, "packing")


def test_one_patch_longer_than_the_lease_keeps_the_job_and_sends_the_part_once(
    tmp_data_dir: Path, tus_server: TusFactory, big: Path
) -> None:
    tus = tus_server()
    with FaultProxy("127.0.0.1", tus.port) as proxy:
        proxy.throttle(500_000)  # 3 MB in one PATCH: about six seconds
        with site(tmp_data_dir, proxy.url_for("/files/"), compression="none") as agent:
            agent.receive(big)
            sent_once_under_one_lease(agent, tus, "the PATCH")


def test_one_stow_batch_longer_than_the_lease_keeps_the_job_and_stores_the_part_once(
    tmp_data_dir: Path, orthanc: OrthancFactory, big: Path
) -> None:
    archive = orthanc("ARCHIVE")
    with FaultProxy("127.0.0.1", archive.http_port) as proxy:
        proxy.throttle(500_000)  # 3 MB in one STOW-RS request: about six seconds
        cloud = {"upload_url": None, "dicomweb_url": proxy.url_for("/dicom-web")}
        with site(tmp_data_dir, cloud, protocol="stow-rs", stow_batch="8MiB") as agent:
            agent.receive(big)
            done_under_one_lease(agent, "the STOW-RS batch", state="confirmed")
    assert len(archive.get("/instances")) == 1


def test_a_worker_whose_job_is_cancelled_while_packing_stops_there_and_records_nothing(
    tmp_data_dir: Path, bigger: Path
) -> None:
    with site(tmp_data_dir, "http://127.0.0.1:9/files/", **SLOW) as agent:
        agent.receive(bigger)
        worker = threading.Thread(target=agent.run_once, name="worker-1")
        worker.start()
        wait_until(lambda: any(agent.spool.bundles.iterdir()), 60, what="packing under way")
        operator = Store.open(agent.database, create=False)  # `dirigo queue cancel 1`
        try:
            operator.jobs.cancel([1], time.time())
        finally:
            operator.close()
        worker.join(60)
        assert not worker.is_alive()
        # Stopped before its bundle was made durable: the partial file is gone, nothing recorded.
        assert list(agent.spool.bundles.iterdir()) == []
        assert agent.rows("SELECT bundle_path FROM uploads") == [(None,)]
        assert agent.rows("SELECT state FROM instances") == [("received",)]
        assert agent.rows("SELECT state, last_error FROM jobs") == [
            ("failed", "cancelled by operator")
        ]
