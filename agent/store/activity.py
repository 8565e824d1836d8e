"""The SQL of the agent's recent activity, as the status page shows it: instances received and
sent per time bucket, the latest study parts, the oldest one still waiting, recent problems.

`Store.activity` is the one instance, sharing the store's connection and lock. Everything is read
from rows the pipeline writes anyway (`instances.received_at`, `uploads.sent_at`, `events`), so the
history survives restarts and a crash, and costs nothing on the DICOM or upload paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.store.records import InstanceState, Level, StudyState

if TYPE_CHECKING:
    from agent.store import Store

WAITING = (StudyState.OPEN, StudyState.STABLE, StudyState.QUEUED, StudyState.UPLOADING)
"""The states of a study part the cloud does not hold yet."""


@dataclass(frozen=True)
class Bucket:
    """Instances (and their bytes, as received) that arrived and that went to the cloud in
    [start, start + width)."""

    start: float
    received: int
    received_bytes: int
    sent: int
    sent_bytes: int


@dataclass(frozen=True)
class PartSummary:
    """One study part: its state, how many instances and bytes it holds, when they arrived."""

    study_uid: str
    part: int
    state: str
    instances: int
    bytes: int
    first_received_at: float | None
    last_received_at: float | None


@dataclass(frozen=True)
class Problem:
    """A warning or error event: a failed attempt, a quarantined input, a replaced instance."""

    at: float
    level: str
    kind: str
    study_uid: str | None
    message: str


class Activity:
    """Read-only queries over the pipeline's rows; every method is one read transaction."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def throughput(self, start: float, width: float, count: int) -> list[Bucket]:
        """Return `count` buckets of `width` seconds from `start`, every one present (zeros
        included): instances received by their `received_at`, and instances sent by the time
        their part went to the cloud. Bytes are the instances' own (as received), in and out
        alike, so the two compare; a bundle on the wire may be smaller."""
        end = start + width * count
        received = [[0, 0] for _ in range(count)]
        sent = [[0, 0] for _ in range(count)]
        with self._store.read() as db:
            rows_in = db.execute(
                "SELECT CAST((received_at - ?) / ? AS INTEGER), count(*), sum(size)"
                " FROM instances WHERE received_at >= ? AND received_at < ? GROUP BY 1",
                (start, width, start, end),
            ).fetchall()
            rows_out = db.execute(
                "SELECT CAST((u.sent_at - ?) / ? AS INTEGER), count(i.id), sum(i.size)"
                " FROM uploads u JOIN instances i ON i.study_id = u.study_id AND i.state = ?"
                " WHERE u.sent_at >= ? AND u.sent_at < ? GROUP BY 1",
                (start, width, InstanceState.SENT, start, end),
            ).fetchall()
        for rows, into in ((rows_in, received), (rows_out, sent)):
            for index, number, size in rows:
                if 0 <= index < count:  # float rounding at the very edge
                    into[index] = [number, size or 0]
        return [
            Bucket(start + i * width, received[i][0], received[i][1], sent[i][0], sent[i][1])
            for i in range(count)
        ]

    def recent_parts(self, limit: int) -> list[PartSummary]:
        """Return the `limit` study parts that last received an instance, newest first."""
        return self._parts("1 = 1", (), "s.last_received_at DESC, s.id DESC", limit)

    def oldest_waiting(self) -> PartSummary | None:
        """Return the study part not yet in the cloud that arrived first, or None."""
        states = ", ".join("?" * len(WAITING))
        found = self._parts(
            f"s.state IN ({states})", tuple(WAITING), "s.first_received_at, s.id", 1
        )
        return found[0] if found else None

    def problems(self, limit: int) -> list[Problem]:
        """Return the `limit` newest warning and error events, newest first."""
        with self._store.read() as db:
            rows = db.execute(
                "SELECT at, level, kind, study_uid, message FROM events"
                " WHERE level IN (?, ?) ORDER BY at DESC, id DESC LIMIT ?",
                (Level.WARNING, Level.ERROR, limit),
            ).fetchall()
        return [Problem(*row) for row in rows]

    def _parts(
        self, where: str, params: tuple[object, ...], order: str, limit: int
    ) -> list[PartSummary]:
        with self._store.read() as db:
            rows = db.execute(
                "SELECT s.study_uid, s.part, s.state,"
                " (SELECT count(*) FROM instances i WHERE i.study_id = s.id AND i.superseded = 0),"
                " (SELECT coalesce(sum(size), 0) FROM instances i"
                "   WHERE i.study_id = s.id AND i.superseded = 0),"
                " s.first_received_at, s.last_received_at"
                f" FROM studies s WHERE {where} ORDER BY {order} LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [PartSummary(*row) for row in rows]


def bucket_start(now: float, width: float, count: int) -> float:
    """Return the start of `count` buckets of `width` seconds that end with the one holding
    `now` (aligned to multiples of `width`, so that a refresh keeps the same buckets)."""
    return (math.floor(now / width) - count + 1) * width
