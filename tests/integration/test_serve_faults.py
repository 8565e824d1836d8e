"""Retrieval through an archive that fails for a while: an HTTP fault injector in front of a real
Orthanc drops WADO-RS connections, answers 503 and cuts a series' stream short, and DCMTK
movescu, getscu and `dirigo retrieve` still get every instance once."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import OrthancFactory, StoreSCP, StoreSCPFactory
from tests.integration.test_serve import load, received, serve_agent, uid, wado_requests
from tests.support import datasets, dcmtk
from tests.support.httpfaults import HttpFaults
from tests.support.net import LOOPBACK
from tests.support.orthanc import Orthanc

SUCCESS = 0x0000
WADO = "/dicom-web/studies/"
"""Where WADO-RS instance retrievals go; QIDO-RS listings go to /dicom-web/instances."""


def arm(faults: HttpFaults) -> int:
    """Make the next WADO-RS requests fail: two connections closed without an answer, then two
    503s asking to come back in a second. Return how many requests will fail."""
    faults.drop_next(2, method="GET", path=WADO)
    faults.fail_next(503, 2, method="GET", path=WADO, headers={"Retry-After": "1"})
    return 4


def test_dropped_connections_and_503s_from_the_archive_cost_no_instance(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=6, rows=64, cols=64, seed=61)
    load(archive, series)
    study = f"StudyInstanceUID={uid(series[0])}"
    expected = {uid(p, "SOPInstanceUID"): datasets.dataset_sha256(p) for p in series}
    destination, pushed_to = storescp(ae="DEST"), storescp(ae="PUSHED")
    with HttpFaults(LOOPBACK, archive.http_port) as faults:
        url = faults.url_for("/dicom-web")
        failing = arm(faults)
        with serve_agent(tmp_data_dir / "move", url, destination) as agent:
            moved = dcmtk.movescu(agent.port, [study], "DEST")
            log = agent.log_tail()
        moved_requests = wado_requests(faults)
        failing += arm(faults)
        with serve_agent(tmp_data_dir / "get", url) as agent:
            got = dcmtk.getscu(agent.port, [study], tmp_path / "got")
            log += agent.log_tail()
        failing += arm(faults)
        (tmp_data_dir / "push").mkdir()
        command = serve_agent(tmp_data_dir / "push", url, pushed_to).command(
            "retrieve", "--study", uid(series[0]), "--to", "PUSHED"
        )
        pushed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        injected = [e for e in faults.exchanges("GET") if e.injected]

    assert dcmtk.final_status(moved) == SUCCESS, moved.stdout[-3000:] + log
    assert dcmtk.sub_operations(moved)["Completed"] == len(series)
    assert dcmtk.sub_operations(moved)["Failed"] == 0
    assert {k: datasets.dataset_sha256(v) for k, v in received(destination.out_dir).items()} == (
        expected
    )
    assert dcmtk.final_status(got) == SUCCESS, got.stdout[-3000:] + log
    assert dcmtk.sub_operations(got)["Completed"] == len(series)
    assert dcmtk.sub_operations(got)["Failed"] == 0
    assert {k: datasets.dataset_sha256(v) for k, v in received(tmp_path / "got").items()} == (
        expected
    )
    assert pushed.returncode == 0, pushed.stderr
    assert f"{len(series)} of {len(series)} instances sent to PUSHED" in pushed.stdout
    assert {k: datasets.dataset_sha256(v) for k, v in received(pushed_to.out_dir).items()} == (
        expected
    )
    assert len(injected) == failing, "every fault was met"
    # The first instance alone (it measures the link), then the rest in one series request:
    # each of the four failures of the first was tried again, once.
    assert moved_requests == 2 + 4, "each failed request tried again, once"
    assert "again in" in log


def move_as_stored(
    archive: Orthanc,
    data_dir: Path,
    destination: StoreSCP,
    study: str,
    arm: Callable[[HttpFaults], object] = lambda _faults: None,
) -> tuple[subprocess.CompletedProcess[str], str, list[str]]:
    """C-MOVE `study` to `destination` through a fresh agent asking as stored (no instance
    fetched alone first: a series' request is the first), its archive behind a fault injector
    armed by `arm`; return movescu's result, the agent's log and the WADO-RS paths asked."""
    with HttpFaults(LOOPBACK, archive.http_port) as faults:
        arm(faults)
        url = faults.url_for("/dicom-web")
        with serve_agent(data_dir, url, destination, fetch_syntax="as-stored") as agent:
            moved = dcmtk.movescu(agent.port, [f"StudyInstanceUID={study}"], "DEST")
            log = agent.log_tail()
        paths = [e.path for e in faults.exchanges("GET") if e.path.startswith(WADO)]
    return moved, log, paths


def test_a_series_stream_cut_short_leaves_the_rest_to_single_fetches(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=8, rows=64, cols=64, seed=62)
    load(archive, series)
    study = uid(series[0])
    expected = {uid(p, "SOPInstanceUID"): datasets.dataset_sha256(p) for p in series}
    destination = storescp(ae="DEST")
    size = series[0].stat().st_size
    moved, log, paths = move_as_stored(
        archive,
        tmp_data_dir,
        destination,
        study,
        lambda faults: faults.cut_next(int(size * 2.5), method="GET", path=WADO),
    )

    assert dcmtk.final_status(moved) == SUCCESS, moved.stdout[-3000:] + log
    assert dcmtk.sub_operations(moved)["Completed"] == len(series)
    assert {k: datasets.dataset_sha256(v) for k, v in received(destination.out_dir).items()} == (
        expected
    )
    assert "/instances/" not in paths[0], "the series streamed in one request first"
    singles = [p for p in paths[1:] if "/instances/" in p]
    assert len(singles) == len(paths) - 1 and 1 <= len(singles) <= len(series) - 2
    assert f"fetching its {len(singles)} other instances one by one" in log
    assert f"{len(series)} fetched, 0 from the cache" in log


def test_a_study_listed_with_its_series_interleaved_streams_one_request_per_series(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    import pydicom

    archive = orthanc(aet="ARCHIVE")
    files = []
    second = pydicom.uid.generate_uid(entropy_srcs=["interleaved", "second series"])
    for index, path in enumerate(datasets.ct_series(tmp_path / "ct", 12, 32, 32, seed=63)):
        ds = pydicom.dcmread(path)
        if index % 2:  # every other slice in a second series: the archive lists them in turn
            ds.SeriesInstanceUID = second
        files.append(tmp_path / f"mixed{index}.dcm")
        ds.save_as(files[-1])
    load(archive, files)
    expected = {uid(p, "SOPInstanceUID"): datasets.dataset_sha256(p) for p in files}
    destination = storescp(ae="DEST")
    moved, log, paths = move_as_stored(archive, tmp_data_dir, destination, uid(files[0]))

    assert dcmtk.final_status(moved) == SUCCESS, moved.stdout[-3000:] + log
    assert dcmtk.sub_operations(moved)["Completed"] == len(files), log
    assert {k: datasets.dataset_sha256(v) for k, v in received(destination.out_dir).items()} == (
        expected
    )
    assert len(paths) == 2 and not any("/instances/" in p for p in paths), paths
