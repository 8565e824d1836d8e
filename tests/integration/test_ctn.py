"""The Central Test Node (Debian's `ctn`) as the PACS: it resets the TCP connection right after
each completed release instead of closing it. That is a normal end of an association and is not
logged as an ERROR; a reset before the release still is."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.agent import Agent
from tests.support.net import LOOPBACK, wait_until

DICOM_ECHO = shutil.which("dicom_echo") or "/usr/bin/dicom_echo"


def errors(agent: Agent) -> list[str]:
    return [line for line in agent.log_tail(100_000).splitlines() if " ERROR " in line]


@pytest.mark.skipif(not Path(DICOM_ECHO).exists(), reason="ctn not installed (scripts/setup)")
def test_a_reset_after_the_release_is_not_an_error_but_one_before_it_is(
    tmp_data_dir: Path,
) -> None:
    with Agent(tmp_data_dir) as agent:
        for _ in range(3):
            echo = subprocess.run(
                [DICOM_ECHO, "-c", agent.ae_title, "-a", "PACS", LOOPBACK, str(agent.port)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert echo.returncode == 0, echo.stdout + echo.stderr
            assert "Successful operation" in echo.stdout
        after_release = errors(agent)

        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        assoc = ae.associate(LOOPBACK, agent.port, ae_title=agent.ae_title)
        assert assoc.is_established
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # mid-association: the agent's reactor reads a reset
        wait_until(lambda: bool(errors(agent)), 30, what="the reset logged")
        assoc.abort()
        before_release = errors(agent)

    assert after_release == []
    assert any("Connection reset by peer" in line for line in before_release), before_release
