"""The audit trail's policy: what is recorded when, in the store first, then to syslog.

Every association (accepted or refused, with the reason), study received, part sent and
confirmed, query, retrieve and quarantine becomes a row of the store's `audit` table
(`Store.audit`), listed by `dirigo audit`; with `audit.syslog` each row then also goes, as a
DICOM audit message (`agent.auditmessage`), to a syslog collector from a thread of its own
(`agent.syslog`). Recording never raises into the DICOM or upload paths: a row the database
cannot take is logged as an error and still sent to syslog.

The receive path stays cheap: instances are counted in memory per association and written when
the association ends, one transaction holding the association's row and one row per study it
brought, never a write per instance.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.auditmessage import Identity, render
from agent.config import AuditSettings, ConfigError
from agent.config.units import parse_duration
from agent.dimse import Status
from agent.importer import IMPORT_AE, LOCAL_ADDRESS
from agent.receive import Reply
from agent.store import AuditEntry, AuditEvent, AuditOutcome, Store, StoreError
from agent.store.audit import Record
from agent.syslog import Collector, SyslogSender

logger = logging.getLogger(__name__)

IMPORTS = "imports"
"""The key under which `Associations` counts imported files."""
STOP_FLUSH = 3.0
"""Seconds the agent waits at stop for queued audit messages to reach the collector."""
PRUNE_EVERY = 3600.0
"""Seconds between two applications of `audit.keep`."""


class Auditor:
    """Records audit entries in the store and, with a sender, forwards them to syslog."""

    def __init__(
        self,
        store: Store,
        sender: SyslogSender[AuditEntry] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.sender = sender
        self.clock = clock
        self.lost = 0
        """Entries the database refused (logged; still sent to syslog)."""
        self._next_prune = 0.0

    @classmethod
    def open(cls, store: Store, settings: AuditSettings, identity: Identity) -> Auditor:
        """Return the auditor `settings` ask for; its sender (with `audit.syslog`) is started.
        Raise ConfigError if `audit.ca` cannot be read or holds no CA certificate."""
        sender = None
        if settings.syslog is not None:
            collector = Collector.parse(settings.syslog, settings.ca)

            def rendered(entry: AuditEntry) -> bytes | None:
                return render(entry, identity)

            try:
                sender = SyslogSender(collector, rendered, settings.queue)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise ConfigError([f"At 'audit.ca': cannot use {settings.ca}: {reason}"]) from None
            sender.start()
        return cls(store, sender)

    def record(self, *entries: AuditEntry) -> None:
        """Write `entries` in one transaction, then queue them for syslog. Never raises."""
        if not entries:
            return
        try:
            stored = self.store.audit.record(entries)
        except StoreError as exc:
            self.lost += len(entries)
            logger.error("audit: %d record(s) not kept in the database: %s", len(entries), exc)
            stored = list(entries)
        if self.sender is not None:
            for entry in stored:
                self.sender.submit(entry)

    def prune(self, now: float, keep: float) -> int:
        """Delete the entries older than `keep` seconds, at most once per PRUNE_EVERY; return
        how many."""
        if now < self._next_prune:
            return 0
        self._next_prune = now + PRUNE_EVERY
        removed = self.store.audit.prune(now - keep)
        if removed:
            logger.info("audit: removed %d record(s) older than audit.keep", removed)
        return removed

    def close(self) -> None:
        """Send what is queued (briefly) and stop the sender."""
        if self.sender is not None:
            self.sender.stop(STOP_FLUSH)

    def status(self) -> dict[str, Any] | None:
        """Return the syslog sender's counts, or None without `audit.syslog`."""
        if self.sender is None:
            return None
        return {
            "syslog": str(self.sender.collector),
            "sent": self.sender.sent,
            "queued": self.sender.queued,
            "dropped": self.sender.dropped,
            "failing": self.sender.failures > 0,
            "last_error": self.sender.last_error,
        }


@dataclass
class _Association:
    """What one admitted association did, counted in memory until it ends."""

    at: float
    calling_ae: str
    called_ae: str
    address: str
    tls: bool = False
    studies: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    """SOP classes (and how many instances of each) received, by study."""
    outcomes: Counter[str] = field(default_factory=Counter)


