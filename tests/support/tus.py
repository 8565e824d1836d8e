"""The official tus 1.0 server (devcloud/tus) on a free loopback port, standing in for the cloud.

`TusServer` runs `node devcloud/tus/server.mjs`, which is `@tus/server` with
`@tus/file-store` as the tus project publishes them, so Dirigo's uploader is
tested against the reference implementation of the protocol rather than
against a fake written from our own reading of it.

FileStore keeps each upload in the storage directory as a data file named by
the upload id, beside a JSON sidecar `<id>.json` with the id, the declared
size (absent while the length is deferred), the metadata (already decoded from
the base64 of `Upload-Metadata`; `null` for a key sent without a value) and the
creation date. The sidecar's `offset` is written once, as 0, and never updated:
the real offset is the data file's length, which is what the server reports
and what `uploads()` reads. A server restarted on the same directory therefore
resumes every upload where the previous one stopped.

Node.js and devcloud/tus's packages come from scripts/setup; when they are
missing the test fails and says so, it is never skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import requests

from tests.support.net import LOOPBACK, PeerExited, free_port, wait_until
from tests.support.process import stop_process, stopped_on_failure, tail

SETUP_HINT = "run scripts/setup to install Node.js and devcloud/tus's npm packages"
SERVER_DIR = Path(__file__).resolve().parents[2] / "devcloud" / "tus"
SERVER_SCRIPT = SERVER_DIR / "server.mjs"
_REQUIRED_PACKAGES = ("@tus/server", "@tus/file-store")


class TusServerMissing(RuntimeError):
    """Node.js or devcloud/tus's installed packages are missing."""


PROJECT_NODE = SERVER_DIR.parent / "node" / "node_modules" / ".bin" / "node"
"""The Node.js scripts/setup installs from the npm registry when the system's is too old for the
tus server (Debian 12's is 18)."""


def node_binary() -> str:
    """Return the node executable's path: `DIRIGO_NODE`, else the project's own (PROJECT_NODE)
    if setup installed one, else the system's; raise TusServerMissing if there is none."""
    if override := os.environ.get("DIRIGO_NODE"):
        return override
    if os.access(PROJECT_NODE, os.X_OK):
        return str(PROJECT_NODE)
    found = shutil.which("node")
    if found is None:
        raise TusServerMissing(f"node not found ({SETUP_HINT})")
    return found


def check_installed() -> str:
    """Return node's path once node and devcloud/tus's packages are found to be installed."""
    node = node_binary()
    for package in _REQUIRED_PACKAGES:
        if not (SERVER_DIR / "node_modules" / package / "package.json").is_file():
            raise TusServerMissing(f"devcloud/tus/node_modules/{package} missing ({SETUP_HINT})")
    return node


@dataclass(frozen=True)
class StoredUpload:
    """One upload as FileStore keeps it on disk.

    `size` is None while the upload's length is deferred; `offset` is how many
    bytes the data file at `data_path` holds; `metadata` has the decoded
    values, with "" for a key sent without a value.
    """

    id: str
    size: int | None
    offset: int
    metadata: dict[str, str]
    data_path: Path

    @property
    def complete(self) -> bool:
        """Return True once every declared byte is stored."""
        return self.size is not None and self.offset == self.size

    def data(self) -> bytes:
        """Return the bytes stored so far."""
        return self.data_path.read_bytes()


