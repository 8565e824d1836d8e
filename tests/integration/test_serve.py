"""Query/Retrieve against real peers: DCMTK findscu/movescu/getscu → `dirigo run` → Orthanc's
DICOMweb as the cloud archive, with storescp or a pynetdicom storage SCP as the destination."""

from __future__ import annotations

import fnmatch
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from tests.conftest import OrthancFactory, StoreSCP, StoreSCPFactory
from tests.support import datasets, dcmtk
from tests.support.agent import Agent
from tests.support.httpfaults import HttpFaults
from tests.support.net import LOOPBACK, free_port, wait_until
from tests.support.orthanc import Orthanc

SUCCESS, PENDING, CANCEL, WARNING = 0x0000, 0xFF00, 0xFE00, 0xB000
OUT_OF_RESOURCES, CANNOT_COUNT, ALL_FAILED, UNKNOWN_DESTINATION = 0xA700, 0xA701, 0xA702, 0xA801
NOT_CONFIGURED = 0xC0D1
PACS = {"ae_title": "PACS", "host": LOOPBACK}


# --- the archive and the agent ----------------------------------------------------------------


def load(archive: Orthanc, paths: list[Path]) -> None:
    """Put files into the archive directly, over its REST API."""
    for path in paths:
        response = archive.session.post(
            f"{archive.http_url}/instances", data=path.read_bytes(), timeout=60
        )
        response.raise_for_status()


def serve_agent(
    data_dir: Path,
    dicomweb_url: str | None,
    *destinations: StoreSCP | tuple[str, int],
    **serve: Any,
) -> Agent:
    peers: dict[str, dict[str, Any]] = {"PACS": PACS}  # findscu & co. call as PACS
    for destination in destinations:
        ae, port = (
            (destination.ae, destination.port) if isinstance(destination, StoreSCP) else destination
        )
        peers[ae] = {"ae_title": ae, "host": LOOPBACK, "port": port}
    cloud: dict[str, Any] = {"timeout": "5s"}
    if dicomweb_url is not None:
        cloud["dicomweb_url"] = dicomweb_url
    return Agent(data_dir, peers=tuple(peers.values()), extra={"cloud": cloud, "serve": serve})


