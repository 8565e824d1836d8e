"""The `dirigo` command as an operator meets it: exit codes, messages, and the status document."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.fileset import FileSet

from agent.store import Store
from tests.conftest import StoreSCPFactory, TusServerFactory
from tests.support import datasets, dcmtk
from tests.support.agent import Agent
from tests.support.net import LOOPBACK, free_port, wait_until

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


def test_check_config_warns_about_a_plain_http_cloud_url_and_still_exits_0(
    tmp_path: Path,
) -> None:
    config = minimal(tmp_path)
    config["cloud"] = {"upload_url": "https://exchange.example/files/"}
    secure = dirigo("check-config", "--config", str(write_config(tmp_path / "s.yaml", config)))
    assert secure.returncode == 0, secure.stderr
    assert "warning" not in secure.stderr
    config["cloud"] = {"dicomweb_url": "http://exchange.example/dicom-web", **config["cloud"]}
    plain = dirigo("check-config", "--config", str(write_config(tmp_path / "p.yaml", config)))
    assert plain.returncode == 0, plain.stderr
    assert "warning: At 'cloud.dicomweb_url': http://exchange.example/dicom-web is plain http" in (
        plain.stderr
    )


def test_check_config_warns_about_peers_admitted_on_their_ae_title_alone(tmp_path: Path) -> None:
    peers = [{"ae_title": "PACS", "host": LOOPBACK}, {"ae_title": "CT1"}]
    config = minimal(tmp_path, peers=peers, accept_unknown_peers=True)
    result = dirigo("check-config", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert [w.split(":", 2)[1].strip() for w in warnings] == [
        "At 'dicom.peers[1]'",
        "At 'dicom.accept_unknown_peers'",
    ]
    assert yaml.safe_load(result.stdout)["dicom"]["peers"][1]["services"] == ["store", "echo"]


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
        "transcode",
        "schema_version",
        "uploads",
        "retrieve",
        "failed",
    }
    assert status["transcode"] == {"setting": "auto", "last_choice": None}
    assert status["uploads"] == [] and status["failed"] == []
    assert status["retrieve"] == {"fetch_syntax": None}
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
    assert "uploading  none" in text and "failed     none" in text
    assert "transcode  auto\n" in text
    assert "retrieve   nothing fetched yet" in text


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


def test_a_second_agent_on_the_same_data_dir_refuses_to_start(tmp_data_dir: Path) -> None:
    with Agent(tmp_data_dir) as first:
        second = subprocess.run(first.command("run"), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "another dirigo agent is running with data_dir" in second.stderr
        assert dcmtk.echoscu(first.port).returncode == 0  # the first one is unharmed


def test_version_and_help_need_no_config() -> None:
    assert dirigo("--version").stdout.startswith("dirigo ")
    assert dirigo().returncode == 2


# -- status of uploads and failed items; the job queue -----------------------------------------


def run(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `dirigo ARGS --config <the agent's>` and return it finished."""
    return subprocess.run(
        agent.command(*args), capture_output=True, text=True, timeout=120, check=False
    )


def failing_agent(data_dir: Path, **extra: Any) -> Agent:
    """An agent whose uploads fail (its cloud is a closed port) and then wait an hour to retry."""
    upload = {"retry_first": "1h", "retry_max": "2h"}
    return Agent(data_dir, stable_after="1s", extra={"upload": upload, **extra})


def failed_item(agent: Agent, attempts: int = 1) -> dict[str, Any]:
    """Wait until one job has failed after `attempts` attempts; return its `dirigo status` item."""
    query = "SELECT id FROM jobs WHERE state = 'failed' AND attempts = ?"
    wait_until(
        lambda: agent.rows(query, attempts), 60, what=f"a job failed after {attempts} attempt(s)"
    )
    items: list[dict[str, Any]] = agent.status()["failed"]
    (item,) = items
    assert item["attempts"] == attempts
    return item


def send_study(agent: Agent, folder: Path, seed: int) -> str:
    series = datasets.ct_series(folder, slices=3, rows=64, cols=64, seed=seed)
    assert len(dcmtk.acknowledged(dcmtk.storescu(series, agent.port))) == len(series)
    return str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)


