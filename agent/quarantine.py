"""The quarantine for operators: list and show kept input, release it, purge it.

Release runs the kept bytes through the receiver's acceptance again, exactly as `dirigo send`
does (copied into `incoming/`, then `Receiver.accept`), as if the original sender had sent them
once more, but without the SOP Instance UID its request announced: an operator who releases a
file vouches for its dataset. Only an accepted file leaves the quarantine; one refused again
stays, with the new reason, and counts as one more repeat.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.dimse import Status
from agent.importer import LOCAL_ADDRESS
from agent.receive import Arrival, Receiver
from agent.spool import Spool
from agent.store import QuarantineEntry, Store


@dataclass(frozen=True)
class Released:
    """What became of one release: `released` (accepted, the entry is gone), with what the
    receiver did (`outcome`) or why not."""

    entry_id: int
    released: bool
    outcome: str


class Quarantine:
    """The operator's view of one agent's quarantine: rows in `store`, copies in `spool`."""

    def __init__(self, spool: Spool, store: Store) -> None:
        self.spool = spool
        self.store = store

    def entries(self) -> list[QuarantineEntry]:
        return self.store.quarantine.entries()

    def entry(self, entry_id: int) -> QuarantineEntry | None:
        return self.store.quarantine.entry(entry_id)

    def note(self, entry: QuarantineEntry) -> dict[str, object]:
        """Return the JSON note kept beside the copy (address, status sent …), {} if unreadable."""
        path = self.spool.path(str(Path(entry.path).with_suffix(".json")))
        try:
            note = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return note if isinstance(note, dict) else {}

    def release(self, receiver: Receiver, entry_id: int, now: float) -> Released:
        """Run the kept copy of `entry_id` through `receiver` again; forget the entry (and
        delete its copy) only if it is accepted now. Never raises for the input itself."""
        entry = self.entry(entry_id)
        if entry is None:
            return Released(entry_id, False, "no such quarantine entry")
        try:
            copy = self._copy(entry)
        except FileNotFoundError:
            return Released(entry_id, False, f"its copy {entry.path} is gone; purge the entry")
        except OSError as exc:
            return Released(entry_id, False, f"cannot copy into incoming/: {exc.strerror}")
        try:
            reply = receiver.accept(Arrival(copy, entry.calling_ae, LOCAL_ADDRESS, None))
        finally:
            self.spool.discard(copy)  # accept() consumes it; this covers an interruption
        if reply.status == Status.SUCCESS:
            self.store.quarantine.released(entry, str(reply.outcome), now)
            self.spool.release_quarantined(entry.path)
            return Released(entry_id, True, str(reply.outcome))
        if reply.quarantined:
            if entry.sha256 is None:
                # Kept before copies were known by content: the receiver kept a second copy
                # under a new entry, which now stands for this one.
                self._forget(self.store.quarantine.forget(now, ids=[entry_id]))
            else:
                self.store.quarantine.refused_again(entry, reply.comment)
            return Released(entry_id, False, f"refused again: {reply.comment}")
        return Released(entry_id, False, reply.comment or f"status 0x{reply.status:04X}")

    def purge(
        self, now: float, ids: list[int], older_than: float | None = None
    ) -> list[QuarantineEntry]:
        """Forget the entries `ids`, and those last seen more than `older_than` seconds ago;
        delete their copies; return the entries forgotten."""
        before = None if older_than is None else now - older_than
        gone = self.store.quarantine.forget(now, ids=ids, last_before=before)
        self._forget(gone)
        return gone

    def _forget(self, entries: list[QuarantineEntry]) -> None:
        for entry in entries:
            self.spool.release_quarantined(entry.path)

    def _copy(self, entry: QuarantineEntry) -> Path:
        """Copy the kept bytes into a new file in `incoming/` (the receiver moves what it
        accepts, and the kept copy must stay until the outcome is known)."""
        with self.spool.path(entry.path).open("rb") as source:
            fd, name = tempfile.mkstemp(prefix="release-", suffix=".dcm", dir=self.spool.incoming)
            try:
                with os.fdopen(fd, "wb") as target:
                    shutil.copyfileobj(source, target)
            except BaseException:
                self.spool.discard(Path(name))
                raise
        return Path(name)


def entry_document(
    entry: QuarantineEntry, note: dict[str, object] | None = None
) -> dict[str, object]:
    """Return an entry as JSON-able data (times in ISO 8601 UTC); with the note's details."""
    document: dict[str, object] = {
        "id": entry.id,
        "at": _iso(entry.at),
        "last_at": _iso(entry.last_at),
        "sender": entry.calling_ae,
        "reason": entry.reason,
        "size": entry.size,
        "repeats": entry.repeats,
        "sop_instance_uid": entry.sop_instance_uid,
        "sha256": entry.sha256,
        "path": entry.path,
    }
    if note is not None:
        for key in ("address", "status"):
            if key in note:
                document[key] = note[key]
    return document


def render_entries(entries: list[QuarantineEntry]) -> str:
    """Return the entries as a table: id, when, sender, reason, size, repeats."""
    if not entries:
        return "quarantine is empty"
    rows = [("ID", "WHEN (UTC)", "SENDER", "SIZE", "REPEATS", "REASON")]
    for entry in entries:
        reason = entry.reason if len(entry.reason) <= 60 else entry.reason[:57] + "..."
        rows.append(
            (
                str(entry.id),
                _iso(entry.last_at)[:19].replace("T", " "),
                entry.calling_ae,
                _size(entry.size),
                str(entry.repeats),
                reason,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[5]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def render_entry(document: dict[str, object]) -> str:
    """Return one entry's document as `key: value` lines."""
    return "\n".join(f"{key}: {'' if value is None else value}" for key, value in document.items())


def _size(size: int) -> str:
    amount = float(size)
    for unit in ("B", "KiB", "MiB"):
        if amount < 1024:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="seconds")