class TusServer:
    """One tus server process on a free loopback port, storing uploads in `directory`.

    The port (a free one unless given) and directory stay the same across
    `restart()` and a `start()` after `kill()`, so a client holding an upload
    URL can resume against the new process. Its output goes to `log_path` (by
    default beside the directory, `<directory>.log`), appended across restarts.
    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        path: str = "/files",
        max_size: int | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 30.0,
        port: int | None = None,
    ) -> None:
        self._node = check_installed()
        self._directory = Path(directory)
        self._route = "/" + path.strip("/")
        self._port = port or free_port()
        self.max_size = max_size
        self.log_path = log_path or self._directory.with_name(f"{self._directory.name}.log")
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def port(self) -> int:
        """Return the loopback TCP port the server listens on."""
        return self._port

    @property
    def directory(self) -> Path:
        """Return the directory where FileStore keeps the uploads."""
        return self._directory

    @property
    def base_url(self) -> str:
        """Return the server's root, e.g. http://127.0.0.1:PORT."""
        return f"http://{LOOPBACK}:{self._port}"

    @property
    def url(self) -> str:
        """Return the creation endpoint, e.g. http://127.0.0.1:PORT/files/."""
        return f"{self.base_url}{self._route}/"

    @property
    def pid(self) -> int:
        """Return the running server's process id."""
        if self._proc is None:
            raise RuntimeError("tus server is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Return True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> TusServer:
        """Start the server and return once `GET /healthz` answers "ok".

        Raise PeerExited if it exits during start-up and TimeoutError if it
        does not answer within `startup_timeout` seconds (stopping it first);
        both carry the end of its log.
        """
        if self._proc is not None:
            raise RuntimeError("tus server already started")
        node = check_installed()
        args = [node, str(SERVER_SCRIPT), "--host", LOOPBACK, "--port", str(self._port)]
        args += ["--dir", str(self._directory), "--path", self._route]
        if self.max_size is not None:
            args += ["--max-size", str(self.max_size)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a+b")
        self._proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=SERVER_DIR,
        )
        with stopped_on_failure("the tus server", self.stop, self.log_tail):
            wait_until(self._answers_health, self.startup_timeout, 0.05, "tus server GET /healthz")
        return self

    def _answers_health(self) -> bool:
        assert self._proc is not None and self._log is not None
        if self._proc.poll() is not None:
            raise PeerExited(f"tus server exited with {self._proc.returncode}:\n{tail(self._log)}")
        response = requests.get(f"{self.base_url}/healthz", timeout=2)
        return response.status_code == 200 and response.text.strip() == "ok"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `timeout` s); keep its directory."""
        if self._proc is not None:
            stop_process(self._proc, timeout)
            self._proc = None
        self._close_log()

    def kill(self, timeout: float = 10.0) -> None:
        """Kill the server at once (SIGKILL), as a crash would; keep its directory."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout)
            self._proc = None
        self._close_log()

    def restart(self) -> TusServer:
        """Stop the server and start a new one on the same port and directory."""
        self.stop()
        return self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, limit: int = 4000) -> str:
        """Return the end of the server's log (for assertion messages)."""
        return self.log_path.read_text(errors="replace")[-limit:] if self.log_path.exists() else ""

    def uploads(self) -> list[StoredUpload]:
        """Return the uploads FileStore holds in the directory, oldest first.

        A sidecar whose data file is gone is left out, as the server itself
        answers 410 for it.
        """
        found: list[tuple[str, StoredUpload]] = []
        if not self._directory.is_dir():
            return []
        for sidecar in self._directory.glob("*.json"):
            info = _read_sidecar(sidecar)
            data_path = self._directory / str(info["id"])
            try:
                offset = data_path.stat().st_size
            except FileNotFoundError:
                continue
            size = info.get("size")
            metadata = {
                str(k): "" if v is None else str(v) for k, v in (info.get("metadata") or {}).items()
            }
            upload = StoredUpload(
                id=str(info["id"]),
                size=None if size is None else int(size),
                offset=offset,
                metadata=metadata,
                data_path=data_path,
            )
            found.append((str(info.get("creation_date", "")), upload))
        found.sort(key=lambda item: (item[0], item[1].id))
        return [upload for _, upload in found]

    def __enter__(self) -> TusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"tus sidecar {path} is not JSON: {exc}") from None
    if not isinstance(info, dict) or "id" not in info:
        raise ValueError(f"tus sidecar {path} has no upload id: {info!r}")
    if info["id"] != path.stem:
        raise ValueError(f"tus sidecar {path} names upload {info['id']!r}")
    return info
