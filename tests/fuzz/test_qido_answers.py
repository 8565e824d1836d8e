"""A QIDO-RS answer is untrusted input: the archive's DICOM JSON, whatever it holds, becomes
C-FIND answers for the PACS. Each result gives an answer that encodes (an element the JSON gets
wrong is answered empty, as `agent.serve.query` documents), a retrieval's instance list gives
each instance or None, and a body that is not a JSON list of datasets is a CloudError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.valuerep import VR
from pynetdicom.dsutils import encode

from agent.cloud import CloudError, CloudHttp, build_session
from agent.config import CloudSettings
from agent.dicomweb import DicomWeb
from agent.serve.query import InstanceRef, Model, Patients, Search, answer, instance_ref, search_for
from tests.fuzz.support import Answer, ScriptedHttp, budget, corpus, scripted_http

KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
    "NumberOfPatientRelatedStudies",
    "PatientWeight",
    "StudyInstanceUID",
    "RetrieveAETitle",
)
VRS = [vr.value for vr in VR]  # the ambiguous ones ("US or SS") too: an archive may write them

server = pytest.fixture(scope="module")(scripted_http)


def search(level: str) -> Search:
    """A C-FIND asking for every key above, and a sequence, at `level`."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in KEYWORDS:
        setattr(identifier, keyword, "")
    identifier.add_new(0x00081110, "SQ", [])  # Referenced Study Sequence
    return search_for(identifier, Model.PATIENT_ROOT, "DIRIGO")


SEARCHES = {level: search(level) for level in ("PATIENT", "STUDY")}
TAGS = sorted({f"{tag:08X}" for s in SEARCHES.values() for tag, _ in s.keys})

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=70),
    st.sampled_from(["1.2.840.10008.1", "20260101", "CT", "Doe^Jane", "A" * 70, "a\\b"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=6,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "vr": st.one_of(st.sampled_from(VRS), json_scalars),
        "Value": st.one_of(st.lists(json_values, max_size=3), json_values),
        "InlineBinary": json_values,
        "BulkDataURI": json_values,
    },
)
results = st.dictionaries(
    st.one_of(st.sampled_from(TAGS), st.text(max_size=9)),
    st.one_of(entries, json_values),
    max_size=8,
)


def check_answers(level: str, found: list[dict[str, Any]]) -> None:
    """Each result answers a C-FIND with a dataset pynetdicom encodes, in both syntaxes a C-FIND
    uses; a PATIENT-level search counts them into answers that encode too."""
    asked = SEARCHES[level]
    answers = [answer(asked, result) for result in found]
    patients = Patients(asked)
    answers += patients.add(found) + patients.finish()
    for ds in answers:
        for implicit in (True, False):
            assert encode(ds, implicit, True) is not None, ds
    for result in found:
        ref = instance_ref(result)
        assert ref is None or isinstance(ref, InstanceRef)


@budget(150)
@given(st.sampled_from(sorted(SEARCHES)), st.lists(results, max_size=3))
def test_any_dicom_json_result_gives_a_c_find_answer_that_encodes(
    level: str, found: list[dict[str, Any]]
) -> None:
    check_answers(level, found)


@pytest.mark.parametrize("path", corpus("qido"), ids=lambda p: p.stem)
def test_each_result_in_the_corpus_answers_and_encodes(path: Path) -> None:
    found = json.loads(path.read_text())
    for level in SEARCHES:
        check_answers(level, found)


@budget(100)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(results, max_size=2).map(lambda r: json.dumps(r).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
    ),
    st.sampled_from([200, 204, 206]),
)
def test_any_qido_body_is_a_list_of_datasets_or_a_cloud_error(
    server: ScriptedHttp, body: bytes, status: int
) -> None:
    server.answer = Answer(
        status,
        [("Content-Type", "application/dicom+json"), ("Content-Length", str(len(body)))],
        body,
    )
    settings = CloudSettings(dicomweb_url=f"{server.url}/dicom-web", timeout=5)
    dicomweb = DicomWeb(CloudHttp(build_session(settings), timeout=5), f"{server.url}/dicom-web")
    try:
        found = dicomweb.search("studies", [], 0, 10)
    except CloudError as exc:
        assert str(exc)
    else:
        assert all(isinstance(result, dict) for result in found)
        check_answers("STUDY", found)
    finally:
        dicomweb.close()
