"""Watch folders in the real agent: a CD-like tree reaches the development cloud, a file still
being written is left alone, bad files end in rejected/ with their reasons, and `kill -9`
mid-folder loses nothing and acknowledges nothing twice (with inotify and with polling)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread
from pydicom.fileset import FileSet

from tests.support import datasets
from tests.support.agent import Agent
from tests.support.devcloud import DevCloud
from tests.support.net import LOOPBACK, free_port, wait_until

SETTLE = 1.0
WAIT = 60.0


class Folders:
    """A watch folder with its done/ and rejected/, and a staging area beside them (on the same
    file system, so that a delivery appears in the watch folder at once, by rename)."""

    def __init__(self, root: Path) -> None:
        self.inbox = root / "inbox"
        self.done = root / "done"
        self.rejected = root / "rejected"
        self.staging = root / "staging"
        for folder in (self.inbox, self.done, self.rejected, self.staging):
            folder.mkdir(parents=True)

    def config(self, poll: bool = False) -> dict[str, Any]:
        folder = {"path": str(self.inbox), "done": str(self.done), "rejected": str(self.rejected)}
        return {"dirs": [folder], "settle": f"{SETTLE}s", "poll": poll}

    def deliver(self, staged: Path) -> Path:
        """Move `staged` into the watch folder in one rename; return its new path."""
        target = self.inbox / staged.name
        staged.rename(target)
        return target


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    return Folders(tmp_path / "watch")


def watching_agent(tmp_path: Path, folders: Folders, **extra: Any) -> Agent:
    return Agent(tmp_path / "data", extra={"watch": folders.config(), **extra})


def cd_instances() -> list[Path]:
    """Return small pydicom-data instances, one per transfer syntax."""
    by_syntax: dict[str, Path] = {}
    for path in datasets.distinct_instances(datasets.real_files()):
        if path.stat().st_size <= 300_000:
            by_syntax.setdefault(datasets.transfer_syntax(path), path)
    assert len(by_syntax) >= 3, f"too few transfer syntaxes among small files: {by_syntax}"
    return list(by_syntax.values())


def write_cd(root: Path, sources: list[Path]) -> dict[str, str]:
    """Write a DICOMDIR file set of `sources` under `root` (as a CD burner lays it out); return
    each instance's study UID by SOP instance UID."""
    file_set = FileSet()
    studies = {}
    for path in sources:
        ds = dcmread(path)
        # A DICOMDIR record needs these; some pydicom-data files leave them empty.
        for keyword, value in (
            ("PatientID", "CD-IMPORT"),
            ("StudyDate", "20260101"),
            ("StudyTime", "120000"),
            ("StudyID", "1"),
            ("SeriesNumber", 1),
            ("InstanceNumber", 1),
        ):
            if not ds.get(keyword):
                setattr(ds, keyword, value)
        file_set.add(ds)
        studies[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
    file_set.write(root)
    return studies


def test_a_cd_tree_is_imported_as_its_dicomdir_lists_and_reaches_the_cloud(
    tmp_path: Path, folders: Folders
) -> None:
    cd = folders.staging / "CD1"
    studies = write_cd(cd, cd_instances())
    listed = [p.relative_to(cd) for p in files_under(cd)]
    (cd / "README.TXT").write_text("Viewer: run VIEWER.EXE\n")
    (cd / "PT000000" / "EXTRA.DCM").write_bytes(datasets.real_files()[0].read_bytes())
    with (
        DevCloud(tmp_path / "cloud") as cloud,
        watching_agent(
            tmp_path,
            folders,
            cloud={"upload_url": cloud.upload_url, "dicomweb_url": cloud.dicomweb_url},
            study={"stable_after": "1s"},
        ) as agent,
    ):
        folders.deliver(cd)
        for study_uid in set(studies.values()):
            expected = {sop for sop, study in studies.items() if study == study_uid}
            assert cloud.wait_for_study(study_uid, len(expected), WAIT) == expected
        wait_until(lambda: not any(folders.inbox.iterdir()), WAIT, what="the inbox emptied")
        received = agent.rows("SELECT sop_instance_uid FROM instances")
    assert sorted(uid for (uid,) in received) == sorted(studies)
    assert sorted(p.relative_to(folders.done / "CD1") for p in files_under(folders.done)) == sorted(
        listed
    )
    rejected = {p.relative_to(folders.rejected / "CD1") for p in files_under(folders.rejected)}
    assert rejected == {
        Path(name)
        for name in (
            "README.TXT",
            "README.TXT.reason",
            "PT000000/EXTRA.DCM",
            "PT000000/EXTRA.DCM.reason",
        )
    }
    reason = (folders.rejected / "CD1" / "PT000000" / "EXTRA.DCM.reason").read_text()
    assert "not in the file set CD1/DICOMDIR lists" in reason


def write_in_pieces(path: Path, data: bytes, pieces: int, pause: float, lock: bool) -> None:
    """Write `data` to `path` in `pieces` writes `pause` seconds apart, holding an exclusive
    flock throughout if `lock`; meanwhile the file must stay in place."""
    size = -(-len(data) // pieces)
    with path.open("wb") as out:
        if lock:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX)
        for start in range(0, len(data), size):
            out.write(data[start : start + size])
            out.flush()
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline:
                assert path.exists(), f"{path.name} was taken before it was complete"
                time.sleep(0.05)


@pytest.mark.parametrize(
    ("pieces", "pause", "lock"),
    [
        pytest.param(5, SETTLE * 0.6, False, id="pauses-shorter-than-settle"),
        pytest.param(2, SETTLE * 2, True, id="locked-through-a-long-pause"),
    ],
)
def test_a_file_written_slowly_is_imported_only_once_complete(
    tmp_path: Path, folders: Folders, pieces: int, pause: float, lock: bool
) -> None:
    source = cd_instances()[0]
    data = source.read_bytes()
    with watching_agent(tmp_path, folders) as agent:
        write_in_pieces(folders.inbox / "slow.dcm", data, pieces, pause, lock)
        wait_until((folders.done / "slow.dcm").exists, WAIT, what="slow.dcm in done/")
        rows = agent.rows("SELECT sop_instance_uid, sha256 FROM instances")
    assert (folders.done / "slow.dcm").read_bytes() == data
    assert not files_under(folders.rejected)
    assert len(rows) == 1
    assert rows[0][0] == str(dcmread(source).SOPInstanceUID)
    assert rows[0][1] == datasets.dataset_sha256(source)


def test_a_text_file_and_a_truncated_dicom_file_are_rejected_with_their_reasons(
    tmp_path: Path, folders: Folders
) -> None:
    good = cd_instances()[0]
    data = good.read_bytes()
    (folders.staging / "notes.txt").write_text("Patient arrived with 2 CDs.\n")
    (folders.staging / "broken.dcm").write_bytes(data[: len(data) // 2])
    (folders.staging / "good.dcm").write_bytes(data)
    with watching_agent(tmp_path, folders) as agent:
        for name in ("notes.txt", "broken.dcm", "good.dcm"):
            folders.deliver(folders.staging / name)
        wait_until(lambda: not any(folders.inbox.iterdir()), WAIT, what="the inbox emptied")
        rows = agent.rows("SELECT sop_instance_uid FROM instances")
    assert [p.name for p in files_under(folders.done)] == ["good.dcm"]
    assert sorted(p.name for p in files_under(folders.rejected)) == [
        "broken.dcm",
        "broken.dcm.reason",
        "notes.txt",
        "notes.txt.reason",
    ]
    assert (folders.rejected / "notes.txt").read_text() == "Patient arrived with 2 CDs.\n"
    assert "not a DICOM Part-10 file" in (folders.rejected / "notes.txt.reason").read_text()
    assert (folders.rejected / "broken.dcm").read_bytes() == data[: len(data) // 2]
    assert "quarantined" in (folders.rejected / "broken.dcm.reason").read_text()
    assert rows == [(str(dcmread(good).SOPInstanceUID),)]


@pytest.fixture(scope="module")
def series_200(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return datasets.ct_series(tmp_path_factory.mktemp("ct200"), slices=200, rows=16, cols=16)


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "polling"])
def test_kill9_mid_folder_then_restart_imports_each_file_once_and_loses_none(
    tmp_path: Path, folders: Folders, series_200: list[Path], poll: bool
) -> None:
    batch = folders.staging / "batch"
    batch.mkdir()
    for path in series_200:
        shutil.copyfile(path, batch / path.name)
    agent = Agent(tmp_path / "data", extra={"watch": folders.config(poll)})
    with agent:
        folders.deliver(batch)
        wait_until(lambda: len(files_under(folders.done)) >= 20, WAIT, 0.01, "20 files in done/")
        agent.kill9()
        left = len(files_under(folders.inbox))
        assert left > 0, "the whole folder was imported before the kill: nothing was tested"
        print(f"killed with {left} of 200 files left in the inbox")
        agent.start()
        wait_until(lambda: not any(folders.inbox.iterdir()), WAIT, what="the inbox emptied")
        rows = agent.rows("SELECT sop_instance_uid FROM instances")
        parts = agent.rows("SELECT COUNT(*) FROM studies")
    expected = sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series_200)
    assert sorted(uid for (uid,) in rows) == expected  # each once, none lost
    assert parts == [(1,)]
    assert sorted(p.name for p in files_under(folders.done)) == sorted(p.name for p in series_200)
    assert not files_under(folders.rejected)


def test_files_already_in_the_folder_at_start_are_imported(
    tmp_path: Path, folders: Folders
) -> None:
    source = cd_instances()[0]
    shutil.copyfile(source, folders.inbox / "early.dcm")
    os.utime(folders.inbox / "early.dcm", (0, 0))
    with watching_agent(tmp_path, folders):
        # Sooner than the rescan without events (30 s): the start-up scan found it.
        wait_until((folders.done / "early.dcm").exists, 20, what="early.dcm in done/")


def test_a_fifo_in_the_folder_neither_hangs_the_watch_nor_stops_the_next_file(
    tmp_path: Path, folders: Folders
) -> None:
    os.mkfifo(folders.inbox / "a.fifo")  # opening it to read would block until a writer came
    port = free_port()
    agent = watching_agent(tmp_path, folders, health={"listen": f"{LOOPBACK}:{port}"})
    with agent:
        shutil.copyfile(cd_instances()[0], folders.staging / "b.dcm")
        folders.deliver(folders.staging / "b.dcm")
        wait_until((folders.done / "b.dcm").exists, WAIT, what="b.dcm in done/")
        health = requests.get(f"http://{LOOPBACK}:{port}/healthz", timeout=30)
    assert health.status_code == 200, health.text
    assert health.json()["parts"]["watch"]["healthy"] is True
    assert (folders.inbox / "a.fifo").exists()


@pytest.fixture
def cdrom(tmp_path: Path) -> Iterator[Path]:
    """Return a tmpfs mounted for the test (remount it read-only to play a mounted CD)."""
    mount = tmp_path / "cdrom"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_read_only_cd_is_copied_out_once_and_passed_over_after_a_restart(
    tmp_path: Path, folders: Folders, cdrom: Path
) -> None:
    studies = write_cd(cdrom, cd_instances())
    on_cd = {p: p.read_bytes() for p in files_under(cdrom)}
    subprocess.run(["mount", "-o", "remount,ro", str(cdrom)], check=True)
    cd_done = tmp_path / "cd-done"
    cd_folder = {"path": str(cdrom), "done": str(cd_done), "rejected": str(tmp_path / "cd-rej")}
    inbox = folders.config()["dirs"][0]
    config = {"dirs": [cd_folder, inbox], "settle": f"{SETTLE}s", "poll": True}
    agent = Agent(tmp_path / "data", extra={"watch": config})
    with agent:
        wait_until(
            lambda: len(files_under(cd_done)) == len(on_cd), WAIT, what="the CD copied to done/"
        )
        agent.stop()
        agent.start()
        # A file in the other folder, taken after the CD's files would have been taken again.
        (folders.staging / "marker.dcm").write_bytes(cd_instances()[0].read_bytes())
        folders.deliver(folders.staging / "marker.dcm")
        wait_until((folders.done / "marker.dcm").exists, WAIT, what="marker.dcm in done/")
        rows = agent.rows("SELECT sop_instance_uid FROM instances")
    assert sorted(uid for (uid,) in rows) == sorted(studies)
    assert sorted(p.relative_to(cd_done) for p in files_under(cd_done)) == sorted(
        p.relative_to(cdrom) for p in on_cd
    )
    assert {p: p.read_bytes() for p in files_under(cdrom)} == on_cd  # the CD as it was
    assert ((tmp_path / "data" / "watch").stat().st_mode & 0o777) == 0o700
