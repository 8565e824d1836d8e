"""HTTP mechanism for the state cloud: a tus 1.0 client, QIDO-RS listing, auth, and the one place
where network and HTTP failures are classified as retryable or not.

Our own small tus client on requests rather than tuspy: tuspy keeps offsets in memory and pulls
in aiohttp, while Dirigo must commit every offset to SQLite and validate the server's offset on
resume (it never trusts an offset it did not send). The client speaks core, creation,
termination and, when the server advertises it, checksum (sha256 per PATCH).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from urllib.parse import urljoin

import requests

from agent.config import CloudSettings, redact_url

logger = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
_RETRYABLE_STATUS = frozenset({408, 425, 429, 460, 500, 502, 503, 504})
_GONE_STATUS = frozenset({404, 410})
_READ_BLOCK = 256 * 1024


class CloudError(Exception):
    """A request to the cloud failed. `retryable` says whether trying again later may help;
    `retry_after` is the server's own hint in seconds (429/503), if it gave one."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class UploadGone(CloudError):
    """The server no longer knows the upload (404/410: expired or terminated): start anew."""


class OffsetConflict(CloudError):
    """The server's offset is not the one the PATCH was sent for (409): ask it again (HEAD)."""


class CloudConfigError(Exception):
    """A file the cloud settings name cannot be read (CA bundle, client certificate, token)."""


@dataclass(frozen=True)
class Capabilities:
    """What a tus server said it supports in its OPTIONS answer."""

    versions: tuple[str, ...]
    extensions: frozenset[str]
    checksum_algorithms: frozenset[str]
    max_size: int | None

    @property
    def sha256_checksums(self) -> bool:
        return "checksum" in self.extensions and "sha256" in self.checksum_algorithms


