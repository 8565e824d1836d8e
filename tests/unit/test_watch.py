"""FolderWatch driven scan by scan (`scan(now)`, no observer, no threads) against a real spool,
store and receiver: settling, the order accept → move, names taken, failures of the gateway."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet

from agent.config import WatchDir, WatchSettings
from agent.importer import Importer, Result
from agent.receive import Receiver
from agent.spool import Spool
from agent.store import Store
from agent.watch import FolderWatch, move
from tests.unit.test_receive import part10

SETTLE = 5.0


@pytest.fixture
def folder(tmp_path: Path) -> WatchDir:
    watched = WatchDir(
        path=tmp_path / "inbox", done=tmp_path / "done", rejected=tmp_path / "rejected"
    )
    watched.path.mkdir()
    return watched


@pytest.fixture
def importer(tmp_path: Path) -> Iterator[Importer]:
    yield from _importer(tmp_path / "data", high_water=100.0)


def _importer(data_dir: Path, high_water: float) -> Iterator[Importer]:
    spool = Spool(data_dir, high_water=high_water)
    spool.prepare()
    store = Store.open(data_dir / "dirigo.db")
    receiver = Receiver(spool, store, concurrency=1)
    yield Importer(spool, receiver)
    receiver.close()
    store.close()


def watch(folder: WatchDir, importer: Importer) -> FolderWatch:
    return FolderWatch(WatchSettings(dirs=(folder,), settle=SETTLE), importer)


def rows(importer: Importer) -> int:
    return len(importer.receiver.store.spool_paths())


def test_a_file_is_taken_only_once_unchanged_for_the_settle_time(
    folder: WatchDir, importer: Importer
) -> None:
    (folder.path / "a.dcm").write_bytes(part10())
    watcher = watch(folder, importer)
    watcher.scan(100.0)
    watcher.scan(100.0 + SETTLE - 0.1)
    assert (folder.path / "a.dcm").exists() and rows(importer) == 0
    watcher.scan(100.0 + SETTLE)
    assert not (folder.path / "a.dcm").exists()
    assert (folder.done / "a.dcm").read_bytes() == part10()
    assert rows(importer) == 1


def test_a_file_that_changes_starts_its_settle_time_again(
    folder: WatchDir, importer: Importer
) -> None:
    path = folder.path / "a.dcm"
    path.write_bytes(part10()[:200])
    watcher = watch(folder, importer)
    watcher.scan(100.0)
    path.write_bytes(part10())
    watcher.scan(100.0 + SETTLE)
    assert path.exists()
    watcher.scan(100.0 + 2 * SETTLE)
    assert (folder.done / "a.dcm").read_bytes() == part10()
    assert not folder.rejected.exists()


def test_a_file_accepted_before_a_crash_but_not_moved_is_moved_without_a_second_row(
    folder: WatchDir, importer: Importer
) -> None:
    path = folder.path / "a.dcm"
    path.write_bytes(part10())
    assert importer.import_file(path).result is Result.STORED  # then the process died
    watcher = watch(folder, importer)
    watcher.scan(0.0)
    watcher.scan(SETTLE)
    assert (folder.done / "a.dcm").exists() and not path.exists()
    assert rows(importer) == 1


def test_a_name_taken_in_done_gets_the_next_free_suffix(
    folder: WatchDir, importer: Importer
) -> None:
    watcher = watch(folder, importer)
    for n, uid in enumerate(("1.2.826.0.1.3680043.10.7.11", "1.2.826.0.1.3680043.10.7.12")):
        (folder.path / "IM0").write_bytes(part10(uid))
        watcher.scan(10.0 * n)
        watcher.scan(10.0 * n + SETTLE)
    assert (folder.done / "IM0").read_bytes() == part10("1.2.826.0.1.3680043.10.7.11")
    assert (folder.done / "IM0~1").read_bytes() == part10("1.2.826.0.1.3680043.10.7.12")


def test_a_gateway_failure_leaves_the_file_in_place_for_a_later_try(
    tmp_path: Path, folder: WatchDir
) -> None:
    # The disk holding the spool is surely more than 1% full: every import fails for now.
    for full in _importer(tmp_path / "full", high_water=1.0):
        (folder.path / "a.dcm").write_bytes(part10())
        watcher = watch(folder, full)
        watcher.scan(0.0)
        watcher.scan(SETTLE)
        watcher.scan(2 * SETTLE)
        assert (folder.path / "a.dcm").exists()
        assert not folder.done.exists() and not folder.rejected.exists()


def test_move_to_another_file_system_copies_durably_then_removes_the_source(
    tmp_path: Path,
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    source = tmp_path / "a.dcm"
    source.write_bytes(b"instance")
    target = shm / f"dirigo-test-{os.getpid()}" / "sub" / "a.dcm"
    try:
        assert move(source, target) == target
        assert target.read_bytes() == b"instance" and not source.exists()
        assert [p.name for p in target.parent.iterdir()] == ["a.dcm"]  # no temporary left
    finally:
        target.unlink(missing_ok=True)
        target.parent.rmdir()
        target.parent.parent.rmdir()


def cd_file_set(count: int) -> FileSet:
    """A CD's file set of `count` CT instances of one patient, study and series."""
    file_set = FileSet()
    for n in range(count):
        ds = dcmread(io.BytesIO(part10(f"1.2.826.0.1.3680043.10.7.2{n}")))
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "1200", "1"
        ds.PatientID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "P", "CT", 1, n + 1
        file_set.add(ds)
    return file_set


def test_a_cds_contents_copied_straight_into_the_folder_are_one_file_set(
    folder: WatchDir, importer: Importer
) -> None:
    cd_file_set(2).write(folder.path)
    listed = sorted(p.relative_to(folder.path) for p in folder.path.rglob("*") if p.is_file())
    (folder.path / "AUTORUN.INF").write_text("[autorun]\n")
    watcher = watch(folder, importer)
    watcher.scan(0.0)
    watcher.scan(SETTLE)
    done = sorted(p.relative_to(folder.done) for p in folder.done.rglob("*") if p.is_file())
    assert done == listed
    assert (folder.rejected / "AUTORUN.INF.reason").exists()
    assert rows(importer) == 2
    assert folder.path.is_dir() and not any(folder.path.iterdir())  # emptied, still there
