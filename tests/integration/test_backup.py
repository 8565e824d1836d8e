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


def test_a_restored_backup_loses_nothing_received_after_it_when_the_spool_is_sent_again(
    tmp_path: Path, tmp_data_dir: Path
) -> None:
    """The restore procedure of docs/operations.md, step by step: a backup, more instances
    acknowledged after it, the agent stopped, the database replaced by the backup (its WAL
    files removed), `dirigo migrate`, the spool (kept aside as hard links) sent again, the agent
    started. Without the send, the start-up sweep removes the spool files the older database
    does not know, acknowledged as they were."""
    first = datasets.ct_series(tmp_path / "a", slices=6, rows=32, cols=32, seed=61)
    later = datasets.ct_series(tmp_path / "b", slices=4, rows=32, cols=32, seed=62)
    backup = tmp_path / "dirigo-backup.db"
    kept = tmp_path / "spool-before-restore"
    database = tmp_data_dir / "dirigo.db"
    with Agent(tmp_data_dir) as agent:
        acknowledged: list[str] = []
        send_series(agent.port, first, acknowledged)
        subprocess.run(agent.command("backup", "--to", str(backup)), check=True, timeout=60)
        send_series(agent.port, later, acknowledged)
        assert len(acknowledged) == len(first) + len(later)
        assert agent.stop() == 0
        subprocess.run(["cp", "-al", str(tmp_data_dir / "spool"), str(kept)], check=True)
        for leftover in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
            leftover.unlink(missing_ok=True)
        subprocess.run(["cp", str(backup), str(database)], check=True)
        migrate = run(agent, "migrate")
        assert "is up to date" in migrate.stdout, migrate.stdout + migrate.stderr
        assert agent.status()["instances"]["received"] == len(first)
        sent = run(agent, "send", str(kept))
        assert f"{len(later)} stored, {len(first)} duplicate" in sent.stdout, sent.stdout
        agent.start()
        assert agent.status()["instances"]["received"] == len(first) + len(later)
        held = {uid for (uid,) in agent.rows("SELECT sop_instance_uid FROM instances")}
        assert held == set(acknowledged)
        assert "unacknowledged file(s) left by an interrupted run" in agent.log_tail()
        assert agent.stop() == 0
        subprocess.run(["rm", "-r", str(kept)], check=True)
        agent.start()  # nothing depended on the copy kept aside
        assert agent.status()["instances"]["received"] == len(first) + len(later)
        assert "lost their spool copy" not in agent.log_tail()


def run(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent.command(*args), capture_output=True, text=True, timeout=120, check=False
    )
