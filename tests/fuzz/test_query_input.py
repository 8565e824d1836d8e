"""A C-FIND or C-GET identifier from the PACS is untrusted input: its bytes, whatever they are,
get an answer (matches and Success, 0xA900 when the identifier does not fit the model, the
failure statuses for the cloud), never 0xC000 (internal error), and the association and the
agent carry on. The identifiers are real ones encoded, then mutated byte by byte, and put on
the wire as they are."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from agent.dimse import QRStatus
from tests.fuzz.support import Answer, ScriptedHttp, budget, corpus, mutated, scripted_http
from tests.support.agent import Agent

MODELS = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
STUDY = "1.2.826.0.1.3680043.8.498.99"

server = pytest.fixture(scope="module")(scripted_http)


class Raw(Dataset):
    """An identifier that goes on the wire as the bytes it carries, unparsed."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.__dict__["raw"] = data


def encoded(level: str, **keys: object) -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    encoded = association.encode(ds, True, True)
    assert encoded is not None
    return encoded


SEEDS = (
    encoded("STUDY", PatientName="DOE*", StudyDate="20200101-20261231", StudyInstanceUID=""),
    encoded("PATIENT", PatientID="P1", NumberOfPatientRelatedStudies="", PatientName=""),
    encoded("SERIES", StudyInstanceUID=STUDY, Modality="CT", SeriesInstanceUID=""),
    encoded("IMAGE", StudyInstanceUID=STUDY, SeriesInstanceUID=f"{STUDY}.1", SOPInstanceUID=""),
    encoded("STUDY", StudyInstanceUID=f"{STUDY}\\{STUDY}.2", SpecificCharacterSet="ISO_IR 192"),
)


@contextlib.contextmanager
def raw_identifiers() -> Iterator[None]:
    """Let pynetdicom send a Raw identifier's bytes instead of encoding it."""
    original = association.encode

    def encode(ds: Dataset, *args: bool) -> bytes | None:
        return ds.__dict__["raw"] if isinstance(ds, Raw) else original(ds, *args)

    association.encode = encode
    logged, _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_REQUEST_IDENTIFIERS, False
    try:
        yield
    finally:
        association.encode = original
        _config.LOG_REQUEST_IDENTIFIERS = logged


@pytest.fixture(scope="module")
def agent(server: ScriptedHttp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """An agent whose archive (the scripted server) matches nothing: every answer is about the
    identifier alone."""
    server.answer = Answer(
        200, [("Content-Type", "application/dicom+json"), ("Content-Length", "2")], b"[]"
    )
    cloud = {"dicomweb_url": f"{server.url}/dicom-web", "timeout": "5s"}
    with Agent(tmp_path_factory.mktemp("q") / "data", extra={"cloud": cloud}) as running:
        yield running


def ask(port: int, model: str, identifier: bytes) -> list[int]:
    """Send one C-FIND or C-GET with `identifier` as its bytes; return the statuses."""
    ae = AE(ae_title="PACS")
    for context in MODELS:
        ae.add_requested_context(context)
    with raw_identifiers():
        assoc = ae.associate("127.0.0.1", port, ae_title="DIRIGO")
        assert assoc.is_established
        try:
            send = (
                assoc.send_c_get
                if model == StudyRootQueryRetrieveInformationModelGet
                else assoc.send_c_find
            )
            statuses = [int(status.Status) for status, _ in send(Raw(identifier), model) if status]
            assert assoc.is_established, "the association did not survive the identifier"
        finally:
            assoc.release()
    return statuses


@budget(80)
@given(
    st.sampled_from(MODELS),
    # not empty: a request announcing an identifier and sending no byte of it is left to wait
    # for its data until the DIMSE timeout, as any silent peer is
    st.sampled_from(SEEDS).flatmap(lambda s: mutated(s)).filter(bool),
)
def test_any_identifier_gets_an_answer_never_an_internal_error(
    agent: Agent, model: str, identifier: bytes
) -> None:
    statuses = ask(agent.port, model, identifier)
    assert statuses, "no answer"
    assert QRStatus.UNABLE_TO_PROCESS not in statuses, agent.log_tail()
    assert statuses[-1] in (QRStatus.SUCCESS, QRStatus.IDENTIFIER_MISMATCH), agent.log_tail()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name.split()[0] + m.name.split()[-1])
@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_each_seed_identifier_is_answered(agent: Agent, model: str, seed: int) -> None:
    statuses = ask(agent.port, model, SEEDS[seed])
    assert statuses[-1] in (QRStatus.SUCCESS, QRStatus.IDENTIFIER_MISMATCH), agent.log_tail()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name.split()[0] + m.name.split()[-1])
@pytest.mark.parametrize("path", corpus("identifier"), ids=lambda p: p.stem)
def test_each_identifier_in_the_corpus_gets_its_documented_status(
    agent: Agent, model: str, path: Path
) -> None:
    """A corpus file's name starts with the final status it must get (a900-: 0xA900)."""
    expected = int(path.name.split("-", 1)[0], 16)
    assert ask(agent.port, model, path.read_bytes())[-1] == expected, agent.log_tail()


def test_after_all_that_the_agent_logged_no_internal_error(agent: Agent) -> None:
    log = agent.log_tail(1_000_000)
    assert agent.proc is not None and agent.proc.poll() is None
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]
