"""The DICOMweb upload profile end to end: storescu → `dirigo run` (upload.protocol: stow-rs)
→ (an HTTP fault injector) → a real Orthanc with its DICOMweb plugin as the state archive.

What reached the archive is read back through Orthanc's own REST API (`/instances/{id}/file`)
and compared, dataset by dataset (sha256 after the File Meta), with what storescu sent. The
injector counts the STOW-RS requests and the bytes they carried.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from tests.support import datasets, dcmtk
from tests.support.agent import Agent
from tests.support.httpfaults import HttpFaults
from tests.support.net import LOOPBACK, wait_until
from tests.support.orthanc import Orthanc

OrthancFactory = Callable[..., Orthanc]

BATCH = 64 * 1024
WAIT = 60.0


def stow_agent(
    data_dir: Path, dicomweb_url: str, *, stable_after: str = "1s", **upload: Any
) -> Agent:
    """Return an agent (not started) storing parts over STOW-RS to `dicomweb_url` in 64 KiB
    batches, retrying after 1 to 2 s. It has no tus endpoint at all."""
    settings: dict[str, Any] = {
        "protocol": "stow-rs",
        "stow_batch": f"{BATCH}B",
        "concurrency": 1,
        "retry_first": "1s",
        "retry_max": "2s",
    }
    settings.update(upload)
    cloud = {"upload_url": None, "dicomweb_url": dicomweb_url}
    return Agent(data_dir, stable_after=stable_after, extra={"cloud": cloud, "upload": settings})


def send_study(agent: Agent, series: list[Path]) -> None:
    result = dcmtk.storescu(series, agent.port)
    assert len(dcmtk.acknowledged(result)) == len(series), result.stdout + result.stderr


def archived_digests(archive: Orthanc) -> list[str]:
    """Return the dataset sha256 of every instance the archive holds, as it gives it back."""
    digests = []
    for instance_id in archive.get("/instances"):
        response = archive.session.get(f"{archive.http_url}/instances/{instance_id}/file")
        response.raise_for_status()
        digests.append(datasets.dataset_digest(response.content))
    return sorted(digests)


def sent_digests(series: list[Path]) -> list[str]:
    return sorted(datasets.dataset_sha256(path) for path in series)


def expected_batches(series: list[Path]) -> int:
    """Return how many STOW-RS requests the agent makes for `series` in BATCH-byte batches."""
    count, size = 0, 0
    for path in series:
        length = path.stat().st_size
        if count == 0 or size + length > BATCH:
            count, size = count + 1, 0
        size += length
    return count


def wait_confirmed(agent: Agent, parts: int = 1) -> None:
    wait_until(
        lambda: agent.status()["studies"]["confirmed"] == parts, WAIT, what="the part confirmed"
    )


def failed_job(agent: Agent, mentions: str, *, retryable: bool) -> dict[str, Any]:
    """Wait until `dirigo status --json` lists the part's job as failed with `mentions` in its
    last error and a next attempt exactly when `retryable`; return that entry."""

    def failed() -> dict[str, Any] | None:
        for job in agent.status()["failed"]:
            retrying = job["next_attempt_at"] is not None
            if mentions in (job["last_error"] or "") and retrying == retryable:
                return dict(job)
        return None

    found = wait_until(failed, WAIT, 0.2, what=f"a failed job mentioning {mentions!r}")
    assert isinstance(found, dict)
    return found


def test_a_study_goes_up_over_stow_rs_in_batches_byte_identical_and_is_confirmed(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=12, rows=128, cols=128, seed=41)
    archive = orthanc("ARCHIVE")
    with (
        HttpFaults(LOOPBACK, archive.http_port) as faults,
        stow_agent(tmp_data_dir, faults.url_for("/dicom-web")) as agent,
    ):
        send_study(agent, series)
        wait_confirmed(agent)
        assert archived_digests(archive) == sent_digests(series)
        assert expected_batches(series) > 1
        assert faults.count("POST") == expected_batches(series)
        status = agent.status()
        assert status["instances"]["sent"] == len(series)
        assert status["jobs"] == {**status["jobs"], "done": 1, "failed": 0, "claimed": 0}
        # The PACS sends the study again: recognised, nothing new goes up.
        send_study(agent, series)
        assert agent.status()["studies"]["open"] == 0
        assert faults.count("POST") == expected_batches(series)
        assert archive.instance_count() == len(series)


def test_kill_9_mid_part_resumes_with_only_the_instances_not_yet_stored(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=24, rows=128, cols=128, seed=42)
    total = sum(path.stat().st_size for path in series)
    archive = orthanc("ARCHIVE")
    with HttpFaults(LOOPBACK, archive.http_port) as faults:
        agent = stow_agent(tmp_data_dir, faults.url_for("/dicom-web"), max_bandwidth="150kB")
        with agent:
            send_study(agent, series)

            def stored() -> int:
                return len(agent.rows("SELECT 1 FROM instances WHERE stow_stored_at IS NOT NULL"))

            wait_until(lambda: stored() >= 4, WAIT, 0.05, what="some instances stored")
            agent.kill9()
            at_kill = stored()
            assert at_kill < len(series), "the part finished before the kill; slow it down"
            agent.start()
            wait_confirmed(agent)
            log = agent.log_tail(100_000)
        posted = sum(e.body_bytes for e in faults.exchanges("POST"))
    assert f"resuming with {len(series) - at_kill} of {len(series)} instance(s)" in log
    assert archived_digests(archive) == sent_digests(series)
    # Every instance once, at most the batch in flight at the kill again, and the multipart
    # framing (about 100 bytes per instance).
    assert posted <= total + BATCH + 200 * len(series)


def test_an_archive_answering_500_is_retried_visibly_then_gets_the_study(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=6, rows=64, cols=64, seed=43)
    archive = orthanc("ARCHIVE")
    with HttpFaults(LOOPBACK, archive.http_port) as faults:
        faults.fail_all(500, method="POST", body=b"archive unwell")
        with stow_agent(tmp_data_dir, faults.url_for("/dicom-web")) as agent:
            send_study(agent, series)
            job = failed_job(agent, "HTTP 500", retryable=True)
            assert "archive unwell" in job["last_error"]
            wait_until(lambda: faults.count("POST") >= 3, WAIT, what="the POST retried")
            assert archive.instance_count() == 0
            faults.clear()
            wait_confirmed(agent)
            assert agent.status()["failed"] == []
    assert archived_digests(archive) == sent_digests(series)


def test_an_instance_the_archive_refuses_fails_the_part_with_the_reason_in_status(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=4, rows=64, cols=64, seed=44)
    uids = [str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in series]
    archive = orthanc("ARCHIVE")
    # The archive's own answer for a refused instance (PS3.18 10.5.3): it stored the others
    # and refused the first, as not matching its SOP class (0xA900). Orthanc 1.10 itself
    # refuses with 0x0110 only, and only what it cannot parse: the agent never sends that.
    answer = {
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081155": {"vr": "UI", "Value": [uids[0]]},
                    "00081197": {"vr": "US", "Value": [0xA900]},
                }
            ],
        },
        "00081199": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids[1:]],
        },
    }
    with HttpFaults(LOOPBACK, archive.http_port) as faults:
        faults.fail_next(
            202,
            method="POST",
            body=json.dumps(answer).encode(),
            headers={"Content-Type": "application/dicom+json"},
        )
        with stow_agent(tmp_data_dir, faults.url_for("/dicom-web")) as agent:
            send_study(agent, series)
            job = failed_job(agent, uids[0], retryable=False)
            assert "0xA900 (data set does not match SOP class)" in job["last_error"]
            assert "did not store 1 of 4" in job["last_error"]
            assert agent.status()["studies"]["confirmed"] == 0
            # The others are recorded as stored: not sent again when an operator retries.
            stored = agent.rows("SELECT sop_instance_uid FROM instances WHERE stow_stored_at > 0")
            assert {uid for (uid,) in stored} == set(uids[1:])
    assert faults.count("POST") == 1


def test_a_spool_file_damaged_after_reception_is_not_sent_and_fails_the_part(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=45)
    archive = orthanc("ARCHIVE")
    with stow_agent(tmp_data_dir, archive.dicomweb_url, stable_after="3s") as agent:
        send_study(agent, series)
        ((path,),) = agent.rows("SELECT path FROM instances ORDER BY id LIMIT 1 OFFSET 1")
        spool_file = tmp_data_dir / str(path)
        data = bytearray(spool_file.read_bytes())
        data[-1] ^= 0xFF  # a bit flipped on disk: same size, different pixels
        spool_file.write_bytes(bytes(data))
        job = failed_job(agent, "changed since it was received", retryable=False)
        assert job["last_error"].startswith("cannot send: ")
        # The request was cut off before the damaged file was complete: the archive stored
        # nothing of the batch, and the agent no instance.
        assert archive.instance_count() == 0
        assert agent.rows("SELECT 1 FROM instances WHERE stow_stored_at IS NOT NULL") == []