class Associations:
    """The audit of DICOM associations: a refusal is recorded when refused, an admitted
    association when it ends, with one row per study it brought."""

    def __init__(self, record: Record, clock: Callable[[], float] = time.time) -> None:
        self._record = record
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Association] = {}

    def refused(
        self, calling_ae: str, called_ae: str, address: str, reason: str, *, tls: bool = False
    ) -> None:
        """Record a connection or association refused, and why; the AE titles are empty
        when it never got as far as asking (a failed TLS handshake)."""
        self._record(
            AuditEntry(
                self._clock(),
                AuditEvent.ASSOCIATION,
                AuditOutcome.FAILURE,
                reason,
                calling_ae.strip() or None,
                called_ae.strip() or None,
                address,
                detail={"tls": tls},
            )
        )

    def admitted(
        self, key: Hashable, calling_ae: str, called_ae: str, address: str, *, tls: bool = False
    ) -> None:
        with self._lock:
            self._open[key] = _Association(
                self._clock(), calling_ae.strip(), called_ae.strip(), address, tls
            )

    def stored(self, key: Hashable, reply: Reply) -> None:
        """Count one C-STORE answered on the association `key`: its outcome (stored,
        duplicate, replaced, or a failure status's name) and, when it holds one, its study
        and SOP class."""
        outcome = str(reply.outcome or Status(reply.status).name.lower())
        with self._lock:
            association = self._open.get(key)
            if association is None:
                return
            association.outcomes[outcome] += 1
            if reply.study_uid is not None and reply.sop_class_uid is not None:
                association.studies[reply.study_uid][reply.sop_class_uid] += 1

    def imported(self, called_ae: str, reply: Reply) -> None:
        """Count one file imported (`dirigo send`, a watch folder) as `stored` counts a
        C-STORE; `flush_imports` writes the studies they brought."""
        with self._lock:
            if IMPORTS not in self._open:
                self._open[IMPORTS] = _Association(
                    self._clock(), IMPORT_AE, called_ae, LOCAL_ADDRESS
                )
        self.stored(IMPORTS, reply)

    def flush_imports(self) -> None:
        """Record one row per study imported since the last flush (there is no association)."""
        self.ended(IMPORTS, association=False)

    def ended(self, key: Hashable, *, association: bool = True, failure: str | None = None) -> None:
        """Record the association `key` (if admitted), unless not an `association`, and the
        studies it brought. With `failure`, the association did not come about after all
        (refused after admission, or no presentation context accepted): its row says why."""
        with self._lock:
            found = self._open.pop(key, None)
        if found is None:
            return
        now = self._clock()
        a = found
        entries = []
        if association:
            entries.append(
                AuditEntry(
                    a.at,
                    AuditEvent.ASSOCIATION,
                    AuditOutcome.FAILURE if failure else AuditOutcome.SUCCESS,
                    failure,
                    calling_ae=a.calling_ae,
                    called_ae=a.called_ae,
                    address=a.address,
                    detail={"ended_at": now, "instances": dict(a.outcomes), "tls": a.tls},
                )
            )
        for study_uid, classes in a.studies.items():
            entries.append(
                AuditEntry(
                    now,
                    AuditEvent.STUDY_RECEIVED,
                    calling_ae=a.calling_ae,
                    called_ae=a.called_ae,
                    address=a.address,
                    study_uid=study_uid,
                    detail={
                        "instances": sum(classes.values()),
                        "sop_classes": dict(classes),
                    },
                )
            )
        self._record(*entries)


def parse_since(text: str, now: float) -> float:
    """Given a duration back from `now` (`24h`, `7d`) or an ISO 8601 date or date-time
    (`2026-12-01`, `2026-12-01T08:00`, UTC unless it names its offset), return the epoch
    seconds it means. Raise ValueError for anything else."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (24h, 7d) nor an ISO date (2026-12-01)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def entry_document(entry: AuditEntry) -> dict[str, Any]:
    """Return an entry as `dirigo audit --json` shows it: stable keys, the time in ISO 8601."""
    document = entry.document()
    document["at"] = _iso(entry.at)
    return document


COLUMNS: tuple[tuple[str, int], ...] = (
    ("WHEN (UTC)", 19),
    ("EVENT", 17),
    ("OUTCOME", 7),
    ("WHO", 24),
    ("ADDRESS", 15),
    ("STUDY", 44),
    ("WHAT", 0),
)
"""The table's columns and their widths: fixed, so that rows print as they are read (a year
of them need not fit in memory); a longer value pushes the rest of its line along."""


def render_entries(entries: Iterable[AuditEntry]) -> Iterator[str]:
    """Yield the entries as the lines of a table: when, event, outcome, who, study, what."""
    empty = True
    for entry in entries:
        if empty:
            yield _line(tuple(name for name, _ in COLUMNS))
            empty = False
        who = " -> ".join(ae for ae in (entry.calling_ae, entry.called_ae) if ae)
        yield _line(
            (
                _iso(entry.at)[:19].replace("T", " "),
                str(entry.event),
                str(entry.outcome),
                who or "-",
                entry.address or "-",
                entry.study_uid or "-",
                summary(entry),
            )
        )
    if empty:
        yield "no audit records match"


def _line(cells: tuple[str, ...]) -> str:
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)).rstrip()


def summary(entry: AuditEntry) -> str:
    """Return what an entry's detail says, in a few words (and why it failed)."""
    d = entry.detail
    parts: list[str] = []
    if entry.event is AuditEvent.ASSOCIATION and d.get("instances"):
        parts.append(", ".join(f"{n} {what}" for what, n in sorted(d["instances"].items())))
    elif entry.event in (
        AuditEvent.STUDY_RECEIVED,
        AuditEvent.PART_SENT,
        AuditEvent.PART_CONFIRMED,
    ):
        part = f"part {d['part']}: " if "part" in d else ""
        parts.append(f"{part}{d.get('instances', 0)} instance(s)")
    elif entry.event is AuditEvent.QUERY:
        keys = " ".join(f"{k}={v}" for k, v in (d.get("keys") or {}).items())
        parts.append(f"{d.get('level', '?')} {keys}".strip() + f": {d.get('matches', 0)} match(es)")
    elif entry.event is AuditEvent.RETRIEVE:
        parts.append(
            f"{d.get('operation')} to {d.get('destination')}: {d.get('instances', 0)} instance(s),"
            f" {d.get('failed', 0)} failed"
        )
    elif entry.event is AuditEvent.QUARANTINE and d.get("sop_instance_uid"):
        parts.append(str(d["sop_instance_uid"]))
    if entry.reason:
        parts.append(entry.reason)
    return "; ".join(parts)


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="seconds")
