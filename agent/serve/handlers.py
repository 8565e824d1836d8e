"""pynetdicom handlers for C-FIND, C-MOVE and C-GET, answered from the cloud's DICOMweb archive.

The contract (pynetdicom's): each handler is a generator of (status, identifier) pairs. C-FIND
answers stream back as Pending responses page by page, as QIDO-RS returns them. A C-MOVE yields
its destination (address, port, association arguments) first, then the number of
sub-operations, then one dataset per C-STORE that pynetdicom sends; a C-GET the same without the
destination. pynetdicom counts the sub-operations (remaining, completed, failed, warning) from
the C-STORE answers, sends a Pending response after each, and ends with Success, Warning
(0xB000: some failed) or Failure (0xA702: all failed). A C-CANCEL is seen between answers and
between instances.

Statuses when the cloud fails (PS3.4 C.4.1.1.4, C.4.2.1.4, C.4.3.1.4): a failure that may pass
(unreachable, timed out, 5xx) is a lack of resources: C-FIND 0xA700; C-MOVE/C-GET 0xA701, which
the standard defines as exactly this case ("unable to calculate number of matches": the instances
could not be listed), and 0xA702 when every sub-operation failed. A PACS treats these as worth
retrying later. A failure that will not pass by itself (the cloud refuses us, Query/Retrieve is
not configured) is 0xC0D1/0xC0D2 in the "unable to process" range. An archive whose pages
cannot be walked to the end (it ignores `offset`) gives 0xC000: a short answer is never
Success. Each failure carries an Error Comment, and each is logged in one line. Handlers never
raise into pynetdicom.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STATUS_WARNING, code_to_category

from agent.cloud import CloudError, UploadGone
from agent.config import Peer, Settings
from agent.dicom import IDLE_WAIT, peer_by_title, tune
from agent.dicomweb import DicomWeb, IncompleteListing
from agent.dimse import QRStatus
from agent.pynetdicom_internals import idle_on_socket, send_from_files, send_responses_directly
from agent.serve.ondisk import file_of
from agent.serve.query import (
    MODELS,
    InstanceRef,
    Level,
    Patients,
    QueryError,
    Scope,
    Search,
    answer,
    scope_for,
    search_for,
)
from agent.serve.retrieve import Counts, Failed, Item, Listing, Retriever, TooManyInstances
from agent.serve.syntax import Accepted, accepted_by, proposals
from agent.serve.trail import Delivery, RequestTally, Who, keys_of, query_entry, retrieve_entry
from agent.store import AuditEntry
from agent.store.audit import Record
from agent.tls import DicomTls

logger = logging.getLogger(__name__)

_MISSING_CLASS = "Unable to send the dataset as one or more required element are missing"
"""How pynetdicom's C-STORE refuses a dataset without SOP Class UID (see `_failed_marker`)."""


@dataclass(frozen=True)
class Refusal:
    """A request answered with a failure status before any sub-operation."""

    status: QRStatus
    comment: str

    def as_status(self) -> Dataset:
        ds = Dataset()
        ds.Status = int(self.status)
        # Error Comment is LO: 64 printable characters, no backslash
        ds.ErrorComment = "".join(
            c if c.isprintable() and c != "\\" else "?" for c in self.comment
        )[:64]
        return ds


Response = tuple[int | Dataset, Dataset | None]


