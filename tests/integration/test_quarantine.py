"""`dirigo quarantine list|show|release|purge` against a real agent fed bad input by C-STORE."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from agent.spool import Spool
from agent.store import Store
from tests.integration.test_receive import ct_file, send_raw
from tests.support.agent import Agent

MISMATCH = "1.2.826.0.1.3680043.10.7.1"
ANNOUNCED = "1.2.826.0.1.3680043.10.7.2"
FINE = "1.2.826.0.1.3680043.10.7.3"
CUT = "1.2.826.0.1.3680043.10.7.4"


def run(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent.command(*args), capture_output=True, text=True, timeout=60, check=False
    )


def mismatched(folder: Path) -> Path:
    """A whole CT instance whose File Meta announces another SOP Instance UID than its dataset
    holds: refused (0xC212) and quarantined, and no release can make it right."""
    path = ct_file(folder / "mismatch.dcm", MISMATCH)
    data = path.read_bytes()
    path.write_bytes(data.replace(MISMATCH.encode(), ANNOUNCED.encode(), 1))
    return path


def truncated(folder: Path) -> Path:
    good = ct_file(folder / "whole.dcm", CUT).read_bytes()
    (folder / "cut.dcm").write_bytes(good[:-1000])
    return folder / "cut.dcm"


def quarantined_by_an_older_check(agent: Agent, tmp_path: Path) -> int:
    """Keep a whole instance in quarantine as a stricter Dirigo would have (through the spool
    and store the receiver uses); return its entry id."""
    source = ct_file(tmp_path / "fine" / "fine.dcm", FINE)
    spool = Spool(agent.data_dir, 90.0)
    arrival = spool.incoming / "older-check.dcm"
    shutil.copyfile(source, arrival)
    details = {"calling_ae": "PACS", "address": "127.0.0.1", "status": "0xC210"}
    copy = spool.quarantine(arrival, "refused by an older check", details)
    store = Store.open(agent.data_dir / "dirigo.db", create=False)
    try:
        store.record_quarantine(
            "refused by an older check",
            copy.path,
            "PACS",
            FINE,
            time.time(),
            sha256=copy.sha256,
            size=copy.size,
        )
        return next(e.id for e in store.quarantine.entries() if e.sop_instance_uid == FINE)
    finally:
        store.close()


def test_quarantine_lists_shows_releases_and_purges_real_refusals(
    tmp_data_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "bad").mkdir()
    bad = [mismatched(tmp_path / "bad"), truncated(tmp_path / "bad")]
    with Agent(tmp_data_dir) as agent:
        assert send_raw(agent.port, [bad[0], bad[1], bad[0]]) == [0xC212, 0xC210, 0xC212]
        fine = quarantined_by_an_older_check(agent, tmp_path)

        listing = run(agent, "quarantine", "list")
        assert listing.returncode == 0, listing.stderr
        header, *lines = listing.stdout.splitlines()
        assert header.split()[:6] == ["ID", "WHEN", "(UTC)", "SENDER", "SIZE", "REPEATS"]
        assert len(lines) == 3 and all(" PACS " in line for line in lines)
        documents = json.loads(run(agent, "quarantine", "list", "--json").stdout)["quarantine"]
        by_uid = {d["sop_instance_uid"]: d for d in documents}
        refused = by_uid[ANNOUNCED]
        assert refused["repeats"] == 1 and refused["sender"] == "PACS"
        assert refused["size"] == (tmp_data_dir / refused["path"]).stat().st_size
        assert "differs from the one announced" in refused["reason"]

        shown = run(agent, "quarantine", "show", str(refused["id"]))
        assert shown.returncode == 0, shown.stderr
        assert f"sop_instance_uid: {ANNOUNCED}" in shown.stdout
        assert "status: 0xC212" in shown.stdout and "address: 127.0.0.1" in shown.stdout
        missing = run(agent, "quarantine", "show", "999")
        assert missing.returncode == 1 and "no quarantine entry 999" in missing.stderr

        released = run(agent, "quarantine", "release", str(fine), str(refused["id"]))
        assert released.returncode == 1, released.stderr
        assert f"entry {fine}: released (stored)" in released.stdout
        assert f"entry {refused['id']}: kept (refused again: SOP Instance UID" in released.stdout
        assert agent.rows("SELECT count(*) FROM instances WHERE sop_instance_uid = ?", FINE) == [
            (1,)
        ]
        left = {
            d["id"]: d
            for d in json.loads(run(agent, "quarantine", "list", "--json").stdout)["quarantine"]
        }
        assert fine not in left
        assert left[refused["id"]]["repeats"] == 2
        assert (tmp_data_dir / left[refused["id"]]["path"]).is_file()
        kept = sorted(p.name for p in (tmp_data_dir / "quarantine").iterdir())
        assert len(kept) == 4  # two entries, each a copy and its note

        cut = by_uid[CUT]
        unknown = run(agent, "quarantine", "purge", str(cut["id"]), "999")
        assert unknown.returncode == 1 and "no quarantine entry 999; none purged" in unknown.stderr
        assert (tmp_data_dir / cut["path"]).is_file()
        recent = run(agent, "quarantine", "purge", "--older-than", "1h")
        assert recent.returncode == 0 and "purged 0 quarantine entries" in recent.stdout
        purged = run(agent, "quarantine", "purge", str(cut["id"]))
        assert purged.returncode == 0, purged.stderr
        assert not (tmp_data_dir / cut["path"]).exists()
        everything = run(agent, "quarantine", "purge", "--older-than", "0s")
        assert "purged 1 quarantine entry" in everything.stdout
        assert list((tmp_data_dir / "quarantine").iterdir()) == []
        assert agent.status()["instances"]["quarantined"] == 0
