"""systemd's side: watchdog intervals from the environment, the watchdog fed only while healthy,
the one-line status, and log lines as journald reads them."""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path

import pytest

from agent.liveness import Liveness
from agent.systemd import (
    JournalFormatter,
    Watchdog,
    journal_stream,
    priority,
    status_line,
    watchdog_interval,
)


def record(level: int, message: str, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("broken")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("agent.upload", level, __file__, 1, message, None, info)


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (5, 7),
    ],
)
def test_each_log_level_has_its_syslog_priority(level: int, expected: int) -> None:
    assert priority(level) == expected


def test_a_journal_line_starts_with_its_priority_and_has_no_timestamp() -> None:
    line = JournalFormatter().format(record(logging.WARNING, "upload slow"))
    assert line == "<4>WARNING agent.upload: upload slow"


def test_every_line_of_a_traceback_carries_the_priority() -> None:
    text = JournalFormatter().format(record(logging.ERROR, "worker died", exc=True))
    lines = text.splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: broken"


def test_journal_stream_matches_only_the_stream_journald_gave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal_stream(a)
        assert not journal_stream(b)  # stderr redirected elsewhere: plain lines
        assert not journal_stream(io.StringIO())
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not journal_stream(a)


def test_the_watchdog_interval_is_half_of_what_systemd_asks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("", "0", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert watchdog_interval() is None


def test_the_watchdog_is_fed_only_while_every_part_is_healthy(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[str] = []
    monkeypatch.setattr("agent.systemd.notify", lambda message: sent.append(message) or True)
    now = [0.0]
    liveness = Liveness(clock=lambda: now[0])
    liveness.watch("upload-1", 300.0)
    watchdog = Watchdog(liveness.check, lambda: "3 studies\nwaiting", 5.0)
    watchdog.beat()
    assert sent == ["WATCHDOG=1", "STATUS=3 studies waiting"]
    sent.clear()
    now[0] = 400.0  # upload-1 silent past its deadline: hung
    with caplog.at_level(logging.ERROR, logger="agent.systemd"):
        watchdog.beat()
        watchdog.beat()
    assert len(sent) == 2
    assert all(m.startswith("STATUS=unhealthy: upload-1 made no progress for 400s") for m in sent)
    assert all(m.endswith("; 3 studies waiting") for m in sent)
    assert caplog.text.count("no longer fed") == 1  # once per change, not once per beat
    sent.clear()
    liveness.beat("upload-1")
    watchdog.beat()
    assert sent[0] == "WATCHDOG=1"


def test_without_a_watchdog_only_the_status_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr("agent.systemd.notify", lambda message: sent.append(message) or True)
    watchdog = Watchdog(Liveness().check, lambda: "idle", None)
    watchdog.beat()
    assert sent == ["STATUS=idle"]
    assert watchdog.period == 10.0


def test_a_failing_summary_still_leaves_the_watchdog_to_liveness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[str] = []
    monkeypatch.setattr("agent.systemd.notify", lambda message: sent.append(message) or True)

    def summary() -> str:
        raise OSError("database is locked")

    Watchdog(Liveness().check, summary, 5.0).beat()
    assert sent == ["WATCHDOG=1", "STATUS=status unavailable: database is locked"]


def test_the_status_line_says_what_waits_fails_and_whether_the_cloud_answers() -> None:
    status = {
        "studies": {"open": 2, "stable": 1, "uploading": 1, "sent": 5},
        "failed": [{"id": 3}],
        "disk": {"used_percent": 41.5},
        "cloud": {"up": False},
        "readiness": {"ready": False, "checks": {"disk": {"ok": False}, "store": {"ok": True}}},
    }
    assert status_line(status) == (
        "3 studies waiting, 1 uploading, 1 failed jobs; disk 41.5% used; cloud UNREACHABLE;"
        " NOT READY (disk)"
    )
    status.update(cloud={"up": None}, readiness={"ready": True, "checks": {}})  # not asked yet
    assert status_line(status) == "3 studies waiting, 1 uploading, 1 failed jobs; disk 41.5% used"
