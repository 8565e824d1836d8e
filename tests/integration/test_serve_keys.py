"""A retrieval names what it moves: wildcards in its unique keys are refused before the archive
is asked, and its listing streams through a temporary file instead of a list (real Orthanc as
the archive, DCMTK's movescu/getscu as the PACS)."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from agent.cloud import CloudHttp
from agent.dicomweb import DicomWeb
from agent.serve.cache import InstanceCache
from agent.serve.query import study_scope
from agent.serve.retrieve import Retriever, TooManyInstances
from tests.conftest import OrthancFactory, StoreSCPFactory
from tests.integration.test_serve import load, serve_agent, uid
from tests.support import datasets, dcmtk

IDENTIFIER_MISMATCH = 0xA900


@pytest.mark.parametrize("patient_id", ["*", "**", "?*"])
def test_a_patient_move_or_get_by_wildcard_is_refused_and_moves_nothing(
    tmp_path: Path,
    tmp_data_dir: Path,
    orthanc: OrthancFactory,
    storescp: StoreSCPFactory,
    patient_id: str,
) -> None:
    archive = orthanc(aet="ARCHIVE")
    load(archive, datasets.ct_series(tmp_path / "a", slices=2, rows=16, cols=16, seed=401))
    load(archive, datasets.ct_series(tmp_path / "b", slices=2, rows=16, cols=16, seed=402))
    destination = storescp(ae="DEST")
    keys = [f"PatientID={patient_id}"]
    with serve_agent(tmp_data_dir, archive.dicomweb_url, destination) as agent:
        moved = dcmtk.movescu(agent.port, keys, "DEST", level="PATIENT", model="-P", timeout=60)
        got = dcmtk.getscu(
            agent.port, keys, tmp_path / "got", level="PATIENT", model="-P", timeout=60
        )
        log = agent.log_tail()
    assert dcmtk.final_status(moved) == IDENTIFIER_MISMATCH, moved.stdout[-2000:] + log
    assert dcmtk.final_status(got) == IDENTIFIER_MISMATCH, got.stdout[-2000:] + log
    assert "PatientID holds a wildcard" in log
    assert list(destination.out_dir.iterdir()) == []
    assert not any((tmp_path / "got").glob("*")), "nothing delivered by C-GET either"


def test_a_listing_streams_into_a_file_each_instance_once_and_stops_past_its_bound(
    tmp_path: Path, orthanc: OrthancFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=5, rows=16, cols=16, seed=403)
    load(archive, series)
    session = requests.Session()
    session.stream = True
    dicomweb = DicomWeb(CloudHttp(session, 30.0), archive.dicomweb_url)
    cache = InstanceCache(tmp_path / "cache", 10**9).open()
    retriever = Retriever(dicomweb, cache, page_size=2)
    scope = study_scope(uid(series[0]))

    listing = retriever.instances(scope)
    try:
        assert len(listing) == 5
        first, second = iter(listing), iter(listing)  # C-MOVE walks it twice at once
        pairs = list(zip(first, second, strict=True))
        assert all(a == b for a, b in pairs)
        assert {ref.sop_instance for ref, _ in pairs} == {uid(p, "SOPInstanceUID") for p in series}
        assert list((tmp_path / "cache" / "tmp").iterdir()) == [], "an unnamed file"
    finally:
        listing.close()
    with pytest.raises(TooManyInstances, match="more than 3"):
        retriever.instances(scope, most=3)
    session.close()
