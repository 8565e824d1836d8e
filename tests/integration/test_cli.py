"""The `dirigo` command as an operator meets it: exit codes, messages, and the status document."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import StoreSCPFactory
from tests.support.agent import Agent
from tests.support.net import LOOPBACK

REPO = Path(__file__).resolve().parents[2]


def dirigo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def write_config(path: Path, config: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def minimal(tmp_path: Path, **dicom: object) -> dict[str, object]:
    return {
        "site": "cli-test",
        "data_dir": str(tmp_path / "data"),
        "dicom": {"bind": LOOPBACK, "port": 11112, **dicom},
        "cloud": {"upload_url": "https://user:hunter2@exchange.example/files/"},
    }


def test_check_config_accepts_the_example_and_prints_it_redacted() -> None:
    result = dirigo("check-config", "--config", str(REPO / "conf.example.yaml"))
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["site"] == "hospital-a"


def test_check_config_never_prints_a_password(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", minimal(tmp_path))
    result = dirigo("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout


def test_a_broken_config_reports_every_problem_by_key_and_exits_78(tmp_path: Path) -> None:
    config = minimal(tmp_path, port=70000, max_associations="ten")
    config["study"] = {"stable_after": "soon"}
    del config["site"]
    path = write_config(tmp_path / "c.yaml", config)
    for command in ("check-config", "run", "status"):
        result = dirigo(command, "--config", str(path))
        assert result.returncode == 78, (command, result.stderr)
        for key in ("'site'", "'dicom.port'", "'dicom.max_associations'", "'study.stable_after'"):
            assert f"At {key}" in result.stderr, (command, key, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_missing_config_file_is_one_clear_line(tmp_path: Path) -> None:
    result = dirigo("status", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 78
    assert "nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_status_before_the_agent_ever_ran_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", minimal(tmp_path))
    result = dirigo("status", "--config", str(path))
    assert result.returncode == 1
    assert "no database" in result.stderr
    assert not (tmp_path / "data" / "dirigo.db").exists()


def test_status_json_has_the_documented_stable_keys(tmp_data_dir: Path) -> None:
    with Agent(tmp_data_dir) as agent:
        status = agent.status()
        text = subprocess.run(
            agent.command("status"), capture_output=True, text=True, check=True, timeout=60
        ).stdout
    assert set(status) == {
        "site",
        "version",
        "data_dir",
        "studies",
        "instances",
        "jobs",
        "disk",
        "last_error",
        "schema_version",
    }
    assert set(status["studies"]) >= {"open", "stable", "queued", "uploading", "sent"}
    assert set(status["instances"]) >= {"received", "quarantined"}
    assert set(status["disk"]) == {
        "total_bytes",
        "used_bytes",
        "free_bytes",
        "used_percent",
        "high_water_percent",
        "accepting",
    }
    assert "studies" in text and "last error none" in text


def test_echo_reaches_a_configured_peer(tmp_path: Path, storescp: StoreSCPFactory) -> None:
    peer = storescp(ae="PACS")
    config = minimal(tmp_path, peers=[{"ae_title": "PACS", "host": LOOPBACK, "port": peer.port}])
    result = dirigo("echo", "--config", str(write_config(tmp_path / "c.yaml", config)), "PACS")
    assert result.returncode == 0, result.stderr
    assert "Success" in result.stdout


def test_echo_to_an_unknown_or_unreachable_peer_fails_with_a_reason(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind((LOOPBACK, 0))
        dead_port = closed.getsockname()[1]
    peers = [{"ae_title": "GONE", "host": LOOPBACK, "port": dead_port}]
    path = write_config(tmp_path / "c.yaml", minimal(tmp_path, peers=peers, acse_timeout="3s"))
    unknown = dirigo("echo", "--config", str(path), "NOBODY")
    assert unknown.returncode == 1 and "no peer 'NOBODY'" in unknown.stderr
    gone = dirigo("echo", "--config", str(path), "GONE")
    assert gone.returncode == 1 and "could not be reached" in gone.stderr


def test_run_on_a_port_already_in_use_exits_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        config = minimal(tmp_path, port=taken.getsockname()[1])
        result = dirigo("run", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr


def test_version_and_help_need_no_config() -> None:
    assert dirigo("--version").stdout.startswith("dirigo ")
    assert dirigo().returncode == 2
