"""pynetdicom mechanism: the Application Entity, presentation contexts, peer admission, statuses.

Policy (what to do with a received instance) lives in `receive`; this module only knows how to be a
well-behaved DICOM node: which contexts to accept, whom to let in, and how to tune the sockets.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pydicom import config as pydicom_config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
    uid_to_service_class,
)

from agent import pynetdicom_internals as internals
from agent.config import DicomSettings, Peer
from agent.config.models import HOSTLESS_SERVICES
from agent.dimse import RejectReason, RejectResult, RejectSource, Status
from agent.pynetdicom_internals import quiet_identifiers
from agent.tls import describe_handshake_failure

logger = logging.getLogger(__name__)


DUL_POLL_INTERVAL = 0.0001
"""Seconds pynetdicom's DUL reactor sleeps when idle (its default is 0.001)."""
REACTOR_WAIT = 0.01
"""Seconds the reactor of an accepted association waits on its message queue at a time
(`wake_on_messages`): the most a release or abort from the peer waits to be seen."""
IDLE_WAIT = 0.01
"""Seconds the DUL reactor of an association waits at a time on its socket, and on what is
queued for it to send, when idle (`idle_on_socket`): how often it runs its timers."""
QUERY_RETRIEVE_SOP_CLASSES = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)
"""The Query/Retrieve services Dirigo offers (agent.serve answers them)."""


@dataclass(frozen=True)
class Admission:
    """Whether an association request may proceed, why not, and which services it may use."""

    accepted: bool
    reason: str = ""
    services: frozenset[str] = frozenset()


class PeerPolicy:
    """Decides which (calling AE title, source address) pairs may associate.

    An AE title is not authentication: a configured peer with a `host` must also connect from one
    of that host's addresses, so `-aet PACS` from another machine is refused. Host names are
    resolved once, when the policy is built.
    """

    def __init__(self, peers: Sequence[Peer], accept_unknown: bool) -> None:
        self.accept_unknown = accept_unknown
        self._peers: dict[str, frozenset[str] | None] = {
            peer.ae_title: resolve(peer.host) if peer.host else None for peer in peers
        }
        self._services = {peer.ae_title: frozenset(peer.services) for peer in peers}
        self._tls_only = frozenset(peer.ae_title for peer in peers if peer.tls)

    def admit(self, calling_ae: str, address: str, tls: bool = False) -> Admission:
        """Judge an association request from `address` calling as `calling_ae`, which came
        over TLS (the TLS port) or not."""
        calling_ae = calling_ae.strip()
        if calling_ae not in self._peers:
            if self.accept_unknown:
                return Admission(True, services=frozenset(HOSTLESS_SERVICES))
            return Admission(False, f"calling AE title {calling_ae!r} is not a configured peer")
        allowed = self._peers[calling_ae]
        if allowed is not None and normalize_address(address) not in allowed:
            return Admission(
                False, f"calling AE title {calling_ae!r} connected from {address}, not its host"
            )
        if calling_ae in self._tls_only and not tls:
            return Admission(
                False,
                f"calling AE title {calling_ae!r} is marked tls in dicom.peers and called the"
                " plain port; it must use the TLS port",
            )
        return Admission(True, services=self._services[calling_ae])


SERVICE_OF_CLASS: dict[str, str] = {
    Verification: "echo",
    PatientRootQueryRetrieveInformationModelFind: "find",
    StudyRootQueryRetrieveInformationModelFind: "find",
    PatientRootQueryRetrieveInformationModelMove: "move",
    StudyRootQueryRetrieveInformationModelMove: "move",
    PatientRootQueryRetrieveInformationModelGet: "get",
    StudyRootQueryRetrieveInformationModelGet: "get",
}
"""The service (as `dicom.peers[].services` names it) of each non-storage SOP class we offer."""


def service_of(context: PresentationContext) -> str:
    """Return the service a negotiated presentation context gives the peer. A storage context
    in which we may act as SCP lets the peer store to us; one in which we are SCU only (the
    peer took the SCP role by role selection) carries a C-GET's instances back to it."""
    service = SERVICE_OF_CLASS.get(str(context.abstract_syntax))
    if service is not None:
        return service
    return "store" if context.as_scp else "get"


