"""The health HTTP server inside `dirigo run`: /healthz, /readyz, /status, /metrics and the page.

cheroot serves it (a kept, pure-Python WSGI server with TLS built in; waitress has none), in
threads of its own, so a slow or hostile client never holds up the DICOM or upload paths. Every
route is a function returning a `Response`; the route table (`Route`) says which ones need the
bearer token. The token is required whenever the server listens beyond loopback (configuration
refuses a non-loopback `health.listen` without `health.token_file`); /healthz and /readyz never
need it, since load balancers and systemd-style probes ask them without credentials and they
tell nothing about patients or studies.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from agent.config import HealthSettings
from agent.config.rules import listen_address

logger = logging.getLogger(__name__)

THREADS = 4
"""Worker threads of the health server: a scraper, a browser and a probe or two at once."""
SHUTDOWN_TIMEOUT = 5.0


@dataclass(frozen=True)
class Response:
    """What a route answers: an HTTP status, a body and its media type."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Route:
    """A GET route: the function that answers it, and whether it needs the bearer token."""

    answer: Callable[[], Response]
    private: bool


class HealthServer:
    """The health HTTP server on `settings.listen`, serving `routes` (path → Route)."""

    def __init__(self, settings: HealthSettings, routes: Mapping[str, Route]) -> None:
        address = listen_address(settings.listen)
        if address is None:
            raise ValueError("health.listen is off: there is no server to run")
        self.routes = dict(routes)
        self._token = _read_token(settings.token_file)
        host, port = address
        self._require_token = not ipaddress.ip_address(host).is_loopback
        self._server = wsgi.Server((host, port), self._app, numthreads=THREADS)
        if settings.cert is not None:
            key = settings.key or settings.cert
            self._server.ssl_adapter = BuiltinSSLAdapter(str(settings.cert), str(key))
        self.scheme = "https" if settings.cert is not None else "http"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and start serving in a thread of its own. Raise OSError if it cannot bind."""
        self._server.prepare()
        self._thread = threading.Thread(target=self._server.serve, name="health-http", daemon=True)
        self._thread.start()
        host, port = self.address
        logger.info("health endpoints on %s://%s:%d", self.scheme, host, port)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server is bound to (the real port when configured as 0)."""
        bound = self._server.bind_addr
        assert isinstance(bound, tuple)
        return str(bound[0]), int(bound[1])

    def stop(self) -> None:
        self._server.stop()
        if self._thread is not None:
            self._thread.join(SHUTDOWN_TIMEOUT)
            self._thread = None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        response = self.respond(
            environ.get("REQUEST_METHOD", "GET"),
            environ.get("PATH_INFO", "/"),
            environ.get("HTTP_AUTHORIZATION"),
        )
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
        ]
        if response.status == HTTPStatus.UNAUTHORIZED:
            headers.append(("WWW-Authenticate", 'Bearer realm="dirigo"'))
            headers.append(("WWW-Authenticate", 'Basic realm="dirigo", charset="UTF-8"'))
        if response.status == HTTPStatus.METHOD_NOT_ALLOWED:
            headers.append(("Allow", "GET, HEAD"))
        start_response(f"{response.status} {HTTPStatus(response.status).phrase}", headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [response.body]

    def respond(self, method: str, path: str, authorization: str | None) -> Response:
        """Return the answer to one request (the WSGI layer only frames it)."""
        route = self.routes.get(path)
        if route is None:
            return text(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        if method not in ("GET", "HEAD"):
            return text(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here")
        if route.private and self._require_token and not self._authorized(authorization):
            return text(HTTPStatus.UNAUTHORIZED, "a bearer token is required")
        try:
            return route.answer()
        except Exception:
            # One failing route must not take the server down; the log has the traceback.
            logger.exception("health endpoint %s failed", path)
            return text(HTTPStatus.INTERNAL_SERVER_ERROR, f"{path} failed; see the agent's log")

    def _authorized(self, authorization: str | None) -> bool:
        """Accept the token as a bearer token (Prometheus, curl) or as the password of HTTP Basic
        authentication with any user name: a browser cannot send a bearer token, but it asks a
        person for a password when challenged, so the status page opens from a desk too."""
        if self._token is None or authorization is None:
            return False
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() == "basic":
            given = _basic_password(given.strip())
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self._token.encode())


def text(status: int, message: str) -> Response:
    """Return a plain-text response of one line."""
    return Response(status, (message + "\n").encode())


def _basic_password(credentials: str) -> str:
    """Return the password in HTTP Basic `credentials` (base64 of ``user:password``), or "" when
    they are not that."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    _user, colon, password = decoded.partition(":")
    return password if colon else ""


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"health.token_file {path} is empty")
    return token
