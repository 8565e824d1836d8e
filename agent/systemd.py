"""systemd integration: sd_notify over its datagram socket, the watchdog fed only while the agent
is healthy, a one-line `STATUS=` summary, and log lines as journald reads them.

A few lines of our own rather than systemd-python, which needs the C headers to build. systemd
restarts the agent when the watchdog pings stop (`WatchdogSec=` in the unit): the pinging thread
asks the same liveness check `/healthz` answers with, so a hung upload worker or a stuck
supervisor stops the pings, not only a dead process.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from agent.liveness import Health

logger = logging.getLogger(__name__)

STATUS_EVERY = 10.0
"""Seconds between `STATUS=` updates when the watchdog asks for none more often."""

PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
"""syslog priority of a log level (at least as severe); anything below INFO is debug (7)."""


def notify(message: str) -> bool:
    """Send `message` to systemd's notify socket; return True if sent. Without NOTIFY_SOCKET
    (not started by systemd as Type=notify) do nothing and return False."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            logger.warning("could not notify systemd: %s", exc)
            return False
    return True


def watchdog_interval() -> float | None:
    """Return the seconds between watchdog pings systemd expects (half its `WatchdogSec=`, as
    sd_watchdog_enabled advises), or None when it expects none: no WATCHDOG_USEC, or a
    WATCHDOG_PID naming another process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds / 2 if seconds > 0 else None


class Watchdog:
    """A thread that pings systemd's watchdog while `check()` finds every part healthy, and
    sends a `STATUS=` line from `summary()` on the same beat.

    `check` is the liveness check `/healthz` answers with. The thread does nothing else, so it
    stalls only if the check does: then the pings stop too, and systemd restarts the agent, as
    it should.
    """

    def __init__(
        self,
        check: Callable[[], Health],
        summary: Callable[[], str],
        interval: float | None,
    ) -> None:
        self.check = check
        self.summary = summary
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._healthy = True

    @property
    def period(self) -> float:
        """Seconds between beats: the watchdog's interval, or STATUS_EVERY without one."""
        return min(self.interval, STATUS_EVERY) if self.interval else STATUS_EVERY

    def start(self) -> None:
        """Beat now, then every `period` seconds on a thread of its own until `stop()`."""
        self._thread = threading.Thread(target=self._loop, name="systemd-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """Ping the watchdog if healthy (log once when that changes); send the status line."""
        health = self.check()
        if health.healthy != self._healthy:
            self._healthy = health.healthy
            if health.healthy:
                logger.info("healthy again: feeding the systemd watchdog")
            else:
                logger.error("%s: the systemd watchdog is no longer fed", health.summary())
        if health.healthy and self.interval:
            notify("WATCHDOG=1")
        try:
            line = self.summary()
        except Exception as exc:
            # The summary reads the store; a store that fails shows in the status line, and
            # the watchdog (fed or not above) still follows the liveness check alone.
            line = f"status unavailable: {exc}"
        if health.failing:
            line = f"{health.summary()}; {line}"
        notify(f"STATUS={' '.join(line.split())}")  # one line, whatever the parts say

    def _loop(self) -> None:
        while True:
            self.beat()
            if self._stop.wait(self.period):
                return

    def stop(self) -> None:
        """Stop beating; return once the thread has ended."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def status_line(status: dict[str, Any]) -> str:
    """Return the `/status` document as the one line `systemctl status` shows: what waits,
    what fails, the disk, and whether the cloud answers and the PACS may send."""
    studies = status["studies"]
    waiting = studies.get("open", 0) + studies.get("stable", 0)
    pieces = [
        f"{waiting} studies waiting, {studies.get('uploading', 0)} uploading,"
        f" {len(status['failed'])} failed jobs",
        f"disk {status['disk']['used_percent']}% used",
    ]
    cloud = status.get("cloud")
    up = cloud.get("up") if isinstance(cloud, dict) else None  # None: not asked yet
    if up is not None:
        pieces.append("cloud up" if up else "cloud UNREACHABLE")
    readiness = status.get("readiness")
    if isinstance(readiness, dict) and not readiness.get("ready", True):
        failing = [name for name, check in readiness["checks"].items() if not check["ok"]]
        pieces.append(f"NOT READY ({', '.join(failing)})")
    return "; ".join(pieces)


def journal_stream(stream: TextIO = sys.stderr) -> bool:
    """Return True if `stream` is connected to journald: JOURNAL_STREAM names its device and
    inode (systemd sets it for the service's stdout/stderr; a redirection clears the match)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """Log lines as journald reads them from a stream: each line starts with the record's
    syslog priority (`<3>` error … `<7>` debug) and carries no timestamp (journald adds its own).
    Every line of a multi-line record (a traceback) gets the prefix, so none is logged as info."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def priority(level: int) -> int:
    """Return the syslog priority of a logging level."""
    for at_least, value in PRIORITIES:
        if level >= at_least:
            return value
    return 7
