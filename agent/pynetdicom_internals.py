"""Every place Dirigo reaches into pynetdicom's private internals, and nowhere else.

pynetdicom has no public way to stream a received dataset to a file, to accept private storage
SOP classes, to quiet its identifier logging, to shorten its reactor's idle sleep, or to guard
against a race in its reactor; each of those needs an underscored name or an undocumented
attribute. They are fenced here so that a pynetdicom upgrade (the dependency is pinned to the
minor version these were read from) breaks one module, and `missing()` (run by the unit tests)
names each attribute that moved instead of letting the agent fail at run time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, acse, evt, transport
from pynetdicom import association as association_module
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

from agent import pdata
from agent.dimse import ContextResult
from agent.part10 import Head

logger = logging.getLogger(__name__)

_DIMSE_RECV = evt.EVT_DIMSE_RECV
_RECEIVE_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV)

_CONFIG_FLAGS = (
    "STORE_RECV_CHUNKED_DATASET",
    "UNRESTRICTED_STORAGE_SERVICE",
    "LOG_REQUEST_IDENTIFIERS",
    "LOG_RESPONSE_IDENTIFIERS",
    "LOG_HANDLER_LEVEL",
    "STORE_SEND_CHUNKED_DATASET",
)
"""The module-level switches of `pynetdicom._config` that Dirigo sets."""

_CONTEXT_ATTRIBUTES = frozenset(
    {
        "_context_id",
        "_abstract_syntax",
        "_transfer_syntax",
        "result",
        "_scu_role",
        "_scp_role",
        "_as_scp",
        "_as_scu",
    }
)
"""A presentation context's attributes as `_copied_context` copies them."""

REQUEUE_LIMIT = 2000
"""How often one stolen response is put back (about 2 s of the reactor's 1 ms loop) before it
is dropped as truly unexpected."""


def receive_to_files_and_accept_any_storage() -> None:
    """Make every acceptor stream each incoming dataset straight to a file as it arrives (so
    memory does not grow with instance size) and accept any storage SOP class, private and
    future ones included (a gateway must not drop a vendor's private objects)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True


def copy_contexts_cheaply() -> None:
    """Make each new association's copy of the server's presentation contexts a plain copy of
    each context and its transfer syntax list, instead of pynetdicom's `deepcopy`.

    Dirigo's server supports ~180 contexts with ~8,000 transfer syntax UIDs in all, and
    `deepcopy` rebuilds every UID object one by one: ~30 ms of CPU for every association a
    peer opens, before its first message. A context's only mutable parts are that list and its
    plain attributes (the UIDs are immutable strings), so copying those is the same copy."""
    deepcopy: Callable[[Any, Any], Any] = getattr(transport, "deepcopy")  # noqa: B009 (private)
    if getattr(deepcopy, "cheap", False):
        return

    def copy_contexts(value: Any, memo: Any = None) -> Any:
        if isinstance(value, list) and all(type(cx) is PresentationContext for cx in value):
            return [_copied_context(cx) for cx in value]
        return deepcopy(value, memo)

    copy_contexts.cheap = True  # type: ignore[attr-defined]
    setattr(transport, "deepcopy", copy_contexts)  # noqa: B010 (not exported, see above)


def _copied_context(context: PresentationContext) -> PresentationContext:
    copied = PresentationContext.__new__(PresentationContext)
    copied.__dict__ = {
        name: list(value) if isinstance(value, list) else value
        for name, value in vars(context).items()
    }
    return copied


def released_here() -> bool:
    """Return True if the calling thread is an association's DUL reactor after a completed
    release that waits for the connection to close (state Sta13: A-RELEASE-RP sent)."""
    thread = threading.current_thread()
    machine = getattr(thread, "state_machine", None)
    return isinstance(thread, DULServiceProvider) and (
        getattr(machine, "current_state", None) == _RELEASED
    )


_RELEASED = "Sta13"
"""The DUL state of an acceptor that answered A-RELEASE-RQ (PS3.8 9.2: awaiting the close)."""


def quiet_identifiers() -> None:
    """Keep patient identifiers out of pynetdicom's logs (it logs request identifiers)."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


