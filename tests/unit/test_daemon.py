"""The supervisor loop: transient housekeeping failures are logged, not fatal."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.daemon import Daemon
from agent.store import StoreError


def test_a_failing_housekeeping_tick_is_logged_and_the_loop_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = parse_config(
        {"site": "t", "data_dir": str(tmp_path), "cloud": {"upload_url": "http://127.0.0.1:9/"}}
    )
    daemon = Daemon(settings)
    ticks: list[float] = []

    def housekeeping(now: float) -> None:
        ticks.append(now)
        if len(ticks) == 1:
            raise StoreError("database is locked")
        daemon._stopping = True

    monkeypatch.setattr(daemon, "start", lambda: None)
    monkeypatch.setattr(daemon, "stop", lambda: None)
    monkeypatch.setattr(daemon, "housekeeping", housekeeping)
    monkeypatch.setattr("agent.daemon.TICK", 0.0)
    with caplog.at_level(logging.ERROR, logger="agent.daemon"):
        daemon.run()
    assert len(ticks) == 2
    assert "housekeeping failed, will retry: database is locked" in caplog.text
