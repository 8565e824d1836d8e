"""Uploads against the real tus server: storescu → `dirigo run` → @tus/server, end to end."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sqlite3
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from pydicom import dcmread

from tests.support import bundles, datasets, dcmtk
from tests.support.agent import Agent
from tests.support.faultproxy import FaultProxy
from tests.support.net import wait_until
from tests.support.orthanc import Orthanc
from tests.support.tus import StoredUpload, TusServer

TusFactory = Callable[..., TusServer]
OrthancFactory = Callable[..., Orthanc]


def upload_agent(
    data_dir: Path, upload_url: str, *, stable_after: str = "1s", **upload: Any
) -> Agent:
    settings = {"chunk_size": "64KiB", "concurrency": 2, "retry_first": "1s", "retry_max": "2s"}
    settings.update(upload)
    return Agent(
        data_dir,
        stable_after=stable_after,
        extra={"cloud": {"upload_url": upload_url}, "upload": settings},
    )


def complete_uploads(tus: TusServer, count: int, timeout: float = 120.0) -> list[StoredUpload]:
    def done() -> bool:
        return len([u for u in tus.uploads() if u.complete]) >= count

    wait_until(done, timeout, what=f"{count} complete upload(s) on the tus server")
    return [u for u in tus.uploads() if u.complete]


def send_one_part(agent: Agent, tus: TusServer, series: list[Path]) -> StoredUpload:
    """Send `series` to the agent, every instance acknowledged; return its one upload, once
    complete and the part marked sent."""
    result = dcmtk.storescu(series, agent.port)
    assert len(dcmtk.acknowledged(result)) == len(series)
    (upload,) = complete_uploads(tus, 1)
    wait_until(lambda: agent.status()["studies"]["sent"] == 1, 30, what="the part marked sent")
    return upload


def test_a_study_from_storescu_arrives_as_one_verified_bundle(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=12, rows=128, cols=128, seed=11)
    tus = tus_server()
    with upload_agent(tmp_data_dir, tus.url) as agent:
        upload = send_one_part(agent, tus, series)
        data = upload.data()
        study_uid = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
        assert upload.metadata["sha256"] == hashlib.sha256(data).hexdigest()
        assert upload.metadata["site"] == "test-site"
        assert upload.metadata["study_uid"] == study_uid
        assert (upload.metadata["part"], upload.metadata["instances"]) == ("1", "12")
        assert upload.metadata["format"] == "dicom-tar+zstd"
        members = bundles.members(data)
        manifest = json.loads(members[-1][1])
        assert members[-1][0] == "manifest.json"
        assert manifest["study_uid"] == study_uid
        sent = {datasets.dataset_sha256(path) for path in series}
        received = {datasets.dataset_digest(body) for _, body in members[:-1]}
        assert received == sent
        assert {entry["sha256"] for entry in manifest["instances"]} == sent
        assert agent.status()["instances"]["sent"] == 12


def test_a_resent_study_uploads_nothing_new_and_late_instances_go_as_part_two(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=8, rows=64, cols=64, seed=12)
    tus = tus_server()
    with upload_agent(tmp_data_dir, tus.url) as agent:
        dcmtk.storescu(series[:6], agent.port)
        complete_uploads(tus, 1)
        wait_until(lambda: agent.status()["studies"]["sent"] == 1, 30, what="part 1 sent")
        dcmtk.storescu(series, agent.port)  # the PACS sends the whole study again, plus 2 late
        uploads = complete_uploads(tus, 2)
        wait_until(lambda: agent.status()["studies"]["sent"] == 2, 30, what="part 2 sent")
        late = next(u for u in uploads if u.metadata["part"] == "2")
        assert late.metadata["instances"] == "2"
        received = {datasets.dataset_digest(body) for _, body in bundles.instances(late.data())}
        assert received == {datasets.dataset_sha256(path) for path in series[6:]}
        assert len(tus.uploads()) == 2


def test_kill_9_mid_upload_resumes_from_the_server_offset_never_from_zero(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=24, rows=256, cols=256, seed=13)
    tus = tus_server()
    chunk = 128 * 1024
    kills = 3
    with FaultProxy("127.0.0.1", tus.port) as proxy:
        agent = upload_agent(
            tmp_data_dir,
            proxy.url_for("/files/"),
            compression="none",
            chunk_size=f"{chunk}B",
            max_bandwidth="1MB",
            concurrency=1,
        )
        offsets_at_kill = []
        with agent:
            dcmtk.storescu(series, agent.port)
            for _ in range(kills):
                previous = max(offsets_at_kill, default=0)

                def progressed(after: int = previous) -> bool:
                    found = tus.uploads()
                    return bool(found) and after + 300_000 < found[0].offset < found[0].size

                wait_until(progressed, 60, what="the upload to progress")
                agent.kill9()
                offsets_at_kill.append(tus.uploads()[0].offset)
                agent.start()
            (upload,) = complete_uploads(tus, 1)
            wait_until(lambda: agent.status()["studies"]["sent"] == 1, 30, what="the part sent")
            log = agent.log_tail(200_000)
        sent_bytes = proxy.bytes_upstream
    assert len(tus.uploads()) == 1  # one upload, resumed: never a second one from zero
    resumed = [
        int(line.split("resuming at ")[1].split()[0])
        for line in log.splitlines()
        if "resuming at " in line
    ]
    assert len(resumed) == kills
    for at_kill, resumed_at in zip(offsets_at_kill, resumed, strict=True):
        assert resumed_at >= at_kill
    assert upload.metadata["sha256"] == hashlib.sha256(upload.data()).hexdigest()
    assert upload.size is not None
    # The bundle once, at most one chunk again per interruption, and HTTP headers.
    assert sent_bytes <= upload.size + kills * chunk + 64 * 1024


@pytest.mark.parametrize("compression", ["none"])
def test_uncompressed_bundles_are_plain_tar(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory, compression: str
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=14)
    tus = tus_server()
    with upload_agent(tmp_data_dir, tus.url, compression=compression) as agent:
        dcmtk.storescu(series, agent.port)
        (upload,) = complete_uploads(tus, 1)
    assert upload.metadata["format"] == "dicom-tar"
    with tarfile.open(fileobj=io.BytesIO(upload.data()), mode="r:") as tar:
        assert tar.getnames()[-1] == "manifest.json"


def confirming_agent(data_dir: Path, tus: TusServer, archive: Orthanc) -> Agent:
    """An agent uploading to `tus` that confirms parts in `archive` and purges them at once."""
    agent = upload_agent(data_dir, tus.url, retry_first="1s", retry_max="1s")
    agent_config = yaml.safe_load(agent.config_path.read_text())
    agent_config["cloud"]["dicomweb_url"] = archive.dicomweb_url
    agent_config["spool"]["keep_sent_for"] = "0s"
    agent.config_path.write_text(yaml.safe_dump(agent_config))
    return agent


def test_a_part_is_confirmed_once_the_archive_lists_it_and_its_files_then_leave_the_spool(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory, orthanc: OrthancFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=5, rows=64, cols=64, seed=15)
    tus = tus_server()
    archive = orthanc("ARCHIVE", dicomweb=True)
    agent = confirming_agent(tmp_data_dir, tus, archive)
    with agent:
        dcmtk.storescu(series, agent.port)
        (upload,) = complete_uploads(tus, 1)
        # Uploaded but not yet in the archive: the part waits, retrying the QIDO-RS check.
        wait_until(lambda: agent.status()["studies"]["sent"] == 1, 30, what="the part sent")
        assert agent.status()["studies"]["confirmed"] == 0
        spool_files = [row[0] for row in agent.rows("SELECT path FROM instances")]
        assert all((tmp_data_dir / path).exists() for path in spool_files)
        # Standing in for the state's ingest (not built yet): the instances go into the archive.
        for _, body in bundles.instances(upload.data()):
            archive.session.post(f"{archive.http_url}/instances", data=body).raise_for_status()
        wait_until(
            lambda: agent.status()["studies"]["confirmed"] == 1, 30, what="the part confirmed"
        )
        wait_until(
            lambda: not any((tmp_data_dir / path).exists() for path in spool_files),
            10,
            what="the spool files removed (keep_sent_for: 0s)",
        )
        assert not list((tmp_data_dir / "bundles").iterdir())
        # The rows stay: the same study sent again is recognised and uploads nothing.
        dcmtk.storescu(series, agent.port)
        assert agent.status()["studies"]["open"] == 0
        assert len(tus.uploads()) == 1
        # The audit trail holds the part's way: sent to the upload host, then confirmed.
        parts = agent.rows(
            "SELECT event, study_uid, address, json_extract(detail, '$.instances') FROM audit"
            " WHERE event LIKE 'part-%' ORDER BY id"
        )
        study = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
        assert parts == [
            ("part-sent", study, "127.0.0.1", 5),
            ("part-confirmed", study, "127.0.0.1", 5),
        ]


def corrected(series: list[Path], out_dir: Path) -> list[Path]:
    """Return copies of `series` with the same UIDs and other content: a demographics fix."""
    out_dir.mkdir()
    copies = []
    for path in series:
        ds = dcmread(path)
        ds.PatientName = "CORRECTED^NAME"
        ds.save_as(out_dir / path.name, enforce_file_format=True)
        copies.append(out_dir / path.name)
    return copies


def test_a_part_of_corrected_instances_is_not_confirmed_from_the_old_version_in_the_archive(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory, orthanc: OrthancFactory
) -> None:
    first = datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=18)
    fixed = corrected(first, tmp_path / "fixed")
    tus = tus_server()
    archive = orthanc("ARCHIVE", dicomweb=True)
    agent = confirming_agent(tmp_data_dir, tus, archive)

    def ingest(upload: StoredUpload) -> None:  # standing in for the state's ingest
        for _, body in bundles.instances(upload.data()):
            archive.session.post(f"{archive.http_url}/instances", data=body).raise_for_status()

    with agent:
        dcmtk.storescu(first, agent.port)
        ingest(complete_uploads(tus, 1)[0])
        wait_until(lambda: agent.status()["studies"]["confirmed"] == 1, 30, what="part 1")
        dcmtk.storescu(fixed, agent.port)  # the PACS sends the corrected study: part 2
        (second,) = [u for u in complete_uploads(tus, 2) if u.metadata["part"] == "2"]

        # The archive lists every UID, but from the old version: part 2 is not confirmed.
        def checked() -> bool:
            ((error,),) = agent.rows("SELECT last_error FROM jobs ORDER BY id DESC LIMIT 1")
            return bool(error) or agent.status()["studies"]["confirmed"] == 2

        wait_until(checked, 30, what="part 2 checked against the archive")
        assert agent.status()["studies"]["confirmed"] == 1
        ((error,),) = agent.rows("SELECT last_error FROM jobs ORDER BY id DESC LIMIT 1")
        assert "other content than this part sent" in error
        paths = agent.rows("SELECT path FROM instances WHERE superseded = 0")
        assert len(paths) == 3 and all((tmp_data_dir / p).exists() for (p,) in paths)

        # Once the archive holds the corrected version, part 2 is confirmed and purged.
        for uid in archive.sop_instance_uids():
            (found,) = archive.post(
                "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": uid}}
            )
            archive.session.delete(f"{archive.http_url}/instances/{found}").raise_for_status()
        ingest(second)
        wait_until(lambda: agent.status()["studies"]["confirmed"] == 2, 30, what="part 2")
        wait_until(
            lambda: not any((tmp_data_dir / p).exists() for (p,) in paths),
            10,
            what="part 2's spool files removed (keep_sent_for: 0s)",
        )


def test_an_offset_the_agent_never_sent_is_not_trusted_and_the_bundle_goes_up_anew(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=12, rows=256, cols=256, seed=16)
    tus = tus_server()
    chunk = 128 * 1024
    agent = upload_agent(
        tmp_data_dir,
        tus.url,
        compression="none",
        chunk_size=f"{chunk}B",
        max_bandwidth="500kB",
        concurrency=1,
    )
    with agent:
        dcmtk.storescu(series, agent.port)
        wait_until(
            lambda: (
                bool(tus.uploads())
                and 0 < tus.uploads()[0].offset < tus.uploads()[0].size - 2 * chunk
            ),
            60,
            what="the upload under way",
        )
        agent.kill9()
        # Someone else writes to the agent's upload: more than one chunk beyond anything the
        # agent put on the wire. The server's offset is now not one the agent can have sent.
        (rogue,) = tus.uploads()
        url = f"{tus.url}{rogue.id}"
        response = requests.patch(
            url,
            data=b"\0" * (chunk + 1),
            headers={
                "Tus-Resumable": "1.0.0",
                "Upload-Offset": str(rogue.offset),
                "Content-Type": "application/offset+octet-stream",
            },
            timeout=30,
        )
        assert response.status_code == 204
        agent.start()
        (upload,) = complete_uploads(tus, 1)
        wait_until(lambda: agent.status()["studies"]["sent"] == 1, 30, what="the part sent")
        log = agent.log_tail(100_000)
    assert "but we sent only" in log
    assert upload.id != rogue.id  # the tainted upload was terminated, a new one completed
    assert [u.id for u in tus.uploads()] == [upload.id]
    data = upload.data()
    assert upload.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        assert len(tar.getmembers()) == len(series) + 1


def test_a_finished_upload_the_server_removed_before_the_part_was_marked_sent_is_not_sent_again(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=4, rows=64, cols=64, seed=17)
    tus = tus_server()
    with upload_agent(tmp_data_dir, tus.url) as agent:
        upload = send_one_part(agent, tus, series)
        agent.stop()
        # Back to what a crash after the last PATCH leaves: the server's confirmation of every
        # byte committed, the part not yet marked sent, its job claimed by the dead worker.
        ((size, offset),) = agent.rows("SELECT bundle_size, confirmed_offset FROM uploads")
        assert offset == size == upload.size
        with contextlib.closing(sqlite3.connect(tmp_data_dir / "dirigo.db")) as db, db:
            db.execute("UPDATE studies SET state = 'uploading'")
            db.execute("UPDATE instances SET state = 'packed'")
            db.execute("UPDATE uploads SET sent_at = NULL")
            db.execute(
                "UPDATE jobs SET state = 'claimed', lease_owner = 'gone:1:upload-1',"
                " lease_expires_at = 1e12"
            )
        # Meanwhile the server cleaned up the finished upload (ingested): HEAD answers 404.
        gone = requests.delete(
            f"{tus.url}{upload.id}", headers={"Tus-Resumable": "1.0.0"}, timeout=30
        )
        assert gone.status_code == 204
        assert tus.uploads() == []
        agent.start()
        wait_until(lambda: agent.status()["studies"]["sent"] == 1, 30, what="the part sent")
        log = agent.log_tail(100_000)
        assert tus.uploads() == []  # no second upload of the same bundle
        assert "not sending it again" in log
        assert agent.rows("SELECT state FROM jobs") == [("done",)]


def test_the_running_agent_transcodes_to_htj2k_with_bit_exact_pixels(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    """The transcoding workers start from `dirigo run` itself (a forkserver preloading the
    agent), not only from a test process."""
    import imagecodecs
    import numpy as np
    from pydicom.encaps import generate_frames

    series = datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=15)
    tus = tus_server()
    with upload_agent(tmp_data_dir, tus.url, transcode="htj2k") as agent:
        dcmtk.storescu(series, agent.port)
        try:
            (upload,) = complete_uploads(tus, 1, timeout=30)
        except TimeoutError:
            print(agent.log_tail(20000))
            raise
        manifest = bundles.manifest(upload.data())
        originals = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in series}
        for (_, body), entry in zip(
            bundles.instances(upload.data()), manifest["instances"], strict=True
        ):
            assert entry["transfer_syntax"] == "1.2.840.10008.1.2.4.201"
            assert entry["original"]["sha256"] == datasets.dataset_sha256(
                next(p for p in series if dcmread(p).SOPInstanceUID == entry["sop_instance_uid"])
            )
            rewritten = dcmread(io.BytesIO(body))
            (frame,) = generate_frames(rewritten.PixelData, number_of_frames=1)
            original = originals[entry["sop_instance_uid"]]
            assert np.array_equal(imagecodecs.htj2k_decode(frame), original.pixel_array)
        assert "crashed" not in agent.log_tail(100_000)
