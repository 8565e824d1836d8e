"""Who gets an association, and for how long: `dirigo run` as a subprocess against raw TCP
connections and DCMTK's tools on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

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
