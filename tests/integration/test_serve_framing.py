"""C-MOVE and C-GET write each cached instance's P-DATA PDUs themselves (agent/pdata.py): real
receivers, small and odd maximum PDU lengths, byte-identical data sets, and a receiver that
aborts mid-send."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

from tests.conftest import OrthancFactory, StoreSCPFactory
from tests.integration.test_serve import (
    SUCCESS,
    WARNING,
    load,
    move,
    received,
    serve_agent,
    uid,
)
from tests.support import datasets, dcmtk
from tests.support.net import LOOPBACK, free_port

ODD_PDU = 4099
"""A maximum PDU length that makes every fragment odd (4093 bytes)."""


def data_set_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Received:
    """What a pynetdicom storage SCP got: each data set's bytes as they came, by SOP Instance."""

    data_sets: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: evt.Event) -> int:
        raw = event.request.DataSet.getvalue()
        with self.lock:
            self.data_sets[str(event.request.AffectedSOPInstanceUID)] = data_set_sha256(raw)
        return 0x0000


@pytest.fixture
def pynetdicom_scp() -> Iterator[tuple[int, Received]]:
    """A pynetdicom storage SCP (AE title PYSCP) with an odd maximum PDU length."""
    got = Received()
    ae = AE(ae_title="PYSCP")
    ae.maximum_pdu_size = ODD_PDU
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, got.on_store)]
    )
    try:
        yield port, got
    finally:
        server.shutdown()


def ct(tmp_path: Path, seed: int, slices: int = 4, size: int = 200) -> list[Path]:
    """A CT series whose data sets span many PDUs (200 x 200: ~80 KB each)."""
    return datasets.ct_series(
        tmp_path / f"ct{seed}", slices=slices, rows=size, cols=size, seed=seed
    )


def test_move_to_storescp_with_the_smallest_pdu_delivers_each_data_set_byte_for_byte(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = ct(tmp_path, seed=51)
    load(archive, series)
    destination = storescp(ae="DEST", extra_args=("+xa", "--max-pdu", "4096"))
    study = f"StudyInstanceUID={uid(series[0])}"
    with serve_agent(tmp_data_dir, archive.dicomweb_url, destination) as agent:
        cold = move(agent, "DEST", "STUDY", study)
        cold_got = {k: datasets.dataset_sha256(p) for k, p in received(destination.out_dir).items()}
        for path in destination.out_dir.iterdir():
            path.unlink()
        warm = move(agent, "DEST", "STUDY", study)
        log = agent.log_tail()

    expected = {uid(p, "SOPInstanceUID"): datasets.dataset_sha256(p) for p in series}
    assert dcmtk.final_status(cold) == SUCCESS, cold.stdout[-3000:] + log
    assert cold_got == expected
    assert dcmtk.final_status(warm) == SUCCESS, warm.stdout[-3000:] + log
    assert {k: datasets.dataset_sha256(p) for k, p in received(destination.out_dir).items()} == (
        expected
    )


def test_move_to_a_pynetdicom_scp_with_odd_fragments_delivers_the_data_sets_as_stored(
    tmp_path: Path,
    tmp_data_dir: Path,
    orthanc: OrthancFactory,
    pynetdicom_scp: tuple[int, Received],
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = ct(tmp_path, seed=52, slices=3) + ct(tmp_path, seed=53, slices=1, size=2)
    load(archive, series)
    port, got = pynetdicom_scp
    with serve_agent(tmp_data_dir, archive.dicomweb_url, ("PYSCP", port)) as agent:
        result = move(agent, "PYSCP", "STUDY", f"StudyInstanceUID={uid(series[0])}")
        # a data set shorter than one fragment: one PDU, its last
        small = move(agent, "PYSCP", "STUDY", f"StudyInstanceUID={uid(series[-1])}")
        log = agent.log_tail()

    assert dcmtk.final_status(result) == SUCCESS, result.stdout[-3000:] + log
    assert dcmtk.final_status(small) == SUCCESS, small.stdout[-3000:] + log
    assert got.data_sets == {uid(p, "SOPInstanceUID"): datasets.dataset_sha256(p) for p in series}


def test_get_by_getscu_and_by_pynetdicom_with_small_pdus_delivers_the_data_sets_as_stored(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = ct(tmp_path, seed=54, slices=3)
    load(archive, series)
    expected = {uid(p, "SOPInstanceUID"): datasets.dataset_sha256(p) for p in series}
    study = uid(series[0])
    got = Received()
    with serve_agent(tmp_data_dir, archive.dicomweb_url) as agent:
        by_getscu = dcmtk.getscu(
            agent.port,
            [f"StudyInstanceUID={study}"],
            tmp_path / "getscu",
            extra_args=["--max-pdu", "4096"],
        )
        ae = AE(ae_title="PACS")
        ae.maximum_pdu_size = ODD_PDU
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(
            LOOPBACK,
            agent.port,
            ae_title=agent.ae_title,
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, got.on_store)],
        )
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            if status
        ]
        got_first = dict(got.data_sets)
        got.data_sets.clear()
        again = [  # a second retrieval on the same association
            int(status.Status)
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            if status
        ]
        assoc.release()
        log = agent.log_tail()

    assert dcmtk.final_status(by_getscu) == SUCCESS, by_getscu.stdout[-3000:] + log
    assert {k: datasets.dataset_sha256(p) for k, p in received(tmp_path / "getscu").items()} == (
        expected
    )
    assert statuses[-1] == SUCCESS and again[-1] == SUCCESS, log
    assert got_first == expected and got.data_sets == expected
    assert log.count("0 refused and 0 stored with a warning by the destination") == 3, log


