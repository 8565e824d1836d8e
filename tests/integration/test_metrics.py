"""/metrics scraped by a real Prometheus server (Debian's `prometheus`), bearer token included:
its query API returns the instances a DCMTK `storescu` sent, as `dirigo run` counted them."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.support import datasets, dcmtk
from tests.support.agent import Agent
from tests.support.net import LOOPBACK, free_port, wait_until
from tests.support.process import stop_process, tail

PROMETHEUS = "/usr/bin/prometheus"
WAIT = 60.0
TOKEN = "scrape-token-for-the-test"


class Prometheus:
    """A Prometheus server on a free loopback port scraping `target` every second."""

    def __init__(self, directory: Path, target: str, token_file: Path) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": "dirigo",
                    "scrape_interval": "1s",
                    "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        self.config = directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.data = directory / "tsdb"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.data}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
            ],
            stdout=self.log,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
        )
        wait_until(self._ready, WAIT, 0.1, what="prometheus ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{tail(self.log)}")
        return requests.get(f"{self.url}/-/ready", timeout=5).status_code == 200

    def query(self, expression: str) -> list[dict[str, Any]]:
        answer = requests.get(
            f"{self.url}/api/v1/query", params={"query": expression}, timeout=10
        ).json()
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)
        self.log.close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "health-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def prometheus_binary() -> Iterator[str]:
    if shutil.which(PROMETHEUS) is None:
        pytest.fail(f"{PROMETHEUS} is missing: run scripts/setup", pytrace=False)
    yield PROMETHEUS


def test_prometheus_scrapes_the_received_instances_with_the_bearer_token(
    tmp_path: Path, tmp_data_dir: Path, token_file: Path, prometheus_binary: str
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=4, rows=64, cols=64, seed=21)
    port = free_port()
    # beyond loopback, so the token is required (the test still talks over loopback only)
    health = {"listen": f"0.0.0.0:{port}", "token_file": str(token_file)}
    target = f"{LOOPBACK}:{port}"
    with Agent(tmp_data_dir, extra={"health": health}) as agent:
        unauthorized = requests.get(f"http://{target}/metrics", timeout=10)
        assert unauthorized.status_code == 401
        assert requests.get(f"http://{target}/healthz", timeout=10).status_code == 200
        prometheus = Prometheus(tmp_path, target, token_file).start()
        try:
            wait_until(
                lambda: prometheus.value('up{job="dirigo"}') == 1.0,
                WAIT,
                0.2,
                what="prometheus scraping dirigo",
            )
            assert prometheus.value("dirigo_instances_received_total") == 0.0
            result = dcmtk.storescu(series, agent.port)
            assert len(dcmtk.acknowledged(result)) == 4, result.stdout + result.stderr
            wait_until(
                lambda: prometheus.value("dirigo_instances_received_total") == 4.0,
                WAIT,
                0.2,
                what="prometheus seeing 4 received instances",
            )
            sizes = sum(path.stat().st_size for path in series)
            received_bytes = prometheus.value("dirigo_received_bytes_total")
            assert received_bytes is not None and received_bytes >= sizes * 0.9
            assert prometheus.value('dirigo_queue_instances{state="received"}') == 4.0
            assert prometheus.value('dirigo_studies{state="open"}') == 1.0
            age = prometheus.value("dirigo_oldest_unsent_study_age_seconds")
            assert age is not None and age > 0
            assert prometheus.value("dirigo_cloud_up") == 0.0  # nothing listens there
            free = prometheus.value("dirigo_disk_free_bytes")
            assert free is not None and free > 0
            (build,) = prometheus.query("dirigo_build_info")
            assert build["metric"]["version"]
        finally:
            prometheus.stop()
