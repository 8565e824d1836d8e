"""Whether the cloud answers, asked at start-up and every minute even when nothing is queued.

An OPTIONS on the tus endpoint (its `Tus-Version`, `Tus-Extension` and `Tus-Max-Size` are kept)
and, with `cloud.dicomweb_url`, a QIDO-RS search for one study. The probe runs in a thread of its
own and never holds anything up: an unreachable cloud is only shown (`/status`, `dirigo_cloud_up`),
since storing and forwarding later is the agent's job. A change of reachability is logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.cloud import CloudError, CloudHttp, TusClient
from agent.config import redact_url
from agent.dicomweb import DicomWeb

logger = logging.getLogger(__name__)

EVERY = 60.0
"""Seconds between two probes."""


@dataclass(frozen=True)
class Reach:
    """What one probe found."""

    up: bool
    checked_at: float
    seconds: float
    """How long the probe took."""
    error: str | None
    tus: dict[str, Any] | None
    """The tus endpoint's version, extensions and maximum size; None if not asked or failed."""
    dicomweb: bool | None
    """Whether QIDO-RS answered; None without `cloud.dicomweb_url`."""

    def document(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.checked_at)),
            "probe_seconds": round(self.seconds, 3),
            "error": self.error,
            "tus": self.tus,
            "dicomweb": self.dicomweb,
        }


class CloudProbe:
    """Probes the cloud every `every` seconds on a thread of its own; `latest` is the last
    result (None before the first one ends)."""

    def __init__(
        self,
        http: CloudHttp,
        upload_url: str,
        dicomweb: DicomWeb | None,
        every: float = EVERY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.http = http
        self.upload_url = upload_url
        self.dicomweb = dicomweb
        self.every = every
        self.clock = clock
        self.latest: Reach | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloud-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop probing; a probe in flight ends within `cloud.timeout` on its own."""
        self._stop.set()
        if self._thread.ident is not None:  # never started: a start that failed first
            self._thread.join(timeout)
        if not self._thread.is_alive():  # else the daemon thread ends with the process
            self.http.session.close()
            if self.dicomweb is not None:
                self.dicomweb.close()

    def probe(self) -> Reach:
        """Ask the cloud once; return (and keep) what it answered."""
        started = time.monotonic()
        tus: dict[str, Any] | None = None
        dicomweb: bool | None = None
        error = None
        try:
            if self.upload_url:
                # a fresh client: TusClient remembers capabilities, a probe must ask again
                found = TusClient(self.http, self.upload_url).capabilities()
                tus = {
                    "versions": list(found.versions),
                    "extensions": sorted(found.extensions),
                    "max_size": found.max_size,
                }
            if self.dicomweb is not None:
                dicomweb = False
                self.dicomweb.search("studies", [], 0, 1)
                dicomweb = True
        except CloudError as exc:
            error = str(exc)
        reach = Reach(error is None, self.clock(), time.monotonic() - started, error, tus, dicomweb)
        self._log_change(self.latest, reach)
        self.latest = reach
        return reach

    def _run(self) -> None:
        while not self._stop.is_set():
            self.probe()
            self._stop.wait(self.every)

    def _log_change(self, before: Reach | None, now: Reach) -> None:
        where = redact_url(self.upload_url) if self.upload_url else "the DICOMweb archive"
        if not now.up and (before is None or before.up):
            logger.warning(
                "cloud unreachable (%s); studies are kept and sent once it answers", now.error
            )
        elif now.up and (before is None or not before.up):
            logger.info("cloud reachable at %s (probe took %.2fs)", where, now.seconds)
