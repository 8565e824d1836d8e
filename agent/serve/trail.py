"""The audit rows of Query/Retrieve: one per C-FIND, C-MOVE, C-GET or `dirigo retrieve`.

A tally watches the responses a handler yields (and, for a retrieval, each instance it offers)
and becomes one `AuditEntry` when the request ends, however it ends: success, a failure status,
a C-CANCEL, or the peer gone mid-way. Query keys are kept as UIDs only: other keys (a patient's
name or ID) are named, never their values.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from agent.dimse import QRStatus
from agent.serve.query import InstanceRef
from agent.store import AuditEntry, AuditEvent, AuditOutcome

UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
"""The matching keys whose values the audit trail keeps."""


@dataclass
class Who:
    """The requester of one request: its AE title, whom it called, and its address."""

    calling_ae: str
    called_ae: str
    address: str

    @classmethod
    def of(cls, event: evt.Event) -> Who:
        assoc = event.assoc
        request = assoc.requestor.primitive
        called = request.called_ae_title if request is not None else assoc.acceptor.ae_title
        return cls(
            str(assoc.requestor.ae_title).strip(), str(called).strip(), assoc.requestor.address
        )


@dataclass
class RequestTally:
    """The responses of one request, as they were yielded."""

    started: float = field(default_factory=time.time)
    answers: int = 0
    final: int | None = None
    reason: str | None = None

    def saw(self, status: object, identifier: object = None) -> None:
        """Note one (status, identifier) a handler yields."""
        code = _status_code(status)
        if code is None:
            return
        if code == QRStatus.PENDING:
            if identifier is not None:
                self.answers += 1
            return
        self.final = code
        if isinstance(status, Dataset) and "ErrorComment" in status:
            self.reason = str(status.ErrorComment)

    def outcome(self) -> tuple[AuditOutcome, str | None]:
        if self.final == QRStatus.SUCCESS:
            return AuditOutcome.SUCCESS, None
        if self.final is None:
            return AuditOutcome.FAILURE, self.reason or "the request ended without a final status"
        if self.final == QRStatus.CANCEL:
            return AuditOutcome.FAILURE, "cancelled by the requester"
        return AuditOutcome.FAILURE, self.reason or f"status 0x{self.final:04X}"


def query_entry(
    who: Who, sop_class: str, identifier: Dataset | None, tally: RequestTally
) -> AuditEntry:
    """Return the audit row of one C-FIND."""
    outcome, reason = tally.outcome()
    detail: dict[str, Any] = {"sop_class": sop_class, "matches": tally.answers}
    detail.update(keys_of(identifier))
    return AuditEntry(
        tally.started,
        AuditEvent.QUERY,
        outcome,
        reason,
        who.calling_ae,
        who.called_ae,
        who.address,
        _single(detail.get("keys", {}).get("StudyInstanceUID")),
        detail,
    )


def keys_of(identifier: Dataset | None) -> dict[str, Any]:
    """Return the level, the UID keys with their values, and the names of the other keys that
    held a value (their values are left out: they may be a patient's name or ID)."""
    if identifier is None:
        return {}
    found: dict[str, Any] = {}
    try:
        level = identifier.get("QueryRetrieveLevel")
        if level:
            found["level"] = str(level).strip()
        keys = {}
        others = []
        for element in identifier:
            keyword = element.keyword
            if not keyword or keyword == "QueryRetrieveLevel" or element.VR == "SQ":
                continue
            if keyword in UID_KEYS:
                keys[keyword] = str(element.value or "").strip()
            elif element.value not in (None, "", b""):
                others.append(keyword)
    except Exception:  # an identifier pynetdicom could not decode raises anything
        return found
    found["keys"] = keys
    if others:
        found["other_keys"] = sorted(others)
    return found


@dataclass
class Delivery:
    """The instances one retrieval offered its destination, by study and SOP class, and how
    many could not be prepared (counted failed)."""

    by_study: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failed: int = 0

    def offered(self, ref: InstanceRef, failed: bool) -> None:
        self.by_study[ref.study][ref.sop_class] += 1
        if failed:
            self.failed += 1


def retrieve_entry(
    who: Who,
    operation: str,
    destination: str,
    destination_address: str | None,
    level_keys: dict[str, Any],
    tally: RequestTally,
    delivery: Delivery,
) -> AuditEntry:
    """Return the audit row of one C-MOVE, C-GET or `dirigo retrieve`."""
    outcome, reason = tally.outcome()
    studies = sorted(delivery.by_study)
    offered = sum(sum(c.values()) for c in delivery.by_study.values())
    detail: dict[str, Any] = {
        "operation": operation,
        "destination": destination,
        "studies": studies,
        "by_study": {study: dict(c) for study, c in delivery.by_study.items()},
        "instances": offered,
        "failed": delivery.failed,
    }
    if destination_address:
        detail["destination_address"] = destination_address
    detail.update(level_keys)
    return AuditEntry(
        tally.started,
        AuditEvent.RETRIEVE,
        outcome,
        reason,
        who.calling_ae,
        who.called_ae,
        who.address,
        studies[0] if len(studies) == 1 else None,
        detail,
    )


def _single(value: object) -> str | None:
    """A UID key's value names one study only when it holds one UID."""
    text = str(value or "")
    return text if text and "\\" not in text and "*" not in text and "?" not in text else None


def _status_code(status: object) -> int | None:
    if isinstance(status, Dataset):
        value = status.get("Status")
        return int(value) if value is not None else None
    if isinstance(status, int):
        return int(status)
    return None
