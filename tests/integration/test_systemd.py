"""The agent under systemd, with systemd's side played by the test: the journald stream
(priority prefixes, no timestamp of our own)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.support import dcmtk
from tests.support.agent import Agent

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


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