def set_loop_delay(assoc: Association, seconds: float) -> None:
    """Set how long the association's DUL reactor sleeps whenever it finds nothing to do."""
    assoc.dul._run_loop_delay = seconds


def idle_on_socket(assoc: Association, seconds: float) -> Callable[[], None]:
    """Have the association's DUL reactor, when it finds nothing to do, wait up to `seconds`
    for its socket to turn readable, or for something queued for it to send, instead of
    sleeping its loop delay; return what undoes it.

    Its loop otherwise wakes every loop delay (0.1 ms for Dirigo's associations) to poll the
    socket and its queues: ~10,000 times a second per association, measured as the largest CPU
    cost of a C-MOVE (two associations, a third of the retrieve's CPU), and each PDU that
    arrives waits for the next poll (a received instance's four or five). Waiting on the
    socket answers what arrives (a C-STORE, its response, a C-CANCEL, an A-ABORT) at once; a
    primitive queued for the reactor to send (a C-FIND response, a release) wakes it through
    an eventfd (`_wake_on_queue`). Every `seconds` the loop also runs its timers.

    A TLS association keeps polling: every message it sends goes through the reactor's queue
    (the direct writes are fenced off, see `_lock_writes`), and each PDU of a C-STORE would
    wait its turn.
    """
    dul = assoc.dul
    if dul.socket is not None and isinstance(dul.socket.socket, ssl.SSLSocket):
        return lambda: None
    if getattr(dul._process_recv_primitive, "waits", False):
        return lambda: None  # already waiting: undone by whoever made it wait
    process = dul._process_recv_primitive
    delay = dul._run_loop_delay
    wake = _wake_on_queue(dul)

    def process_or_wait() -> bool:
        if process():
            return True
        transport = dul.socket
        sock = transport.socket if transport is not None else None
        if sock is not None and dul.event_queue.empty():
            # closed under us (OSError, ValueError): the reactor's own check next says so
            with contextlib.suppress(OSError, ValueError):
                waited: list[Any] = [sock, wake]
                readable, _writable, _failed = select.select(waited, [], [], seconds)
                if wake in readable:
                    os.eventfd_read(wake)
        return False

    process_or_wait.waits = True  # type: ignore[attr-defined]
    dul._process_recv_primitive = process_or_wait  # type: ignore[method-assign]
    dul._run_loop_delay = 0.0

    def undo() -> None:
        dul._process_recv_primitive = process  # type: ignore[method-assign]
        dul._run_loop_delay = delay

    return undo


_WAKES: weakref.WeakKeyDictionary[DULServiceProvider, int] = weakref.WeakKeyDictionary()


def _wake_on_queue(dul: DULServiceProvider) -> int:
    """Return an eventfd that turns readable whenever a primitive is queued for the DUL
    reactor to send (made once per reactor, closed when it is collected)."""
    with _WAKES_LOCK:
        wake = _WAKES.get(dul)
        if wake is not None:
            return wake
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        _WAKES[dul] = wake
        weakref.finalize(dul, os.close, wake)
    queued = dul.to_provider_queue
    put = queued.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        with contextlib.suppress(OSError):
            os.eventfd_write(wake, 1)

    queued.put = put_and_wake  # type: ignore[method-assign]
    return wake


_WAKES_LOCK = threading.Lock()


_REACTOR_SLEEP = 0.001
"""What pynetdicom's association reactor sleeps before each look at its message queue."""
_WAITING_REACTORS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


