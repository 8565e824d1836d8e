"""The development cloud's monitoring side: a heartbeat receiver in the manner of Healthchecks.

    python devcloud/heartbeat.py [--bind 127.0.0.1] [--port 0]

Each site's agent POSTs its status document to `/ping/<check>` while healthy and to
`/ping/<check>/fail` while degraded or unhealthy (Dirigo's `cloud.heartbeat_url` is
`http://HOST:PORT/ping/<check>`; one check per site, named as the site likes). The receiver
keeps, per check, the last heartbeat (when, success or failure, the document), how many came
and how many were failures, and shows them:

- `GET /`: a page with one row per check, newest first;
- `GET /checks`: the same as JSON, `{check: {last_at, ok, pings, fails, site, state, bearer,
  document}}` (`bearer`: whether the last one carried an `Authorization: Bearer` token; the
  token itself is never kept).

Prints `heartbeat receiver listening on URL` once it listens (port 0: the kernel picks one),
then one line per change of a check's state. Memory only: a restart forgets. Standard library
only: it is not part of the agent.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PING = re.compile(r"/ping/([A-Za-z0-9._-]{1,100})(/fail)?/?")
MAX_BODY = 1 << 20
"""The largest heartbeat body kept (a status document is a few kB)."""


class Checks:
    """The last heartbeat of each check; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checks: dict[str, dict[str, Any]] = {}

    def record(self, check: str, ok: bool, document: Any, bearer: bool) -> bool:
        """Record one heartbeat; return True if the check's state (ok or failing) changed."""
        site = document.get("site") if isinstance(document, dict) else None
        state = document.get("state") if isinstance(document, dict) else None
        with self._lock:
            entry = self._checks.setdefault(check, {"pings": 0, "fails": 0, "ok": None})
            changed = entry["ok"] is not ok
            entry.update(
                last_at=time.time(), ok=ok, site=site, state=state, bearer=bearer, document=document
            )
            entry["pings"] += 1
            entry["fails"] += 0 if ok else 1
            return changed

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: dict(entry) for name, entry in self._checks.items()}


def make_handler(checks: Checks) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "dirigo-devcloud-heartbeat"

        def do_POST(self) -> None:
            self._ping()

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/checks":
                self._answer(200, "application/json", json.dumps(checks.snapshot()).encode())
            elif path == "/":
                self._answer(200, "text/html; charset=utf-8", page(checks.snapshot()).encode())
            elif PING.fullmatch(path):  # Healthchecks takes GET pings too
                self._ping()
            else:
                self._answer(404, "text/plain", b"not found\n")

        def _ping(self) -> None:
            match = PING.fullmatch(self.path.split("?", 1)[0])
            if match is None:
                self._answer(404, "text/plain", b"not found\n")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._answer(413, "text/plain", b"too large\n")
                return
            body = self.rfile.read(length) if length else b""
            try:
                document = json.loads(body) if body else None
            except ValueError:
                document = body[:200].decode("utf-8", "replace")
            ok = match[2] is None
            bearer = self.headers.get("Authorization", "").startswith("Bearer ")
            if checks.record(match[1], ok, document, bearer):
                print(f"{match[1]}: {'up' if ok else 'FAILING'}", flush=True)
            self._answer(200, "text/plain", b"OK")

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per state change is printed instead of one per request

    return Handler


def page(checks: dict[str, dict[str, Any]]) -> str:
    """Return the receiver's page: one row per check, the most recent heartbeat first."""
    now = time.time()
    rows = []
    for name, entry in sorted(checks.items(), key=lambda item: -item[1]["last_at"]):
        at = datetime.fromtimestamp(entry["last_at"], tz=UTC)
        state = "up" if entry["ok"] else "FAILING"
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(cell))}</td>"
                for cell in (
                    name,
                    entry["site"] or "-",
                    state,
                    entry["state"] or "-",
                    f"{at:%Y-%m-%d %H:%M:%S} UTC ({now - entry['last_at']:.0f}s ago)",
                    entry["pings"],
                    entry["fails"],
                )
            )
            + "</tr>"
        )
    body = "\n".join(rows) or '<tr><td colspan="7">no heartbeat yet</td></tr>'
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>Heartbeats</title>
<style>body{{font-family:sans-serif}}td,th{{padding:2px 10px;text-align:left}}</style></head>
<body><h1>Last heartbeat of each site</h1>
<table><tr><th>check</th><th>site</th><th>ping</th><th>agent state</th><th>last heartbeat</th>
<th>heartbeats</th><th>failures</th></tr>
{body}
</table></body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Receive Dirigo heartbeats and show each site's.")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.bind, args.port), make_handler(Checks()))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    host, port = server.server_address[:2]
    print(f"heartbeat receiver listening on http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
