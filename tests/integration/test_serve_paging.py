"""Query/Retrieve through archives whose QIDO-RS paging is broken: one that caps `limit` below
`serve.page_size`, one that ignores `offset`. Orthanc is the archive; `QidoPaging` in front of
it breaks the paging, as such archives do."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import requests
import yaml

from agent.cloud import CloudHttp
from agent.dicomweb import DicomWeb, IncompleteListing
from tests.conftest import OrthancFactory, StoreSCPFactory
from tests.integration.test_serve import load, received, serve_agent, uid
from tests.integration.test_upload import TusFactory, complete_uploads, confirming_agent
from tests.support import datasets, dcmtk
from tests.support.net import LOOPBACK, wait_until
from tests.support.orthanc import Orthanc
from tests.support.qidopaging import QidoPaging

SUCCESS, UNABLE_TO_PROCESS = 0x0000, 0xC000
STUDIES = 7


@pytest.fixture
def seven_studies(tmp_path: Path, orthanc: OrthancFactory) -> tuple[Orthanc, list[Path]]:
    """An archive of seven one-slice studies, and their files."""
    archive = orthanc(aet="ARCHIVE")
    files = [
        datasets.ct_series(tmp_path / f"study{n}", slices=1, rows=16, cols=16, seed=300 + n)[0]
        for n in range(STUDIES)
    ]
    load(archive, files)
    return archive, files


def test_find_through_an_archive_that_caps_limit_answers_every_match(
    tmp_path: Path, tmp_data_dir: Path, seven_studies: tuple[Orthanc, list[Path]]
) -> None:
    archive, files = seven_studies
    with QidoPaging("127.0.0.1", archive.http_port, cap=2) as capped:
        url = capped.url_for("/dicom-web")
        with serve_agent(tmp_data_dir, url, page_size=5) as agent:
            result = dcmtk.findscu(agent.port, ["StudyInstanceUID"], out_dir=tmp_path / "found")
            log = agent.log_tail()
    assert dcmtk.final_status(result) == SUCCESS, result.stdout[-2000:] + log
    found = {str(pydicom.dcmread(p).StudyInstanceUID) for p in dcmtk.answers(tmp_path / "found")}
    assert found == {uid(path) for path in files}


def test_move_through_an_archive_that_caps_limit_delivers_every_instance(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=7, rows=16, cols=16, seed=310)
    load(archive, series)
    destination = storescp(ae="DEST")
    with QidoPaging("127.0.0.1", archive.http_port, cap=3) as capped:
        url = capped.url_for("/dicom-web")
        with serve_agent(tmp_data_dir, url, destination, page_size=5) as agent:
            result = dcmtk.movescu(
                agent.port, [f"StudyInstanceUID={uid(series[0])}"], "DEST", timeout=120
            )
            log = agent.log_tail()
    assert dcmtk.final_status(result) == SUCCESS, result.stdout[-2000:] + log
    assert dcmtk.sub_operations(result)["Completed"] == len(series)
    assert set(received(destination.out_dir)) == {uid(p, "SOPInstanceUID") for p in series}


def test_an_archive_that_ignores_offset_fails_the_find_and_the_move_instead_of_looping(
    tmp_path: Path,
    tmp_data_dir: Path,
    seven_studies: tuple[Orthanc, list[Path]],
    storescp: StoreSCPFactory,
) -> None:
    archive, files = seven_studies
    destination = storescp(ae="DEST")
    with QidoPaging("127.0.0.1", archive.http_port, ignore_offset=True) as stuck:
        url = stuck.url_for("/dicom-web")
        with serve_agent(tmp_data_dir, url, destination, page_size=3) as agent:
            found = dcmtk.findscu(
                agent.port, ["StudyInstanceUID"], out_dir=tmp_path / "found", timeout=60
            )
            moved = dcmtk.movescu(
                agent.port,
                ["PatientID=" + uid(files[0], "PatientID")],
                "DEST",
                level="PATIENT",
                model="-P",
                timeout=60,
            )
            log = agent.log_tail()
        searches = len(stuck.searches())
    assert dcmtk.final_status(found) == UNABLE_TO_PROCESS, found.stdout[-2000:] + log
    assert "ignores offset" in log
    assert dcmtk.final_status(moved) == UNABLE_TO_PROCESS, moved.stdout[-2000:] + log
    assert list(destination.out_dir.iterdir()) == []
    assert searches <= 5, "find: two pages, then the repeat is seen; move: two asked at once, then"


def test_confirmation_through_an_archive_that_caps_limit_sees_the_whole_part(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory, orthanc: OrthancFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=5, rows=16, cols=16, seed=320)
    archive = orthanc(aet="ARCHIVE")
    load(archive, series)  # the archive already holds the part: only the listing is in doubt
    tus = tus_server()
    with QidoPaging("127.0.0.1", archive.http_port, cap=2) as capped:
        agent = confirming_agent(tmp_data_dir, tus, archive)
        config = yaml.safe_load(agent.config_path.read_text())
        config["cloud"]["dicomweb_url"] = capped.url_for("/dicom-web")
        config.setdefault("serve", {})["page_size"] = 4
        agent.config_path.write_text(yaml.safe_dump(config))
        with agent:
            dcmtk.storescu(series, agent.port)
            complete_uploads(tus, 1)
            wait_until(
                lambda: agent.status()["studies"]["confirmed"] == 1,
                60,
                what="the part confirmed through 2-result pages",
            )
        assert len(capped.searches()) >= 3


def test_pages_asked_ahead_come_whole_in_order_from_a_plain_and_a_capped_archive(
    seven_studies: tuple[Orthanc, list[Path]],
) -> None:
    archive, files = seven_studies
    expected = sorted(uid(path) for path in files)
    for cap, ahead, most_at_once in ((None, 2, 2), (2, 2, 2), (None, 1, 1)):
        with QidoPaging(LOOPBACK, archive.http_port, cap=cap, delay=0.2) as proxy:
            web = DicomWeb(CloudHttp(requests.Session(), 30.0), proxy.url_for("/dicom-web"))
            pages = list(web.pages("studies", [("includefield", "0020000D")], 3, ahead))
        listed = [answer["0020000D"]["Value"][0] for page in pages for answer in page]
        assert sorted(listed) == expected, (cap, ahead)
        assert proxy.most_in_flight == most_at_once, (cap, ahead)
        if cap is not None:  # after the first short page, one at a time from where it ended
            assert [len(page) for page in pages] == [2, 2, 2, 1]


def test_pages_asked_ahead_from_an_archive_that_ignores_offset_stop_incomplete(
    seven_studies: tuple[Orthanc, list[Path]],
) -> None:
    archive, _files = seven_studies
    with QidoPaging(LOOPBACK, archive.http_port, ignore_offset=True) as stuck:
        web = DicomWeb(CloudHttp(requests.Session(), 30.0), stuck.url_for("/dicom-web"))
        with pytest.raises(IncompleteListing, match="ignores offset"):
            list(web.pages("studies", [], 3, 2))