def test_a_destination_aborting_mid_send_fails_the_move_and_the_agent_serves_on(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = ct(tmp_path, seed=55, slices=3, size=512)  # 0.5 MB each: aborted while written
    load(archive, series)
    aborting = storescp(ae="ABORTS", extra_args=("+xa", "--abort-during"))
    healthy = storescp(ae="DEST")
    study = f"StudyInstanceUID={uid(series[0])}"
    with serve_agent(tmp_data_dir, archive.dicomweb_url, aborting, healthy) as agent:
        cut = move(agent, "ABORTS", "STUDY", study)
        after = move(agent, "DEST", "STUDY", study)
        log = agent.log_tail()

    assert dcmtk.final_status(cut) not in (None, SUCCESS), cut.stdout[-3000:] + log
    assert dcmtk.sub_operations(cut).get("Completed", 0) == 0, cut.stdout[-3000:] + log
    assert dcmtk.final_status(after) == SUCCESS, after.stdout[-3000:] + log
    assert {k: datasets.dataset_sha256(p) for k, p in received(healthy.out_dir).items()} == {
        uid(p, "SOPInstanceUID"): datasets.dataset_sha256(p) for p in series
    }


class Answering(Received):
    """A receiver that answers its C-STOREs in turn from `answers`: a status, with an error
    comment when one is given, after `delay` seconds."""

    def __init__(self, answers: list[tuple[int, str | None]], delay: float = 0.0) -> None:
        super().__init__()
        self.answers = answers
        self.delay = delay
        self.stores = 0

    def on_store(self, event: evt.Event) -> Dataset:  # type: ignore[override]
        with self.lock:
            status, comment = self.answers[self.stores % len(self.answers)]
            self.stores += 1
        super().on_store(event)
        time.sleep(self.delay)
        answer = Dataset()
        answer.Status = status
        if comment is not None:
            answer.ErrorComment = comment
        return answer


@contextlib.contextmanager
def answering_scp(answering: Answering) -> Iterator[int]:
    ae = AE(ae_title="PYSCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, answering.on_store)]
    )
    try:
        yield port
    finally:
        server.shutdown()


def test_warnings_and_failures_with_comments_count_per_instance_among_successes(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory
) -> None:
    """Only a response saying Success and nothing more is read by the sending thread; these go
    back to pynetdicom, between plain successes on the same association."""
    archive = orthanc(aet="ARCHIVE")
    series = ct(tmp_path, seed=56, slices=8, size=64)
    load(archive, series)
    answers = [
        (0x0000, None),
        (0xB000, "coerced an element"),
        (0x0000, None),
        (0xA700, "out of resources"),
    ]
    answering = Answering(answers)
    with (
        answering_scp(answering) as port,
        serve_agent(tmp_data_dir, archive.dicomweb_url, ("PYSCP", port)) as agent,
    ):
        result = move(agent, "PYSCP", "STUDY", f"StudyInstanceUID={uid(series[0])}")
        again = move(agent, "PYSCP", "STUDY", f"StudyInstanceUID={uid(series[0])}")
        log = agent.log_tail()
        audited = agent.rows(
            "SELECT outcome, reason FROM audit WHERE event = 'retrieve' ORDER BY id"
        )

    for moved in (result, again):
        counts = dcmtk.sub_operations(moved)
        assert (counts["Completed"], counts["Failed"], counts["Warning"]) == (4, 2, 2), (
            moved.stdout[-3000:] + log
        )
        assert dcmtk.final_status(moved) == WARNING, moved.stdout[-3000:] + log
    assert set(answering.data_sets) == {uid(p, "SOPInstanceUID") for p in series}
    # the agent's own account says what the destination answered, as the requester was told
    summary = "0 failed, 2 refused and 2 stored with a warning by the destination"
    assert log.count(summary) == 2, log
    reason = "of 8 instances, 2 refused by the destination, 2 stored with a warning"
    assert audited == [("failure", reason)] * 2


def test_a_destination_that_does_not_answer_fails_the_move_at_the_dimse_timeout(
    tmp_path: Path,
    tmp_data_dir: Path,
    orthanc: OrthancFactory,
    storescp: StoreSCPFactory,
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = ct(tmp_path, seed=57, slices=3, size=64)
    load(archive, series)
    healthy = storescp(ae="DEST")
    silent = Answering([(0x0000, None)], delay=8.0)
    study = f"StudyInstanceUID={uid(series[0])}"
    with answering_scp(silent) as port:
        agent = serve_agent(tmp_data_dir, archive.dicomweb_url, ("PYSCP", port), healthy)
        agent_config = yaml.safe_load(agent.config_path.read_text())
        agent_config["dicom"]["dimse_timeout"] = "2s"
        agent.config_path.write_text(yaml.safe_dump(agent_config))
        with agent:
            started = time.monotonic()
            cut = move(agent, "PYSCP", "STUDY", study)
            waited = time.monotonic() - started
            after = move(agent, "DEST", "STUDY", study)
            log = agent.log_tail()

    assert dcmtk.final_status(cut) not in (None, SUCCESS), cut.stdout[-3000:] + log
    assert dcmtk.sub_operations(cut).get("Completed", 0) == 0, cut.stdout[-3000:] + log
    assert waited < 8.0, "given up at the 2 s DIMSE timeout, not when the receiver answered"
    assert "No response to the C-STORE" in log
    assert dcmtk.final_status(after) == SUCCESS, after.stdout[-3000:] + log
    assert set(received(healthy.out_dir)) == {uid(p, "SOPInstanceUID") for p in series}
