"""What the health endpoints answer: liveness (/healthz), readiness (/readyz) and the status
document (/status), each computed when asked, from the running agent's parts.

Liveness asks whether the process should be restarted: a part stuck or dead. Readiness asks
whether the PACS may send now: store writable, DICOM port listening, disk below high water. A
cloud outage makes the agent neither: storing and forwarding later is its job; `/status` shows it
as `degraded`.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from agent.config import Settings
from agent.config.rules import SERVICES
from agent.dicom import service_of
from agent.health import iso_time, snapshot
from agent.liveness import Liveness
from agent.metrics import CONTENT_TYPE, Metrics, State
from agent.page import status_page
from agent.probe import CloudProbe
from agent.spool import Spool
from agent.store import Store, StoreError
from agent.web import Response, Route


@dataclass(frozen=True)
class Readiness:
    """The checks of /readyz, each None when it passes or a sentence saying why not."""

    checks: dict[str, str | None]

    @property
    def ready(self) -> bool:
        return all(problem is None for problem in self.checks.values())

    def document(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "checks": {
                name: {"ok": problem is None, "problem": problem}
                for name, problem in self.checks.items()
            },
        }


class Endpoints:
    """The answers of /healthz, /readyz and /status for one running agent.

    `servers` returns the DICOM servers (the plain port's, and the TLS port's when there is
    one; none once they are closed): their listening sockets and their open associations."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        spool: Spool,
        liveness: Liveness,
        servers: Callable[[], Sequence[Any]],
        metrics: Metrics,
        probe: CloudProbe | None,
        clock: Callable[[], float] = time.monotonic,
        audit: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.liveness = liveness
        self.servers = servers
        self.metrics = metrics
        self.probe = probe
        self.clock = clock
        self.started = clock()
        metrics.read_state(self.metric_state)
        self.audit = audit
        """The audit trail's syslog sender counts (an `Auditor.status`), or None."""
        if audit is not None:
            metrics.read_audit(audit)

    def routes(self) -> dict[str, Route]:
        """Return the routes of these endpoints (the server adds /metrics and the page)."""
        return {
            "/healthz": Route(self.healthz, private=False),
            "/readyz": Route(self.readyz, private=False),
            "/status": Route(self.status, private=True),
            "/metrics": Route(self.exposition, private=True),
            "/": Route(self.page, private=True),
        }

    def healthz(self) -> Response:
        health = self.liveness.check()
        status = HTTPStatus.OK if health.healthy else HTTPStatus.SERVICE_UNAVAILABLE
        return json_response(status, health.document())

    def readyz(self) -> Response:
        readiness = self.readiness()
        status = HTTPStatus.OK if readiness.ready else HTTPStatus.SERVICE_UNAVAILABLE
        return json_response(status, readiness.document())

    def status(self) -> Response:
        return json_response(HTTPStatus.OK, self.document())

    def page(self) -> Response:
        html = status_page(self.document(), self.store, time.time())
        return Response(HTTPStatus.OK, html.encode(), "text/html; charset=utf-8")

    def document(self) -> dict[str, Any]:
        """Return `dirigo status --json`'s document plus health, readiness, uptime and what
        `extra` adds; `state` sums them up as `healthy`, `degraded` or `unhealthy`."""
        document = snapshot(self.settings, self.store, self.spool)
        health = self.liveness.check()
        readiness = self.readiness()
        reach = None if self.probe is None else self.probe.latest
        if not health.healthy:
            state = "unhealthy"
        elif health.impaired or not readiness.ready or (reach is not None and not reach.up):
            state = "degraded"
        else:
            state = "healthy"
        document.update(
            state=state,
            health=health.document(),
            readiness=readiness.document(),
            uptime_seconds=round(self.clock() - self.started, 1),
            cloud=reach.document() if reach is not None else {"up": None},
            last_upload_at=iso_time(self.metrics.last_upload),
            last_retrieve_at=iso_time(self.metrics.last_retrieve),
        )
        if self.audit is not None and (audit := self.audit()) is not None:
            document["audit"] = audit
        return document

    def exposition(self) -> Response:
        return Response(HTTPStatus.OK, self.metrics.exposition(), CONTENT_TYPE)

    def metric_state(self) -> State:
        """Return what the state gauges of /metrics show now."""
        status = self.store.status()
        oldest = self.store.activity.oldest_waiting()
        first = None if oldest is None else oldest.first_received_at
        disk = self.spool.disk_usage()
        reach = None if self.probe is None else self.probe.latest
        return State(
            studies=dict(status.studies),
            instances=dict(status.instances),
            jobs=dict(status.jobs),
            oldest_unsent_age=None if first is None else max(time.time() - first, 0.0),
            disk_free=disk.free,
            disk_total=disk.total,
            associations=self._associations(),
            cloud_up=None if reach is None else reach.up,
        )

    def _associations(self) -> dict[str, int]:
        """Return the open associations by the services they negotiated (one association may
        count for several: a PACS that stores and queries on one)."""
        counts: dict[str, int] = dict.fromkeys(SERVICES, 0)
        associations = [assoc for server in self.servers() for assoc in server.active_associations]
        for assoc in associations:
            for service in {service_of(context) for context in assoc.accepted_contexts}:
                counts[service] = counts.get(service, 0) + 1
        return counts

    def readiness(self) -> Readiness:
        return Readiness(
            {
                "store": self._store_problem(),
                "dicom": self._listening_problem(),
                "disk": self._disk_problem(),
            }
        )

    def _store_problem(self) -> str | None:
        try:
            self.spool.check_writable()
        except OSError as exc:
            return f"the spool cannot take a file: {exc}"
        try:
            self.store.check_writable()
        except StoreError as exc:
            return f"the database cannot be written: {exc}"
        return None

    def _listening_problem(self) -> str | None:
        servers = self.servers()
        if not servers:
            return "the DICOM port is closed"
        for server in servers:
            sock = server.socket
            name = "DICOM TLS" if server.ssl_context is not None else "DICOM"
            if sock is None or sock.fileno() < 0:
                return f"the {name} port is closed"
            try:
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    return f"the {name} socket is not listening"
            except OSError as exc:
                return f"the {name} socket is unusable: {exc}"
        return None

    def _disk_problem(self) -> str | None:
        if not self.spool.above_high_water():
            return None
        usage = self.spool.disk_usage()
        high_water = self.settings.spool.high_water
        return f"the disk is {usage.percent:.1f}% full, at or above high water ({high_water:g}%)"


def json_response(status: int, document: dict[str, Any]) -> Response:
    body = json.dumps(document, indent=2).encode()
    return Response(status, body + b"\n", "application/json")
