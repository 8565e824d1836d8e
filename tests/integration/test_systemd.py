"""The agent under systemd, with systemd's side played by the test: the notify socket it owns
(READY=1, STATUS=, WATCHDOG=1 only while healthy) and the journald stream (priority prefixes,
no timestamp of our own)."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import dcmtk
from tests.support.agent import Agent
from tests.support.datasets import ct_series
from tests.support.devcloud import HeartbeatReceiver
from tests.support.net import LOOPBACK, wait_until

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


class NotifySocket:
    """systemd's notify socket as a test owns it: an abstract unix datagram socket."""

    def __init__(self) -> None:
        self.name = f"@dirigo-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        """Every message received so far, with the monotonic time it came."""

    def poll(self) -> list[str]:
        """Take what has arrived; return every message received so far."""
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            self.messages.append((time.monotonic(), data.decode()))
        return [message for _, message in self.messages]

    def since(self, at: float) -> list[str]:
        self.poll()
        return [message for when, message in self.messages if when >= at]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def test_under_systemd_the_agent_says_ready_its_status_and_feeds_the_watchdog(
    tmp_data_dir: Path, notify_socket: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.name, "WATCHDOG_USEC": "1000000"}
    with Agent(tmp_data_dir, env=env) as agent:
        wait_until(
            lambda: notify_socket.poll().count("WATCHDOG=1") >= 3,
            30,
            what="three watchdog pings",
        )
        messages = notify_socket.poll()
        assert "READY=1" in messages
        status = [m for m in messages if m.startswith("STATUS=")]
        assert status and "\n" not in status[-1]
        assert not any("unhealthy" in m for m in status), status
        assert agent.stop() == 0
    assert notify_socket.poll()[-1] == "STOPPING=1" or "STOPPING=1" in notify_socket.poll()


def test_a_hung_upload_worker_stops_the_watchdog_pings_and_fails_the_heartbeat(
    tmp_data_dir: Path,
    tmp_path: Path,
    notify_socket: NotifySocket,
    heartbeat_receiver: HeartbeatReceiver,
) -> None:
    # A cloud that takes the connection and never answers: the upload worker hangs in its
    # first request (cloud.timeout is an hour), as it would on a wedged proxy.
    with socket.create_server((LOOPBACK, 0), backlog=16) as silent:
        port = silent.getsockname()[1]
        env = {"NOTIFY_SOCKET": notify_socket.name, "WATCHDOG_USEC": "1000000"}
        extra = {
            "cloud": {
                "upload_url": f"http://{LOOPBACK}:{port}/files/",
                "timeout": "1h",
                "heartbeat_url": f"{heartbeat_receiver.url}ping/site",
                "heartbeat_every": "0.5s",
            },
            "health": {"stall_after": "3s", "listen": "off"},
        }
        files = ct_series(tmp_path / "ct", slices=2)
        with Agent(tmp_data_dir, stable_after="1s", extra=extra, env=env) as agent:
            wait_until(
                lambda: notify_socket.poll().count("WATCHDOG=1") >= 2,
                30,
                what="watchdog pings while healthy",
            )
            assert dcmtk.storescu(files, agent.port).returncode == 0
            wait_until(
                lambda: any("unhealthy: upload" in m for m in notify_socket.poll()),
                60,
                what="a STATUS= naming the hung upload worker",
            )
            unhealthy_at = time.monotonic()
            # Four watchdog intervals (two pings each) pass without a single ping.
            wait_until(
                lambda: time.monotonic() - unhealthy_at > 4.0, 10, what="four watchdog intervals"
            )
            after = notify_socket.since(unhealthy_at)
            assert "WATCHDOG=1" not in after, after
            assert sum(m.startswith("STATUS=unhealthy") for m in after) >= 2
            # The agent itself still answers (systemd, not the agent, restarts it).
            assert agent.proc is not None and agent.proc.poll() is None
            # and the state's monitoring hears of it: the heartbeat goes to /fail.
            check = wait_until(
                lambda: (c := heartbeat_receiver.checks().get("site")) and not c["ok"] and c,
                30,
                what="a heartbeat to /fail",
            )
            assert isinstance(check, dict) and check["state"] == "unhealthy"
            assert check["document"]["health"]["failing"][0].startswith("upload-")
            agent.kill9()  # as systemd would; a graceful stop waits 30 s for the hung worker


def test_log_lines_to_journald_carry_priorities_and_no_timestamp(tmp_data_dir: Path) -> None:
    agent = Agent(tmp_data_dir)
    st = os.fstat(agent.log.fileno())
    agent.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"  # stderr is journald's stream
    with agent:
        # An unknown caller is refused with a warning.
        dcmtk.echoscu(agent.port, calling_ae="STRANGER", called_ae=agent.ae_title)
        assert agent.stop() == 0
        agent.log.seek(0)
        lines = [
            line
            for line in agent.log.read().decode().splitlines()
            if line and not line.startswith("--- ")  # the harness's own marker
        ]
    assert lines, "the agent logged nothing"
    assert all(re.match(r"<[2-7]>", line) for line in lines), lines
    assert not any(TIMESTAMP.search(line[:40]) for line in lines), lines
    assert any(line.startswith("<6>INFO agent.daemon: listening as") for line in lines)
    assert any(line.startswith("<4>") for line in lines), lines


def test_log_lines_elsewhere_keep_their_timestamp(tmp_data_dir: Path) -> None:
    # JOURNAL_STREAM inherited by a process whose stderr went elsewhere (a redirect).
    with Agent(tmp_data_dir, env={"JOURNAL_STREAM": "1:1"}) as agent:
        assert agent.stop() == 0
        agent.log.seek(0)
        started = [
            line for line in agent.log.read().decode().splitlines() if "listening as" in line
        ]
    assert started and TIMESTAMP.match(started[0]) and not started[0].startswith("<")
