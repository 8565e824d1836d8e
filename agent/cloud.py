"""HTTP mechanism for the state cloud: the one HTTP edge (`CloudHttp`) that tus, DICOMweb and
STOW-RS all speak through, and the tus 1.0 client on it.

`CloudHttp` holds what every request to the cloud shares: the session (trust, client
certificate, token: `build_session`), the timeout, the bandwidth budget (`Throttle`), and the
one place where network and HTTP failures are classified as retryable or not (`check_answer`,
`unanswered`). A caller names the statuses other than 2xx it reads itself (`accept`: 409 for
tus, whose offset conflict is an answer; 400 and 409 for STOW-RS, which list per-instance
reasons); every other status becomes a CloudError.

Our own small tus client on requests rather than tuspy: tuspy keeps offsets in memory and pulls
in aiohttp, while Dirigo must commit every offset to SQLite and validate the server's offset on
resume (it never trusts an offset it did not send). The client speaks core, creation,
termination and, when the server advertises it, checksum (sha256 per PATCH).

Every request goes through requests except a file range sent as a body (the tus PATCH, which
carries nearly all the bytes): `CloudHttp.send_range` sends it from the file itself
(`agent.connections`: `sendfile` on plain TCP, one reused buffer over TLS) on a kept-alive
connection per worker thread, with the session's headers, token, trust and client certificate.
requests cannot send a file without copying it through Python, and that copy kept uploads well
below the server's own ceiling (docs/performance.md). When requests would reach the cloud
through a proxy (the session's or the environment's, as requests reads them), the range goes
through requests after all, streamed from the file, so a site behind a proxy works as before.
Either way its answer is classified by the same function, `check_answer`.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import http.client
import io
import logging
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import cast
from urllib.parse import urljoin

import requests

from agent.config import CloudSettings, redact_url
from agent.connections import (
    BUFFER_SIZE,
    Answer,
    Connections,
    FileEnded,
    RangeBody,
    Tls,
    check_range,
    read_range,
    same_origin,
)

logger = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
_RETRYABLE_STATUS = frozenset({408, 425, 429, 460, 500, 502, 503, 504})
_GONE_STATUS = frozenset({404, 410})
_TUS = frozenset({409})
"""What tus reads itself: a 409 is the server's offset differing from the PATCH's."""

Body = RangeBody | Iterable[bytes | memoryview]
"""A request body streamed block by block, of known length (`len()`): sent with a
Content-Length, never held whole."""


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


class CloudHttp:
    """The HTTP edge to the cloud: one session, timeout and bandwidth budget, and every request
    classified alike. Thread-safe: requests share the session; a file range goes on the
    calling thread's own kept-alive connection.

    `direct=False` sends every file range through requests, as when a proxy applies (tests).
    """

    def __init__(
        self,
        session: requests.Session,
        timeout: float,
        throttle: Throttle | None = None,
        *,
        direct: bool = True,
    ) -> None:
        self.session = session
        self.timeout = timeout
        self.throttle = throttle or Throttle(None)
        self.direct = direct
        self._connections = Connections(timeout)

    @classmethod
    def open(cls, settings: CloudSettings, throttle: Throttle | None = None) -> CloudHttp:
        """Return the edge with the configured trust, certificate, token and timeout. Raise
        CloudConfigError if a file the settings name cannot be read."""
        return cls(build_session(settings), settings.timeout, throttle)

    def send(
        self,
        method: str,
        url: str,
        action: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Body | None = None,
        accept: Collection[int] = (),
        stream: bool = False,
    ) -> requests.Response:
        """Make one request with requests; return the response if its status is 2xx or one of
        `accept`. Raise CloudError, classified as `check_answer` and `unanswered` say. With
        `stream`, the body is read as the caller iterates over it, never whole."""
        try:
            response = self.session.request(
                method,
                url,
                headers=headers,
                # urllib3 sends each block (a memoryview of a reused buffer) as it is, uncopied
                data=cast("Iterable[bytes] | None", data),
                timeout=self.timeout,
                allow_redirects=method in ("GET", "HEAD", "OPTIONS"),
                stream=stream,
                # Explicit: requests lets REQUESTS_CA_BUNDLE and friends in the environment
                # override a session's own trust settings, and cloud.ca_file must win.
                verify=self.session.verify,
                cert=self.session.cert,
            )
        except requests.exceptions.RequestException as exc:
            raise unanswered(action, url, exc) from None
        except ValueError:
            # requests reads the Location of any 3xx answer, followed or not, and raises
            # ValueError (UnicodeDecodeError among them) when it is not UTF-8 or not a URL.
            raise CloudError(
                f"cannot {action}: {redact_url(url)} answered with a redirect to a Location"
                " that is not a URL",
                retryable=True,
            ) from None
        check_answer(
            method,
            url,
            action,
            response.status_code,
            response.reason,
            response.headers,
            lambda: response.text,
            accept,
        )
        return response

    def send_range(
        self,
        method: str,
        url: str,
        action: str,
        headers: Mapping[str, str],
        body: tuple[io.BufferedIOBase, int, int],
        accept: Collection[int] = (),
    ) -> Answer:
        """Send bytes [offset, offset + length) of the file in `body` = (f, offset, length) as
        the request's body, paid for at the throttle; return the answer (its status 2xx or one
        of `accept`). Raise CloudError as `send` does, FileEnded (an OSError: a local fault)
        if the file is shorter than the range."""
        f, offset, length = body
        pace = self.throttle.take if self.throttle.rate else None
        # Two ways: our own connection sends the range straight from the file (sendfile),
        # which requests cannot; through a proxy, requests does the talking (CONNECT, proxy
        # credentials), reading the range through one buffer as it sends.
        tls = self._direct_tls(url)
        if tls is None:
            data = RangeBody(f, offset, length, pace)
            response = self.send(method, url, action, headers=headers, data=data, accept=accept)
            return Answer(response.status_code, response.reason, response.headers, "")
        try:
            # requests prepares the headers as for any request: the session's (User-Agent,
            # token), credentials in the URL or .netrc, cookies.
            prepared = self.session.prepare_request(
                requests.Request(method, url, headers=dict(headers))
            )
            prepared.headers["Content-Length"] = str(length)
            assert prepared.url is not None
            answer = self._connections.send(method, prepared.url, prepared.headers, body, pace, tls)
        except FileEnded:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise unanswered(action, url, exc) from None
        check_answer(
            method,
            url,
            action,
            answer.status,
            answer.reason,
            answer.headers,
            lambda: answer.text,
            accept,
        )
        return answer

    def close(self) -> None:
        """Close the calling thread's own connections (another thread's go when it ends)."""
        self._connections.close()

    def _direct_tls(self, url: str) -> Tls | None:
        """Return the trust settings requests would use for `url`, or None if it would go
        through a proxy (set in the session or, with trust_env, in the environment)."""
        if not self.direct:
            return None
        session = self.session
        # What requests itself does per request: environment proxies (minus NO_PROXY) over
        # the session's, and REQUESTS_CA_BUNDLE where the session trusts the default bundle.
        settings = session.merge_environment_settings(url, {}, None, session.verify, session.cert)
        if requests.utils.select_proxy(url, settings["proxies"]):
            return None
        verify = settings["verify"]
        return Tls(verify if isinstance(verify, str) else bool(verify), settings["cert"])


class TusClient:
    """One tus endpoint on the cloud's HTTP edge. Thread-safe: each call is one request."""

    def __init__(self, http: CloudHttp, endpoint: str) -> None:
        self.http = http
        self.endpoint = endpoint
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
        try:
            url = urljoin(self.endpoint, location)
        except ValueError:  # not a URL: a bracketed host that is no IP address, say (not quoted:
            # a Location may carry a signature)
            raise CloudError(
                "the tus server created an upload but gave an unusable Location (not a URL)",
                retryable=True,
            ) from None
        if not same_origin(url, self.endpoint):
            # The chunks would carry the bearer token and patient data to wherever the
            # Location points: only the configured endpoint's scheme, host and port are trusted.
            raise CloudError(
                f"the tus server placed the upload at {redact_url(url)}, outside"
                f" {redact_url(self.endpoint)} (another scheme, host or port); nothing sent there",
                retryable=False,
            )
        return url

    def offset(self, url: str) -> tuple[int, int | None]:
        """Return the server's (offset, length) of an upload. Raise UploadGone if it is gone."""
        response = self._request("HEAD", url, "ask an upload's offset")
        offset = _int_or_none(response.headers.get("Upload-Offset"))
        if offset is None or offset < 0:
            raise CloudError(
                "the tus server answered HEAD without a valid Upload-Offset", retryable=True
            )
        return offset, _int_or_none(response.headers.get("Upload-Length"))

    def patch(self, url: str, offset: int, f: io.BufferedIOBase, length: int) -> int:
        """Send bytes [offset, offset + length) of the file `f` at `offset`; return the server's
        new offset.

        Carries `Upload-Checksum: sha256 …` when the server supports it, so a chunk damaged in
        transit is refused (460) and sent again rather than stored; the range is read once
        for the hash before it is sent. Raise FileEnded (an OSError: a local fault) if `f` is
        shorter than the range.
        """
        check_range(f, offset, length)
        headers = {
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            "Tus-Resumable": TUS_VERSION,
        }
        if self.capabilities().sha256_checksums:
            headers["Upload-Checksum"] = f"sha256 {_range_sha256(f, offset, length)}"
        action = "send a chunk"
        answer = self.http.send_range("PATCH", url, action, headers, (f, offset, length), _TUS)
        _no_conflict(answer.status, action)
        new_offset = _int_or_none(answer.headers.get("Upload-Offset"))
        if new_offset is None:
            raise CloudError("the tus server answered PATCH without Upload-Offset", retryable=True)
        return new_offset

    def terminate(self, url: str) -> None:
        """Delete an upload on the server (termination extension); gone already is fine."""
        if "termination" not in self.capabilities().extensions:
            return
        with contextlib.suppress(UploadGone):  # already gone is what we wanted
            self._request("DELETE", url, "terminate an upload")

    def close(self) -> None:
        """Close the calling thread's PATCH connections (another thread's go when it ends)."""
        self.http.close()

    def _request(
        self, method: str, url: str, action: str, headers: Mapping[str, str] | None = None
    ) -> requests.Response:
        all_headers = dict(headers or {})
        if method != "OPTIONS":
            all_headers["Tus-Resumable"] = TUS_VERSION
        response = self.http.send(method, url, action, headers=all_headers, accept=_TUS)
        _no_conflict(response.status_code, action)
        return response


