"""The SQL of the audit trail: who did what to which study, when, and how it ended.

`Store.audit` is the one instance, sharing the store's connection and lock. Rows are written in
batches (an association's row and its studies' in one transaction), listed for `dirigo audit`,
and pruned by age (`audit.keep`). They hold UIDs, AE titles and addresses, never a patient's
name or ID: the trail may be shown to people who may not see the images.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.store import Store


class AuditEvent(StrEnum):
    """What an audit row records."""

    APPLICATION_START = "application-start"
    APPLICATION_STOP = "application-stop"
    ASSOCIATION = "association"
    """A DICOM association, accepted (written when it ends) or refused (when refused)."""
    STUDY_RECEIVED = "study-received"
    """Instances of one study received on one association or import."""
    PART_SENT = "part-sent"
    PART_CONFIRMED = "part-confirmed"
    QUERY = "query"
    RETRIEVE = "retrieve"
    QUARANTINE = "quarantine"


class AuditOutcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


@dataclass(frozen=True)
class AuditEntry:
    """One audit record. `calling_ae` is who asked (the peer that associated, or Dirigo when it
    acts on its own), `called_ae` whom it asked; `address` the peer's network address (an IP
    for DICOM, a host for the cloud). `detail` holds what depends on the event, JSON-able."""

    at: float
    event: AuditEvent
    outcome: AuditOutcome = AuditOutcome.SUCCESS
    reason: str | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    address: str | None = None
    study_uid: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None
    """The row's id once stored (None before)."""

    def document(self) -> dict[str, Any]:
        """Return the entry as `dirigo audit --json` shows it (stable keys)."""
        return {
            "id": self.id,
            "at": self.at,
            "event": str(self.event),
            "outcome": str(self.outcome),
            "reason": self.reason,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
            "address": self.address,
            "study_uid": self.study_uid,
            "detail": dict(self.detail),
        }


class Record(Protocol):
    """Somewhere to hand audit entries, written together (an `Auditor.record`)."""

    def __call__(self, *entries: AuditEntry) -> None: ...


_BATCH = 500
"""Rows read at a time when streaming."""
_COLUMNS = "id, at, event, outcome, reason, calling_ae, called_ae, address, study_uid, detail"


class AuditRows:
    """Writes, lists and prunes the `audit` table."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def record(self, entries: Sequence[AuditEntry]) -> list[AuditEntry]:
        """Write `entries` in one transaction; return them with their row ids."""
        stored = []
        with self._store.write() as db:
            for entry in entries:
                (row_id,) = db.execute(
                    "INSERT INTO audit (at, event, outcome, reason, calling_ae, called_ae,"
                    " address, study_uid, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (
                        entry.at,
                        str(entry.event),
                        str(entry.outcome),
                        entry.reason,
                        entry.calling_ae,
                        entry.called_ae,
                        entry.address,
                        entry.study_uid,
                        json.dumps(dict(entry.detail), sort_keys=True),
                    ),
                ).fetchone()
                stored.append(replace(entry, id=row_id))
        return stored

    def entries(
        self,
        since: float | None = None,
        study_uid: str | None = None,
        peer: str | None = None,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """Return the entries `each` yields, as a list."""
        return list(self.each(since, study_uid, peer, limit))

    def each(
        self,
        since: float | None = None,
        study_uid: str | None = None,
        peer: str | None = None,
        limit: int | None = None,
    ) -> Iterator[AuditEntry]:
        """Yield the entries at or after `since`, of `study_uid` (the study's own rows, and
        retrieves that named it among others), involving `peer` (as calling or called AE
        title, address, or a retrieve's destination), oldest first; the newest `limit` if
        given. Without `limit` they stream from one read transaction (a year of them may not
        fit in memory), so consume them before writing with the same store."""
        where: list[str] = ["1 = 1"]
        params: list[object] = []
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        if study_uid is not None:
            where.append(
                "(study_uid = ? OR EXISTS (SELECT 1 FROM json_each(detail, '$.studies')"
                " WHERE value = ?))"
            )
            params += [study_uid, study_uid]
        if peer is not None:
            where.append(
                "(calling_ae = ? OR called_ae = ? OR address = ?"
                " OR json_extract(detail, '$.destination') = ?)"
            )
            params += [peer] * 4
        query = f"SELECT {_COLUMNS} FROM audit WHERE {' AND '.join(where)}"
        if limit is not None:
            with self._store.read() as db:
                rows = db.execute(
                    f"{query} ORDER BY at DESC, id DESC LIMIT ?", (*params, limit)
                ).fetchall()
            yield from (_entry(row) for row in reversed(rows))
            return
        with self._store.read() as db:
            cursor = db.execute(f"{query} ORDER BY at, id", params)
            while batch := cursor.fetchmany(_BATCH):
                yield from (_entry(row) for row in batch)

    def prune(self, before: float) -> int:
        """Delete the entries older than `before`; return how many."""
        with self._store.write() as db:
            return db.execute("DELETE FROM audit WHERE at < ?", (before,)).rowcount


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    row_id, at, event, outcome, reason, calling, called, address, study_uid, detail = row
    return AuditEntry(
        at,
        AuditEvent(event),
        AuditOutcome(outcome),
        reason,
        calling,
        called,
        address,
        study_uid,
        json.loads(detail),
        row_id,
    )
