"""The SQL of uploads: which files make up a study part, its bundle, its tus upload and offsets.

`Store.uploads` is the one instance, sharing the store's connection and lock. A part goes
`stable → uploading → sent → confirmed`; its instances `received → packed → sent`. Every
offset the uploader relies on after a restart is committed here before it is relied on:
`record_sending` before a PATCH goes out, `record_offset` once the server acknowledged it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.store.jobs import Lease, hold
from agent.store.records import InstanceState, Level, StudyState, event

CODEC_CHOSEN = "codec_chosen"
"""The event kind of a codec chosen for a part by `upload.transcode: auto`."""

if TYPE_CHECKING:
    from agent.store import Store


@dataclass(frozen=True)
class PartFile:
    """One instance of a study part, as the packer needs it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Bundle:
    """A packed study part: a file in data_dir (relative `path`) and what identifies it."""

    path: str
    size: int
    sha256: str
    format: str
    instances: int


@dataclass(frozen=True)
class UploadRecord:
    """Where one study part stands on its way to the cloud."""

    study_id: int
    study_uid: str
    part: int
    state: str
    bundle: Bundle | None
    url: str | None
    confirmed_offset: int
    sent_to: int


@dataclass(frozen=True)
class CodecChoice:
    """The codec chosen for a part and why, as recorded with its bundle."""

    at: float
    study_uid: str | None
    reason: str
    """`part N: htj2k: est. …`, as the event's message says it."""


@dataclass(frozen=True)
class UploadProgress:
    """A part being uploaded: bytes the server confirmed of the bundle, and the rate of this
    attempt (bytes per second since it started; 0 until a chunk was confirmed)."""

    study_uid: str
    part: int
    size: int
    confirmed_offset: int
    rate: float


@dataclass(frozen=True)
class Purgeable:
    """A part whose spool files may go: its instance files and its bundle, if any."""

    study_id: int
    study_uid: str
    part: int
    paths: tuple[str, ...]


