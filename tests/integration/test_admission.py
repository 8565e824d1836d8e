"""Who gets an association, and for how long: `dirigo run` as a subprocess against raw TCP
connections and DCMTK's tools on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pynetdicom import AE, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.support import dcmtk
from tests.support.agent import Agent
from tests.support.datasets import ct_series
from tests.support.net import LOOPBACK, wait_until


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def closed_by_peer(sock: socket.socket) -> bool:
    """Return True once the other end has closed `sock` (EOF or reset), without blocking."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@contextlib.contextmanager
def junk_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """Open `count` connections that each send one byte (the start of a PDU) and then nothing."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((LOOPBACK, port), timeout=10)
            sock.sendall(b"\x01")
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_half_open_connections_neither_stop_intake_nor_keep_a_thread(
    tmp_data_dir: Path, tmp_path: Path
) -> None:
    acse_timeout, network_timeout = 6.0, 8.0
    timeouts = {"acse_timeout": f"{acse_timeout}s", "network_timeout": f"{network_timeout}s"}
    extra = {"dicom": timeouts}
    files = ct_series(tmp_path / "ct", slices=3, rows=64, cols=64)
    with Agent(tmp_data_dir, extra=extra) as agent:
        baseline = threads_of(agent.pid)
        with junk_connections(agent.port, 50) as junk:
            # every junk connection has reached the agent before the real sender starts
            wait_until(
                lambda: threads_of(agent.pid) >= baseline + 2 * 10,
                timeout=30,
                what="the junk connections to be accepted",
            )
            opened = time.monotonic()
            sent = dcmtk.storescu(files, agent.port, timeout=60)
            took = time.monotonic() - opened
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert dcmtk.acknowledged(sent) == files
            assert took < acse_timeout, f"storescu needed {took:.1f} s"
            wait_until(
                lambda: all(closed_by_peer(sock) for sock in junk),
                timeout=network_timeout + 20,
                what="the agent to close every junk connection",
            )
        wait_until(
            lambda: threads_of(agent.pid) <= baseline + 4,
            timeout=network_timeout + 20,
            what=f"the agent's threads to return to {baseline}",
        )
        assert dcmtk.echoscu(agent.port).returncode == 0
        assert len(agent.rows("SELECT 1 FROM instances")) == len(files)
        assert "Traceback" not in agent.log_tail(100_000)


def test_a_peer_that_stalls_mid_message_gives_its_slot_back_after_network_timeout(
    tmp_data_dir: Path,
) -> None:
    network_timeout = 4.0
    dicom = {"max_associations": 1, "network_timeout": f"{network_timeout}s"}
    with Agent(tmp_data_dir, extra={"dicom": dicom}) as agent:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        stalled = ae.associate(LOOPBACK, agent.port, ae_title="DIRIGO")
        assert stalled.is_established
        try:
            # a P-DATA-TF announcing 100 bytes, 10 of which arrive: the link then goes quiet
            assert stalled.dul.socket is not None and stalled.dul.socket.socket is not None
            stalled.dul.socket.socket.sendall(b"\x04\x00" + (100).to_bytes(4, "big") + bytes(10))
            assert dcmtk.echoscu(agent.port).returncode != 0  # the one slot is taken
            wait_until(
                lambda: dcmtk.echoscu(agent.port).returncode == 0,
                timeout=network_timeout + 20,
                what="the stalled association's slot to come back",
            )
        finally:
            stalled.abort()


def test_a_released_association_gives_its_slot_back_at_once(tmp_data_dir: Path) -> None:
    """A PACS that releases and at once associates again (a C-ECHO, then the store) is
    admitted, even with a single slot: the released association's thread, still ending, does
    not hold it."""
    with Agent(tmp_data_dir, extra={"dicom": {"max_associations": 1}}) as agent:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        for _ in range(5):
            assert dcmtk.echoscu(agent.port).returncode == 0
            assoc = ae.associate(LOOPBACK, agent.port, ae_title="DIRIGO")
            assert assoc.is_established
            assoc.release()
        assert "slots are in use" not in agent.log_tail(100_000)


ALL_SERVICES = {
    Verification: "echo",
    CTImageStorage: "store",
    StudyRootQueryRetrieveInformationModelFind: "find",
    StudyRootQueryRetrieveInformationModelMove: "move",
    StudyRootQueryRetrieveInformationModelGet: "get",
}


def negotiate(
    port: int, calling_ae: str, sop_classes: Iterable[str], roles: Iterable[str] = ()
) -> tuple[set[str], dict[str, int]]:
    """Associate as `calling_ae` proposing `sop_classes` (taking the SCP role for `roles`, as
    a C-GET requestor does); return the services accepted and {service: result} refused."""
    ae = AE(ae_title=calling_ae)
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class)
    role_items = [build_role(sop_class, scp_role=True) for sop_class in roles]
    assoc = ae.associate(LOOPBACK, port, ae_title="DIRIGO", ext_neg=role_items)
    assert assoc.is_established, f"{calling_ae} was not admitted"
    try:
        accepted = {ALL_SERVICES[str(cx.abstract_syntax)] for cx in assoc.accepted_contexts}
        refused = {
            ALL_SERVICES[str(cx.abstract_syntax)]: cx.result for cx in assoc.rejected_contexts
        }
    finally:
        assoc.release()
    return accepted, refused


def test_a_peer_may_use_only_its_services_and_learns_it_at_negotiation(
    tmp_data_dir: Path, tmp_path: Path
) -> None:
    peers = (
        {"ae_title": "PACS", "host": LOOPBACK},
        {"ae_title": "VIEWER", "host": LOOPBACK, "services": ["echo", "find", "get"]},
        {"ae_title": "CT1"},
    )
    user_rejection = 0x01
    with Agent(tmp_data_dir, peers=peers) as agent:
        accepted, refused = negotiate(agent.port, "PACS", ALL_SERVICES)
        assert (accepted, refused) == (set(ALL_SERVICES.values()), {})

        accepted, refused = negotiate(agent.port, "CT1", ALL_SERVICES)
        assert accepted == {"echo", "store"}
        assert refused == dict.fromkeys(("find", "move", "get"), user_rejection)

        accepted, refused = negotiate(agent.port, "VIEWER", ALL_SERVICES)
        assert accepted == {"echo", "find", "get"}
        assert refused == dict.fromkeys(("store", "move"), user_rejection)
        # the storage context a C-GET brings its instances back on (the peer as SCP) is a get
        get = [StudyRootQueryRetrieveInformationModelGet, CTImageStorage]
        accepted, refused = negotiate(agent.port, "VIEWER", get, roles=[CTImageStorage])
        assert (accepted, refused) == ({"get", "store"}, {})

        files = ct_series(tmp_path / "ct", slices=2, rows=64, cols=64)
        sent = dcmtk.storescu(files, agent.port, calling_ae="VIEWER", timeout=60)
        assert sent.returncode != 0
        assert dcmtk.acknowledged(sent) == []
        assert agent.rows("SELECT 1 FROM instances") == []
        assert "presentation context(s) for store: not among its services" in agent.log_tail()


def test_sop_classes_pynetdicom_would_take_for_storage_but_dirigo_does_not_offer_are_refused(
    tmp_data_dir: Path,
) -> None:
    """Modality Worklist FIND and Color Palette Q/R: pynetdicom 3.0.4 would accept them as
    unknown storage classes, and a C-FIND on them would end in 0xC000 and a traceback."""
    worklist, palette_move = "1.2.840.10008.5.1.4.31", "1.2.840.10008.5.1.4.39.3"
    with Agent(tmp_data_dir) as agent:
        ae = AE(ae_title="PACS")
        for sop_class in (Verification, worklist, palette_move, "1.2.840.113619.4.2"):
            ae.add_requested_context(sop_class)
        assoc = ae.associate(LOOPBACK, agent.port, ae_title="DIRIGO")
        assert assoc.is_established
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            refused = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        finally:
            assoc.release()
        assert accepted == {Verification, "1.2.840.113619.4.2"}  # a private class is stored
        assert refused == {worklist: 0x01, palette_move: 0x01}
        assert "refused 2 presentation context(s) of SOP classes Dirigo does not offer" in (
            agent.log_tail()
        )
