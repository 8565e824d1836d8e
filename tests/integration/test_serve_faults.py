"""Retrieval through an archive that fails for a while: an HTTP fault injector in front of a real
Orthanc drops WADO-RS connections and answers 503, and DCMTK movescu, getscu and `dirigo
retrieve` still get every instance once."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import OrthancFactory, StoreSCPFactory
from tests.integration.test_serve import load, received, serve_agent, uid, wado_requests
from tests.support import datasets, dcmtk
from tests.support.httpfaults import HttpFaults
from tests.support.net import LOOPBACK

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
    assert moved_requests == len(series) + 4, "each failed request tried again, once"
    assert "again in" in log