class QueryRetrieve:
    """The Query/Retrieve SCP of one agent: its handlers, its cloud archive and its cache.

    `retriever` is None when `cloud.dicomweb_url` is not set: every request is then answered
    with 0xC0D1 and a log line saying why. `tls` carries the C-STOREs of a C-MOVE to a
    destination marked `tls` (None when `dicom.tls` is not set, and then no peer is).
    """

    def __init__(
        self, settings: Settings, retriever: Retriever | None, tls: DicomTls | None = None
    ) -> None:
        self.ae_title = settings.dicom.ae_title
        self.tls = tls
        self.peers: Sequence[Peer] = settings.dicom.peers
        self.page_size = settings.serve.page_size
        self.retriever = retriever
        self.dicomweb: DicomWeb | None = retriever.dicomweb if retriever else None
        self.audit: Record | None = None
        """Told of each request when it ends (the audit trail)."""
        _quiet_failed_markers()

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
        ]

    def close(self) -> None:
        if self.dicomweb is not None:
            self.dicomweb.close()

    # --- C-FIND ----------------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[Response]:
        """Answer a C-FIND from QIDO-RS, page by page."""
        peer = _peer(event)
        tally = RequestTally()
        try:
            for response in self._find(event, peer):
                tally.saw(*response)
                yield response
        except Exception:
            logger.exception("C-FIND from %s failed", peer)
            failure = Refusal(QRStatus.UNABLE_TO_PROCESS, "internal error at the gateway")
            tally.saw(failure.as_status())
            yield failure.as_status(), None
        finally:
            self._audit(
                lambda: query_entry(
                    Who.of(event),
                    str(event.context.abstract_syntax),
                    _identifier_or_none(event),
                    tally,
                )
            )

    def _find(self, event: evt.Event, peer: str) -> Iterator[Response]:
        started = time.monotonic()
        if self.dicomweb is None:
            yield self._not_configured("C-FIND", peer), None
            return
        model = MODELS[event.context.abstract_syntax]
        try:
            search = search_for(_identifier(event), model, self.ae_title)
        except QueryError as exc:
            logger.warning("C-FIND from %s refused: %s", peer, exc)
            yield Refusal(QRStatus.IDENTIFIER_MISMATCH, str(exc)).as_status(), None
            return
        matches = 0
        try:
            for found in self._matches(search):
                if event.is_cancelled:
                    logger.info("C-FIND from %s cancelled after %d matches", peer, matches)
                    yield QRStatus.CANCEL, None
                    return
                if found is not None:
                    matches += 1
                    yield QRStatus.PENDING, found
        except CloudError as exc:
            refusal = _cloud_refusal(exc, QRStatus.FIND_OUT_OF_RESOURCES)
            logger.error("C-FIND from %s failed after %d matches: %s", peer, matches, exc)
            yield refusal.as_status(), None
            return
        took = time.monotonic() - started
        logger.info(
            "C-FIND %s level from %s: %d matches in %.1f s", search.level, peer, matches, took
        )
        yield QRStatus.SUCCESS, None

    def _matches(self, search: Search) -> Iterator[Dataset | None]:
        """Yield the answers of a search as its pages arrive, and None after each page (a
        moment to notice a C-CANCEL even when a page brings no new answer)."""
        assert self.dicomweb is not None
        patients = Patients(search) if search.level is Level.PATIENT else None
        for page in self.dicomweb.pages(search.resource, search.params, self.page_size):
            yield from patients.add(page) if patients else (answer(search, r) for r in page)
            yield None
        if patients:
            yield from patients.finish()

    # --- C-MOVE ----------------------------------------------------------------------------

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        """Deliver a C-MOVE's instances to its destination, one of `dicom.peers`."""
        peer = _peer(event)
        title = (event.move_destination or "").strip()
        destination = peer_by_title(self.peers, title)
        tally, delivery = RequestTally(), Delivery()
        if destination is None or destination.host is None or destination.port is None:
            logger.warning(
                "C-MOVE from %s refused: destination %r is not a peer with host and port",
                peer,
                title,
            )
            tally.final = QRStatus.MOVE_DESTINATION_UNKNOWN
            tally.reason = f"destination {title!r} is not a peer with host and port"
            self._audit_retrieve(event, "C-MOVE", title, None, tally, delivery)
            yield None, None
            return
        plan = self._plan(event, peer, "C-MOVE", propose=True)
        store: dict[str, Association] = {}

        counts = Counts()

        def opened(store_event: evt.Event) -> None:
            store["assoc"] = store_event.assoc
            tune(store_event.assoc, sends_stores=True)
            send_from_files(store_event.assoc, file_of)
            _count_answers(store_event.assoc, counts)

        # a refusal still goes through the destination (pynetdicom's contract): propose
        # something every storage SCP takes
        contexts = plan.contexts if isinstance(plan, _Plan) else [build_context(Verification)]
        yield (
            destination.host,
            destination.port,
            {
                "ae_title": destination.ae_title,
                "contexts": contexts,
                "evt_handlers": [(evt.EVT_CONN_OPEN, opened)],
                "tls_args": self.tls.args_for(destination) if self.tls else None,
            },
        )
        where = f"to {destination.ae_title}" + (" over TLS" if destination.tls else "")

        def accepted() -> Accepted:
            assoc = store.get("assoc")
            return accepted_by(assoc.accepted_contexts) if assoc is not None else {}

        try:
            yield from self._deliver(
                event, peer, "C-MOVE", where, plan, accepted, (tally, delivery, counts)
            )
        finally:
            _close(plan)
            self._audit_retrieve(
                event, "C-MOVE", destination.ae_title, destination.host, tally, delivery
            )

    # --- C-GET -----------------------------------------------------------------------------

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        """Deliver a C-GET's instances over its own association."""
        peer = _peer(event)
        plan = self._plan(event, peer, "C-GET", propose=False)
        counts = Counts()
        send_from_files(event.assoc, file_of)
        _count_answers(event.assoc, counts)

        def accepted() -> Accepted:
            return accepted_by(event.assoc.accepted_contexts)

        tally, delivery = RequestTally(), Delivery()
        try:
            yield from self._deliver(
                event, peer, "C-GET", f"to {peer}", plan, accepted, (tally, delivery, counts)
            )
        finally:
            _close(plan)
            self._audit_retrieve(event, "C-GET", peer, None, tally, delivery)

    # --- shared by C-MOVE and C-GET --------------------------------------------------------

    def _plan(self, event: evt.Event, peer: str, kind: str, propose: bool) -> _Plan | Refusal:
        """List the instances a retrieval asks for and, with `propose`, the presentation
        contexts to propose to its destination; never raises."""
        try:
            if self.retriever is None:
                return Refusal(QRStatus.NOT_CONFIGURED, _NOT_CONFIGURED)
            model = MODELS[event.context.abstract_syntax]
            scope = scope_for(_identifier(event), model)
            refs = self.retriever.instances(scope, most=MAX_SUB_OPERATIONS)
            try:
                contexts = proposals(self.retriever.known_syntaxes(refs)) if propose else []
            except BaseException:
                refs.close()
                raise
            return _Plan(scope, refs, contexts or [build_context(Verification)])
        except QueryError as exc:
            return Refusal(QRStatus.IDENTIFIER_MISMATCH, str(exc))
        except TooManyInstances as exc:
            logger.warning("%s from %s refused: %s", kind, peer, exc)
            return Refusal(QRStatus.UNABLE_TO_PROCESS, f"{exc}: retrieve by study or series")
        except CloudError as exc:
            logger.error("%s from %s: cannot list the instances: %s", kind, peer, exc)
            return _cloud_refusal(exc, QRStatus.CANNOT_COUNT_MATCHES)
        except Exception:
            logger.exception("%s from %s failed", kind, peer)
            return Refusal(QRStatus.UNABLE_TO_PROCESS, "internal error at the gateway")

    def _deliver(
        self,
        event: evt.Event,
        peer: str,
        kind: str,
        where: str,
        plan: _Plan | Refusal,
        accepted: Callable[[], Accepted],
        notes: tuple[RequestTally, Delivery, Counts],
    ) -> Iterator[Any]:
        """Yield the sub-operation count, then one dataset per instance (pynetdicom's contract
        after the destination); note in the tally how it ended, in the delivery what it
        offered, and in the counts what it did and what the destination answered."""
        tally, delivery, counts = notes
        if isinstance(plan, Refusal):
            if plan.status is QRStatus.NOT_CONFIGURED:
                logger.error("%s from %s refused: %s", kind, peer, _NOT_CONFIGURED)
            elif plan.status is QRStatus.IDENTIFIER_MISMATCH:
                logger.warning("%s from %s refused: %s", kind, peer, plan.comment)
            # pynetdicom answers Success to zero sub-operations: announce one, then fail
            tally.saw(plan.as_status())
            yield 1
            yield plan.as_status(), None
            return
        assert self.retriever is not None
        refs = plan.refs
        logger.info(
            "%s %s from %s %s: %d instances", kind, plan.scope.description, peer, where, len(refs)
        )
        yield len(refs)
        items = self.retriever.items(refs, accepted, counts)
        # the requester's association only takes pending responses and may bring a C-CANCEL:
        # its reactor need not poll 10,000 times a second while the instances go out
        polling = idle_on_socket(event.assoc, IDLE_WAIT)
        send_responses_directly(event.assoc)
        try:
            for index, ref in enumerate(refs):
                if event.is_cancelled:
                    logger.info(
                        "%s from %s cancelled after %d of %d instances",
                        kind,
                        peer,
                        index,
                        len(refs),
                    )
                    tally.saw(QRStatus.CANCEL)
                    yield QRStatus.CANCEL, None
                    return
                _markers.active = False
                item = _next_item(items, ref)
                if isinstance(item, Failed):
                    logger.error(
                        "%s %s: instance %s not sent: %s",
                        kind,
                        where,
                        ref.sop_instance,
                        item.reason,
                    )
                    delivery.offered(ref, failed=True)
                    yield QRStatus.PENDING, _failed_marker(ref)
                else:
                    delivery.offered(ref, failed=False)
                    yield QRStatus.PENDING, item.dataset
            if delivery.failed or counts.refused or counts.warned:
                # pynetdicom answers the same: Warning, sub-operations failed or warned
                tally.final = QRStatus.SUB_OPERATIONS_FAILED
                reasons = [
                    f"{delivery.failed} could not be sent" if delivery.failed else "",
                    f"{counts.refused} refused by the destination" if counts.refused else "",
                    f"{counts.warned} stored with a warning" if counts.warned else "",
                ]
                tally.reason = f"of {len(refs)} instances, " + ", ".join(r for r in reasons if r)
            else:
                tally.final = QRStatus.SUCCESS
        finally:
            items.close()
            polling()
            logger.info(
                "%s %s from %s %s done: %s",
                kind,
                plan.scope.description,
                peer,
                where,
                counts.summary(),
            )

    def _audit(self, entry: Callable[[], AuditEntry]) -> None:
        """Hand the audit trail the entry `entry` makes; never raises into pynetdicom."""
        if self.audit is None:
            return
        try:
            self.audit(entry())
        except Exception:
            logger.exception("cannot audit a Query/Retrieve request")

    def _audit_retrieve(
        self,
        event: evt.Event,
        operation: str,
        destination: str,
        address: str | None,
        tally: RequestTally,
        delivery: Delivery,
    ) -> None:
        self._audit(
            lambda: retrieve_entry(
                Who.of(event),
                operation,
                destination,
                address,
                keys_of(_identifier_or_none(event)),
                tally,
                delivery,
            )
        )

    def _not_configured(self, kind: str, peer: str) -> Dataset:
        logger.error("%s from %s refused: %s", kind, peer, _NOT_CONFIGURED)
        return Refusal(QRStatus.NOT_CONFIGURED, _NOT_CONFIGURED).as_status()


