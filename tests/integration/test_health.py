"""The health endpoints of a real `dirigo run`: /healthz, /readyz and /status, healthy and
failing (a full disk, an upload worker hung on a cloud that never answers), over plain HTTP and
TLS; requests from the test are real HTTP clients of the agent's cheroot server."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import trustme
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.config import HealthSettings
from agent.web import HealthServer, Route, text
from tests.support import datasets, dcmtk
from tests.support.agent import Agent
from tests.support.faultproxy import FaultProxy
from tests.support.net import LOOPBACK, PeerExited, free_port, wait_until
from tests.support.tus import TusServer

WAIT = 60.0
"""Bound on every wait; a healthy run needs a second or two."""


def health_agent(data_dir: Path, **extra: Any) -> tuple[Agent, str]:
    """Return an agent (not started) with its health server on a free port, and its base URL."""
    port = free_port()
    sections: dict[str, Any] = {"health": {"listen": f"{LOOPBACK}:{port}"}}
    for section, values in extra.pop("extra", {}).items():
        sections.setdefault(section, {}).update(values)
    return Agent(data_dir, extra=sections, **extra), f"http://{LOOPBACK}:{port}"


def get(url: str) -> requests.Response:
    return requests.get(url, timeout=30)


def test_a_healthy_agent_is_live_ready_and_shows_its_status(
    tmp_path: Path, tmp_data_dir: Path, tus_server: Any
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=7)
    tus: TusServer = tus_server()
    agent, base = health_agent(tmp_data_dir, extra={"cloud": {"upload_url": tus.url}})
    with agent:
        live = get(f"{base}/healthz")
        assert live.status_code == 200, live.text
        parts = live.json()["parts"]
        assert {"dicom-acceptor", "upload-1", "upload-2", "supervisor"} <= set(parts)
        assert live.json()["failing"] == []
        ready = get(f"{base}/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == {"store", "dicom", "disk"}
        result = dcmtk.storescu(series, agent.port)
        assert len(dcmtk.acknowledged(result)) == 3, result.stdout + result.stderr
        wait_until(
            lambda: get(f"{base}/status").json()["cloud"]["up"] is not None,
            WAIT,
            0.1,
            what="the first cloud probe",
        )
        status = get(f"{base}/status").json()
        cli = agent.status()
        assert status["instances"] == cli["instances"] and status["instances"]["received"] == 3
        assert status["studies"] == cli["studies"]
        assert status["state"] == "healthy", status
        assert status["cloud"]["up"] is True
        assert "1.0.0" in status["cloud"]["tus"]["versions"]
        assert "creation" in status["cloud"]["tus"]["extensions"]
        assert status["health"]["healthy"] is True and status["readiness"]["ready"] is True
        assert status["uptime_seconds"] > 0
        page = get(f"{base}/")
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert get(f"{base}/no-such-page").status_code == 404
        assert requests.post(f"{base}/status", timeout=30).status_code == 405


def test_a_cloud_outage_leaves_the_agent_ready_but_degraded(tmp_data_dir: Path) -> None:
    closed = f"http://{LOOPBACK}:{free_port()}/files/"  # nothing listens there
    agent, base = health_agent(tmp_data_dir, extra={"cloud": {"upload_url": closed}})
    with agent:

        def probed() -> dict[str, Any] | None:
            status: dict[str, Any] = get(f"{base}/status").json()
            return status if status["cloud"]["up"] is not None else None

        status = wait_until(probed, WAIT, 0.2, what="the first cloud probe")
        assert isinstance(status, dict)
        assert status["cloud"]["up"] is False and "connection failed" in status["cloud"]["error"]
        assert status["state"] == "degraded"
        assert get(f"{base}/readyz").status_code == 200
        assert get(f"{base}/healthz").status_code == 200
        assert "dirigo_cloud_up 0.0" in get(f"{base}/metrics").text


def test_a_disk_above_high_water_makes_the_agent_unready_but_still_live(
    tmp_data_dir: Path,
) -> None:
    agent, base = health_agent(tmp_data_dir, high_water="1%")
    with agent:
        ready = get(f"{base}/readyz")
        assert ready.status_code == 503, ready.text
        checks = ready.json()["checks"]
        assert checks["disk"]["ok"] is False and "high water (1%)" in checks["disk"]["problem"]
        assert checks["store"]["ok"] and checks["dicom"]["ok"]
        assert get(f"{base}/healthz").status_code == 200
        assert get(f"{base}/status").json()["state"] == "degraded"


def test_an_upload_worker_hung_on_a_silent_cloud_makes_the_agent_unhealthy(
    tmp_path: Path, tmp_data_dir: Path, tus_server: Any
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=2, rows=64, cols=64, seed=8)
    tus: TusServer = tus_server()
    with FaultProxy(LOOPBACK, tus.port) as proxy:
        proxy.stall()  # the cloud accepts connections and never answers
        agent, base = health_agent(
            tmp_data_dir,
            stable_after="1s",
            extra={
                "cloud": {"upload_url": proxy.url_for("/files/"), "timeout": "60s"},
                "upload": {"concurrency": 1},
                "health": {"stall_after": "3s"},
            },
        )
        with agent:
            assert get(f"{base}/healthz").status_code == 200
            result = dcmtk.storescu(series, agent.port)
            assert len(dcmtk.acknowledged(result)) == 2, result.stdout + result.stderr

            def unhealthy() -> dict[str, Any] | None:
                answer = get(f"{base}/healthz")
                return answer.json() if answer.status_code == 503 else None

            health = wait_until(unhealthy, WAIT, 0.2, what="/healthz answering 503")
            assert isinstance(health, dict)
            assert health["failing"] == ["upload-1"]
            assert "made no progress" in health["parts"]["upload-1"]["problem"]
            assert health["parts"]["supervisor"]["healthy"] is True
            assert get(f"{base}/readyz").status_code == 200  # the PACS may still send
            assert get(f"{base}/status").json()["state"] == "unhealthy"
            proxy.resume()
            wait_until(
                lambda: get(f"{base}/healthz").status_code == 200,
                WAIT,
                0.2,
                what="/healthz healthy again once the cloud answers",
            )


def test_the_health_server_speaks_tls_with_the_configured_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = tmp_path / "health.pem"
    key = tmp_path / "health.key"
    issued = ca.issue_cert(LOOPBACK)
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    settings = HealthSettings(listen=f"{LOOPBACK}:{free_port()}", cert=cert, key=key)
    server = HealthServer(settings, {"/healthz": Route(lambda: text(200, "ok"), private=False)})
    server.start()
    try:
        host, port = server.address
        answer = requests.get(f"https://{host}:{port}/healthz", verify=str(ca_file), timeout=30)
        assert answer.status_code == 200 and answer.text == "ok\n"
        with pytest.raises(requests.ConnectionError):  # no plain HTTP on the TLS port
            requests.get(f"http://{host}:{port}/healthz", timeout=30)
    finally:
        server.stop()


def test_the_probe_asks_the_archive_and_a_retrieve_is_counted(
    tmp_path: Path, tmp_data_dir: Path, tus_server: Any, orthanc: Any
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=2, rows=64, cols=64, seed=9)
    archive = orthanc(aet="ARCHIVE")
    for path in series:
        archive.session.post(
            f"{archive.http_url}/instances", data=path.read_bytes(), timeout=60
        ).raise_for_status()
    tus: TusServer = tus_server()
    cloud = {"upload_url": tus.url, "dicomweb_url": archive.dicomweb_url}
    agent, base = health_agent(tmp_data_dir, extra={"cloud": cloud})
    with agent:

        def probed() -> dict[str, Any] | None:
            reach: dict[str, Any] = get(f"{base}/status").json()["cloud"]
            return reach if reach["up"] is not None else None

        reach = wait_until(probed, WAIT, 0.2, what="the first cloud probe")
        assert isinstance(reach, dict)
        assert reach["up"] is True and reach["dicomweb"] is True, reach
        study = str(pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
        got = dcmtk.getscu(agent.port, [f"StudyInstanceUID={study}"], tmp_path / "got")
        assert dcmtk.final_status(got) == 0, got.stdout[-2000:]
        metrics = get(f"{base}/metrics").text
        assert "dirigo_retrieve_duration_seconds_count 2.0" in metrics
        retrieved = next(
            line for line in metrics.splitlines() if line.startswith("dirigo_retrieved_bytes_total")
        )
        assert float(retrieved.split()[1]) >= sum(p.stat().st_size for p in series) * 0.9
        assert get(f"{base}/status").json()["last_retrieve_at"] is not None


def metric(base: str, name: str) -> float | None:
    """Return the value of one sample of /metrics, by its name with labels, or None."""
    for line in get(f"{base}/metrics").text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name:
            return float(value)
    return None


def test_open_associations_are_counted_by_service(tmp_data_dir: Path) -> None:
    agent, base = health_agent(tmp_data_dir)
    with agent:
        pacs = AE(ae_title="PACS")
        pacs.add_requested_context(Verification)
        pacs.add_requested_context(CTImageStorage)
        assoc = pacs.associate(LOOPBACK, agent.port, ae_title="DIRIGO")
        assert assoc.is_established
        try:
            wait_until(
                lambda: metric(base, 'dirigo_associations_active{service="store"}') == 1.0,
                WAIT,
                0.1,
                what="one store association counted",
            )
            assert metric(base, 'dirigo_associations_active{service="echo"}') == 1.0
            assert metric(base, 'dirigo_associations_active{service="find"}') == 0.0
        finally:
            assoc.release()
        wait_until(
            lambda: metric(base, 'dirigo_associations_active{service="store"}') == 0.0,
            WAIT,
            0.1,
            what="the released association no longer counted",
        )


def test_a_taken_health_port_stops_the_start_with_a_message_naming_it(
    tmp_data_dir: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = Agent(tmp_data_dir, extra={"health": {"listen": f"{LOOPBACK}:{port}"}})
        with pytest.raises(PeerExited, match=f"cannot serve health endpoints on {LOOPBACK}:{port}"):
            agent.start()
        assert agent.proc is not None and agent.proc.returncode != 0
