"""A real rsyslog as the audit record repository: `rsyslogd -n` with a configuration of its
own in a test's directory, listening on a free loopback port (TCP, or TLS with rsyslog's gtls
driver), writing each record it receives, as it parsed it, to a file there."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.net import LOOPBACK, PeerExited, free_port, wait_until
from tests.support.process import stop_process, tail

SEPARATOR = " |#| "
"""Between the fields rsyslog writes for each record (none of them holds it)."""
FIELDS: tuple[str, ...] = ("pri", "protocol-version", "timereported:::date-rfc3339")
FIELDS += ("hostname", "app-name", "procid", "msgid", "structured-data", "msg")


class RsyslogMissing(RuntimeError):
    """rsyslogd (or its gtls module) is not installed: run scripts/setup."""


@dataclass(frozen=True)
class Record:
    """One syslog record as rsyslog parsed it (RFC 5424 fields)."""

    pri: int
    version: str
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: str


@dataclass(frozen=True)
class Tls:
    """The server side of TLS: its certificate chain and key (PEM files)."""

    cert: Path
    key: Path
    ca: Path


class Rsyslog:
    """One rsyslogd in the foreground; `records()` reads what it wrote so far."""

    def __init__(self, directory: Path, tls: Tls | None = None, port: int | None = None) -> None:
        binary = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        if not Path(binary).exists():
            raise RsyslogMissing("rsyslogd is not installed: run scripts/setup")
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.out = directory / "received.log"
        self.config = directory / "rsyslog.conf"
        (directory / "work").mkdir(parents=True, exist_ok=True)
        self.config.write_text(_config(directory, self.port, self.out, tls))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)

    def start(self) -> Rsyslog:
        self.proc = subprocess.Popen(
            [self.binary, "-n", "-f", str(self.config), "-i", str(self.directory / "pid")],
            stdout=self.log,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
        )
        wait_until(self._listening, 15, what=f"rsyslogd listening on {self.port}")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise PeerExited(f"rsyslogd exited: {tail(self.log)}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((LOOPBACK, self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        self.log.close()

    def output(self) -> str:
        return tail(self.log)

    def records(self) -> list[Record]:
        """Return every record received so far, in order."""
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split(SEPARATOR, len(FIELDS) - 1)
            if len(parts) == len(FIELDS):
                pri, *rest = parts
                found.append(Record(int(pri), *rest))
        return found

    def __enter__(self) -> Rsyslog:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _config(directory: Path, port: int, out: Path, tls: Tls | None) -> str:
    """Return an rsyslog configuration that reads TCP (or TLS) on `port` and writes each
    record's RFC 5424 fields to `out`; nothing of the system's (no /dev/log, no /var/log)."""
    template = SEPARATOR.join(f"%{field}%" for field in FIELDS)
    driver = ""
    if tls is not None:
        driver = (
            f' defaultNetstreamDriver="gtls" defaultNetstreamDriverCAFile="{tls.ca}"'
            f' defaultNetstreamDriverCertFile="{tls.cert}"'
            f' defaultNetstreamDriverKeyFile="{tls.key}"'
        )
    stream = ' StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon"'
    return f"""
global(workDirectory="{directory / "work"}" maxMessageSize="64k"{driver})
module(load="imtcp"{stream if tls is not None else ""})
input(type="imtcp" address="{LOOPBACK}" port="{port}")
template(name="fields" type="string" string="{template}\\n")
*.* action(type="omfile" file="{out}" template="fields")
"""
