"""Storage SCP policy: what happens to an instance between its arrival and the Success status.

Order matters, and is the promise: rename into the spool → (fsync data and directory, while the
bytes are checked) → duplicate? answer Success, keep the durable copy → commit the row → Success.
A duplicate is one only while the recorded copy is intact (or the cloud holds it): a re-send
repairs a lost copy. Anything else gets a named failure status, the received bytes are
quarantined or discarded (never after a commit whose outcome is unknown), and the association
carries on.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.dataset import Dataset

from agent.config import SpoolSettings
from agent.config.units import format_duration, format_size
from agent.dimse import Status
from agent.instance import InstanceHeader, InvalidInstance, Problem, inspect
from agent.spool import Spool
from agent.store import (
    AuditEntry,
    AuditEvent,
    AuditOutcome,
    NewInstance,
    Outcome,
    Store,
    StoreError,
)
from agent.store.audit import Record

logger = logging.getLogger(__name__)

_STATUS_FOR_PROBLEM = {
    Problem.MALFORMED: Status.MALFORMED_DATASET,
    Problem.MISSING_UID: Status.MISSING_ATTRIBUTE,
    Problem.UID_MISMATCH: Status.SOP_INSTANCE_MISMATCH,
}


@dataclass(frozen=True)
class Arrival:
    """One received file and what the sender said about it."""

    path: Path
    calling_ae: str
    address: str
    sop_instance_uid: str | None


@dataclass(frozen=True)
class Reply:
    """The DIMSE status for an arrival, with an error comment when it failed.

    `outcome` says what a Success did (stored, duplicate or replaced), and `quarantined` whether
    a failure kept the bytes in quarantine; neither goes to the peer (the importer counts them).
    """

    status: Status
    comment: str = ""
    outcome: Outcome | None = None
    quarantined: bool = False
    study_uid: str | None = None
    sop_class_uid: str | None = None
    """The study and SOP class of an instance answered with Success (for the audit trail)."""

    def as_dataset(self) -> Dataset:
        """Return the C-STORE response status dataset pynetdicom sends."""
        ds = Dataset()
        ds.Status = int(self.status)
        if self.comment:
            # Error Comment is LO: at most 64 printable characters, and a backslash would split
            # it into several values.
            text = "".join(c if c.isprintable() and c != "\\" else "?" for c in self.comment)
            ds.ErrorComment = text[:64]
        return ds


class Receiver:
    """Accepts arrivals into the spool and the store; called concurrently by association threads."""

    def __init__(
        self,
        spool: Spool,
        store: Store,
        clock: Callable[[], float] = time.time,
        concurrency: int = 10,
        limits: SpoolSettings | None = None,
    ) -> None:
        self.spool = spool
        self.store = store
        self.clock = clock
        self.limits = limits or SpoolSettings()
        self._flusher = ThreadPoolExecutor(concurrency, thread_name_prefix="flush")
        self._uncertain: set[str] = set()
        """Spool files whose row's commit failed with an unknown outcome."""
        self._uncertain_lock = threading.Lock()
        self.observe: Callable[[Reply, int], None] | None = None
        """Told every reply and the size of the file it answers for, whatever the source
        (C-STORE, a watch folder): the agent's metrics."""
        self.audit: Record | None = None
        """Told of every input quarantined (the audit trail)."""

    def close(self) -> None:
        """Wait for pending flushes and stop the flusher threads."""
        self._flusher.shutdown(wait=True)

    def housekeeping(self, now: float) -> None:
        """Settle the files of failed commits and bound the quarantine (called periodically)."""
        self.reconcile()
        self.trim_quarantine(now)

    def trim_quarantine(self, now: float) -> int:
        """Delete quarantined input last seen more than `spool.quarantine_keep` ago, then the
        oldest until the quarantine fits in `spool.quarantine_max`; return how many."""
        paths = self.store.trim_quarantine(
            now - self.limits.quarantine_keep, self.limits.quarantine_max
        )
        for path in paths:
            self.spool.release_quarantined(path)
        if paths:
            logger.warning(
                "removed %d quarantined file(s): older than %s or beyond %s in all",
                len(paths),
                format_duration(self.limits.quarantine_keep),
                format_size(self.limits.quarantine_max),
            )
        return len(paths)

    def reconcile(self) -> int:
        """Delete the spool files of failed commits that no row references, now that the
        database answers; return how many. A file a row references (the commit did happen) is
        kept; while the database cannot be read, every file is kept for the next call."""
        with self._uncertain_lock:
            pending = set(self._uncertain)
        if not pending:
            return 0
        unreferenced = pending - self.store.referenced(pending)
        for relative in unreferenced:
            self.spool.remove(relative)
        with self._uncertain_lock:
            self._uncertain -= pending
        if unreferenced:
            logger.warning("removed %d spool file(s) no row refers to", len(unreferenced))
        return len(unreferenced)

    def accept(self, arrival: Arrival) -> Reply:
        """Given a received file, make it durable and recorded, and return the status to send.

        Never raises: every failure becomes a status, and the file is quarantined or discarded;
        or, when recording it failed and the row may have been committed all the same, kept
        for `reconcile` (or the start-up sweep) to decide.
        """
        try:
            size = arrival.path.stat().st_size
        except OSError:
            size = 0  # nothing to count; _answer says what became of it
        reply = self._answer(arrival)
        if self.observe is not None:
            self.observe(reply, size)
        return reply

    def _answer(self, arrival: Arrival) -> Reply:
        try:
            return self._accept(arrival)
        except OSError as exc:
            self.spool.discard(arrival.path)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                logger.error("disk full while storing %s: %s", arrival.sop_instance_uid, exc)
                return Reply(Status.OUT_OF_RESOURCES, "disk full at the gateway; retry later")
            logger.error("could not store %s: %s", arrival.sop_instance_uid, exc)
            return Reply(Status.OUT_OF_RESOURCES, f"storage error at the gateway: {exc.strerror}")
        except StoreError as exc:
            logger.error("could not record %s: %s", arrival.sop_instance_uid, exc)
            return Reply(Status.OUT_OF_RESOURCES, "database error at the gateway; retry later")
        except Exception:
            # A bug, not bad input: answer with a failure (never Success) and keep serving.
            logger.exception("unexpected error storing %s", arrival.sop_instance_uid)
            self.spool.discard(arrival.path)
            return Reply(Status.PROCESSING_FAILURE, "internal error at the gateway")

    def _accept(self, arrival: Arrival) -> Reply:
        if self.spool.above_high_water(pending=arrival.path.stat().st_size):
            self.spool.discard(arrival.path)
            logger.warning(
                "refused %s from %s: disk above high-water mark (%.0f%%)",
                arrival.sop_instance_uid,
                arrival.calling_ae,
                self.spool.high_water,
            )
            return Reply(Status.OUT_OF_RESOURCES, "gateway disk above high-water mark")
        # Into the spool first, then the fsyncs (I/O, no GIL) run while this thread checks the
        # same bytes (CPU): the sender waits for both anyway, so overlapping them shortens every
        # C-STORE. Until the row is committed, a crash leaves an unreferenced file that the
        # start-up sweep removes; nothing was acknowledged for it.
        relative = self.spool.adopt(arrival.path)
        settled = self._flusher.submit(self.spool.settle, relative)
        try:
            header = inspect(self.spool.path(relative), arrival.sop_instance_uid)
            known = self.store.find_instance(header.sop_instance_uid)
            damaged = None
            if known is not None and known.sha256 == header.sha256:
                if known.released or self.spool.intact(known.path, known.size):
                    # Already held with identical content: the new copy adds nothing.
                    wait([settled])
                    self.spool.remove(relative)
                    logger.info(
                        "duplicate %s from %s ignored", header.sop_instance_uid, arrival.calling_ae
                    )
                    return Reply(
                        Status.SUCCESS,
                        outcome=Outcome.DUPLICATE,
                        study_uid=header.study_uid,
                        sop_class_uid=header.sop_class_uid,
                    )
                # The recorded copy is lost and the cloud may not hold it yet: keep this one.
                damaged = known.path
            settled.result()
            new = self._new_instance(header, relative, arrival)
        except InvalidInstance as exc:
            wait([settled])
            return self._quarantine(replace(arrival, path=self.spool.path(relative)), exc)
        except BaseException:
            # No row points at the file (nothing was written yet): drop it.
            wait([settled])
            self.spool.remove(relative)
            raise
        try:
            result = self.store.record_instance(new, self.clock(), damaged)
        except BaseException:
            # Whether the row was committed is unknown (a COMMIT can fail after it reached the
            # disk): deleting the file could leave a committed row without its data. The file
            # stays until a check of the rows, or the start-up sweep, finds no row for it.
            with self._uncertain_lock:
                self._uncertain.add(relative)
            raise
        if result.obsolete_path is not None:
            self.spool.remove(result.obsolete_path)
        notable = result.outcome in (Outcome.REPLACED, Outcome.REPAIRED)
        log = logger.warning if notable else logger.info
        log(
            "%s %s study %s part %d (%d bytes) from %s",
            result.outcome,
            header.sop_instance_uid,
            header.study_uid,
            result.part,
            header.size,
            arrival.calling_ae,
        )
        return Reply(
            Status.SUCCESS,
            outcome=result.outcome,
            study_uid=header.study_uid,
            sop_class_uid=header.sop_class_uid,
        )

    def _quarantine(self, arrival: Arrival, exc: InvalidInstance) -> Reply:
        status = _STATUS_FOR_PROBLEM[exc.problem]
        details: dict[str, object] = {
            "calling_ae": arrival.calling_ae,
            "address": arrival.address,
            "sop_instance_uid": arrival.sop_instance_uid,
            "status": f"0x{status:04X}",
        }
        copy = self.spool.quarantine(arrival.path, exc.detail, details)
        kept = self.store.record_quarantine(
            exc.detail,
            copy.path,
            arrival.calling_ae,
            arrival.sop_instance_uid,
            self.clock(),
            sha256=copy.sha256,
            size=copy.size,
        )
        if kept != copy.path:
            # The sender tried this very input before: one copy is enough (the row counts).
            self.spool.release_quarantined(copy.path)
        else:
            try:
                self.trim_quarantine(self.clock())
            except (OSError, StoreError) as trim_failed:
                # The input is quarantined and recorded: that is the answer. The daemon's
                # housekeeping trims again.
                logger.warning("could not trim the quarantine: %s", trim_failed)
        if self.audit is not None:
            self.audit(
                AuditEntry(
                    self.clock(),
                    AuditEvent.QUARANTINE,
                    AuditOutcome.FAILURE,
                    exc.detail,
                    arrival.calling_ae,
                    address=arrival.address,
                    detail={"sop_instance_uid": arrival.sop_instance_uid, "kept": kept},
                )
            )
        logger.error(
            "quarantined %s from %s (%s): %s",
            arrival.sop_instance_uid,
            arrival.calling_ae,
            exc.problem,
            exc.detail,
        )
        return Reply(status, exc.detail, quarantined=True)

    @staticmethod
    def _new_instance(header: InstanceHeader, relative: str, arrival: Arrival) -> NewInstance:
        return NewInstance(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            transfer_syntax=header.transfer_syntax,
            path=relative,
            size=header.size,
            sha256=header.sha256,
            calling_ae=arrival.calling_ae,
        )
