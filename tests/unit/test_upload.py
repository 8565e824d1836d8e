"""Upload policy without the network: which parts' spool files retention may delete, and when."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import Settings, parse_config
from agent.spool import Spool
from agent.store import UPLOAD, NewInstance, Store
from agent.upload import purge

DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "dirigo.db")
    yield opened
    opened.close()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """A spool whose disk is always above its high-water mark: any disk is above 0%."""
    spool = Spool(tmp_path / "data", high_water=0.0)
    spool.prepare()
    assert spool.above_high_water()
    return spool


def settings(spool: Spool, **values: object) -> Settings:
    return parse_config(
        {
            "site": "hospital-a",
            "data_dir": str(spool.data_dir),
            "cloud": {"upload_url": "https://x.example/files/"},
            "spool": {"keep_sent_for": "7d", **values},
        }
    )


def sent_part(store: Store, spool: Spool, now: float) -> Path:
    """Record one instance with its spool file, close its part and mark it sent at `now`."""
    relative = "spool/00/1.2.3.dcm"
    path = spool.path(relative)
    path.write_bytes(b"\0" * 10)
    ct = "1.2.840.10008.5.1.4.1.1.2"
    new = NewInstance(
        "1.2.3", ct, "1.2", "1.2.1", "1.2.840.10008.1.2.1", relative, 10, "a" * 64, "PACS"
    )
    store.record_instance(new, now)
    assert store.mark_stable(now + 60, stable_after=60) == [("1.2", 1)]
    job = store.jobs.claim(UPLOAD, "worker", 120, now + 60)
    assert job is not None
    store.uploads.mark_sent(job.study_id, job.lease, now + 61)
    return path


def test_at_high_water_a_part_merely_sent_waits_keep_sent_for_without_dicomweb(
    spool: Spool, store: Store
) -> None:
    path = sent_part(store, spool, now=1000.0)
    assert purge(settings(spool), store, spool, now=1000.0 + DAY) == 0
    assert path.exists()
    assert purge(settings(spool), store, spool, now=1000.0 + 8 * DAY) == 1
    assert not path.exists()


def test_at_high_water_purge_unconfirmed_lets_a_merely_sent_part_go_early(
    spool: Spool, store: Store
) -> None:
    path = sent_part(store, spool, now=1000.0)
    assert purge(settings(spool, purge_unconfirmed=True), store, spool, now=1000.0 + DAY) == 1
    assert not path.exists()