def _no_conflict(status: int, action: str) -> None:
    if status == 409:
        raise OffsetConflict(
            f"cannot {action}: the server's offset differs (409)", retryable=True, status=409
        )


def _range_sha256(f: io.BufferedIOBase, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    for block in read_range(f, offset, length, BUFFER_SIZE):
        digest.update(block)
    return base64.b64encode(digest.digest()).decode("ascii")


def check_answer(
    method: str,
    url: str,
    action: str,
    status: int,
    reason: str | None,
    headers: Mapping[str, str],
    text: Callable[[], str],
    accept: Collection[int] = (),
) -> None:
    """Return if `status` answers `method` well: 2xx, or one of `accept` (statuses the caller
    reads itself, as tus a 409 offset conflict). Otherwise raise `bad_answer`'s CloudError.
    `text()` gives the answer's body; it is only asked for on failure.
    """
    if 200 <= status < 300 or status in accept:
        return
    raise bad_answer(method, url, action, status, reason, headers, text)


def bad_answer(
    method: str,
    url: str,
    action: str,
    status: int,
    reason: str | None,
    headers: Mapping[str, str],
    text: Callable[[], str],
) -> CloudError:
    """Return the CloudError for an answer that failed, classified: 5xx, 408, 425, 429 and 460
    are retryable (with the server's `Retry-After`, if any); 404/410 are UploadGone; other 4xx
    (401, 403, 409, 413, …) are not retryable. `text()` gives the answer's body, quoted in the
    message (not for HEAD)."""
    detail = _short(text()) if method != "HEAD" else ""
    message = f"cannot {action}: HTTP {status} {reason or ''}".rstrip()
    message += f" from {redact_url(url)}" + (f": {detail}" if detail else "")
    if status in _GONE_STATUS:
        return UploadGone(message, retryable=True, status=status)
    retry_after = _retry_after(headers.get("Retry-After"))
    retryable = status in _RETRYABLE_STATUS or status >= 500
    return CloudError(message, retryable=retryable, status=status, retry_after=retry_after)


def unanswered(action: str, url: str, exc: Exception) -> CloudError:
    """Return the CloudError for a request that got no answer, from requests or from the
    standard library (our own PATCH connections). Always retryable: the link, the server or
    its certificate may be fixed by then."""
    where = redact_url(url)
    if isinstance(exc, requests.exceptions.SSLError | ssl.SSLError):
        problem = f"TLS failed with {where}: {exc}"
    elif isinstance(exc, requests.exceptions.Timeout | TimeoutError):
        problem = f"timed out ({where})"
    elif isinstance(exc, requests.exceptions.RequestException) and not isinstance(
        exc, requests.exceptions.ConnectionError
    ):
        problem = f"{exc} ({where})"
    else:  # a refused or broken connection, no or a garbled answer
        problem = f"connection failed ({where})"
    return CloudError(f"cannot {action}: {problem}", retryable=True)


_MAX_DIGITS = 30
"""More digits than any offset or size needs (and int() refuses past 4300)."""


def _split(header: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in header.split(",") if part.strip())


def _int_or_none(text: str | None) -> int | None:
    """Return the number a header holds as tus and HTTP write one (1*DIGIT: `Upload-Offset`,
    `Upload-Length`, `Tus-Max-Size`, a `Retry-After` in seconds), or None if it holds anything
    else. Stricter than int(), which reads "1_000", "+5" and " 7 " as numbers too."""
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    return int(text) if len(text) <= _MAX_DIGITS else None


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
