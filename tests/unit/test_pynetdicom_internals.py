"""The fence around pynetdicom's private internals: an upgrade that moves one fails here."""

from __future__ import annotations

import copy
import re
import socket
import ssl
import time
from pathlib import Path

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket

import agent
from agent import pynetdicom_internals as internals
from agent.dicom import DUL_POLL_INTERVAL, tune
from tests.support.net import LOOPBACK

INTERNALS = re.compile(
    r"(?<!\w)_config\b|\b(?:dul|dimse|assoc|association|message)\._\w+|\bmsg_queue\b"
)
"""How a use of pynetdicom's internals reads: its _config module, an underscored attribute of
an association or its parts, the DIMSE message queue."""


def test_every_internal_the_agent_uses_is_where_the_fence_expects_it() -> None:
    gone = internals.missing()
    assert not gone, (
        f"pynetdicom {pynetdicom.__version__} moved internals that agent/pynetdicom_internals.py"
        f" uses: {', '.join(gone)}"
    )


def test_tuning_an_association_sets_the_reactor_delay_and_the_response_guard() -> None:
    assoc = Association(AE(), "requestor")  # never started: no thread, no socket
    serve = assoc._serve_request
    tune(assoc)
    assert assoc.dul._run_loop_delay == DUL_POLL_INTERVAL
    assert assoc._serve_request == serve
    tune(assoc, sends_stores=True)
    assert assoc._serve_request != serve


def test_a_tuned_acceptor_answers_every_request_and_sees_the_release() -> None:
    """Its reactor takes each message as it arrives (`wake_on_messages`) instead of sleeping
    1 ms and polling: every request is still answered, in order, and the peer's release seen
    (within the reactor's 10 ms wait) instead of hanging."""
    tuned: list[Association] = []

    def on_open(event: evt.Event) -> None:
        tune(event.assoc)
        tuned.append(event.assoc)

    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    server = scp.start_server(
        (LOOPBACK, 0), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)]
    )
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate(LOOPBACK, server.server_address[1], ae_title="SCP")
        assert assoc.is_established
        statuses = [assoc.send_c_echo(msg_id=n).Status for n in range(1, 201)]
        started = time.monotonic()
        assoc.release()
        released_in = time.monotonic() - started
        assert assoc.is_released
    finally:
        server.shutdown()
    assert statuses == [0x0000] * 200
    assert len(tuned) == 1 and tuned[0].is_acceptor
    assert released_in < 5.0


def test_no_other_module_of_the_agent_touches_pynetdicom_internals() -> None:
    root = Path(agent.__file__).parent
    fence = root / "pynetdicom_internals.py"
    touching = [
        f"{path.relative_to(root)}: {found.group()}"
        for path in sorted(root.rglob("*.py"))
        if path != fence
        for found in INTERNALS.finditer(path.read_text())
    ]
    assert not touching


def association_over(sock: socket.socket) -> Association:
    """Return an association (never started) whose connection is `sock`."""
    assoc = Association(AE(), "requestor")
    assoc.dul.socket = AssociationSocket(assoc, client_socket=sock)
    return assoc


def test_a_tls_association_keeps_pynetdicoms_own_send_path_and_its_polling() -> None:
    # OpenSSL takes no write from one thread while another reads the same connection: on TLS
    # the reactor alone reads and writes, and it must not wait on a socket its queue feeds
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # wraps an unconnected socket as it is
    with socket.socket() as raw, context.wrap_socket(raw, server_side=True) as tls:
        assoc = association_over(tls)
        process = assoc.dul._process_recv_primitive
        assert internals._lock_writes(assoc) is None
        tune(assoc, sends_stores=True)
        assert assoc.dul._process_recv_primitive == process
        assert assoc.dul._run_loop_delay == DUL_POLL_INTERVAL
    with socket.socket() as plain:
        assoc = association_over(plain)
        assert internals._lock_writes(assoc) is not None
        tune(assoc, sends_stores=True)
        assert assoc.dul._process_recv_primitive != process


def test_an_associations_contexts_are_copied_as_deepcopy_would_and_apart() -> None:
    from pynetdicom import transport

    from agent.config import DicomSettings
    from agent.dicom import build_ae

    ae = build_ae(DicomSettings())  # installs the cheap copy
    contexts = ae.supported_contexts
    cheap = getattr(transport, "deepcopy")(contexts)  # noqa: B009 (what pynetdicom calls)
    assert [vars(cx) for cx in cheap] == [vars(cx) for cx in copy.deepcopy(contexts)]
    cheap[0].transfer_syntax.append("1.2.3")  # an association's negotiation changes its copy
    cheap[0].result = 0x01
    assert "1.2.3" not in contexts[0].transfer_syntax and contexts[0].result is None
    assert getattr(transport, "deepcopy")({"a": [1]}) == {"a": [1]}  # noqa: B009 (anything else)
