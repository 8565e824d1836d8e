"""systemd's side: log lines as journald reads them."""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path

import pytest

from agent.systemd import JournalFormatter, journal_stream, priority


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