def test_status_shows_a_failed_upload_with_its_last_error_and_next_attempt(
    tmp_path: Path, tmp_data_dir: Path
) -> None:
    with failing_agent(tmp_data_dir) as agent:
        study_uid = send_study(agent, tmp_path / "ct", seed=41)
        item = failed_item(agent)
        text = run(agent, "status").stdout
    assert set(item) == {
        "id",
        "kind",
        "study_uid",
        "part",
        "attempts",
        "last_error",
        "next_attempt_at",
    }
    assert (item["kind"], item["study_uid"], item["part"]) == ("upload", study_uid, 1)
    assert "127.0.0.1:9" in item["last_error"]
    next_attempt = datetime.fromisoformat(item["next_attempt_at"])
    assert next_attempt.utcoffset() == timedelta(0)
    assert next_attempt > datetime.now(tz=UTC)
    line = next(line for line in text.splitlines() if line.startswith("failed "))
    assert f"job {item['id']} upload {study_uid} part 1" in line
    assert "127.0.0.1:9" in line and "next attempt 20" in line and "UTC (in " in line


def test_status_shows_an_upload_in_progress_with_bytes_sent_and_rate(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusServerFactory
) -> None:
    tus = tus_server()
    # About 1.2 MB at 128 KiB/s: some ten seconds under way.
    upload = {"chunk_size": "64KiB", "max_bandwidth": "128KiB", "compression": "none"}
    extra = {"cloud": {"upload_url": tus.url}, "upload": upload}
    series = datasets.ct_series(tmp_path / "ct", slices=16, rows=192, cols=192, seed=45)
    study_uid = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    with Agent(tmp_data_dir, stable_after="1s", extra=extra) as agent:
        assert len(dcmtk.acknowledged(dcmtk.storescu(series, agent.port))) == len(series)

        def sending() -> dict[str, Any] | None:
            items = agent.status()["uploads"]
            return items[0] if items and items[0]["bytes_sent"] > 0 else None

        item = wait_until(sending, 60, interval=0.2, what="an upload under way")
        text = run(agent, "status").stdout
    assert isinstance(item, dict)
    assert set(item) == {"study_uid", "part", "bytes_sent", "bytes_total", "rate_bytes_per_s"}
    assert (item["study_uid"], item["part"]) == (study_uid, 1)
    assert 0 < item["bytes_sent"] < item["bytes_total"]
    assert 0 < item["rate_bytes_per_s"] < 1024 * 1024  # capped at 128 KiB/s
    line = next(line for line in text.splitlines() if line.startswith("uploading "))
    assert line.startswith(f"uploading  {study_uid} part 1: ")
    assert " MB (" in line and "%) at 0." in line and line.endswith(" MB/s")


def test_queue_cancel_and_retry_act_on_a_real_failed_job(
    tmp_path: Path, tmp_data_dir: Path
) -> None:
    with failing_agent(tmp_data_dir) as agent:
        study_uid = send_study(agent, tmp_path / "ct", seed=42)
        job_id = failed_item(agent)["id"]

        listed = json.loads(run(agent, "queue", "list", "--json").stdout)["jobs"]
        assert [(j["id"], j["state"], j["study_uid"]) for j in listed] == [
            (job_id, "failed", study_uid)
        ]
        table = run(agent, "queue", "list").stdout
        assert table.startswith("ID") and f"{study_uid}" in table and "failed" in table
        assert run(agent, "queue", "list", "--state", "done").stdout.strip() == "no jobs"

        cancel = run(agent, "queue", "cancel", str(job_id))
        assert cancel.returncode == 0, cancel.stderr
        (item,) = agent.status()["failed"]
        assert (item["last_error"], item["next_attempt_at"]) == ("cancelled by operator", None)
        text = run(agent, "status").stdout
        assert f"never: needs `dirigo queue retry {job_id}`" in text

        retry = run(agent, "queue", "retry", str(job_id))
        assert retry.returncode == 0, retry.stderr
        assert f"job {job_id}: ready, due now (1 attempt(s) so far)" in retry.stdout
        again = failed_item(agent, attempts=2)  # the running agent took it up at once
        assert again["id"] == job_id and "127.0.0.1:9" in again["last_error"]
        events = agent.rows("SELECT level, kind FROM events WHERE kind LIKE 'job_%' ORDER BY id")
    assert events == [("info", "job_cancelled"), ("info", "job_retried")]