NOT_OFFERED = "a SOP class Dirigo does not offer"
"""Why a context is refused whatever the peer's services (`offered`)."""


def offered(abstract_syntax: str) -> bool:
    """Return False if `abstract_syntax` is a SOP class of a service Dirigo does not offer.

    With its unrestricted storage service, pynetdicom 3.0.4 accepts every SOP class it does not
    know by its standard keyword as if it were an unknown storage class: Modality Worklist FIND
    and the Color Palette Query/Retrieve classes among them. Their requests would reach handlers
    that cannot answer them; they are refused at negotiation instead. Storage classes, and UIDs
    pynetdicom does not know at all (private and future classes), are offered.
    """
    if abstract_syntax in SERVICE_OF_CLASS:
        return True
    service_class = uid_to_service_class(abstract_syntax)
    return service_class is ServiceClass or issubclass(service_class, StorageServiceClass)


def resolve(host: str) -> frozenset[str]:
    """Return every address `host` resolves to. Raise OSError if it does not resolve."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return frozenset(normalize_address(str(info[4][0])) for info in infos)


def normalize_address(address: str) -> str:
    """Return the canonical text of an IP address; IPv4-mapped IPv6 becomes plain IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle's algorithm: small DIMSE responses otherwise wait ~40 ms for a delayed ACK.

    pynetdicom never sets it; measured here, a sender reaches 72-86 MB/s with it and 19 without.
    """
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tune(assoc: Association, *, sends_stores: bool = False) -> None:
    """Tune an association the way every Dirigo association is tuned, accepted or requested.

    TCP_NODELAY on its socket; a short idle sleep of pynetdicom's DUL reactor, which sleeps
    this long whenever it finds nothing to do (its own comment trades idle CPU against latency):
    every C-STORE waits on it several times, and 1 ms (the default) costs ~1.7 ms per instance
    here. An accepted association goes further: its DUL reactor waits on its socket and its
    send queue instead of polling them (`idle_on_socket`), its association reactor on its
    message queue (`wake_on_messages`), and its C-STORE and pending retrieve responses are
    written by the thread that answers (`send_responses_directly`): 2,000 slices from storescu
    in 10 s, not 15 s. With `sends_stores` (a C-MOVE's destination, `dirigo retrieve`), also
    the guard against pynetdicom's reactor stealing C-STORE responses, and the DUL reactor
    waits on its socket: such an association writes its C-STOREs' data sets itself
    (`send_from_files`), and what it receives wakes the reactor. A TLS association keeps
    pynetdicom's polling and its queued writes (see `idle_on_socket`).
    """
    if assoc.dul.socket is not None:
        set_nodelay(assoc.dul.socket.socket)
    internals.set_loop_delay(assoc, DUL_POLL_INTERVAL)
    if assoc.is_acceptor:
        internals.wake_on_messages(assoc, REACTOR_WAIT)
        internals.send_responses_directly(assoc)
        internals.idle_on_socket(assoc, IDLE_WAIT)
    if sends_stores:
        internals.keep_responses(assoc)
        internals.idle_on_socket(assoc, IDLE_WAIT)


class NoTracebacks(logging.Filter):
    """Drop the record pynetdicom logs with a traceback, at ERROR, for an exception of `kind`.

    Each time a read from a peer times out, the line it logs just before ("Connection closed
    before the entire PDU was received") says what happened, and a traceback per silent
    connection would let a port scan fill the log; each time a TLS association it requests
    fails (the peer's certificate not trusted, say), the line before ("TCP Initialisation
    Error: [SSL: CERTIFICATE_VERIFY_FAILED] ...") says why, and C-MOVEs repeat it.
    """

    def __init__(self, kind: type[BaseException]) -> None:
        super().__init__()
        self.kind = kind

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], self.kind))


_QUIETED = (("pynetdicom.dul", TimeoutError), ("pynetdicom.transport", ssl.SSLError))


class ResetAfterRelease(logging.Filter):
    """Drop what pynetdicom logs at ERROR when a peer resets the TCP connection right after a
    completed release, instead of closing it (the Central Test Node does, after every
    association): the association ended as both sides agreed, and an ERROR per association
    would hide real ones. A reset at any other moment is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not internals.released_here():
            return True
        if record.exc_info is not None and not isinstance(record.exc_info[1], OSError):
            return True
        logger.debug("the peer reset the connection after the release: %s", record.getMessage())
        return False


def quiet_tracebacks() -> None:
    """Install the `NoTracebacks` and `ResetAfterRelease` filters on pynetdicom's loggers
    (once)."""
    for name, kind in _QUIETED:
        log = logging.getLogger(name)
        if not any(isinstance(f, NoTracebacks) and f.kind is kind for f in log.filters):
            log.addFilter(NoTracebacks(kind))
    dul = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, ResetAfterRelease) for f in dul.filters):
        dul.addFilter(ResetAfterRelease())


def build_ae(settings: DicomSettings) -> AE:
    """Return an AE accepting every storage SOP class in every transfer syntax, Verification,
    and Query/Retrieve (FIND, MOVE, GET) in the Patient Root and Study Root models.

    Incoming datasets are written straight to a file as they arrive (pynetdicom's chunked receive),
    so memory does not grow with instance size. Private and future storage SOP classes are accepted
    too: a gateway must not drop a vendor's private objects.
    """
    internals.receive_to_files_and_accept_any_storage()
    internals.copy_contexts_cheaply()
    # pynetdicom builds and encodes several pydicom datasets per message (command sets, the
    # file meta), and pydicom checks every value with regular expressions on the way: ~0.9 ms
    # of each C-STORE here, about 15% of the protocol's cost. The checks only ever warn, and
    # Dirigo checks each received dataset's structure itself (agent.instance).
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    quiet_identifiers()
    quiet_tracebacks()
    ae = AE(ae_title=settings.ae_title)
    # pynetdicom counts every accepted connection against this, admitted or not; the Gate
    # keeps max_associations for admitted peers, so pynetdicom's own count must leave room
    # for the connections that have not asked yet (the Gate bounds those).
    ae.maximum_associations = settings.max_associations + 2 * pending_limit(settings)
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            # Both roles: a C-GET's requestor proposes to be the storage SCP on its own
            # association (SCP/SCU role selection); a plain sender proposes nothing and
            # keeps the default roles.
            ae.add_supported_context(
                context.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for sop_class in QUERY_RETRIEVE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    return ae


PENDING_PER_SLOT = 4
"""Connections that have not yet passed admission, per association slot, before the oldest of
them is closed to make room."""
KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 5))
"""TCP keepalive: first probe after 60 s of silence, then every 10 s; gone after 5 unanswered
(a peer that vanished without a FIN, e.g. behind a firewall that dropped the connection)."""
REAP_GRACE = 2.0
"""Seconds past acse_timeout before the Gate closes a connection that has still not asked."""