class Uploads:
    """Upload bookkeeping; every method is one short transaction.

    Each write a worker makes for a part names the job's `Lease`, and is made only while its
    owner still holds it (renewing it on the way); otherwise it raises LeaseLost and writes
    nothing, so a worker that lost its job can never overwrite what the job's next owner did.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    @contextmanager
    def _held(self, lease: Lease, now: float) -> Iterator[sqlite3.Connection]:
        """One write transaction on behalf of `lease`'s job: the lease is renewed first, or
        LeaseLost is raised and nothing is written."""
        with self._store.write() as db:
            hold(db, lease, now)
            yield db

    def part_files(self, study_id: int) -> list[PartFile]:
        """Return the current (not superseded) instances of a part, in arrival order."""
        with self._store.read() as db:
            rows = db.execute(
                "SELECT sop_instance_uid, sop_class_uid, transfer_syntax, path, size, sha256"
                " FROM instances WHERE study_id = ? AND superseded = 0 ORDER BY id",
                (study_id,),
            ).fetchall()
        return [PartFile(*row) for row in rows]

    def replaced(self, study_id: int) -> set[str]:
        """Return the SOP Instance UIDs of the part's current instances that replaced an
        earlier version (the same UID received before with other content)."""
        with self._store.read() as db:
            rows = db.execute(
                "SELECT sop_instance_uid FROM instances WHERE study_id = ? AND superseded = 0"
                " AND replaced_count > 0",
                (study_id,),
            )
            return {uid for (uid,) in rows}

    def stow_pending(self, study_id: int) -> list[PartFile]:
        """Return the current instances of a part the archive has not acknowledged over
        STOW-RS yet, in arrival order."""
        with self._store.read() as db:
            rows = db.execute(
                "SELECT sop_instance_uid, sop_class_uid, transfer_syntax, path, size, sha256"
                " FROM instances WHERE study_id = ? AND superseded = 0"
                " AND stow_stored_at IS NULL ORDER BY id",
                (study_id,),
            ).fetchall()
        return [PartFile(*row) for row in rows]

    def record_stored(
        self,
        study_id: int,
        sop_instance_uids: Collection[str],
        lease: Lease,
        now: float,
    ) -> None:
        """Record that the archive acknowledged these instances of the part over STOW-RS."""
        with self._held(lease, now) as db:
            db.executemany(
                "UPDATE instances SET stow_stored_at = ? WHERE study_id = ? AND superseded = 0"
                " AND sop_instance_uid = ? AND stow_stored_at IS NULL",
                [(now, study_id, uid) for uid in sop_instance_uids],
            )
            db.execute("UPDATE uploads SET updated_at = ? WHERE study_id = ?", (now, study_id))

    def get(self, study_id: int) -> UploadRecord:
        """Return the part's upload record (an empty one if nothing was packed or sent yet)."""
        with self._store.read() as db:
            row = db.execute(
                "SELECT s.study_uid, s.part, s.state, u.bundle_path, u.bundle_size,"
                " u.bundle_sha256, u.bundle_format, u.instances, u.url,"
                " coalesce(u.confirmed_offset, 0), coalesce(u.sent_to, 0)"
                " FROM studies s LEFT JOIN uploads u ON u.study_id = s.id WHERE s.id = ?",
                (study_id,),
            ).fetchone()
        if row is None:
            raise LookupError(f"no study part with id {study_id}")
        study_uid, part, state, path, size, sha256, fmt, instances, url, offset, sent_to = row
        bundle = None if path is None else Bundle(path, size, sha256, fmt, instances)
        return UploadRecord(study_id, study_uid, part, state, bundle, url, offset, sent_to)

    def begin_attempt(self, study_id: int, lease: Lease, now: float) -> None:
        """Note that an upload attempt starts now (for its rate) and the part is uploading."""
        with self._held(lease, now) as db:
            db.execute(
                "INSERT INTO uploads (study_id, created_at, updated_at, attempt_started_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (study_id) DO UPDATE SET"
                " attempt_offset = confirmed_offset, attempt_started_at = excluded.updated_at,"
                " updated_at = excluded.updated_at",
                (study_id, now, now, now),
            )
            db.execute(
                "UPDATE studies SET state = ? WHERE id = ? AND state IN (?, ?)",
                (StudyState.UPLOADING, study_id, StudyState.STABLE, StudyState.QUEUED),
            )

    def record_bundle(
        self, study_id: int, bundle: Bundle, lease: Lease, now: float, choice: str | None = None
    ) -> None:
        """Record a durable bundle for the part; any earlier upload URL is forgotten (its bytes
        were of another bundle), and the part's instances are `packed`. `choice`, the codec
        chosen for it and why (`upload.transcode: auto`), is kept as an info event."""
        with self._held(lease, now) as db:
            if choice is not None:
                self._event(db, study_id, now, Level.INFO, CODEC_CHOSEN, choice)
            db.execute(
                "UPDATE uploads SET bundle_path = ?, bundle_size = ?, bundle_sha256 = ?,"
                " bundle_format = ?, instances = ?, url = NULL, confirmed_offset = 0,"
                " sent_to = 0, attempt_offset = 0, updated_at = ? WHERE study_id = ?",
                (
                    bundle.path,
                    bundle.size,
                    bundle.sha256,
                    bundle.format,
                    bundle.instances,
                    now,
                    study_id,
                ),
            )
            db.execute(
                "UPDATE instances SET state = ? WHERE study_id = ? AND superseded = 0",
                (InstanceState.PACKED, study_id),
            )

    def forget_bundle(self, study_id: int, reason: str, lease: Lease, now: float) -> None:
        """Forget the part's bundle and upload URL (the bundle file is gone or damaged): the
        next attempt packs again and starts a new upload. Logged as a warning event."""
        with self._held(lease, now) as db:
            db.execute(
                "UPDATE uploads SET bundle_path = NULL, bundle_size = NULL, bundle_sha256 = NULL,"
                " bundle_format = NULL, url = NULL, confirmed_offset = 0, sent_to = 0,"
                " attempt_offset = 0, updated_at = ? WHERE study_id = ?",
                (now, study_id),
            )
            self._event(db, study_id, now, Level.WARNING, "bundle_discarded", reason)

    def record_url(self, study_id: int, url: str | None, lease: Lease, now: float) -> None:
        """Record the tus upload URL just created for the part's bundle (None: forget it, so
        the next attempt creates a new upload); offsets start again at 0."""
        with self._held(lease, now) as db:
            db.execute(
                "UPDATE uploads SET url = ?, confirmed_offset = 0, sent_to = 0,"
                " attempt_offset = 0, updated_at = ? WHERE study_id = ?",
                (url, now, study_id),
            )

    def record_sending(self, study_id: int, end: int, lease: Lease, now: float) -> None:
        """Commit, before a PATCH goes out, that bytes up to `end` may reach the server."""
        with self._held(lease, now) as db:
            db.execute(
                "UPDATE uploads SET sent_to = max(sent_to, ?), updated_at = ? WHERE study_id = ?",
                (end, now, study_id),
            )

    def record_offset(self, study_id: int, offset: int, lease: Lease, now: float) -> None:
        """Record the offset the server reports it holds."""
        with self._held(lease, now) as db:
            db.execute(
                "UPDATE uploads SET confirmed_offset = ?, updated_at = ? WHERE study_id = ?",
                (offset, now, study_id),
            )

    def advance(
        self,
        study_id: int,
        offset: int,
        sending_to: int,
        lease: Lease,
        now: float,
    ) -> None:
        """In one transaction: record the offset the server confirmed, and commit that bytes up
        to `sending_to` may go out next."""
        with self._held(lease, now) as db:
            db.execute(
                "UPDATE uploads SET confirmed_offset = ?, sent_to = max(sent_to, ?),"
                " updated_at = ? WHERE study_id = ?",
                (offset, sending_to, now, study_id),
            )

    def mark_sent(self, study_id: int, lease: Lease, now: float) -> None:
        """The whole bundle is in the cloud: the part and its instances are `sent`."""
        with self._held(lease, now) as db:
            db.execute(
                "INSERT INTO uploads (study_id, created_at, updated_at, sent_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (study_id) DO UPDATE SET"
                " sent_at = excluded.sent_at, updated_at = excluded.updated_at",
                (study_id, now, now, now),
            )
            db.execute("UPDATE studies SET state = ? WHERE id = ?", (StudyState.SENT, study_id))
            db.execute(
                "UPDATE instances SET state = ? WHERE study_id = ? AND superseded = 0",
                (InstanceState.SENT, study_id),
            )
            self._event(db, study_id, now, Level.INFO, "sent", "uploaded to the cloud")

    def mark_confirmed(self, study_id: int, lease: Lease, now: float) -> None:
        """The cloud lists every instance of the part: it is `confirmed`."""
        with self._held(lease, now) as db:
            db.execute(
                "UPDATE uploads SET confirmed_at = ?, updated_at = ? WHERE study_id = ?",
                (now, now, study_id),
            )
            db.execute(
                "UPDATE studies SET state = ? WHERE id = ?", (StudyState.CONFIRMED, study_id)
            )
            self._event(db, study_id, now, Level.INFO, "confirmed", "the cloud lists it")

    def purgeable(
        self, done_before: float | None, state: StudyState, limit: int
    ) -> list[Purgeable]:
        """Return up to `limit` parts in `state` (sent or confirmed), oldest first, whose files
        are still in the spool, done before `done_before` (None: however recently)."""
        column = "confirmed_at" if state == StudyState.CONFIRMED else "sent_at"
        with self._store.read() as db:
            rows = db.execute(
                f"SELECT s.id, s.study_uid, s.part, u.bundle_path FROM studies s"
                f" JOIN uploads u ON u.study_id = s.id WHERE s.state = ? AND u.purged_at IS NULL"
                f" AND u.{column} IS NOT NULL AND u.{column} <= ?"
                f" ORDER BY u.{column}, s.id LIMIT ?",
                (state, float("inf") if done_before is None else done_before, limit),
            ).fetchall()
            found = []
            for study_id, study_uid, part, bundle_path in rows:
                paths = [
                    p
                    for (p,) in db.execute(
                        "SELECT path FROM instances WHERE study_id = ?", (study_id,)
                    )
                ]
                if bundle_path is not None:
                    paths.append(bundle_path)
                found.append(Purgeable(study_id, study_uid, part, tuple(paths)))
        return found

    def record_purged(self, study_id: int, now: float) -> None:
        """Note that the part's spool files are deleted (its rows stay: re-sends of the same
        content are still recognised as duplicates)."""
        with self._store.write() as db:
            db.execute(
                "UPDATE uploads SET purged_at = ?, bundle_path = NULL, updated_at = ?"
                " WHERE study_id = ?",
                (now, now, study_id),
            )

    def last_codec_choice(self) -> CodecChoice | None:
        """Return the newest codec choice recorded with a bundle, or None."""
        with self._store.read() as db:
            row = db.execute(
                "SELECT at, study_uid, message FROM events WHERE kind = ? ORDER BY id DESC LIMIT 1",
                (CODEC_CHOSEN,),
            ).fetchone()
        return None if row is None else CodecChoice(*row)

    def bundle_paths(self) -> set[str]:
        """Return the path of every recorded bundle (the rest in bundles/ are leftovers)."""
        with self._store.read() as db:
            rows = db.execute("SELECT bundle_path FROM uploads WHERE bundle_path IS NOT NULL")
            return {path for (path,) in rows}

    def in_progress(self) -> list[UploadProgress]:
        """Return every part being uploaded, with how far it got."""
        with self._store.read() as db:
            rows = db.execute(
                "SELECT s.study_uid, s.part, coalesce(u.bundle_size, 0), u.confirmed_offset,"
                " u.attempt_offset, u.attempt_started_at, u.updated_at"
                " FROM studies s JOIN uploads u ON u.study_id = s.id WHERE s.state = ?"
                " ORDER BY u.attempt_started_at",
                (StudyState.UPLOADING,),
            ).fetchall()
        progress = []
        for study_uid, part, size, offset, attempt_offset, started, updated in rows:
            elapsed = (updated or 0) - (started or 0)
            rate = (offset - attempt_offset) / elapsed if elapsed > 0 else 0.0
            progress.append(UploadProgress(study_uid, part, size, offset, max(rate, 0.0)))
        return progress

    @staticmethod
    def _event(
        db: sqlite3.Connection, study_id: int, now: float, level: Level, kind: str, text: str
    ) -> None:
        row = db.execute("SELECT study_uid, part FROM studies WHERE id = ?", (study_id,)).fetchone()
        study_uid, part = row if row is not None else (None, 0)
        event(db, now, level, kind, f"part {part}: {text}", study_uid, None)
