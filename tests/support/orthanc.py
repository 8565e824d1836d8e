"""A real Orthanc server in a temporary directory, as a DICOM peer and DICOMweb archive.

Each `Orthanc` gets its own free HTTP and DICOM ports, storage directory and
SQLite index in a temporary directory, its log in that directory, and the
DICOMweb plugin when installed (Debian: package `orthanc-dicomweb`, plugin
`/usr/share/orthanc/plugins/libOrthancDicomWeb.so`, a link into
`/usr/lib/orthanc/`). Only that plugin is loaded, not the whole plugin folder
that Debian's own configuration names.

Orthanc 1.10 (Debian 12) has no option to bind to an address: its HTTP server
refuses non-loopback clients (`RemoteAccessAllowed: false`), and its DICOM port
listens on every interface, on a random free port, for the life of a test.
Its DICOM layer is DCMTK, so it runs with `TCP_NODELAY=1` too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import requests

from tests.support import dcmtk
from tests.support.net import LOOPBACK, PeerExited, free_port, wait_for_port, wait_until
from tests.support.process import stop_process, stopped_on_failure, tail

SETUP_HINT = "run scripts/setup to install orthanc and orthanc-dicomweb"
_BINARIES = ("/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc", "/usr/local/bin/Orthanc")
_DICOMWEB_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)

Modalities = Mapping[str, Sequence[str | int]]


class OrthancMissing(RuntimeError):
    """Orthanc is not installed."""


def binary() -> str:
    """Return the Orthanc executable's path; raise OrthancMissing if there is none."""
    if override := os.environ.get("DIRIGO_ORTHANC"):
        return override
    found = shutil.which("Orthanc") or next((p for p in _BINARIES if os.access(p, os.X_OK)), None)
    if found is None:
        raise OrthancMissing(f"Orthanc not found ({SETUP_HINT})")
    return found


def dicomweb_plugin() -> str | None:
    """Return the DICOMweb plugin's path, or None if it is not installed."""
    return next((p for p in _DICOMWEB_PLUGINS if os.path.exists(p)), None)


def version() -> str:
    """Return Orthanc's name and version, e.g. 'Orthanc 1.10.1'."""
    out = subprocess.run([binary(), "--version"], capture_output=True, text=True, timeout=10)
    first = out.stdout.split("\n", 1)[0].split()
    return f"Orthanc {first[-1]}" if first else "Orthanc (unknown version)"


class Orthanc:
    """One Orthanc process with its own ports and storage, stopped for sure on exit.

    `modalities` maps a name to [AET, host, port] (Orthanc's `DicomModalities`);
    `extra_config` is merged over the generated configuration last; the ports are free
    ones unless given. Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(
        self,
        aet: str = "ORTHANC",
        modalities: Modalities | None = None,
        *,
        dicomweb: bool = True,
        extra_config: Mapping[str, Any] | None = None,
        startup_timeout: float = 60.0,
        http_port: int | None = None,
        dicom_port: int | None = None,
    ) -> None:
        self.aet = aet
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.http_url = f"http://{LOOPBACK}:{self.http_port}"
        self.startup_timeout = startup_timeout
        self.work_dir = Path(tempfile.mkdtemp(prefix="dirigo-orthanc-"))
        self.log_path = self.work_dir / "orthanc.log"
        self.config_path = self.work_dir / "orthanc.json"
        self.config = self._config(modalities or {}, dicomweb, extra_config or {})
        self.session = requests.Session()
        # Orthanc gzips answers on the fly when asked; DICOM payloads should not be.
        self.session.headers["Accept-Encoding"] = "identity"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _config(
        self, modalities: Modalities, dicomweb: bool, extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Name": f"dirigo-test-{self.aet}",
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {name: list(spec) for name, spec in modalities.items()},
            "StorageCompression": False,
            "SyncStorageArea": True,
            "Plugins": [],
        }
        plugin = dicomweb_plugin() if dicomweb else None
        if dicomweb and plugin is None:
            raise OrthancMissing(f"Orthanc's DICOMweb plugin not found ({SETUP_HINT})")
        if plugin is not None:
            config["Plugins"] = [plugin]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
        config.update(extra)
        return config

    @property
    def dicomweb_url(self) -> str:
        """Return the DICOMweb root, e.g. http://127.0.0.1:PORT/dicom-web."""
        return f"{self.http_url}/dicom-web"

    @property
    def pid(self) -> int:
        """Return the running Orthanc's process id."""
        if self._proc is None:
            raise RuntimeError("Orthanc is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Return True while the Orthanc process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Orthanc:
        """Start Orthanc and return once its REST API and a C-ECHO answer.

        Raise PeerExited if it exits during start-up and TimeoutError if it
        is not ready within `startup_timeout` seconds (stopping it first).
        """
        if self._proc is not None:
            raise RuntimeError("Orthanc already started")
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self._log = self.log_path.open("a+b")  # kept across a kill() and start()
        self._proc = subprocess.Popen(
            [binary(), str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
            cwd=self.work_dir,
        )
        with stopped_on_failure("Orthanc", self.stop, self.log_tail):
            wait_until(self._answers_http, self.startup_timeout, 0.1, "Orthanc GET /system")
            wait_for_port(LOOPBACK, self.dicom_port, self.startup_timeout)
            wait_until(self._answers_echo, self.startup_timeout, 0.1, "Orthanc C-ECHO")
        return self

    def _answers_http(self) -> bool:
        assert self._proc is not None and self._log is not None
        if self._proc.poll() is not None:
            raise PeerExited(f"Orthanc exited with {self._proc.returncode}:\n{tail(self._log)}")
        return self.session.get(f"{self.http_url}/system", timeout=2).ok

    def _answers_echo(self) -> bool:
        return dcmtk.echoscu(self.dicom_port, "ECHO", self.aet, timeout=30).returncode == 0

    def terminate(self) -> None:
        """Ask Orthanc to stop (SIGTERM) without waiting; it takes about 3.5 s.

        Stopping several servers: `terminate()` them all, then `stop()` each.
        """
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def kill(self, timeout: float = 10.0) -> None:
        """Kill Orthanc at once (SIGKILL), as a crash would; keep its directory, so that
        `start()` brings the same archive back on the same ports."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after `timeout` s) and delete its directory."""
        if self._proc is not None:
            stop_process(self._proc, timeout)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.session.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def log_tail(self, limit: int = 4000) -> str:
        """Return the end of Orthanc's log (for assertion messages)."""
        return self.log_path.read_text(errors="replace")[-limit:] if self.log_path.exists() else ""

    def get(self, path: str, **params: str) -> Any:
        """GET a REST path (e.g. '/instances') and return the decoded JSON answer."""
        response = self.session.get(f"{self.http_url}{path}", params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        """POST JSON `body` to a REST path and return the decoded JSON answer."""
        response = self.session.post(f"{self.http_url}{path}", json=body, timeout=300)
        response.raise_for_status()
        return response.json() if response.content else None

    def put_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Add or replace a DICOM modality at run time (for peers started after Orthanc)."""
        response = self.session.put(
            f"{self.http_url}/modalities/{name}",
            json={"AET": aet, "Host": host, "Port": port},
            timeout=30,
        )
        response.raise_for_status()

    def instance_count(self) -> int:
        """Return how many instances Orthanc has stored."""
        return int(self.get("/statistics")["CountInstances"])

    def sop_instance_uids(self) -> set[str]:
        """Return the SOPInstanceUID of every stored instance."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
