"""The heartbeat against the development cloud's receiver: each site's heartbeats arrive (with the
cloud's token, without patient data), `/fail` while a site's cloud is down, and a monitoring
endpoint that hangs slows neither receiving nor uploading. (`/fail` from a hung agent:
tests/integration/test_systemd.py.)"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from agent.config import CloudSettings
from agent.heartbeat import Heartbeat
from tests.support import dcmtk
from tests.support.agent import Agent
from tests.support.datasets import ct_series
from tests.support.devcloud import DevCloud, HeartbeatReceiver, describe
from tests.support.net import LOOPBACK, free_port, wait_until
from tests.support.tlsfront import TlsFront
from tests.support.tus import TusServer


@pytest.fixture
def devcloud(tmp_path: Path) -> Iterator[DevCloud]:
    with DevCloud(tmp_path / "cloud") as cloud:
        yield cloud


def test_the_receiver_sees_each_sites_heartbeats_and_fail_while_its_cloud_is_down(
    tmp_path: Path, devcloud: DevCloud
) -> None:
    token = tmp_path / "token"
    token.write_text("site-a-secret\n")
    token.chmod(0o600)
    files = ct_series(tmp_path / "ct", slices=2, rows=64, cols=64)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    up = {
        "cloud": {
            "upload_url": devcloud.upload_url,
            "token_file": str(token),
            "heartbeat_url": devcloud.heartbeat_url("site-a"),
            "heartbeat_every": "0.5s",
        },
        "health": {"listen": "off"},
    }
    down = {
        "cloud": {
            "upload_url": f"http://{LOOPBACK}:{free_port()}/files/",  # nothing listens
            "heartbeat_url": devcloud.heartbeat_url("site-b"),
            "heartbeat_every": "0.5s",
        },
        "health": {"listen": "off"},
    }
    with Agent(a_dir, extra=up) as a, Agent(b_dir, extra=down):
        assert dcmtk.storescu(files, a.port).returncode == 0

        def heard() -> dict[str, dict[str, Any]] | None:
            checks = devcloud.heartbeats()
            if checks.get("site-a", {}).get("pings", 0) < 3:
                return None
            if checks.get("site-b", {}).get("pings", 0) < 3:
                return None
            if checks["site-a"]["document"]["instances"].get("received", 0) < 2:
                return None
            return checks

        checks = wait_until(heard, 60, 0.2, "three heartbeats from each site after the send")
        assert isinstance(checks, dict)
        # What a person sees: scripts/devcloud prints the receiver's URL, its page each site.
        assert devcloud.monitor_url in describe(devcloud)
        page = requests.get(devcloud.monitor_url, timeout=10)
        assert page.status_code == 200
        rows = {row.split("</td>")[0]: row for row in page.text.split("<tr><td>")[1:]}
        assert "<td>up</td><td>healthy</td>" in rows["site-a"]
        assert "<td>FAILING</td><td>degraded</td>" in rows["site-b"]
    site_a, site_b = checks["site-a"], checks["site-b"]
    assert site_a["ok"] and site_a["state"] == "healthy" and site_a["fails"] == 0
    assert site_a["bearer"]  # the cloud's token goes with it
    assert site_a["document"]["site"] == "test-site"
    assert site_a["document"]["instances"]["received"] == 2
    assert site_a["document"]["cloud"]["up"] is True
    # The other site's cloud does not answer: degraded, every heartbeat to /fail, and the
    # document says why.
    assert not site_b["ok"] and site_b["state"] == "degraded"
    assert site_b["fails"] == site_b["pings"]
    assert site_b["document"]["cloud"]["up"] is False
    assert not site_b["bearer"]
    for check in (site_a, site_b):
        assert "Synthetic^Patient" not in str(check["document"])  # no patient data
        assert "SYN000000" not in str(check["document"])


def send_and_upload(agent: Agent, files: list[Path]) -> tuple[float, float]:
    """C-STORE `files` to `agent`; return the seconds the send took and the seconds from its
    end until the study was uploaded."""
    started = time.monotonic()
    assert dcmtk.storescu(files, agent.port).returncode == 0
    stored = time.monotonic()
    wait_until(
        lambda: agent.rows("SELECT 1 FROM studies WHERE state IN ('sent', 'confirmed')"),
        120,
        0.05,
        "the study uploaded",
    )
    return stored - started, time.monotonic() - stored


def test_a_hanging_monitoring_endpoint_slows_neither_receiving_nor_uploading(
    tmp_path: Path, tus_server: Any
) -> None:
    tus: TusServer = tus_server()
    files = ct_series(tmp_path / "ct", slices=10, rows=256, cols=256)
    base = {"cloud": {"upload_url": tus.url}, "health": {"listen": "off"}}
    (tmp_path / "plain").mkdir()
    with Agent(tmp_path / "plain", stable_after="1s", extra=base) as plain:
        store_plain, upload_plain = send_and_upload(plain, files)
    # A monitoring endpoint that takes the connection and never answers.
    with socket.create_server((LOOPBACK, 0), backlog=16) as silent:
        hung = {
            "cloud": {
                "upload_url": tus.url,
                "heartbeat_url": f"http://{LOOPBACK}:{silent.getsockname()[1]}/ping/site",
                "heartbeat_every": "30s",  # each heartbeat waits up to 30 s for its answer
            },
            "health": {"listen": "off"},
        }
        (tmp_path / "hung").mkdir()
        with Agent(tmp_path / "hung", stable_after="1s", extra=hung) as agent:
            store_hung, upload_hung = send_and_upload(agent, files)
            silent.settimeout(5)
            connection, _ = silent.accept()  # the heartbeat did reach it, and hangs there
            connection.close()
    # Generous bounds for a shared machine; a heartbeat in the way would add its 30 s.
    assert store_hung < 2 * store_plain + 5, (store_plain, store_hung)
    assert upload_hung < 2 * upload_plain + 10, (upload_plain, upload_hung)


def test_the_heartbeat_goes_with_the_clouds_trust_client_certificate_and_token(
    tmp_path: Path, heartbeat_receiver: HeartbeatReceiver
) -> None:
    ca = trustme.CA()
    client = ca.issue_cert("hospital-a.dirigo.example")
    for name, pem in (
        ("ca.pem", ca.cert_pem),
        ("client.pem", client.cert_chain_pems[0]),
        ("client.key", client.private_key_pem),
    ):
        pem.write_to_path(str(tmp_path / name))
    (tmp_path / "token").write_text("heartbeat-token\n")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as the state's endpoints ask
    port = int(heartbeat_receiver.url.rsplit(":", 1)[1].strip("/"))
    document = {"site": "hospital-a", "state": "degraded"}
    with TlsFront(context, port) as front:
        trusted = CloudSettings.model_validate(
            {
                "upload_url": front.url_for("/files/"),
                "ca_file": tmp_path / "ca.pem",
                "client_cert": tmp_path / "client.pem",
                "client_key": tmp_path / "client.key",
                "token_file": tmp_path / "token",
                "heartbeat_url": front.url_for("/ping/hospital-a"),
            }
        )
        heartbeat = Heartbeat.open(trusted, lambda: document)
        assert heartbeat is not None
        assert heartbeat.beat()
        assert b"POST /ping/hospital-a/fail " in front.received
        assert b"Authorization: Bearer heartbeat-token" in front.received
        # Without the client certificate the endpoint refuses the connection.
        anonymous = trusted.model_copy(update={"client_cert": None, "client_key": None})
        refused = Heartbeat.open(anonymous, lambda: document)
        assert refused is not None and not refused.beat()
        heartbeat.stop()
        refused.stop()
    check = heartbeat_receiver.checks()["hospital-a"]
    assert not check["ok"] and check["state"] == "degraded" and check["pings"] == 1
    assert check["bearer"]


def test_a_monitor_that_stays_down_is_logged_once_and_again_when_it_answers(
    tmp_path: Path, heartbeat_receiver: HeartbeatReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    document = {"site": "hospital-a", "state": "healthy"}
    down = CloudSettings.model_validate(
        {
            "upload_url": f"http://{LOOPBACK}:{free_port()}/files/",
            "heartbeat_url": f"http://{LOOPBACK}:{free_port()}/ping/a",  # nothing listens
        }
    )
    heartbeat = Heartbeat.open(down, lambda: document)
    assert heartbeat is not None
    with caplog.at_level(logging.INFO, logger="agent.heartbeat"):
        assert not any(heartbeat.beat() for _ in range(5))
        heartbeat.url = f"{heartbeat_receiver.url}ping/a"  # the monitor is back
        assert all(heartbeat.beat() for _ in range(3))
    heartbeat.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "failed" in lines[0] and lines[1].endswith("sent (healthy)")
    assert heartbeat_receiver.checks()["a"]["pings"] == 3
