"""The real `dirigo run` as a subprocess on a free loopback port, for tests and benches."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.support import dcmtk
from tests.support.net import LOOPBACK, PeerExited, free_port, wait_until
from tests.support.process import stop_process, tail


class Agent:
    """One Dirigo agent with its own data_dir and config file; restartable on the same port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        ae_title: str = "DIRIGO",
        peers: tuple[dict[str, Any], ...] = ({"ae_title": "PACS", "host": LOOPBACK},),
        stable_after: str = "1h",
        high_water: str = "90%",
        extra: dict[str, Any] | None = None,
        probe_ae: str = "PACS",
        env: dict[str, str] | None = None,
        launcher: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.program: tuple[str, ...] = (sys.executable, "-m", "agent")
        """The `dirigo` command: this interpreter's agent, unless a test installed one elsewhere."""
        self.launcher = launcher
        """A command `dirigo run` starts under, as `launcher... program run ...`."""
        self.ae_title = ae_title
        self.probe_ae = probe_ae
        self.port = free_port()
        self.config_path = data_dir.parent / f"{data_dir.name}.yaml"
        config: dict[str, Any] = {
            "site": "test-site",
            "data_dir": str(data_dir),
            "dicom": {
                "ae_title": ae_title,
                "bind": LOOPBACK,
                "port": self.port,
                "peers": list(peers),
            },
            "study": {"stable_after": stable_after},
            "spool": {"high_water": high_water},
            "cloud": {"upload_url": "http://127.0.0.1:9/files/"},
            # A free port, not the default 8080: tests run side by side (extra may override).
            "health": {"listen": f"{LOOPBACK}:{free_port()}"},
        }
        for section, values in (extra or {}).items():
            config.setdefault(section, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, **(env or {})}
        """The environment `dirigo run` starts with (the test's own, plus `env`)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)

    def command(self, *args: str) -> list[str]:
        return [*self.program, *args, "--config", str(self.config_path)]

    def start(self, timeout: float = 30.0) -> Agent:
        """Start `dirigo run` and wait until it answers a C-ECHO from `probe_ae`."""
        self.log.write(b"--- start ---\n")
        self.proc = subprocess.Popen(
            [*self.launcher, *self.command("run")],
            stdout=self.log,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        try:
            wait_until(self._answers_echo, timeout, what=f"dirigo on port {self.port} answering")
        except BaseException:
            # `with Agent(...)` never reaches __exit__ when __enter__ raises: stop it here.
            stop_process(self.proc, timeout=10)
            raise
        return self

    def _answers_echo(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise PeerExited(f"dirigo exited with {self.proc.returncode}:\n{self.log_tail()}")
        echo = dcmtk.echoscu(self.port, calling_ae=self.probe_ae, called_ae=self.ae_title)
        return echo.returncode == 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int:
        """SIGTERM (graceful) and wait; return the exit code."""
        assert self.proc is not None
        return stop_process(self.proc, timeout=60)

    def kill9(self) -> None:
        """Kill the agent with SIGKILL: no clean-up of any kind runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def log_tail(self, limit: int = 4000) -> str:
        return tail(self.log, limit)

    def status(self) -> dict[str, Any]:
        """Return `dirigo status --json` as a dict (fails the test if the command fails)."""
        out = subprocess.run(
            self.command("status", "--json"), capture_output=True, text=True, timeout=60, check=True
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Run a read-only query against the agent's database (tests inspect what was committed)."""
        uri = f"file:{self.data_dir / 'dirigo.db'}?mode=ro"
        # closing(): sqlite3's own context manager commits but leaves the connection open,
        # which keeps a tmpfs data_dir busy.
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            return db.execute(sql, params).fetchall()

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout=60)
        self.log.close()
