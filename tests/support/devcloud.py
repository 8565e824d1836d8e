"""The development cloud: the state's side of the exchange on loopback, every server real.

`DevCloud` starts, in a working directory of its own:

- the official tus server (`TusServer`, devcloud/tus): the upload endpoint Dirigo sends
  bundles to (`upload_url`), keeping them in `store_dir`;
- an Orthanc with its DICOMweb plugin (`Orthanc`): the state archive (`orthanc_url` for its
  REST API, `dicomweb_url` for QIDO-RS/WADO-RS/STOW-RS);
- devcloud/ingest.py, as a subprocess: it checks each finished upload (sha256, manifest, every
  instance) and stores its instances in the archive. Its log is `ingest.log`.
- devcloud/heartbeat.py, as a subprocess: the state monitoring's heartbeat receiver
  (`heartbeat_url(site)` is a site's `cloud.heartbeat_url`, `heartbeats()` what it received).

The ingest's state lives in the archive's own directory, so the two share a lifetime: a new
archive on an existing upload store ingests every upload in it again.

As a command, it runs the whole dev cloud in the foreground until Ctrl-C (see
`scripts/devcloud`):

    python -m tests.support.devcloud [--dir DIR] [--tus-port N] [--http-port N] [--dicom-port N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import requests

from tests.support.net import PeerExited, wait_until
from tests.support.orthanc import Orthanc
from tests.support.process import stop_process, stopped_on_failure
from tests.support.tus import TusServer

REPO = Path(__file__).resolve().parents[2]
INGEST_SCRIPT = REPO / "devcloud" / "ingest.py"
HEARTBEAT_SCRIPT = REPO / "devcloud" / "heartbeat.py"


class DevCloud:
    """The tus server, an Orthanc archive with DICOMweb, and the ingest between them.

    Use as a context manager, or call `start()` and `stop()`; `stop()` deletes the archive
    and keeps the uploads in `store_dir`. Ports are free loopback ports unless given.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        archive_aet: str = "DEVCLOUD",
        poll_interval: float = 0.2,
        tus_port: int | None = None,
        http_port: int | None = None,
        dicom_port: int | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.store_dir = self.work_dir / "uploads"
        self.tus = TusServer(self.store_dir, log_path=self.work_dir / "tus.log", port=tus_port)
        self.archive = Orthanc(
            archive_aet, dicomweb=True, http_port=http_port, dicom_port=dicom_port
        )
        self.state_dir = self.archive.work_dir / "ingest"
        self.ingest_log_path = self.work_dir / "ingest.log"
        self.poll_interval = poll_interval
        self.startup_timeout = startup_timeout
        self.session = requests.Session()
        self.session.headers["Accept-Encoding"] = "identity"
        self._ingest: subprocess.Popen[bytes] | None = None
        self._ingest_log: IO[bytes] | None = None
        self._log_start = 0
        self.heartbeat = HeartbeatReceiver(self.work_dir / "heartbeat.log", startup_timeout)

    @property
    def upload_url(self) -> str:
        """Return the tus creation endpoint (Dirigo's `cloud.upload_url`)."""
        return self.tus.url

    @property
    def dicomweb_url(self) -> str:
        """Return the archive's DICOMweb root (Dirigo's `cloud.dicomweb_url`)."""
        return self.archive.dicomweb_url

    @property
    def orthanc_url(self) -> str:
        """Return the archive's REST root."""
        return self.archive.http_url

    @property
    def monitor_url(self) -> str:
        """Return the heartbeat receiver's page (every site's last heartbeat)."""
        return self.heartbeat.url

    def heartbeat_url(self, check: str) -> str:
        """Return the heartbeat URL of one check (a site's `cloud.heartbeat_url`)."""
        return f"{self.heartbeat.url}ping/{check}"

    def heartbeats(self) -> dict[str, dict[str, Any]]:
        """Return the last heartbeat of every check, as the receiver's `/checks` shows it."""
        return self.heartbeat.checks()

    def start(self) -> DevCloud:
        """Start the tus server, the archive, the ingest and the heartbeat receiver; return
        once each is ready.

        Raise PeerExited or TimeoutError (with the peer's log) if one is not, having
        stopped the others.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.tus.start()
            self.archive.start()
            self.start_ingest()
            self.heartbeat.start()
        except BaseException:
            self.stop()
            raise
        return self

    def ingest_command(self, *extra: str) -> list[str]:
        """Return the command line that runs the ingest against this cloud."""
        return [
            sys.executable,
            str(INGEST_SCRIPT),
            "--store",
            str(self.store_dir),
            "--orthanc",
            self.orthanc_url,
            "--state",
            str(self.state_dir),
            "--interval",
            str(self.poll_interval),
            *extra,
        ]

    def start_ingest(self) -> None:
        """Start the ingest process; return once it watches the store."""
        if self._ingest is not None:
            raise RuntimeError("the ingest is already running")
        self._ingest_log = self.ingest_log_path.open("a+b")
        self._ingest_log.seek(0, 2)
        self._log_start = self._ingest_log.tell()
        self._ingest = subprocess.Popen(
            self.ingest_command(),
            stdout=self._ingest_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
        with stopped_on_failure("the ingest", self.stop_ingest, self.ingest_log):
            wait_until(self._ingest_watches, self.startup_timeout, 0.05, "the ingest watching")

    def _ingest_watches(self) -> bool:
        assert self._ingest is not None
        if self._ingest.poll() is not None:
            code = self._ingest.returncode
            raise PeerExited(f"the ingest exited with {code}:\n{self.ingest_log()}")
        return " watching " in self.ingest_log()

    @property
    def ingest_pid(self) -> int:
        """Return the running ingest's process id."""
        if self._ingest is None:
            raise RuntimeError("the ingest is not running")
        return self._ingest.pid

    @property
    def ingest_running(self) -> bool:
        """Return True while the ingest process is alive."""
        return self._ingest is not None and self._ingest.poll() is None

    def stop_ingest(self, timeout: float = 10.0) -> int | None:
        """Stop the ingest (SIGTERM, then SIGKILL); return its exit code (None if not running).

        Its log stays readable with `ingest_log()` until the next `start_ingest()`.
        """
        code = None
        if self._ingest is not None:
            code = stop_process(self._ingest, timeout)
            self._ingest = None
        if self._ingest_log is not None:
            self._ingest_log.close()
            self._ingest_log = None
        return code

    def ingest_log(self) -> str:
        """Return what the ingest started last has logged so far."""
        if not self.ingest_log_path.exists():
            return ""
        with self.ingest_log_path.open("rb") as log:
            log.seek(self._log_start)
            return log.read().decode("utf-8", "replace")

    def settled(self) -> dict[str, dict[str, Any]]:
        """Return the ingest's record of settled uploads by upload id (table `uploads`)."""
        database = self.state_dir / "ingest.db"
        if not database.exists():
            return {}
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            return {row["id"]: dict(row) for row in db.execute("SELECT * FROM uploads")}
        finally:
            db.close()

    def rejection_note(self, upload_id: str) -> dict[str, Any] | None:
        """Return the ingest's note on a rejected upload, or None if there is none."""
        note = self.state_dir / "rejected" / f"{upload_id}.json"
        return json.loads(note.read_text()) if note.exists() else None

    def wait_until_settled(self, upload_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the ingest has ingested or rejected an upload; return its record."""
        with self._log_on_timeout():
            found = wait_until(
                lambda: self.settled().get(upload_id),
                timeout,
                0.05,
                f"upload {upload_id} ingested or rejected",
            )
        assert isinstance(found, dict)
        return found

    @contextlib.contextmanager
    def _log_on_timeout(self) -> Iterator[None]:
        try:
            yield
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; the ingest's log:\n{self.ingest_log()[-4000:]}") from None

    def study_instances(self, study_uid: str) -> set[str]:
        """Return the SOP Instance UIDs the archive holds in a study, asked by QIDO-RS."""
        response = self.session.get(
            f"{self.dicomweb_url}/studies/{study_uid}/instances",
            headers={"Accept": "application/dicom+json"},
            timeout=30,
        )
        if response.status_code == 204:
            return set()
        response.raise_for_status()
        return {item["00080018"]["Value"][0] for item in response.json()}

    def wait_for_study(self, study_uid: str, instances: int, timeout: float = 30.0) -> set[str]:
        """Wait until QIDO-RS finds `instances` instances in the study; return their UIDs."""

        def complete() -> set[str] | None:
            uids = self.study_instances(study_uid)
            return uids if len(uids) == instances else None

        with self._log_on_timeout():
            found = wait_until(
                complete, timeout, 0.05, f"{instances} instance(s) of study {study_uid} archived"
            )
        assert isinstance(found, set)
        return found

    def stop(self) -> None:
        """Stop the ingest, the heartbeat receiver, the tus server and the archive (deleting
        the archive)."""
        self.stop_ingest()
        self.heartbeat.stop()
        self.archive.terminate()  # Orthanc takes seconds to stop: meanwhile the rest
        self.tus.stop()
        self.archive.stop()
        self.session.close()

    def __enter__(self) -> DevCloud:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class HeartbeatReceiver:
    """devcloud/heartbeat.py as a subprocess on a port the kernel picks; its log in `log_path`."""

    def __init__(self, log_path: Path, startup_timeout: float = 30.0) -> None:
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def start(self) -> None:
        """Start the receiver; return once it listens (`url` is set)."""
        with self.log_path.open("ab") as log:
            start = log.tell()
            self._proc = subprocess.Popen(
                [sys.executable, str(HEARTBEAT_SCRIPT)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._log_start = start
        with stopped_on_failure("the heartbeat receiver", self.stop, self.log):
            found = wait_until(self._listening, self.startup_timeout, 0.05, "heartbeat receiver")
        self.url = str(found)

    def _listening(self) -> str | None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            code = self._proc.returncode
            raise PeerExited(f"the heartbeat receiver exited with {code}:\n{self.log()}")
        match = re.search(r"listening on (http://\S+)", self.log())
        return match[1] if match else None

    def checks(self) -> dict[str, dict[str, Any]]:
        """Return the last heartbeat of every check, as the receiver's `/checks` shows it."""
        response = requests.get(f"{self.url}checks", timeout=10)
        response.raise_for_status()
        result: dict[str, dict[str, Any]] = response.json()
        return result

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            return log.read().decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, 10.0)
            self._proc = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run Dirigo's development cloud on loopback until Ctrl-C: the tus upload"
        " endpoint, an Orthanc archive with DICOMweb, and the ingest between them."
    )
    parser.add_argument("--dir", type=Path, help="where uploads and logs go (default: a new one)")
    parser.add_argument("--tus-port", type=int, help="the tus server's port (default: free)")
    parser.add_argument("--http-port", type=int, help="the archive's HTTP port (default: free)")
    parser.add_argument("--dicom-port", type=int, help="the archive's DICOM port (default: free)")
    args = parser.parse_args(argv)
    # Ctrl-C, and SIGTERM alike, end the run; even when started with SIGINT ignored (`cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    work_dir = args.dir or Path(tempfile.mkdtemp(prefix="dirigo-devcloud-"))
    print(f"starting the development cloud in {work_dir} ...", flush=True)
    cloud = DevCloud(
        work_dir,
        poll_interval=0.5,
        tus_port=args.tus_port,
        http_port=args.http_port,
        dicom_port=args.dicom_port,
    )
    try:
        cloud.start()
        print(describe(cloud), flush=True)
        return follow(cloud)
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping ...", flush=True)
        cloud.stop()
        print(f"the uploads stay in {cloud.store_dir}; the archive is gone", flush=True)


