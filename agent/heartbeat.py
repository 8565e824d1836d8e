"""The heartbeat: the status document POSTed to the state's monitoring endpoint at a steady beat,
following the ping convention of Healthchecks-style monitors: a healthy agent pings the URL
itself, a degraded or unhealthy one the URL with `/fail` appended. A monitor that hears nothing
for a while raises its own alarm, which is how a site that lost power or network shows up.

The heartbeat runs on a thread of its own with an HTTP session of its own (the cloud's trust,
client certificate and token; no bandwidth budget) and a timeout no longer than its beat, so a
monitoring endpoint that hangs delays the next heartbeat, never a C-STORE or an upload.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from agent.cloud import Body, CloudError, CloudHttp, build_session
from agent.config import CloudSettings, redact_url

logger = logging.getLogger(__name__)

HEALTHY = "healthy"
"""The one state pinged as success; any other (`degraded`, `unhealthy`) goes to `/fail`."""


def fail_url(url: str) -> str:
    """Return the Healthchecks-style failure URL of a ping URL: `/fail` appended to its path
    (a query string stays at the end)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/fail"))


class Heartbeat:
    """POST `document()` (the `/status` document) every `every` seconds to `url` while its
    `state` is healthy, else to the `/fail` URL, on a thread of its own. A failure to deliver
    is logged once per change of outcome, never raised: the heartbeat is the monitor's
    business, not the pipeline's."""

    def __init__(
        self,
        url: str,
        every: float,
        http: CloudHttp,
        document: Callable[[], dict[str, Any]],
    ) -> None:
        self.url = url
        self.every = every
        self.http = http
        self.document = document
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outcome: str | None = None

    @classmethod
    def open(
        cls,
        settings: CloudSettings,
        document: Callable[[], dict[str, Any]],
    ) -> Heartbeat | None:
        """Return the heartbeat `cloud.heartbeat_url` asks for, or None without one. Raise
        CloudConfigError if a file the cloud settings name cannot be read."""
        if not settings.heartbeat_url:
            return None
        every = settings.heartbeat_every
        # No answer within one beat is no answer: the next heartbeat is due by then.
        http = CloudHttp(build_session(settings), min(settings.timeout, every))
        return cls(settings.heartbeat_url, every, http, document)

    def start(self) -> None:
        """Beat now and then every `every` seconds until `stop()`, on a thread of its own."""
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> bool:
        """Send one heartbeat; return True if the endpoint accepted it."""
        document = self.document()
        state = document.get("state")
        url = self.url if state == HEALTHY else fail_url(self.url)
        payload = json.dumps(document, separators=(",", ":")).encode()
        try:
            self.http.send(
                "POST",
                url,
                "heartbeat",
                headers={"Content-Type": "application/json"},
                data=cast(Body, payload),  # requests sends bytes as they are
            )
        except CloudError as exc:
            self._log(f"failed: {exc}", logging.WARNING)
            return False
        self._log(f"sent ({state})", logging.INFO)
        return True

    def _log(self, outcome: str, level: int) -> None:
        """Log an outcome only when it differs from the last one (a monitor down for a day
        is one line, not 1440)."""
        if outcome != self._outcome:
            self._outcome = outcome
            logger.log(level, "heartbeat to %s %s", redact_url(self.url), outcome)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:
                # Building the document failed (the store mid-stop, say): this beat is
                # skipped, the next one tries again.
                logger.exception("heartbeat skipped")
            self._stop.wait(self.every)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating; wait up to `timeout` seconds for a heartbeat in flight."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.http.session.close()