def test_queue_actions_on_unknown_jobs_fail_with_one_line(tmp_data_dir: Path) -> None:
    Store.open(tmp_data_dir / "dirigo.db").close()  # an agent's database with no jobs yet
    agent = Agent(tmp_data_dir)
    for action in ("retry", "cancel"):
        result = run(agent, "queue", action, "41", "42")
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip() == (
            "dirigo: there is no job 41; there is no job 42; nothing was changed"
        )
    usage = run(agent, "queue", "retry", "one")
    assert usage.returncode == 2 and "invalid int value" in usage.stderr


# -- send: importing files and folders ---------------------------------------------------------


def imported_instances(agent: Agent) -> int:
    (count,) = agent.rows("SELECT count(*) FROM instances WHERE calling_ae = 'IMPORT'")[0]
    assert isinstance(count, int)
    return count


def expected_outcomes(paths: list[Path]) -> dict[str, int]:
    """Replay the receiver's rules over files in import order: the first copy of a SOP
    Instance UID is stored, identical content again is a duplicate, new content replaces."""
    counts = {"stored": 0, "duplicate": 0, "replaced": 0}
    current: dict[str, str] = {}
    for path in paths:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        digest = datasets.dataset_sha256(path)
        if uid not in current:
            counts["stored"] += 1
        elif current[uid] == digest:
            counts["duplicate"] += 1
        else:
            counts["replaced"] += 1
        current[uid] = digest
    return counts