_NOT_CONFIGURED = "Query/Retrieve needs cloud.dicomweb_url"
MAX_SUB_OPERATIONS = 65535
"""The most instances one C-MOVE or C-GET can count (its counts are US); pynetdicom refuses
more, but only once every one was listed."""


@dataclass(frozen=True)
class _Plan:
    scope: Scope
    refs: Listing
    contexts: list[PresentationContext]


def _close(plan: _Plan | Refusal) -> None:
    if isinstance(plan, _Plan):
        plan.refs.close()


def _next_item(items: Generator[Item, None, None], ref: InstanceRef) -> Item:
    try:
        return next(items)
    except Exception as exc:  # a bug in preparing one instance must not end the retrieval
        logger.exception("unexpected error preparing instance %s", ref.sop_instance)
        return Failed(ref, f"internal error at the gateway: {exc!r}")


def _count_answers(assoc: Association, counts: Counts) -> None:
    """Count in `counts` each C-STORE sent on `assoc` that its receiver refused (a failure, no
    answer, an exception: pynetdicom counts those failed) or stored with a warning. A C-GET's
    association serves several retrievals: its sends are wrapped once, and each retrieval
    counts into its own `counts`."""
    send = assoc.send_c_store
    if getattr(send, "counts", None) is not None:
        send.counts = counts  # type: ignore[attr-defined]
        return

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        current: Counts = send_c_store.counts  # type: ignore[attr-defined]
        try:
            status = send(dataset, *args, **kwargs)
        except Exception:
            current.refused += 1
            raise
        code = status.get("Status") if isinstance(status, Dataset) else None
        category = code_to_category(int(code)) if code is not None else STATUS_FAILURE
        if category == STATUS_WARNING:
            current.warned += 1
        elif category != STATUS_SUCCESS:
            current.refused += 1
        return status

    send_c_store.counts = counts  # type: ignore[attr-defined]
    # what send_from_files looks for, so that a later retrieval does not wrap the sends again
    send_c_store.from_files = getattr(send, "from_files", False)  # type: ignore[attr-defined]
    assoc.send_c_store = send_c_store  # type: ignore[method-assign]


