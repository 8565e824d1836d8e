"""systemd integration: sd_notify over its datagram socket, and log lines as journald reads them.

A few lines of our own rather than systemd-python, which needs the C headers to build.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TextIO

logger = logging.getLogger(__name__)

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
