"""Every place Dirigo reaches into pynetdicom's private internals, and nowhere else.

pynetdicom has no public way to stream a received dataset to a file, to accept private storage
SOP classes, to quiet its identifier logging, to shorten its reactor's idle sleep, or to guard
against a race in its reactor; each of those needs an underscored name or an undocumented
attribute. They are fenced here so that a pynetdicom upgrade (the dependency is pinned to the
minor version these were read from) breaks one module, and `missing()` (run by the unit tests)
names each attribute that moved instead of letting the agent fail at run time.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pynetdicom import AE, _config, acse
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.presentation import PresentationContext

from agent.dimse import ContextResult

_CONFIG_FLAGS = (
    "STORE_RECV_CHUNKED_DATASET",
    "UNRESTRICTED_STORAGE_SERVICE",
    "LOG_REQUEST_IDENTIFIERS",
    "LOG_RESPONSE_IDENTIFIERS",
    "LOG_HANDLER_LEVEL",
    "STORE_SEND_CHUNKED_DATASET",
)
"""The module-level switches of `pynetdicom._config` that Dirigo sets."""

REQUEUE_LIMIT = 2000
"""How often one stolen response is put back (about 2 s of the reactor's 1 ms loop) before it
is dropped as truly unexpected."""


def receive_to_files_and_accept_any_storage() -> None:
    """Make every acceptor stream each incoming dataset straight to a file as it arrives (so
    memory does not grow with instance size) and accept any storage SOP class, private and
    future ones included (a gateway must not drop a vendor's private objects)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True


def quiet_identifiers() -> None:
    """Keep patient identifiers out of pynetdicom's logs (it logs request identifiers)."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


def set_loop_delay(assoc: Association, seconds: float) -> None:
    """Set how long the association's DUL reactor sleeps whenever it finds nothing to do."""
    assoc.dul._run_loop_delay = seconds


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


def send_from_files(assoc: Association, file_of: Callable[[Any], Path | None]) -> None:
    """Make `assoc.send_c_store` send each dataset that `file_of` maps to a Part-10 file from
    that file, block by block as it goes on the wire, instead of encoding it in memory whole.

    pynetdicom sends a C-STORE from a file when given its path and `STORE_SEND_CHUNKED_DATASET`
    is set (it then uses the file's own transfer syntax, unconverted); its C-MOVE and C-GET
    service classes pass on only datasets, so the association's `send_c_store` is wrapped to
    hand it the path. Other datasets, and other callers' paths, are sent as before.
    """
    if getattr(assoc.send_c_store, "from_files", False):
        return
    _config.STORE_SEND_CHUNKED_DATASET = True
    send = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        path = file_of(dataset)
        return send(path if path is not None else dataset, *args, **kwargs)

    send_c_store.from_files = True  # type: ignore[attr-defined]
    assoc.send_c_store = send_c_store  # type: ignore[method-assign]


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
    assoc = Association(AE(), "requestor")  # built, never started: no thread, no socket
    if not isinstance(getattr(assoc.dul, "_run_loop_delay", None), float):
        gone.append("pynetdicom.dul.DULServiceProvider._run_loop_delay")
    if not callable(getattr(assoc, "_serve_request", None)):
        gone.append("pynetdicom.association.Association._serve_request")
    if not isinstance(getattr(assoc.dimse, "msg_queue", None), queue.Queue):
        gone.append("pynetdicom.dimse.DIMSEServiceProvider.msg_queue")
    if not hasattr(assoc.dimse, "message"):
        gone.append("pynetdicom.dimse.DIMSEServiceProvider.message")
    if not hasattr(DIMSEMessage(), "_data_set_file"):
        gone.append("pynetdicom.dimse_messages.DIMSEMessage._data_set_file")
    return gone