def test_send_imports_a_folder_of_real_files_in_every_syntax_and_exits_0(
    tmp_path: Path, tmp_data_dir: Path
) -> None:
    folder = tmp_path / "import"
    (folder / "nested").mkdir(parents=True)
    real = datasets.real_files()
    for path in real:
        shutil.copyfile(path, folder / "nested" / path.name)
    shutil.copyfile(real[0], folder / "DICOMDIR")  # a CD's index: passed over, not counted
    with Agent(tmp_data_dir):
        pass  # creates the database; `send` works with the agent stopped too
    agent = Agent(tmp_data_dir)
    result = run(agent, "send", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    expected = expected_outcomes(sorted(folder.joinpath("nested").iterdir()))
    assert result.stdout.strip() == (
        f"{len(real)} file(s): {expected['stored']} stored, {expected['duplicate']} duplicate,"
        f" {expected['replaced']} replaced, 0 quarantined, 0 skipped, 0 failed"
    )
    assert imported_instances(agent) == len(
        {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in real}
    )
    assert list((tmp_data_dir / "incoming").iterdir()) == []


def test_send_of_broken_files_quarantines_or_skips_each_and_exits_1(
    tmp_path: Path, tmp_data_dir: Path
) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    broken = datasets.broken_files()
    for path in broken:
        shutil.copyfile(path, folder / path.name)
    (folder / "README.TXT").write_text("Open VIEWER.EXE to see the images.\n")
    part10 = [p for p in broken if p.read_bytes()[128:132] == b"DICM"]
    with Agent(tmp_data_dir):
        pass
    agent = Agent(tmp_data_dir)
    result = run(agent, "send", str(folder))
    assert result.returncode == 1
    skipped = len(broken) - len(part10) + 1
    assert f" 0 stored, 0 duplicate, 0 replaced, {len(part10)} quarantined (" in result.stdout
    assert f"{skipped} skipped (not a DICOM Part-10 file" in result.stdout
    for path in part10:
        assert f"quarantined {folder / path.name}: " in result.stderr
    assert f"skipped {folder / 'README.TXT'}: not a DICOM Part-10 file" in result.stderr
    assert "Traceback" not in result.stderr
    rows = agent.rows("SELECT calling_ae FROM quarantine")
    assert rows == [("IMPORT",)] * len(part10)
    assert len(list((tmp_data_dir / "quarantine").glob("*.dcm"))) == len(part10)
    assert imported_instances(agent) == 0


def test_send_of_a_cd_while_the_agent_runs_feeds_the_same_pipeline(
    tmp_path: Path, tmp_data_dir: Path
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=20, rows=64, cols=64, seed=43)
    cd = FileSet()
    for path in series:
        cd.add(path)
    cd.write(tmp_path / "cd")
    for path in (tmp_path / "cd").rglob("*"):
        os.utime(path, (946684800, 946684800))  # burned years ago, as files on a CD are
    study_uid = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    # The agent's periodic sweep of stale receives runs each second with a 2 s threshold here.
    timeouts = {"network_timeout": "1s", "dimse_timeout": "1s"}
    with failing_agent(tmp_data_dir, dicom=timeouts) as agent:
        sending = subprocess.Popen(
            agent.command("send", str(tmp_path / "cd")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        other = send_study(agent, tmp_path / "other", seed=44)  # C-STORE meanwhile
        out, err = sending.communicate(timeout=120)
        assert sending.returncode == 0, out + err
        assert out.strip() == (
            "20 file(s): 20 stored, 0 duplicate, 0 replaced, 0 quarantined, 0 skipped, 0 failed"
        )
        again = run(agent, "send", str(tmp_path / "cd"))
        assert again.returncode == 0 and " 20 duplicate," in again.stdout
        assert imported_instances(agent) == 20
        wait_until(
            lambda: {item["study_uid"] for item in agent.status()["failed"]} == {study_uid, other},
            60,
            interval=0.2,
            what="both studies packed and queued for upload",
        )
        log = agent.log_tail(100_000)
    assert "stale partial receive" not in log and "Traceback" not in log


def test_send_refuses_a_missing_path_or_a_data_dir_without_database(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", minimal(tmp_path))
    missing = dirigo("send", "--config", str(config), str(tmp_path / "no-cd"))
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"dirigo: cannot import {tmp_path / 'no-cd'}: No such file or directory"
    )
    file = shutil.copyfile(datasets.real_files()[0], tmp_path / "one.dcm")
    no_database = dirigo("send", "--config", str(config), str(file))
    assert no_database.returncode == 1 and "no database" in no_database.stderr
    assert not (tmp_path / "data").exists()


def test_send_of_a_file_cut_inside_its_file_meta_quarantines_it(
    tmp_path: Path, tmp_data_dir: Path
) -> None:
    data = datasets.ct_series(tmp_path / "ct", slices=1, rows=16, cols=16)[0].read_bytes()
    # Cut inside the 4-byte length of (0002,0001), whose VR (OB) is a long one.
    version = data.index(b"\x02\x00\x01\x00OB")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: version + 10])
    with Agent(tmp_data_dir):
        pass
    agent = Agent(tmp_data_dir)
    result = run(agent, "send", str(cut))
    assert result.returncode == 1
    assert "1 quarantined (File Meta is truncated" in result.stdout, result.stdout
    assert "0 failed" in result.stdout and "Traceback" not in result.stderr
    assert agent.rows("SELECT calling_ae FROM quarantine") == [("IMPORT",)]
    assert len(list((tmp_data_dir / "quarantine").glob("*.dcm"))) == 1


# -- permissions --------------------------------------------------------------------------------


def test_the_agent_keeps_data_dir_and_every_file_in_it_to_its_own_user(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "fresh"  # created by the agent
    good = datasets.ct_series(tmp_path / "ct", slices=1, rows=16, cols=16)[0]
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(good.read_bytes()[:-100])
    previous = os.umask(0o022)  # what a shell or a careless unit would hand the agent
    try:
        with Agent(data_dir) as agent:
            assert dcmtk.storescu([good], agent.port).returncode == 0
            assert run(agent, "send", str(bad)).returncode == 1
    finally:
        os.umask(previous)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert {p.relative_to(data_dir).parts[0] for p in files} >= {"dirigo.db", "spool", "quarantine"}
    loose = {str(p.relative_to(data_dir)): oct(p.stat().st_mode) for p in files}
    assert {name: mode for name, mode in loose.items() if int(mode, 8) & 0o077} == {}


@pytest.mark.parametrize("key", ["token_file", "client_key"])
def test_a_secret_file_others_may_read_stops_the_start_and_check_config(
    tmp_path: Path, key: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    secret.chmod(0o640)
    config = minimal(tmp_path, port=free_port())
    cloud = dict(config["cloud"], **{key: str(secret)})  # type: ignore[call-overload]
    if key == "client_key":
        cloud["client_cert"] = str(tmp_path / "client.pem")
    path = write_config(tmp_path / "dirigo.yaml", {**config, "cloud": cloud})
    expected = f"At 'cloud.{key}': {secret} is readable by its group or by others (mode 0640)"
    for command in ("run", "check-config"):
        result = dirigo(command, "--config", str(path), timeout=30)
        assert result.returncode == 78, result.stderr
        assert expected in result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created
    secret.chmod(0o600)
    assert dirigo("check-config", "--config", str(path)).returncode == 0
