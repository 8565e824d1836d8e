"""The SQL of the quarantine as an operator sees it: list, show, release, purge.

`Store.quarantine` is the one instance, sharing the store's connection and lock. Input is put in
quarantine by `Store.record_quarantine` (the receiver) and bounded by `Store.trim_quarantine`;
here an operator looks at the rows, forgets them, or records how a release went.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.store.records import Level, event

if TYPE_CHECKING:
    from agent.store import Store

_COLUMNS = (
    "id, at, coalesce(last_at, at), reason, path, calling_ae, sop_instance_uid, sha256, size,"
    " repeats"
)


@dataclass(frozen=True)
class QuarantineEntry:
    """One kept input: when it first and last came, from whom, why it was refused, and its
    copy (relative to data_dir). UIDs and AE titles only: no patient data."""

    id: int
    at: float
    last_at: float
    reason: str
    path: str
    calling_ae: str
    sop_instance_uid: str | None
    sha256: str | None
    size: int
    repeats: int


class QuarantineRows:
    """The quarantine table for operators; every method is one short transaction."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def entries(self) -> list[QuarantineEntry]:
        """Return every kept input, oldest first."""
        with self._store.read() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM quarantine ORDER BY at, id").fetchall()
        return [QuarantineEntry(*row) for row in rows]

    def entry(self, entry_id: int) -> QuarantineEntry | None:
        """Return the kept input `entry_id`, or None if there is no such row."""
        with self._store.read() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM quarantine WHERE id = ?", (entry_id,)
            ).fetchone()
        return None if row is None else QuarantineEntry(*row)

    def forget(
        self, now: float, *, ids: Collection[int] = (), last_before: float | None = None
    ) -> list[QuarantineEntry]:
        """Delete the rows `ids`, and those last seen before `last_before`; return the rows
        deleted (the caller deletes their copies), each with an audit event."""
        with self._store.write() as db:
            rows = db.execute(
                "DELETE FROM quarantine WHERE id IN (SELECT value FROM json_each(?))"
                f" OR coalesce(last_at, at) < ? RETURNING {_COLUMNS}",
                (_json_ids(ids), float("-inf") if last_before is None else last_before),
            ).fetchall()
            gone = [QuarantineEntry(*row) for row in rows]
            for entry in gone:
                event(
                    db,
                    now,
                    Level.INFO,
                    "quarantine-purged",
                    f"purged quarantined input {entry.id} from {entry.calling_ae} at {entry.path}",
                    None,
                    entry.sop_instance_uid,
                )
        return sorted(gone, key=lambda e: e.id)

    def released(self, entry: QuarantineEntry, outcome: str, now: float) -> bool:
        """Forget a kept input the receiver accepted on release (`outcome`: stored, duplicate
        …); return False if the row was gone already (purged or trimmed meanwhile)."""
        with self._store.write() as db:
            gone = db.execute("DELETE FROM quarantine WHERE id = ?", (entry.id,)).rowcount
            event(
                db,
                now,
                Level.INFO,
                "quarantine-released",
                f"released quarantined input {entry.id} from {entry.calling_ae}: {outcome}",
                None,
                entry.sop_instance_uid,
            )
        return bool(gone)

    def refused_again(self, entry: QuarantineEntry, reason: str) -> None:
        """Record why a release was refused: the row keeps the newest reason."""
        with self._store.write() as db:
            db.execute("UPDATE quarantine SET reason = ? WHERE id = ?", (reason, entry.id))


def _json_ids(ids: Collection[int]) -> str:
    return "[" + ",".join(str(int(i)) for i in ids) + "]"