def pending_limit(settings: DicomSettings) -> int:
    """Return how many connections may wait for admission at once."""
    return PENDING_PER_SLOT * settings.max_associations


def set_keepalive(sock: socket.socket) -> None:
    """Turn on TCP keepalive with the probe timing of `KEEPALIVE`, where the system has it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE:
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def close_connection(assoc: Association) -> None:
    """Shut the association's socket down; a reactor blocked reading it wakes up and ends.

    A TLS socket is shut down beneath its TLS layer: `SSLSocket.shutdown` drops the TLS state
    first, and a reader on another thread would then take the raw ciphertext for PDUs.
    """
    if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(assoc.dul.socket.socket, socket.SHUT_RDWR)


@dataclass
class _Connection:
    opened: float
    admitted: bool = False


def _holds_slot(assoc: Association) -> bool:
    """Return True while an admitted association still takes one of the `max_associations`.

    A released or aborted association's thread lives on for a while (pynetdicom waits for its
    transport to close), but it serves nothing more: counting it refused a peer that released
    and at once asked again (a C-ECHO before a store), with "all slots in use".
    """
    return assoc.is_alive() and not (assoc.is_released or assoc.is_aborted)


class Gate:
    """Every accepted connection passes here: tuning, admission, and the association slots.

    pynetdicom counts a connection against `max_associations` from the moment it is accepted,
    and its sockets have no timeout: a peer that sends one byte and stops holds a reader thread
    in `recv()` and a slot forever, and a handful of them stop all intake. Here each accepted
    socket gets TCP keepalive and a timeout (acse_timeout until its A-ASSOCIATE-RQ passed
    admission, network_timeout after), a connection counts against `max_associations` only once
    admitted, connections still waiting for admission are bounded (the oldest is closed), and
    `reap` closes any that outlived acse_timeout.
    """

    def __init__(
        self,
        settings: DicomSettings,
        policy: PeerPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._connections: dict[Association, _Connection] = {}  # oldest first
        self.on_admitted: Callable[[Association], None] | None = None
        """Told of each association admitted (the audit trail)."""
        self.on_refused: Callable[[Association, str], None] | None = None
        """Told of each association refused, and why (the audit trail)."""

    def handlers(self) -> list[EventHandlerType]:
        """Return the event handlers every accepted association gets."""

        def on_echo(event: evt.Event) -> int:
            return Status.SUCCESS

        return [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, on_echo),
        ]

    def _on_open(self, event: evt.Event) -> None:
        assoc = event.assoc
        tune(assoc)
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if sock is not None:
            sock.settimeout(self.settings.acse_timeout)
            set_keepalive(sock)
        with self._lock:
            self._connections[assoc] = _Connection(self._clock())
            waiting = [a for a, c in self._connections.items() if not c.admitted]
        for oldest in waiting[: max(0, len(waiting) - pending_limit(self.settings))]:
            logger.warning(
                "closing a connection from %s: too many connections have not asked for an"
                " association",
                oldest.requestor.address,
            )
            close_connection(oldest)
        if isinstance(sock, ssl.SSLSocket):
            self._handshake(assoc, sock)

    def _handshake(self, assoc: Association, sock: ssl.SSLSocket) -> None:
        """Do the TLS handshake of a connection to the TLS port on its own thread (see
        `agent.tls.DeferredHandshakeContext`), bounded by acse_timeout; on failure (a plain
        DICOM peer, an untrusted or missing client certificate, no common cipher suite, a
        silent client) refuse the connection and say why."""
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:
            reason = f"TLS handshake failed: {describe_handshake_failure(exc)}"
            self._refused(assoc, None, reason)
            # Closed before its reactor starts, which then reads nothing of what the peer
            # sent; with no wait for a request that cannot come, it ends at once instead of
            # holding its thread for acse_timeout.
            if assoc.dul.socket is not None:
                assoc.dul.socket.close()
            assoc.acse_timeout = 0

    def _refused(self, assoc: Association, calling_ae: str | None, reason: str) -> None:
        """Log a refused connection or association in one line (where it came from, which
        port, the AE title it called as: None when it never got as far as asking, and why),
        and tell `on_refused` (the audit trail)."""
        port = "TLS" if is_tls(assoc) else "plain"
        caller = "" if calling_ae is None else f", calling AE title {calling_ae.strip()!r}"
        logger.warning(
            "rejected association from %s (%s port%s): %s",
            assoc.requestor.address,
            port,
            caller,
            reason,
        )
        if self.on_refused is not None:
            self.on_refused(assoc, reason)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling_ae = request.calling_ae_title if request is not None else ""
        admission = self.policy.admit(calling_ae, assoc.requestor.address, is_tls(assoc))
        if not admission.accepted:
            self._refused(assoc, calling_ae, admission.reason)
            _reject(
                assoc,
                RejectResult.PERMANENT,
                RejectSource.SERVICE_USER,
                RejectReason.CALLING_AE_NOT_RECOGNIZED,
            )
            return
        limit = self.settings.max_associations
        with self._lock:
            busy = sum(
                1
                for other, c in self._connections.items()
                if c.admitted and other is not assoc and _holds_slot(other)
            )
            if busy < limit:
                self._connections.setdefault(assoc, _Connection(self._clock())).admitted = True
        if busy >= limit:
            self._refused(assoc, calling_ae, f"all {limit} association slots are in use")
            _reject(
                assoc,
                RejectResult.TRANSIENT,
                RejectSource.SERVICE_PROVIDER_PRESENTATION,
                RejectReason.LOCAL_LIMIT_EXCEEDED,
            )
            return
        if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
            assoc.dul.socket.socket.settimeout(self.settings.network_timeout)
        if self.on_admitted is not None:
            self.on_admitted(assoc)
        services = admission.services

        def judge(context: PresentationContext) -> str | None:
            if not offered(str(context.abstract_syntax)):
                return NOT_OFFERED
            service = service_of(context)
            return None if service in services else service

        def report(refused: list[str]) -> None:
            unoffered = refused.count(NOT_OFFERED)
            if unoffered:
                logger.warning(
                    "association from %s: refused %d presentation context(s) of SOP classes"
                    " Dirigo does not offer",
                    calling_ae.strip(),
                    unoffered,
                )
            denied = [reason for reason in refused if reason != NOT_OFFERED]
            if denied:
                logger.warning(
                    "association from %s: refused %d presentation context(s) for %s: not among"
                    " its services in dicom.peers",
                    calling_ae.strip(),
                    len(denied),
                    ", ".join(sorted(set(denied))),
                )

        internals.refuse_contexts(assoc, judge, report)

    def reap(self) -> list[Association]:
        """Close each connection that has not passed admission within acse_timeout (a reader
        blocked on it wakes up and ends); forget the associations that ended, and return them."""
        overdue = self._clock() - self.settings.acse_timeout - REAP_GRACE
        with self._lock:
            ended = [a for a in self._connections if a.ident is not None and not a.is_alive()]
            for assoc in ended:
                del self._connections[assoc]
            stale = [
                a for a, c in self._connections.items() if not c.admitted and c.opened < overdue
            ]
        for assoc in stale:
            logger.warning(
                "closing a connection from %s: no association request within %g s",
                assoc.requestor.address,
                self.settings.acse_timeout,
            )
            close_connection(assoc)
        return ended

    def admitted(self) -> int:
        """Return how many admitted associations are alive."""
        with self._lock:
            return sum(1 for a, c in self._connections.items() if c.admitted and a.is_alive())


def is_tls(assoc: Association) -> bool:
    """Return True if the association runs over TLS."""
    transport = assoc.dul.socket
    return transport is not None and isinstance(transport.socket, ssl.SSLSocket)


def _reject(assoc: Association, result: int, source: int, reason: int) -> None:
    assoc.acse.send_reject(result, source, reason)
    # As pynetdicom's own rejection does: wait until the reject is on the wire, or the reactor
    # would close the socket first and the peer would see a bare abort.
    assoc.kill()


def peer_by_title(peers: Iterable[Peer], ae_title: str) -> Peer | None:
    """Return the configured peer with this AE title, if any."""
    return next((peer for peer in peers if peer.ae_title == ae_title.strip()), None)


class EchoFailed(Exception):
    """A C-ECHO got no Success; the message says how far it got."""


def echo(
    ae_title: str, peer: Peer, timeout: float, tls_args: tuple[ssl.SSLContext, str] | None = None
) -> float:
    """Send a C-ECHO as `ae_title` to `peer` (which has a host and port), over TLS with
    `tls_args`; return how long it took in seconds. Raise EchoFailed if the peer cannot be
    reached, rejects the association or answers with anything but Success."""
    assert peer.host is not None and peer.port is not None
    quiet_tracebacks()
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        outcome = "rejected the association" if assoc.is_rejected else "could not be reached"
        over = " over TLS" if tls_args is not None else ""
        raise EchoFailed(f"{peer.ae_title} at {peer.host}:{peer.port}{over} {outcome}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or status.Status != Status.SUCCESS:
        code = f"0x{status.Status:04X}" if status else "no response"
        raise EchoFailed(f"C-ECHO to {peer.ae_title} failed: {code}")
    return time.monotonic() - started