def uid(path: Path, keyword: str = "StudyInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


def received(out_dir: Path) -> dict[str, Path]:
    """Return the files a destination wrote, by SOP Instance UID."""
    return {uid(p, "SOPInstanceUID"): p for p in out_dir.iterdir() if p.is_file()}


def wado_requests(faults: HttpFaults) -> int:
    """Return how many WADO-RS instance retrievals reached the archive."""
    return sum(1 for e in faults.exchanges("GET") if e.path.startswith("/dicom-web/studies/"))


@pytest.fixture
def real_archive(orthanc: OrthancFactory) -> tuple[Orthanc, list[Path]]:
    """An archive holding one copy of each of pydicom-data's sound instances."""
    archive = orthanc(aet="ARCHIVE")
    files = datasets.distinct_instances(datasets.real_files())
    load(archive, files)
    return archive, files


# --- C-FIND -----------------------------------------------------------------------------------


def find(agent: Agent, out_dir: Path, level: str, *keys: str, model: str = "-S") -> list[Dataset]:
    result = dcmtk.findscu(agent.port, keys, level=level, model=model, out_dir=out_dir)
    assert dcmtk.final_status(result) == SUCCESS, result.stdout[-3000:] + agent.log_tail()
    return [pydicom.dcmread(p) for p in dcmtk.answers(out_dir)]


def test_find_studies_by_wildcard_name_and_date_range(
    tmp_path: Path, tmp_data_dir: Path, real_archive: tuple[Orthanc, list[Path]]
) -> None:
    archive, files = real_archive
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    with serve_agent(tmp_data_dir, archive.dicomweb_url, page_size=3) as agent:
        by_name = find(
            agent,
            tmp_path / "name",
            "STUDY",
            "PatientName=CompressedSamples?RG*",
            "StudyInstanceUID",
            "StudyDate",
            "RetrieveAETitle",
        )
        by_date = find(
            agent, tmp_path / "date", "STUDY", "StudyDate=20000101-20041231", "StudyInstanceUID"
        )
        open_range = find(agent, tmp_path / "open", "STUDY", "StudyDate=-19991231")

    named = {
        str(h.StudyInstanceUID)
        for h in headers
        if fnmatch.fnmatchcase(str(h.get("PatientName", "")), "CompressedSamples?RG*")
    }
    assert named and {str(a.StudyInstanceUID) for a in by_name} == named
    assert len(by_name) == len(named)  # one answer per study, though several have two series
    assert all(a.RetrieveAETitle == "DIRIGO" and a.QueryRetrieveLevel == "STUDY" for a in by_name)
    assert all(str(a.PatientName).startswith("CompressedSamples^") for a in by_name)
    dated = {
        str(h.StudyInstanceUID)
        for h in headers
        if "20000101" <= h.get("StudyDate", "") <= "20041231"
    }
    assert dated and {str(a.StudyInstanceUID) for a in by_date} == dated
    # the archive decides whether an empty date matches an open range; Orthanc says it does
    assert any(a.StudyDate for a in open_range)
    assert all(a.StudyDate <= "19991231" for a in open_range)


def test_find_at_patient_series_and_image_levels(
    tmp_path: Path, tmp_data_dir: Path, real_archive: tuple[Orthanc, list[Path]]
) -> None:
    archive, files = real_archive
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    study = next(
        h for h in headers if sum(o.StudyInstanceUID == h.StudyInstanceUID for o in headers) > 1
    )
    in_study = [h for h in headers if h.StudyInstanceUID == study.StudyInstanceUID]
    series = in_study[0].SeriesInstanceUID
    with serve_agent(tmp_data_dir, archive.dicomweb_url) as agent:
        patients = find(
            agent,
            tmp_path / "patients",
            "PATIENT",
            "PatientName=CompressedSamples*",
            "PatientID",
            "NumberOfPatientRelatedStudies",
            model="-P",
        )
        series_answers = find(
            agent,
            tmp_path / "series",
            "SERIES",
            f"StudyInstanceUID={study.StudyInstanceUID}",
            "SeriesInstanceUID",
            "Modality",
        )
        images = find(
            agent,
            tmp_path / "images",
            "IMAGE",
            f"StudyInstanceUID={study.StudyInstanceUID}",
            f"SeriesInstanceUID={series}",
            "SOPInstanceUID",
            "SOPClassUID",
        )

    named = [h for h in headers if str(h.get("PatientName", "")).startswith("CompressedSamples")]
    expected_patients = {str(h.get("PatientID", "")) for h in named}
    assert sorted(str(p.PatientID) for p in patients) == sorted(expected_patients)
    for patient in patients:
        studies = {h.StudyInstanceUID for h in named if h.get("PatientID") == patient.PatientID}
        assert patient.NumberOfPatientRelatedStudies == len(studies)
        assert patient.QueryRetrieveLevel == "PATIENT"
    assert {a.SeriesInstanceUID for a in series_answers} == {h.SeriesInstanceUID for h in in_study}
    assert all(a.StudyInstanceUID == study.StudyInstanceUID for a in series_answers)
    expected_images = {h.SOPInstanceUID for h in in_study if h.SeriesInstanceUID == series}
    assert {a.SOPInstanceUID for a in images} == expected_images
    assert all(a.SOPClassUID for a in images)


def test_find_by_a_list_of_study_uids(
    tmp_path: Path, tmp_data_dir: Path, real_archive: tuple[Orthanc, list[Path]]
) -> None:
    archive, files = real_archive
    wanted = sorted({uid(p) for p in files})[:3]
    with serve_agent(tmp_data_dir, archive.dicomweb_url) as agent:
        found = find(agent, tmp_path / "list", "STUDY", "StudyInstanceUID=" + "\\".join(wanted))
    assert sorted(str(a.StudyInstanceUID) for a in found) == wanted


def test_cancel_stops_a_long_find_promptly(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    studies = [
        datasets.ct_series(tmp_path / f"s{i}", slices=1, rows=16, cols=16, seed=1000 + i)[0]
        for i in range(120)
    ]
    load(archive, studies)
    with HttpFaults(LOOPBACK, archive.http_port) as faults:
        url = faults.url_for("/dicom-web")
        with serve_agent(tmp_data_dir, url, page_size=1) as agent:
            result = dcmtk.findscu(
                agent.port,
                ["StudyInstanceUID"],
                extra_args=["--cancel", "3"],
                out_dir=tmp_path / "answers",
            )
            searches = faults.count("GET")
            log = agent.log_tail()
    assert dcmtk.final_status(result) == CANCEL, result.stdout[-2000:]
    assert 3 <= len(dcmtk.answers(tmp_path / "answers")) < len(studies)
    assert searches < len(studies) / 2, "the agent kept asking the archive after the cancel"
    assert "cancelled after" in log


# --- C-MOVE -----------------------------------------------------------------------------------


def move(
    agent: Agent, destination: str, level: str = "STUDY", *keys: str
) -> subprocess.CompletedProcess[str]:
    return dcmtk.movescu(agent.port, keys, destination, level=level)


def test_move_of_a_study_delivers_every_instance_unchanged(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=10, rows=128, cols=128, seed=21)
    other = datasets.ct_series(tmp_path / "other", slices=2, rows=32, cols=32, seed=22)
    load(archive, series + other)
    destination = storescp(ae="DEST")
    with serve_agent(tmp_data_dir, archive.dicomweb_url, destination) as agent:
        result = move(agent, "DEST", "STUDY", f"StudyInstanceUID={uid(series[0])}")
        log = agent.log_tail()

    assert dcmtk.final_status(result) == SUCCESS, result.stdout[-3000:] + log
    assert dcmtk.statuses(result).count(PENDING) == len(series)
    assert dcmtk.sub_operations(result)["Completed"] == len(series)
    got = received(destination.out_dir)
    assert set(got) == {uid(p, "SOPInstanceUID") for p in series}
    for path in series:
        assert datasets.dataset_sha256(got[uid(path, "SOPInstanceUID")]) == datasets.dataset_sha256(
            path
        )


def test_a_500_instance_move_counts_every_sub_operation_down_to_zero(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=500, rows=32, cols=32, seed=24)
    archive = orthanc(aet="ARCHIVE")
    load(archive, series)
    destination = storescp(ae="DEST")
    with serve_agent(tmp_data_dir, archive.dicomweb_url, destination) as agent:
        result = move(agent, "DEST", "STUDY", f"StudyInstanceUID={uid(series[0])}")
        log = agent.log_tail(20_000)

    assert dcmtk.final_status(result) == SUCCESS, result.stdout[-3000:] + log
    assert dcmtk.statuses(result).count(PENDING) == 500
    output = result.stdout + "\n" + result.stderr
    remaining = [
        int(m["count"]) for m in dcmtk._SUB_OPERATIONS.finditer(output) if m["kind"] == "Remaining"
    ]
    assert remaining[:500] == list(range(499, -1, -1))
    final = dcmtk.sub_operations(result)
    assert (final["Completed"], final["Failed"], final["Warning"]) == (500, 0, 0)
    assert set(received(destination.out_dir)) == {uid(p, "SOPInstanceUID") for p in series}


def test_move_of_a_patient_in_the_patient_root_model_brings_only_that_patient(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    wanted = datasets.ct_series(tmp_path / "a", slices=3, rows=32, cols=32, seed=61)
    other = datasets.ct_series(tmp_path / "b", slices=2, rows=32, cols=32, seed=62)
    load(archive, wanted + other)
    destination = storescp(ae="DEST")
    with serve_agent(tmp_data_dir, archive.dicomweb_url, destination) as agent:
        result = dcmtk.movescu(
            agent.port,
            [f"PatientID={uid(wanted[0], 'PatientID')}"],
            "DEST",
            level="PATIENT",
            model="-P",
        )
    assert dcmtk.final_status(result) == SUCCESS, result.stdout[-2000:]
    assert set(received(destination.out_dir)) == {uid(p, "SOPInstanceUID") for p in wanted}


def test_an_orthanc_pacs_finds_and_retrieves_a_study_through_dirigo(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=4, rows=32, cols=32, seed=71)
    load(archive, series)
    pacs = orthanc(aet="PACS", dicomweb=False)
    with serve_agent(tmp_data_dir, archive.dicomweb_url, ("PACS", pacs.dicom_port)) as agent:
        pacs.put_modality("dirigo", "DIRIGO", LOOPBACK, agent.port)
        query = pacs.post(
            "/modalities/dirigo/query",
            {"Level": "Study", "Query": {"PatientName": "Synthetic*", "StudyDate": ""}},
        )
        answers = pacs.get(f"/queries/{query['ID']}/answers", expand="")
        pacs.post(f"/queries/{query['ID']}/retrieve", {"TargetAet": "PACS", "Synchronous": True})
    assert [a["0020,000d"]["Value"] for a in answers] == [uid(series[0])]
    assert pacs.sop_instance_uids() == {uid(p, "SOPInstanceUID") for p in series}


def test_move_to_an_unknown_destination_is_refused_with_a801(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=2, rows=32, cols=32, seed=23)
    load(archive, series)
    known = storescp(ae="DEST")
    with serve_agent(tmp_data_dir, archive.dicomweb_url, known) as agent:
        unknown = move(agent, "NOBODY", "STUDY", f"StudyInstanceUID={uid(series[0])}")
        log = agent.log_tail()
    assert dcmtk.final_status(unknown) == UNKNOWN_DESTINATION, unknown.stdout[-2000:]
    assert list(known.out_dir.iterdir()) == []
    assert "'NOBODY' is not a peer with host and port" in log


def test_move_of_jpeg_ls_to_an_uncompressed_only_destination_decompresses_losslessly(
    tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    data = datasets.pydicom_data_dir()
    jpeg_ls, lossy = data / "emri_small_jpeg_ls_lossless.dcm", data / "color3d_jpeg_baseline.dcm"
    load(archive, [jpeg_ls, lossy])
    destination = storescp(ae="PLAIN", extra_args=())  # storescp's default: uncompressed only
    with serve_agent(tmp_data_dir, archive.dicomweb_url, destination) as agent:
        decompressed = move(agent, "PLAIN", "STUDY", f"StudyInstanceUID={uid(jpeg_ls)}")
        refused = move(agent, "PLAIN", "STUDY", f"StudyInstanceUID={uid(lossy)}")
        log = agent.log_tail()

    assert dcmtk.final_status(decompressed) == SUCCESS, decompressed.stdout[-3000:] + log
    (delivered,) = received(destination.out_dir).values()
    assert not datasets.transfer_syntax(delivered).is_compressed
    ds = pydicom.dcmread(delivered)
    assert ds.SOPInstanceUID == uid(jpeg_ls, "SOPInstanceUID")
    reference = pydicom.dcmread(data / "emri_small.dcm").pixel_array  # the same image, uncompressed
    assert np.array_equal(ds.pixel_array, reference)

    assert dcmtk.final_status(refused) == ALL_FAILED, refused.stdout[-3000:]
    assert dcmtk.sub_operations(refused)["Failed"] == 1
    assert len(list(destination.out_dir.iterdir())) == 1
    assert "lossy (JPEG Baseline (Process 1))" in log


def test_move_of_jpeg_ls_to_a_destination_taking_it_goes_as_the_archive_holds_it(
    tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    jpeg_ls = datasets.pydicom_data_dir() / "emri_small_jpeg_ls_lossless.dcm"
    load(archive, [jpeg_ls])
    # every syntax DCMTK knows, written bit for bit as it arrives
    destination = storescp(ae="ALL", extra_args=("+xa", "+B"))
    with serve_agent(tmp_data_dir, archive.dicomweb_url, destination) as agent:
        result = move(agent, "ALL", "STUDY", f"StudyInstanceUID={uid(jpeg_ls)}")
    assert dcmtk.final_status(result) == SUCCESS
    (delivered,) = received(destination.out_dir).values()
    assert datasets.transfer_syntax(delivered) == datasets.transfer_syntax(jpeg_ls)
    assert datasets.dataset_sha256(delivered) == datasets.dataset_sha256(jpeg_ls)


# --- C-GET ------------------------------------------------------------------------------------


def test_get_of_a_series_delivers_it_on_the_same_association(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=6, rows=64, cols=64, seed=31)
    jpeg_ls = datasets.pydicom_data_dir() / "emri_small_jpeg_ls_lossless.dcm"
    load(archive, [*series, jpeg_ls])
    with serve_agent(tmp_data_dir, archive.dicomweb_url) as agent:
        result = dcmtk.getscu(
            agent.port,
            [
                f"StudyInstanceUID={uid(series[0])}",
                f"SeriesInstanceUID={uid(series[0], 'SeriesInstanceUID')}",
            ],
            tmp_path / "got",
            level="SERIES",
        )
        plain = dcmtk.getscu(agent.port, [f"StudyInstanceUID={uid(jpeg_ls)}"], tmp_path / "plain")
        as_held = dcmtk.getscu(
            agent.port, [f"StudyInstanceUID={uid(jpeg_ls)}"], tmp_path / "jls", extra_args=["+xt"]
        )
        log = agent.log_tail()

    assert dcmtk.final_status(result) == SUCCESS, result.stdout[-3000:] + log
    got = received(tmp_path / "got")
    assert set(got) == {uid(p, "SOPInstanceUID") for p in series}
    for path in series:
        assert datasets.dataset_sha256(got[uid(path, "SOPInstanceUID")]) == datasets.dataset_sha256(
            path
        )
    assert dcmtk.final_status(plain) == SUCCESS
    (decompressed,) = received(tmp_path / "plain").values()
    assert not datasets.transfer_syntax(decompressed).is_compressed
    assert dcmtk.final_status(as_held) == SUCCESS
    (kept,) = received(tmp_path / "jls").values()
    assert datasets.transfer_syntax(kept) == datasets.transfer_syntax(jpeg_ls)


# --- failures of the cloud ----------------------------------------------------------------------


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A DICOMweb URL that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(16)
        yield f"http://{LOOPBACK}:{listener.getsockname()[1]}/dicom-web"


def test_an_unreachable_cloud_fails_each_request_promptly_with_a_status(
    tmp_path: Path, tmp_data_dir: Path, storescp: StoreSCPFactory, black_hole: str
) -> None:
    destination = storescp(ae="DEST")
    refused_url = f"http://{LOOPBACK}:{free_port()}/dicom-web"  # nothing listens
    study = "1.2.826.0.1.3680043.8.498.77"
    with serve_agent(tmp_data_dir / "a", black_hole, destination) as agent:
        started = time.monotonic()
        found = dcmtk.findscu(agent.port, ["StudyInstanceUID"], timeout=60)
        hung_for = time.monotonic() - started
    with serve_agent(tmp_data_dir / "b", refused_url, destination) as agent:
        moved = move(agent, "DEST", "STUDY", f"StudyInstanceUID={study}")
        got = dcmtk.getscu(agent.port, [f"StudyInstanceUID={study}"], tmp_path / "got")
    assert dcmtk.final_status(found) == OUT_OF_RESOURCES
    assert 4 < hung_for < 20, "bounded by cloud.timeout (5s), not hanging"
    assert dcmtk.final_status(moved) == CANNOT_COUNT, moved.stdout[-2000:]
    assert dcmtk.final_status(got) == CANNOT_COUNT, got.stdout[-2000:]
    assert "unavailable" in moved.stdout + moved.stderr


def test_without_dicomweb_url_query_retrieve_fails_and_says_why(tmp_data_dir: Path) -> None:
    with serve_agent(tmp_data_dir, None) as agent:
        found = dcmtk.findscu(agent.port, ["StudyInstanceUID"])
        log = agent.log_tail()
    assert dcmtk.final_status(found) == NOT_CONFIGURED
    assert "cloud.dicomweb_url" in log


# --- an interrupted move ------------------------------------------------------------------------


@dataclass
class SlowSCP:
    """A pynetdicom storage SCP that takes its time over each instance."""

    delay: float
    ae_title: str = "SLOW"
    port: int = field(default_factory=free_port)
    digests: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: evt.Event) -> int:
        time.sleep(self.delay)
        encoded = event.encoded_dataset()
        with self.lock:
            self.digests[str(event.request.AffectedSOPInstanceUID)] = datasets.dataset_digest(
                encoded
            )
        return 0

    def __enter__(self) -> SlowSCP:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:  # explicit VR: the bytes as loaded
            ae.add_supported_context(context.abstract_syntax, ExplicitVRLittleEndian)
        self.server = ae.start_server(
            (LOOPBACK, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.on_store)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    def count(self) -> int:
        with self.lock:
            return len(self.digests)


def test_a_move_interrupted_by_kill_9_resumes_from_the_cache(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=30, rows=64, cols=64, seed=41)
    load(archive, series)
    study = uid(series[0])
    with HttpFaults(LOOPBACK, archive.http_port) as faults, SlowSCP(delay=0.1) as slow:
        agent = serve_agent(tmp_data_dir, faults.url_for("/dicom-web"), (slow.ae_title, slow.port))
        with agent:
            first = subprocess.Popen(
                [
                    dcmtk.tool("movescu"),
                    "-S",
                    "-aet",
                    "PACS",
                    "-aec",
                    "DIRIGO",
                    "-aem",
                    "SLOW",
                    "-k",
                    "QueryRetrieveLevel=STUDY",
                    "-k",
                    f"StudyInstanceUID={study}",
                    LOOPBACK,
                    str(agent.port),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dcmtk.dcmtk_env(),
            )
            wait_until(lambda: slow.count() >= 8, 60, what="8 instances delivered")
            agent.kill9()
            first.wait(timeout=60)
            cached = len(list((tmp_data_dir / "cache").glob("??/*.dcm")))
            fetched_before = wado_requests(faults)
            agent.start()
            again = move(agent, "SLOW", "STUDY", f"StudyInstanceUID={study}")
            log = agent.log_tail()
    assert 8 <= cached < len(series)
    assert dcmtk.final_status(again) == SUCCESS, again.stdout[-2000:] + log
    assert wado_requests(faults) - fetched_before == len(series) - cached
    assert slow.digests == {uid(p, "SOPInstanceUID"): datasets.dataset_sha256(p) for p in series}
    assert f"{len(series) - cached} fetched, {cached} from the cache" in log


# --- dirigo retrieve ----------------------------------------------------------------------------


def test_retrieve_pushes_a_study_to_a_peer(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=5, rows=64, cols=64, seed=51)
    jpeg_ls = datasets.pydicom_data_dir() / "emri_small_jpeg_ls_lossless.dcm"
    load(archive, [*series, jpeg_ls])
    first, second = storescp(ae="FIRST"), storescp(ae="SECOND", extra_args=())
    agent = serve_agent(tmp_data_dir, archive.dicomweb_url, first, second)  # not started

    def retrieve(*args: str) -> subprocess.CompletedProcess[str]:
        command = agent.command("retrieve", *args)
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    with agent:  # the agent's database, where `dirigo status` reads what retrieve chose
        default = retrieve("--study", uid(series[0]))
        status = subprocess.run(
            agent.command("status", "--json"), capture_output=True, text=True, timeout=60
        )
    chosen = retrieve("--study", uid(jpeg_ls), "--to", "SECOND")
    missing = retrieve("--study", "1.2.3.4", "--to", "SECOND")
    unknown_peer = retrieve("--study", uid(jpeg_ls), "--to", "NOBODY")

    assert default.returncode == 0, default.stderr
    assert "5 of 5 instances sent to FIRST" in default.stdout
    got = received(first.out_dir)
    assert {k: datasets.dataset_sha256(v) for k, v in got.items()} == {
        uid(p, "SOPInstanceUID"): datasets.dataset_sha256(p) for p in series
    }
    assert status.returncode == 0, status.stderr
    fetch_syntax = json.loads(status.stdout)["retrieve"]["fetch_syntax"]
    # 64x64 slices are too small to measure the link by: as held, and status says why
    assert (fetch_syntax["setting"], fetch_syntax["asks"]) == ("auto", "*")
    assert fetch_syntax["why"] == "the link is not measured yet"
    assert chosen.returncode == 0, chosen.stderr
    (decompressed,) = received(second.out_dir).values()
    assert not datasets.transfer_syntax(decompressed).is_compressed
    assert missing.returncode == 1 and "no instances of study 1.2.3.4" in missing.stderr
    assert unknown_peer.returncode == 1 and "NOBODY" in unknown_peer.stderr