def build_session(settings: CloudSettings) -> requests.Session:
    """Return a requests session with the configured trust, client certificate and token.

    Raise CloudConfigError if a named file cannot be read, so the agent refuses to start
    instead of failing on every upload.
    """
    session = requests.Session()
    session.headers["User-Agent"] = "dirigo-agent"
    # DICOM payloads do not shrink under gzip; some servers compress answers on the fly slowly
    session.headers["Accept-Encoding"] = "identity"
    for name in ("ca_file", "client_cert", "client_key"):
        path = getattr(settings, name)
        if path is not None:
            _readable(path, f"cloud.{name}")
    if settings.ca_file is not None:
        session.verify = str(settings.ca_file)
    if settings.client_cert is not None:
        cert = str(settings.client_cert)
        key = str(settings.client_key) if settings.client_key is not None else None
        session.cert = (cert, key) if key else cert
    if settings.token_file is not None:
        token = _readable(settings.token_file, "cloud.token_file").decode("utf-8", "replace")
        token = token.strip()
        if not token or any(c.isspace() for c in token):
            raise CloudConfigError(f"cloud.token_file {settings.token_file}: not one token")
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def _readable(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CloudConfigError(f"{key} {path}: {exc.strerror or exc}") from None


def encode_metadata(metadata: Mapping[str, str]) -> str:
    """Return tus `Upload-Metadata`: comma-separated `key base64(value)` pairs."""
    pairs = []
    for key, value in metadata.items():
        if not key or not key.isascii() or any(c in key for c in " ,"):
            raise ValueError(f"invalid tus metadata key {key!r}")
        encoded = base64.b64encode(value.encode()).decode("ascii")
        pairs.append(f"{key} {encoded}" if value else key)
    return ",".join(pairs)


class Throttle:
    """A token bucket shared by all uploads: at most `rate` bytes per second in total
    (None: unlimited). Bursts up to a quarter second's worth."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._at = time.monotonic()

    def take(self, amount: int) -> None:
        """Block until `amount` bytes may be sent."""
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            burst = self.rate / 4
            self._tokens = min(burst, self._tokens + (now - self._at) * self.rate) - amount
            self._at = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class _Body:
    """A PATCH body: `data` handed to requests in blocks, each paid for at the throttle."""

    def __init__(self, data: bytes, throttle: Throttle) -> None:
        self._view = memoryview(data)
        self._position = 0
        self._throttle = throttle

    def __len__(self) -> int:
        return len(self._view) - self._position

    def read(self, size: int = -1) -> bytes:
        size = _READ_BLOCK if size is None or size < 0 else min(size, _READ_BLOCK)
        block = self._view[self._position : self._position + size]
        self._position += len(block)
        self._throttle.take(len(block))
        return bytes(block)


class TusClient:
    """One tus endpoint. Thread-safe: each call is one request on the shared session."""

    def __init__(
        self,
        session: requests.Session,
        endpoint: str,
        timeout: float,
        throttle: Throttle | None = None,
    ) -> None:
        self.session = session
        self.endpoint = endpoint
        self.timeout = timeout
        self.throttle = throttle or Throttle(None)
        self._capabilities: Capabilities | None = None

    def capabilities(self) -> Capabilities:
        """Return (and remember) what the server supports, from an OPTIONS request."""
        if self._capabilities is None:
            response = self._request("OPTIONS", self.endpoint, "ask the server's capabilities")
            headers = response.headers
            self._capabilities = Capabilities(
                versions=_split(headers.get("Tus-Version", "")),
                extensions=frozenset(_split(headers.get("Tus-Extension", ""))),
                checksum_algorithms=frozenset(
                    a.lower() for a in _split(headers.get("Tus-Checksum-Algorithm", ""))
                ),
                max_size=_int_or_none(headers.get("Tus-Max-Size")),
            )
            if TUS_VERSION not in self._capabilities.versions:
                versions = ", ".join(self._capabilities.versions) or "none"
                raise CloudError(
                    f"{redact_url(self.endpoint)} does not speak tus {TUS_VERSION}"
                    f" (Tus-Version: {versions})",
                    retryable=False,
                )
        return self._capabilities

    def create(self, length: int, metadata: Mapping[str, str]) -> str:
        """Create an upload of `length` bytes; return its absolute URL."""
        capabilities = self.capabilities()
        if "creation" not in capabilities.extensions:
            raise CloudError(
                "the tus server does not offer the creation extension", retryable=False
            )
        if capabilities.max_size is not None and length > capabilities.max_size:
            raise CloudError(
                f"bundle of {length} bytes exceeds the server's Tus-Max-Size"
                f" {capabilities.max_size}",
                retryable=False,
            )
        headers = {"Upload-Length": str(length), "Upload-Metadata": encode_metadata(metadata)}
        response = self._request("POST", self.endpoint, "create an upload", headers=headers)
        location = response.headers.get("Location")
        if not location:
            raise CloudError(
                "the tus server created an upload but gave no Location", retryable=True
            )
        return urljoin(self.endpoint, location)

    def offset(self, url: str) -> tuple[int, int | None]:
        """Return the server's (offset, length) of an upload. Raise UploadGone if it is gone."""
        response = self._request("HEAD", url, "ask an upload's offset")
        offset = _int_or_none(response.headers.get("Upload-Offset"))
        if offset is None or offset < 0:
            raise CloudError(
                "the tus server answered HEAD without a valid Upload-Offset", retryable=True
            )
        return offset, _int_or_none(response.headers.get("Upload-Length"))

    def patch(self, url: str, offset: int, data: bytes) -> int:
        """Send `data` at `offset`; return the server's new offset.

        Carries `Upload-Checksum: sha256 …` when the server supports it, so a chunk damaged in
        transit is refused (460) and sent again rather than stored.
        """
        headers = {
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
        }
        if self.capabilities().sha256_checksums:
            digest = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
            headers["Upload-Checksum"] = f"sha256 {digest}"
        body: bytes | _Body = data if not self.throttle.rate else _Body(data, self.throttle)
        response = self._request("PATCH", url, "send a chunk", headers=headers, data=body)
        new_offset = _int_or_none(response.headers.get("Upload-Offset"))
        if new_offset is None:
            raise CloudError("the tus server answered PATCH without Upload-Offset", retryable=True)
        return new_offset

    def terminate(self, url: str) -> None:
        """Delete an upload on the server (termination extension); gone already is fine."""
        if "termination" not in self.capabilities().extensions:
            return
        with contextlib.suppress(UploadGone):  # already gone is what we wanted
            self._request("DELETE", url, "terminate an upload")

    def _request(
        self,
        method: str,
        url: str,
        action: str,
        headers: Mapping[str, str] | None = None,
        data: bytes | _Body | None = None,
    ) -> requests.Response:
        all_headers = dict(headers or {})
        if method != "OPTIONS":
            all_headers["Tus-Resumable"] = TUS_VERSION
        response = send(self.session, method, url, action, self.timeout, all_headers, data)
        if response.status_code == 409:
            raise OffsetConflict(
                f"cannot {action}: the server's offset differs (409)", retryable=True, status=409
            )
        return response


def send(
    session: requests.Session,
    method: str,
    url: str,
    action: str,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    data: bytes | _Body | None = None,
    params: Mapping[str, str] | None = None,
) -> requests.Response:
    """Make one request; return the response if its status is 2xx (or 409, for tus).

    Raise CloudError, classified: connection failures, timeouts, 5xx, 408, 429 and 460 are
    retryable; 404/410 raise UploadGone; other 4xx (401, 403, 413, …) are not retryable.
    """
    where = redact_url(url)
    try:
        response = session.request(
            method,
            url,
            headers=headers,
            data=data,
            params=params,
            timeout=timeout,
            allow_redirects=method in ("GET", "HEAD", "OPTIONS"),
            # Explicit: requests lets REQUESTS_CA_BUNDLE and friends in the environment
            # override a session's own trust settings, and cloud.ca_file must win.
            verify=session.verify,
            cert=session.cert,
        )
    except requests.exceptions.SSLError as exc:
        raise CloudError(
            f"cannot {action}: TLS failed with {where}: {exc}", retryable=True
        ) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
        raise CloudError(f"cannot {action}: {kind} ({where})", retryable=True) from None
    except requests.exceptions.RequestException as exc:
        raise CloudError(f"cannot {action}: {exc} ({where})", retryable=True) from None
    status = response.status_code
    if 200 <= status < 300 or status == 409:
        return response
    detail = _short(response.text) if method != "HEAD" else ""
    message = f"cannot {action}: HTTP {status} {response.reason or ''}".rstrip()
    message += f" from {where}" + (f": {detail}" if detail else "")
    if status in _GONE_STATUS:
        raise UploadGone(message, retryable=True, status=status)
    retry_after = _retry_after(response.headers.get("Retry-After"))
    retryable = status in _RETRYABLE_STATUS or status >= 500
    raise CloudError(message, retryable=retryable, status=status, retry_after=retry_after)


def qido_instances(
    session: requests.Session, dicomweb_url: str, study_uid: str, timeout: float
) -> set[str]:
    """Return the SOP Instance UIDs the archive lists for a study (QIDO-RS)."""
    url = dicomweb_url.rstrip("/") + f"/studies/{study_uid}/instances"
    response = send(
        session,
        "GET",
        url,
        "list the study's instances",
        timeout,
        headers={"Accept": "application/dicom+json"},
        params={"includefield": "00080018"},
    )
    if response.status_code == 204 or not response.content:
        return set()
    try:
        answers = response.json()
    except ValueError:
        raise CloudError(
            "QIDO-RS answered with something that is not JSON", retryable=True
        ) from None
    found: set[str] = set()
    for answer in answers if isinstance(answers, list) else []:
        values = answer.get("00080018", {}).get("Value", []) if isinstance(answer, dict) else []
        found.update(str(v).strip() for v in values)
    return found


def _reason(exc: requests.exceptions.RequestException) -> str:
    """Return the innermost cause of a requests failure, without urllib3's retry wrapping."""
    cause: object = exc.args[0] if exc.args else exc
    cause = getattr(cause, "reason", cause)
    return str(cause)


def _split(header: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in header.split(",") if part.strip())


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _retry_after(text: str | None) -> float | None:
    """Return the seconds a `Retry-After` asks for: delay-seconds or an HTTP-date (RFC 9110
    10.2.3; a date already past is 0); None if absent or neither."""
    if text is None:
        return None
    value = _int_or_none(text.strip())
    if value is not None:
        return float(value) if value >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as HTTP-dates always are
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - time.time(), 0.0)


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
