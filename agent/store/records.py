"""The states, levels and audit events the store's tables hold, shared by its modules."""

from __future__ import annotations

import sqlite3
from enum import StrEnum


class StudyState(StrEnum):
    """Where a study part is on its way to the cloud."""

    OPEN = "open"
    STABLE = "stable"
    QUEUED = "queued"
    UPLOADING = "uploading"
    SENT = "sent"
    CONFIRMED = "confirmed"


class InstanceState(StrEnum):
    """Where one received instance is on its way to the cloud."""

    RECEIVED = "received"
    PACKED = "packed"
    SENT = "sent"


class JobState(StrEnum):
    """A job's place in its lifecycle: ready → claimed (leased) → done | failed."""

    READY = "ready"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"


class Outcome(StrEnum):
    """What `record_instance` did with an arrival."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"
    REPAIRED = "repaired"
    """Identical content again, while the recorded copy was missing or damaged: the new copy
    took its place."""


class Level(StrEnum):
    """Severity of an audit event."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def event(
    db: sqlite3.Connection,
    now: float,
    level: Level,
    kind: str,
    message: str,
    study_uid: str | None,
    sop_instance_uid: str | None,
) -> None:
    """Append to the audit trail. Messages carry UIDs and AE titles, never patient data."""
    db.execute(
        "INSERT INTO events (at, level, kind, study_uid, sop_instance_uid, message)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (now, level, kind, study_uid, sop_instance_uid, message),
    )