def describe(cloud: DevCloud) -> str:
    """Return what a person needs to point Dirigo at this cloud and to look into it."""
    archive = cloud.archive
    return f"""
Dirigo's development cloud is running (loopback, no authentication):
  tus upload endpoint   {cloud.upload_url}
  DICOMweb archive      {cloud.dicomweb_url}
  Orthanc REST API      {cloud.orthanc_url}  (Explorer: {cloud.orthanc_url}/app/explorer.html)
  Orthanc DICOM         AE {archive.aet}, port {archive.dicom_port} (every interface)
  uploads               {cloud.store_dir}
  ingest log            {cloud.ingest_log_path}
  heartbeat receiver    {cloud.monitor_url}  (each site's last heartbeat)

In Dirigo's config:
  cloud:
    upload_url: {cloud.upload_url}
    dicomweb_url: {cloud.dicomweb_url}
    heartbeat_url: {cloud.heartbeat_url("SITE")}

Each bundle that arrives is checked and stored in the archive; the ingest's lines follow.
Ctrl-C stops everything.
"""


def follow(cloud: DevCloud) -> int:
    """Print the ingest's log as it grows until a server dies (return 1) or Ctrl-C."""
    with cloud.ingest_log_path.open("rb") as log:
        log.seek(0, 2)
        while True:
            if new := log.read():
                print(new.decode("utf-8", "replace"), end="", flush=True)
            for name, alive in (
                ("the tus server", cloud.tus.running),
                ("the archive (Orthanc)", cloud.archive.running),
                ("the ingest", cloud.ingest_running),
                ("the heartbeat receiver", cloud.heartbeat.running),
            ):
                if not alive:
                    print(f"{name} stopped unexpectedly; see the logs in {cloud.work_dir}")
                    return 1
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
