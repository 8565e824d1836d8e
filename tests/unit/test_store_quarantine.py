"""The quarantine rows an operator lists, purges and releases (`Store.quarantine`)."""

from __future__ import annotations

from pathlib import Path

from agent.store import Store
from agent.store.maintenance import backup, check

T0 = 1_700_000_000.0


def kept(store: Store, name: str, at: float, sha: str) -> None:
    store.record_quarantine(
        f"bad {name}", f"quarantine/{name}.dcm", "CT1", f"1.{name}", at, sha256=sha * 64, size=10
    )


def test_entries_come_oldest_first_with_repeats_and_sizes(store: Store) -> None:
    kept(store, "1", T0 + 10, "a")
    kept(store, "2", T0, "b")
    kept(store, "1", T0 + 20, "a")  # the same input again
    entries = store.quarantine.entries()
    assert [(e.path, e.repeats, e.at, e.last_at, e.size) for e in entries] == [
        ("quarantine/2.dcm", 0, T0, T0, 10),
        ("quarantine/1.dcm", 1, T0 + 10, T0 + 20, 10),
    ]
    assert store.quarantine.entry(entries[1].id) == entries[1]
    assert store.quarantine.entry(999) is None


def test_forget_takes_the_ids_named_and_those_last_seen_before_a_time(store: Store) -> None:
    for name, at in (("1", T0), ("2", T0 + 100), ("3", T0 + 200)):
        kept(store, name, at, name)
    ids = {e.path: e.id for e in store.quarantine.entries()}
    assert store.quarantine.forget(T0 + 300) == []
    gone = store.quarantine.forget(T0 + 300, ids=[ids["quarantine/3.dcm"]], last_before=T0 + 50)
    assert [e.path for e in gone] == ["quarantine/1.dcm", "quarantine/3.dcm"]
    assert [e.path for e in store.quarantine.entries()] == ["quarantine/2.dcm"]


def test_a_refused_release_keeps_the_newest_reason_and_an_accepted_one_forgets_the_row(
    store: Store,
) -> None:
    kept(store, "1", T0, "a")
    (entry,) = store.quarantine.entries()
    store.quarantine.refused_again(entry, "still bad")
    assert store.quarantine.entries()[0].reason == "still bad"
    assert store.quarantine.released(entry, "stored", T0 + 1) is True
    assert store.quarantine.entries() == []
    assert store.quarantine.released(entry, "stored", T0 + 2) is False


def test_backup_copies_the_rows_into_a_checked_file_for_its_owner_alone(
    store: Store, db_path: Path, tmp_path: Path
) -> None:
    kept(store, "1", T0, "a")
    made = backup(db_path, tmp_path / "copy.db")
    assert made.path == tmp_path / "copy.db" and made.instances == 0
    assert (made.path.stat().st_mode & 0o777) == 0o600
    integrity = check(made.path)
    assert integrity.ok and integrity.schema_version == integrity.known_version
    copy = Store.open(made.path, create=False)
    try:
        assert [e.path for e in copy.quarantine.entries()] == ["quarantine/1.dcm"]
    finally:
        copy.close()