def _failed_marker(ref: InstanceRef) -> Dataset:
    """Return a stand-in for an instance that cannot be sent.

    pynetdicom counts a sub-operation as failed only when its C-STORE fails. A dataset without
    SOP Class UID fails before anything goes on the wire: the instance is then counted failed
    and listed in Failed SOP Instance UID List, and the destination sees nothing.
    """
    ds = Dataset()
    ds.SOPInstanceUID = ref.sop_instance
    _markers.active = True
    return ds


_markers = threading.local()


class _MarkerFilter(logging.Filter):
    """Drop the two lines pynetdicom logs for a `_failed_marker` (a C-STORE failure that is
    none): ours already said why the instance was not sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_markers, "active", False):
            return True
        message = record.getMessage()
        if message.startswith(_MISSING_CLASS):
            _markers.active = False
            return False
        return message != "C-STORE sub-operation failed."


_filter = _MarkerFilter()


def _quiet_failed_markers() -> None:
    service_class = logging.getLogger("pynetdicom.service_class")
    if _filter not in service_class.filters:
        service_class.addFilter(_filter)


def _cloud_refusal(exc: CloudError, transient: QRStatus) -> Refusal:
    if isinstance(exc, IncompleteListing):
        return Refusal(QRStatus.UNABLE_TO_PROCESS, "the cloud archive's listing is incomplete")
    if exc.retryable and not isinstance(exc, UploadGone):
        return Refusal(transient, "the cloud archive is unavailable; retry later")
    return Refusal(QRStatus.CLOUD_REFUSED, f"the cloud archive refused: HTTP {exc.status}")


def _identifier(event: evt.Event) -> Dataset:
    """Return the request's identifier. Raise QueryError if it cannot be decoded."""
    try:
        identifier = event.identifier
        if isinstance(identifier, Dataset):
            # pydicom decodes each element on its first access: decode them all now, so that
            # a malformed one is this refusal, not an error in the middle of the search
            for element in identifier.iterall():
                _ = element.value
    except Exception as exc:  # pynetdicom decodes on access; a malformed one raises anything
        raise QueryError(f"the identifier cannot be decoded: {type(exc).__name__}") from None
    if not isinstance(identifier, Dataset):
        raise QueryError("the request has no identifier")
    return identifier


def _identifier_or_none(event: evt.Event) -> Dataset | None:
    try:
        return _identifier(event)
    except QueryError:
        return None


def _peer(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()