class _ReactorClock:
    """`pynetdicom.association`'s `time`: the `time` module, except that the reactor of an
    association that waits on its message queue (`wake_on_messages`) does not sleep first."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == _REACTOR_SLEEP and threading.current_thread() in _WAITING_REACTORS:
            return
        time.sleep(seconds)


def wake_on_messages(assoc: Association, seconds: float) -> None:
    """Have the association's reactor wait on its message queue, up to `seconds` at a time,
    and take each message (a C-STORE request, a C-FIND) as it arrives, instead of sleeping
    1 ms and looking again: measured as the largest share of the time an accepted association
    spends per received instance.

    The reactor's other checks (a release or abort from the peer, the network timeout) and a
    pause asked by another thread then wait up to `seconds`; none of Dirigo's accepted
    associations is paused from another thread (their handlers run on the reactor)."""
    dimse = assoc.dimse
    get = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if block or threading.current_thread() is not assoc:
            return get(block)
        try:
            return dimse.msg_queue.get(timeout=seconds)
        except queue.Empty:
            return None, None

    dimse.get_msg = get_msg  # type: ignore[method-assign]
    _WAITING_REACTORS.add(assoc)
    if not isinstance(getattr(association_module, "time", None), _ReactorClock):
        setattr(association_module, "time", _ReactorClock())  # noqa: B010 (not exported)


def keep_responses(assoc: Association) -> None:
    """Guard an association we send C-STOREs on against a race in pynetdicom 3's reactor.

    Before sending, `send_c_store` pauses the association's reactor thread and waits until it
    says it is paused; but the flag can still read "paused" from the previous send while the
    reactor is already waking up. Under load the reactor then takes the C-STORE response off
    the queue itself, logs "Received unexpected C-STORE service message" and drops it; the
    sender waits for the DIMSE timeout and aborts, and every later sub-operation fails
    (measured: a 500-instance C-MOVE lost its last ~30 instances after a 60 s stall). Here a
    response the reactor takes is put back on the queue for the sender that is waiting for it.
    """
    serve = assoc._serve_request
    requeued: dict[int, int] = {}

    def serve_or_put_back(msg: Any, context_id: int) -> None:
        if msg.is_valid_response:
            times = requeued.get(id(msg), 0)
            if times < REQUEUE_LIMIT:
                requeued[id(msg)] = times + 1
                assoc.dimse.msg_queue.put((context_id, msg))
                return
            requeued.pop(id(msg), None)
        serve(msg, context_id)

    assoc._serve_request = serve_or_put_back  # type: ignore[method-assign]


def send_from_files(assoc: Association, file_of: Callable[[Any], tuple[Path, Head] | None]) -> None:
    """Make `assoc.send_c_store` send each dataset that `file_of` maps to a Part-10 file from
    that file, its data set's bytes as they are (in the file's own transfer syntax), never
    encoded in memory whole.

    pynetdicom sends a C-STORE from a file when given its path and `STORE_SEND_CHUNKED_DATASET`
    is set, but each of its P-DATA PDUs (~32 per 0.5 MB instance at a 16 KiB maximum PDU) goes
    through its reactor's queue, state machine and PDU encoder: ~10 ms of CPU per instance,
    12 times what Orthanc spends. So the sending thread writes the PDUs itself, framed as
    pynetdicom frames them (`agent.pdata`), a few hundred KiB per write, while the
    association's reactor is paused as pynetdicom pauses it for a send. The request primitive
    (with its checks), the presentation context, and the response and its handling stay
    pynetdicom's; the command set is encoded as pynetdicom encodes it (`pdata.store_command`).
    The reactor's own writes (a C-GET's pending responses, an A-ABORT) take the same lock as
    such a message, so PDUs never interleave; its responses that say Success are read without
    pydicom (`read_store_successes`). Its C-MOVE and C-GET service classes pass on only
    datasets, so the association's `send_c_store` is wrapped; other datasets are sent as
    before, and so is a file if the association has no socket or a TLS one.
    """
    if getattr(assoc.send_c_store, "from_files", False):
        return
    _config.STORE_SEND_CHUNKED_DATASET = True
    read_store_successes(assoc)
    send = assoc.send_c_store
    lock = _lock_writes(assoc)
    reader = _ResponseReader.install(assoc) if lock is not None else None

    def send_c_store(
        dataset: Any,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Any:
        found = file_of(dataset)
        if found is None or lock is None:
            target = dataset if found is None else found[0]
            return send(target, msg_id, priority, originator_aet, originator_id)
        path, head = found
        store = _store_request(path, head, msg_id, priority, originator_aet, originator_id)
        return _send_store(assoc, store, path, lock, reader)

    send_c_store.from_files = True  # type: ignore[attr-defined]
    assoc.send_c_store = send_c_store  # type: ignore[method-assign]


class StoreSuccess:
    """A C-STORE response that said Success and nothing more, read in a few struct unpacks
    (`read_store_successes`); it answers what pynetdicom asks of a response primitive."""

    __slots__ = ("MessageIDBeingRespondedTo",)
    is_valid_response = True
    Status = pdata.SUCCESS
    STATUS_OPTIONAL_KEYWORDS: tuple[str, ...] = ()

    def __init__(self, responding_to: int) -> None:
        self.MessageIDBeingRespondedTo = responding_to


class _ResponseReader:
    """Lets the thread that sent a C-STORE read its response from the socket itself.

    The association's DUL reactor otherwise reads the response, decodes it, and hands it to
    the sender through pynetdicom's queue: measured as 0.3-0.4 ms between the response's
    arrival and the sender's wake-up (the reactor keeps the GIL for its loop first), about a
    third of the time a C-MOVE from the cache spends per 0.5 MB instance. While `lock` is held
    (by the sender, from its request to its response), the reactor does not touch the socket:
    its transport check waits for the lock instead. The sender takes a P-DATA-TF that is one
    C-STORE response saying Success and nothing more (`pdata.store_success`); whatever else it
    reads (another status, a C-CANCEL, an A-ABORT, a release request) is put back for the
    reactor, which reads it first, as if from the socket, and handles it as before."""

    PARKED = 0.05
    """How long the reactor waits at a time for the sender to finish reading."""
    RESPONSE_MOST = 64 * 1024
    """Bytes a P-DATA-TF may have to be read here: a C-STORE response has about 150."""

    def __init__(self, assoc: Association, transport: Any) -> None:
        self.assoc = assoc
        self.transport = transport
        self.lock = threading.Lock()
        self.pushed_back = bytearray()

    @classmethod
    def install(cls, assoc: Association) -> _ResponseReader | None:
        """Return the association's reader, made and wired into its reactor on first use;
        None if it has no socket or a TLS one (pynetdicom's reactor then reads everything)."""
        dul = assoc.dul
        transport = dul.socket
        if transport is None or isinstance(transport.socket, ssl.SSLSocket):
            return None
        existing: _ResponseReader | None = getattr(dul._is_transport_event, "reader", None)
        if existing is not None:
            return existing
        reader = cls(assoc, transport)
        check = dul._is_transport_event
        recv = transport.recv

        def is_transport_event() -> bool:
            if not reader.lock.acquire(timeout=cls.PARKED):
                return False  # the sender is reading: wait for it here, do not spin
            try:
                if reader.pushed_back:
                    dul._read_pdu_data()
                    return True
                return bool(check())
            finally:
                reader.lock.release()

        def recv_pushed_back_first(nr_bytes: int) -> bytearray:
            if not reader.pushed_back:
                return recv(nr_bytes)
            taken = reader.pushed_back[:nr_bytes]
            del reader.pushed_back[:nr_bytes]
            if len(taken) < nr_bytes:
                taken += recv(nr_bytes - len(taken))
            return taken

        is_transport_event.reader = reader  # type: ignore[attr-defined]
        dul._is_transport_event = is_transport_event  # type: ignore[method-assign]
        transport.recv = recv_pushed_back_first  # type: ignore[method-assign]
        return reader

    def usable(self) -> bool:
        """Whether the next response may be read here: nothing put back is waiting for the
        reactor, and no handler wants every PDU or message received (pynetdicom's debug
        logging binds such handlers; they are given what the reactor decodes)."""
        return not self.pushed_back and not any(
            self.assoc.get_handlers(event) for event in _RECEIVE_EVENTS
        )

    def store_success(self, timeout: float | None) -> tuple[int, StoreSuccess] | None:
        """Read the next PDU, holding `lock`: return its context ID and the response if it is
        a C-STORE response saying Success and nothing more; otherwise put what was read back
        for the reactor and return None. Raise TimeoutError if nothing whole came within
        `timeout` seconds (None: no limit), OSError if the connection fails."""
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self.transport.socket
        read = bytearray()
        try:
            if not _read_exactly(sock, 6, deadline, read):
                return None
            kind, _reserved, length = struct.unpack(">BBI", read)
            if kind != pdata.P_DATA_TF or length > self.RESPONSE_MOST:
                return None
            if not _read_exactly(sock, 6 + length, deadline, read):
                return None
            item_length, context_id = struct.unpack_from(">IB", read, 6)
            if item_length + 4 != length:
                return None
            responding_to = pdata.store_success_value(bytes(read[11:]))
            if responding_to is None:
                return None
            read.clear()
            self.assoc.dul._idle_timer.restart()
            return context_id, StoreSuccess(responding_to)
        finally:
            self.pushed_back += read


def _read_exactly(sock: socket.socket, size: int, deadline: float | None, into: bytearray) -> bool:
    """Read from `sock` into `into` until it holds `size` bytes; return False if the peer
    closed the connection first. Raise TimeoutError at `deadline` (monotonic)."""
    while len(into) < size:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise TimeoutError("no response within the DIMSE timeout")
        readable, _writable, _failed = select.select([sock], [], [], wait)
        if not readable:
            raise TimeoutError("no response within the DIMSE timeout")
        chunk = sock.recv(size - len(into))
        if not chunk:
            return False
        into += chunk
    return True


def read_store_successes(assoc: Association) -> None:
    """Make the association's reactor read each C-STORE response that says Success and nothing
    more in a few struct unpacks (`pdata.store_success`), queueing a `StoreSuccess` for the
    sender; every other message (another status, an error comment, a C-CANCEL, a message in
    several fragments) goes through pynetdicom's decoding as before.

    pynetdicom decodes every response with pydicom into a dataset and then a primitive whose
    setters validate each UID: about a third of the CPU of a C-MOVE sent from the cache (2,000
    responses, yappi). Skipped while a handler is bound to every received DIMSE message
    (pynetdicom's debug logging binds one): it is given the decoded message."""
    dimse = assoc.dimse
    if getattr(dimse.receive_primitive, "store_successes", False):
        return
    receive = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        values = primitive.presentation_data_value_list
        if dimse.message is None and len(values) == 1 and not assoc.get_handlers(_DIMSE_RECV):
            context_id, data = values[0]
            responding_to = pdata.store_success_value(data)
            if responding_to is not None:
                dimse.msg_queue.put((context_id, cast(Any, StoreSuccess(responding_to))))
                return
        receive(primitive)

    receive_primitive.store_successes = True  # type: ignore[attr-defined]
    dimse.receive_primitive = receive_primitive  # type: ignore[method-assign]


def send_responses_directly(assoc: Association) -> None:
    """Make the association's most frequent responses go straight to its socket from the
    thread that sends them, their command set encoded in a few struct packs: a Pending C-MOVE
    or C-GET response without an identifier (one after every instance a retrieval sends,
    `pdata.pending_command`) and a C-STORE response saying Success and nothing more (one for
    every instance received, `pdata.store_response`).

    pynetdicom encodes each as a pydicom dataset, twice, and queues its PDU for the reactor,
    whose state machine and PDU encoder take their turn; measured as about a quarter of the
    sending thread's time in a warm C-MOVE. Every other message (a final response, a warning
    or failure, a C-FIND match) goes pynetdicom's way, after those (written before it is
    queued). The write takes the lock the reactor's writes take, so PDUs never interleave; an
    association without a socket or with a TLS one keeps pynetdicom's path throughout (see
    `_lock_writes`).
    """
    dimse = assoc.dimse
    if getattr(dimse.send_msg, "directly", False):
        return
    send = dimse.send_msg
    lock = _lock_writes(assoc)

    def send_msg(primitive: Any, context_id: int) -> None:
        encoded = _direct_response(primitive)
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if encoded is None or lock is None or sock is None:
            send(primitive, context_id)
            return
        framed = pdata.command(encoded, context_id, dimse.maximum_pdu_size)
        try:
            with lock:
                sock.sendall(framed)
        except OSError as exc:
            # the reactor finds the connection gone on its next read and ends the association
            logger.warning("A response to %s was not sent: %s", assoc.requestor.address, exc)

    send_msg.directly = True  # type: ignore[attr-defined]
    dimse.send_msg = send_msg  # type: ignore[method-assign]


def _direct_response(primitive: Any) -> bytes | None:
    """Return the encoded command set of `primitive` if it is a response `send_responses_
    directly` writes itself, None otherwise."""
    if isinstance(primitive, C_STORE):
        if (
            primitive.MessageIDBeingRespondedTo is None
            or primitive.Status != pdata.SUCCESS
            or primitive.ErrorComment is not None
            or primitive.OffendingElement is not None
        ):
            return None
        return pdata.store_response(
            primitive.MessageIDBeingRespondedTo,
            primitive.AffectedSOPClassUID,
            primitive.AffectedSOPInstanceUID,
        )
    kind = _pending_kind(primitive)
    if kind is None:
        return None
    return pdata.pending_command(
        kind,
        primitive.MessageIDBeingRespondedTo,
        primitive.AffectedSOPClassUID,
        (
            primitive.NumberOfRemainingSuboperations,
            primitive.NumberOfCompletedSuboperations,
            primitive.NumberOfFailedSuboperations,
            primitive.NumberOfWarningSuboperations,
        ),
    )


def _pending_kind(primitive: Any) -> str | None:
    """Return "C-MOVE" or "C-GET" if `primitive` is such a response, Pending, without an
    identifier and with every count set; None otherwise."""
    if isinstance(primitive, C_MOVE):
        kind = "C-MOVE"
    elif isinstance(primitive, C_GET):
        kind = "C-GET"
    else:
        return None
    counts = (
        primitive.NumberOfRemainingSuboperations,
        primitive.NumberOfCompletedSuboperations,
        primitive.NumberOfFailedSuboperations,
        primitive.NumberOfWarningSuboperations,
    )
    if (
        primitive.MessageIDBeingRespondedTo is None
        or primitive.AffectedSOPClassUID is None
        or primitive.Status != pdata.PENDING
        or primitive.Identifier is not None
        or any(count is None for count in counts)
    ):
        return None
    return kind


def _lock_writes(assoc: Association) -> threading.Lock | None:
    """Make every write of the association's reactor to its socket take a lock, and return it
    (the same one on every call); None if the association has no socket yet, or a TLS one:
    OpenSSL does not take a write from one thread while another reads the same connection, so
    TLS keeps pynetdicom's path, where the reactor alone does both."""
    transport = assoc.dul.socket
    if transport is None or isinstance(transport.socket, ssl.SSLSocket):
        return None
    held: threading.Lock | None = getattr(transport.send, "lock", None)
    if held is not None:
        return held
    lock = threading.Lock()
    write = transport.send

    def send_locked(bytestream: bytes) -> None:
        with lock:
            write(bytestream)

    send_locked.lock = lock  # type: ignore[attr-defined]
    transport.send = send_locked  # type: ignore[method-assign]
    return lock


def _store_request(
    path: Path,
    head: Head,
    msg_id: int,
    priority: int,
    originator_aet: str | None,
    originator_id: int | None,
) -> tuple[C_STORE, UID, int]:
    """Return the C-STORE request primitive for the file at `path` whose head is `head`, as
    pynetdicom builds it for a file, with the file's transfer syntax and where its data set
    starts. Raise AttributeError, as pynetdicom does, if the file meta lacks what names the
    instance."""
    found = (head.media_sop_class, head.media_sop_instance, head.transfer_syntax)
    missing = [name for name, value in zip(_FILE_META_NEEDED, found, strict=True) if value is None]
    if missing:
        raise AttributeError(
            f"Unable to send the dataset from the file at {path} as one or more required file"
            f" meta information elements are missing: {', '.join(missing)}"
        )
    request = C_STORE()
    request.MessageID = msg_id
    request.Priority = priority
    request.MoveOriginatorApplicationEntityTitle = originator_aet
    request.MoveOriginatorMessageID = originator_id
    request.AffectedSOPClassUID = head.media_sop_class
    request.AffectedSOPInstanceUID = head.media_sop_instance
    return request, UID(cast(str, head.transfer_syntax)), head.offset


_FILE_META_NEEDED = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")


def _send_store(
    assoc: Association,
    store: tuple[C_STORE, UID, int],
    path: Path,
    lock: threading.Lock,
    reader: _ResponseReader | None,
) -> Any:
    """Send a C-STORE whose data set is the rest of the file at `path`, writing its PDUs
    straight to the socket; return the response's status dataset as pynetdicom's
    `send_c_store` does (an empty one if no response came: the association is then aborted).
    Raise RuntimeError, ValueError and AttributeError where it does."""
    if not assoc.is_established:
        raise RuntimeError(
            "The association with a peer SCP must be established before sending a C-STORE request"
        )
    request, syntax, offset = store
    context = assoc._get_valid_context(
        cast(UID, request.AffectedSOPClassUID), syntax, "scu", allow_conversion=False
    )
    context_id = cast(int, context.context_id)
    encoded = pdata.store_command(
        cast(int, request.MessageID),
        request.Priority,
        cast(UID, request.AffectedSOPClassUID),
        cast(UID, request.AffectedSOPInstanceUID),
        request.MoveOriginatorApplicationEntityTitle,
        request.MoveOriginatorMessageID,
    )
    max_pdu = assoc.dimse.maximum_pdu_size
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None

    assoc._reactor_checkpoint.clear()  # pause the reactor, as pynetdicom does for a send
    while not assoc._is_paused:
        time.sleep(0.0001)
    reading = reader.lock if reader is not None and reader.usable() else contextlib.nullcontext()
    response: Any = None
    try:
        if sock is None:
            raise OSError("the association has no connection")
        fd = os.open(path, os.O_RDONLY)
        try:
            length = os.fstat(fd).st_size - offset
            with reading:
                with lock:
                    sock.sendall(pdata.command(encoded, context_id, max_pdu))
                    for block in pdata.data_set(fd, offset, length, context_id, max_pdu):
                        sock.sendall(block)
                if reader is not None and reading is reader.lock:
                    read = reader.store_success(assoc.dimse_timeout)
                    response = None if read is None else read[1]
        finally:
            os.close(fd)
        if response is None:
            _context, response = assoc.dimse.get_msg(block=True)
    except TimeoutError:
        logger.error("No response to the C-STORE of %s", request.AffectedSOPInstanceUID)
        response = None
    except (OSError, EOFError) as exc:
        # A message cut off mid-PDU leaves the peer nothing to parse: end the association.
        logger.error("C-STORE of %s cut off: %s", request.AffectedSOPInstanceUID, exc)
        response = None
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:
        if assoc.is_established:
            assoc.abort()
        return Dataset()
    return assoc._check_received_status(response)


def partial_dataset_file(assoc: Association) -> IO[bytes] | None:
    """Return the file an ended association was streaming a dataset into, if one is left open
    (pynetdicom leaves it when the receive is cut off)."""
    message = assoc.dimse.message
    partial: IO[bytes] | None = getattr(message, "_data_set_file", None) if message else None
    return partial


Judge = Callable[[PresentationContext], str | None]
"""Given a presentation context the acceptor would accept, return why to refuse it, or None."""
Report = Callable[[list[str]], None]
"""Told the reasons, once per association that had contexts refused."""
_NEGOTIATORS = ("negotiate_as_acceptor", "negotiate_unrestricted")
_judges: weakref.WeakKeyDictionary[threading.Thread, tuple[Judge, Report]] = (
    weakref.WeakKeyDictionary()
)
_install_lock = threading.Lock()


def refuse_contexts(assoc: Association, judge: Judge, report: Report) -> None:
    """Have the negotiation of acceptor `assoc` refuse each context that `judge` gives a reason
    for (result 0x01, user rejection), as if this AE did not support it; call before the
    negotiation starts (an EVT_REQUESTED handler).

    pynetdicom negotiates one supported-context list for the whole server, and with its
    unrestricted storage service it accepts every storage class regardless; the negotiation
    functions its ACSE calls are wrapped (once) to apply the judge of the association whose
    thread runs the negotiation.
    """
    with _install_lock:
        for name in _NEGOTIATORS:
            negotiate = getattr(acse, name)
            if not hasattr(negotiate, "judged"):
                setattr(acse, name, _judged(negotiate))
    _judges[assoc] = (judge, report)


def _judged(negotiate: Callable[..., Any]) -> Callable[..., Any]:
    def negotiate_and_judge(rq_contexts: Any, ac_contexts: Any, roles: Any = None) -> Any:
        result, reply_roles = negotiate(rq_contexts, ac_contexts, roles)
        judging = _judges.pop(threading.current_thread(), None)
        if judging is None:
            return result, reply_roles
        judge, report = judging
        reasons = []
        for cx in result:
            reason = judge(cx) if cx.result == ContextResult.ACCEPTANCE else None
            if reason is not None:
                cx.result = ContextResult.USER_REJECTION
                reasons.append(reason)
        if reasons:
            kept = {cx.abstract_syntax for cx in result if cx.result == ContextResult.ACCEPTANCE}
            reply_roles = [role for role in reply_roles if role.sop_class_uid in kept]
            report(reasons)
        return result, reply_roles

    negotiate_and_judge.judged = negotiate  # type: ignore[attr-defined]
    return negotiate_and_judge


def missing() -> list[str]:
    """Return the name of each internal this module uses that the installed pynetdicom lacks
    (empty when all are where this module expects them)."""
    gone = [f"pynetdicom._config.{name}" for name in _CONFIG_FLAGS if not hasattr(_config, name)]
    gone += [f"pynetdicom.acse.{name}" for name in _NEGOTIATORS if not hasattr(acse, name)]
    if not callable(getattr(transport, "deepcopy", None)):
        gone.append("pynetdicom.transport.deepcopy")
    if set(vars(PresentationContext())) != _CONTEXT_ATTRIBUTES:
        gone.append("pynetdicom.presentation.PresentationContext's attributes")
    assoc = Association(AE(), "requestor")  # built, never started: no thread, no socket
    if not isinstance(getattr(assoc.dul, "_run_loop_delay", None), float):
        gone.append("pynetdicom.dul.DULServiceProvider._run_loop_delay")
    if not isinstance(
        getattr(getattr(assoc.dul, "state_machine", None), "current_state", None), str
    ):
        gone.append("pynetdicom.fsm.StateMachine.current_state")
    if not callable(getattr(assoc.dul, "_process_recv_primitive", None)):
        gone.append("pynetdicom.dul.DULServiceProvider._process_recv_primitive")
    if not callable(getattr(assoc, "_serve_request", None)):
        gone.append("pynetdicom.association.Association._serve_request")
    if not isinstance(getattr(assoc.dimse, "msg_queue", None), queue.Queue):
        gone.append("pynetdicom.dimse.DIMSEServiceProvider.msg_queue")
    if not hasattr(assoc.dimse, "message"):
        gone.append("pynetdicom.dimse.DIMSEServiceProvider.message")
    if getattr(getattr(association_module, "time", None), "sleep", None) is None:
        gone.append("pynetdicom.association.time")
    if not callable(getattr(assoc.dul, "_is_transport_event", None)):
        gone.append("pynetdicom.dul.DULServiceProvider._is_transport_event")
    if not callable(getattr(assoc.dul, "_read_pdu_data", None)):
        gone.append("pynetdicom.dul.DULServiceProvider._read_pdu_data")
    if not callable(getattr(getattr(assoc.dul, "_idle_timer", None), "restart", None)):
        gone.append("pynetdicom.dul.DULServiceProvider._idle_timer")
    if not callable(getattr(transport.AssociationSocket, "recv", None)):
        gone.append("pynetdicom.transport.AssociationSocket.recv")
    if not callable(getattr(assoc.dimse, "receive_primitive", None)):
        gone.append("pynetdicom.dimse.DIMSEServiceProvider.receive_primitive")
    if "presentation_data_value_list" not in dir(P_DATA()):
        gone.append("pynetdicom.pdu_primitives.P_DATA.presentation_data_value_list")
    if not hasattr(DIMSEMessage(), "_data_set_file"):
        gone.append("pynetdicom.dimse_messages.DIMSEMessage._data_set_file")
    if not isinstance(getattr(assoc, "_reactor_checkpoint", None), threading.Event):
        gone.append("pynetdicom.association.Association._reactor_checkpoint")
    if not isinstance(getattr(assoc, "_is_paused", None), bool):
        gone.append("pynetdicom.association.Association._is_paused")
    gone += [
        f"pynetdicom.association.Association.{name}"
        for name in ("_get_valid_context", "_check_received_status")
        if not callable(getattr(assoc, name, None))
    ]
    return gone
