"""`dirigo backup` while a real agent receives a series by C-STORE."""

from __future__ import annotations

import contextlib
import sqlite3
import stat
import subprocess
import threading
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.store import MIGRATIONS
from tests.support import datasets
from tests.support.agent import Agent
from tests.support.net import LOOPBACK, wait_until


def send_series(port: int, paths: list[Path], acknowledged: list[str]) -> None:
    """C-STORE each file on one association, appending each UID once its Success is in."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(LOOPBACK, port, ae_title="DIRIGO")
    assert assoc.is_established
    try:
        for path in paths:
            ds = dcmread(path)
            response = assoc.send_c_store(ds)
            if response and response.Status == 0:
                acknowledged.append(str(ds.SOPInstanceUID))
    finally:
        assoc.release()


def test_backup_while_receiving_is_consistent_and_holds_every_row_acknowledged_before(
    tmp_path: Path, tmp_data_dir: Path
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=240, rows=64, cols=64, seed=51)
    target = tmp_path / "backups" / "dirigo-backup.db"
    target.parent.mkdir()
    target.write_bytes(b"an older backup, replaced whole")
    acknowledged: list[str] = []
    with Agent(tmp_data_dir) as agent:
        sender = threading.Thread(target=send_series, args=(agent.port, series, acknowledged))
        sender.start()
        try:
            wait_until(lambda: len(acknowledged) >= 40, 120, what="40 instances acknowledged")
            before = set(acknowledged)
            result = subprocess.run(
                agent.command("backup", "--to", str(target)),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            during = len(acknowledged)
        finally:
            sender.join(timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("backup of ") and str(target) in result.stdout
        folder = run_in_folder(agent, tmp_path)
        assert folder.returncode == 1 and "is a folder" in folder.stderr
    assert len(acknowledged) == len(series) and during > len(before), "sending went on meanwhile"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    with contextlib.closing(sqlite3.connect(f"file:{target}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        uids = {uid for (uid,) in db.execute("SELECT sop_instance_uid FROM instances")}
        (version,) = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
    assert before <= uids
    assert version == max(m.version for m in MIGRATIONS)


def run_in_folder(agent: Agent, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent.command("backup", "--to", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
