"""C-FIND/C-MOVE identifiers to QIDO-RS and back (agent.serve.query): pure functions."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from agent.serve.query import (
    InstanceRef,
    Level,
    Model,
    Patients,
    QueryError,
    answer,
    instance_ref,
    instance_search,
    level_of,
    scope_for,
    search_for,
)

STUDY = "1.2.826.0.1.3680043.8.498.1"
STUDY2 = "1.2.826.0.1.3680043.8.498.2"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"
SOP = "1.2.826.0.1.3680043.8.498.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def identifier(level: str = "STUDY", **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def params(ds: Dataset, model: Model = Model.STUDY_ROOT) -> dict[str, str]:
    return dict(search_for(ds, model).params)


def includes(ds: Dataset, model: Model = Model.STUDY_ROOT) -> list[str]:
    return params(ds, model)["includefield"].split(",")


def roundtrip(ds: Dataset) -> Dataset:
    """Encode and decode `ds` as pynetdicom does (implicit VR little endian)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    buffer.seek(0)
    return read_dataset(buffer, is_implicit_VR=True, is_little_endian=True)


# --- levels ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE", "study ", "PATIENT"])
def test_level_is_read_from_the_identifier_whatever_its_case_and_padding(level: str) -> None:
    assert level_of(identifier(level), Model.PATIENT_ROOT) == Level(level.strip().upper())


@pytest.mark.parametrize("level", ["", "FRAME", "STUDIES"])
def test_an_unknown_or_empty_level_is_a_query_error(level: str) -> None:
    with pytest.raises(QueryError, match="not a level"):
        level_of(identifier(level), Model.STUDY_ROOT)


def test_a_missing_level_is_a_query_error() -> None:
    with pytest.raises(QueryError, match="missing"):
        level_of(Dataset(), Model.STUDY_ROOT)


def test_patient_level_in_the_study_root_model_is_a_query_error() -> None:
    with pytest.raises(QueryError, match="Study Root"):
        search_for(identifier("PATIENT", PatientID=""), Model.STUDY_ROOT)


@pytest.mark.parametrize(
    ("level", "resource"),
    [("PATIENT", "studies"), ("STUDY", "studies"), ("SERIES", "series"), ("IMAGE", "instances")],
)
def test_each_level_searches_its_qido_resource(level: str, resource: str) -> None:
    assert search_for(identifier(level), Model.PATIENT_ROOT).resource == resource


# --- matching --------------------------------------------------------------------------------


def test_empty_keys_are_universal_matching_and_only_returned() -> None:
    ds = identifier(PatientName="", StudyDate="", StudyInstanceUID="")
    assert set(params(ds)) == {"includefield"}
    assert set(includes(ds)) == {"00100010", "00080020", "0020000D"}


def test_a_single_value_passes_through_without_its_padding() -> None:
    assert params(identifier(PatientID="12345 ", AccessionNumber="A1"))["00100020"] == "12345"
    assert params(identifier(AccessionNumber="A1"))["00080050"] == "A1"


@pytest.mark.parametrize("value", ["Doe*", "D?e^J*", "*oe", "Doe^John"])
def test_wildcards_pass_through_unchanged(value: str) -> None:
    assert params(identifier(PatientName=value))["00100010"] == value


def test_a_lone_asterisk_is_universal_matching() -> None:
    ds = identifier(PatientName="*", StudyDescription="*")
    assert set(params(ds)) == {"includefield"}
    assert {"00100010", "00081030"} <= set(includes(ds))


@pytest.mark.parametrize("value", ["20200101-20201231", "-20201231", "20200101-", "20200101"])
def test_date_ranges_pass_through(value: str) -> None:
    assert params(identifier(StudyDate=value))["00080020"] == value


@pytest.mark.parametrize("value", ["080000-120000", "-1200", "1200-"])
def test_time_ranges_pass_through(value: str) -> None:
    assert params(identifier(StudyTime=value))["00080030"] == value


def test_a_list_of_uids_becomes_a_comma_separated_list() -> None:
    ds = identifier(StudyInstanceUID=[STUDY, STUDY2])
    assert params(ds)["0020000D"] == f"{STUDY},{STUDY2}"


def test_a_list_of_modalities_becomes_a_comma_separated_list() -> None:
    assert params(identifier(ModalitiesInStudy=["CT", "MR"]))["00080061"] == "CT,MR"


def test_sequences_are_returned_but_never_matched() -> None:
    item = Dataset()
    item.CodeValue = "X"
    ds = identifier(ProcedureCodeSequence=Sequence([item]))
    assert "00081032" not in params(ds)
    assert "00081032" in includes(ds)


def test_character_set_and_level_are_neither_matched_nor_asked_for() -> None:
    ds = identifier(SpecificCharacterSet="ISO_IR 100", PatientName="Doe")
    assert set(params(ds)) == {"00100010", "includefield"}
    assert "00080005" not in includes(ds) and "00080052" not in includes(ds)


def test_retrieve_ae_title_is_ours_not_the_archives() -> None:
    ds = identifier(RetrieveAETitle="", StudyInstanceUID="")
    search = search_for(ds, Model.STUDY_ROOT, retrieve_ae="DIRIGO")
    assert "00080054" not in dict(search.params)["includefield"]
    assert answer(search, {}).RetrieveAETitle == "DIRIGO"


def test_unique_keys_of_the_level_and_above_are_always_returned() -> None:
    assert set(includes(identifier("IMAGE"))) == {"0020000D", "0020000E", "00080018"}
    patient_root = includes(identifier("SERIES"), Model.PATIENT_ROOT)
    assert set(patient_root) == {"00100020", "0020000D", "0020000E"}


def test_higher_level_keys_scope_a_lower_level_search() -> None:
    ds = identifier("SERIES", StudyInstanceUID=STUDY, Modality="CT", SeriesInstanceUID="")
    assert params(ds) == {
        "00080060": "CT",
        "0020000D": STUDY,
        "includefield": "00080060,0020000D,0020000E",
    }


# --- answers ---------------------------------------------------------------------------------


def study_result(**extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "00080020": {"vr": "DA", "Value": ["20200315"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]},
        "00100020": {"vr": "LO", "Value": ["P1"]},
        "0020000D": {"vr": "UI", "Value": [STUDY]},
        "00201208": {"vr": "IS", "Value": [12]},
        "00081190": {"vr": "UR", "Value": ["https://archive.example/studies/1"]},
    }
    result.update(extra)
    return result


def test_an_answer_carries_each_asked_key_and_nothing_else() -> None:
    ds = identifier(PatientName="D*", StudyDate="", NumberOfStudyRelatedInstances="")
    got = answer(search_for(ds, Model.STUDY_ROOT), study_result())
    assert got.QueryRetrieveLevel == "STUDY"
    assert str(got.PatientName) == "Doe^John"
    assert got.StudyDate == "20200315"
    assert got.NumberOfStudyRelatedInstances == 12
    assert got.StudyInstanceUID == STUDY
    assert "RetrieveURL" not in got and "PatientID" not in got


def test_keys_the_archive_has_no_value_for_come_back_empty() -> None:
    ds = identifier(AccessionNumber="", StudyDescription="")
    got = answer(search_for(ds, Model.STUDY_ROOT), study_result(**{"00080050": {"vr": "SH"}}))
    assert got.AccessionNumber in ("", None)
    assert "StudyDescription" in got and got.StudyDescription in ("", None)


def test_an_ascii_answer_keeps_the_requested_character_set() -> None:
    ds = identifier(SpecificCharacterSet="ISO_IR 100", PatientName="")
    assert answer(search_for(ds, Model.STUDY_ROOT), study_result()).SpecificCharacterSet == (
        "ISO_IR 100"
    )
    assert "SpecificCharacterSet" not in answer(
        search_for(identifier(PatientName=""), Model.STUDY_ROOT), study_result()
    )
    asked = identifier(SpecificCharacterSet="", PatientName="")
    got = answer(search_for(asked, Model.STUDY_ROOT), study_result())
    assert "SpecificCharacterSet" in got and not got.SpecificCharacterSet


def test_a_non_ascii_answer_is_utf8_and_survives_encoding() -> None:
    name = {"vr": "PN", "Value": [{"Alphabetic": "Müller^Zoë"}]}
    ds = identifier(SpecificCharacterSet="ISO_IR 100", PatientName="")
    got = answer(search_for(ds, Model.STUDY_ROOT), study_result(**{"00100010": name}))
    assert got.SpecificCharacterSet == "ISO_IR 192"
    assert str(roundtrip(got).PatientName) == "Müller^Zoë"


def test_a_sequence_in_the_result_is_returned() -> None:
    code = {"00080100": {"vr": "SH", "Value": ["X1"]}}
    result = study_result(**{"00081032": {"vr": "SQ", "Value": [code]}})
    got = answer(search_for(identifier(ProcedureCodeSequence=[]), Model.STUDY_ROOT), result)
    assert got.ProcedureCodeSequence[0].CodeValue == "X1"


def test_a_value_the_json_gets_wrong_is_answered_empty_not_fatal() -> None:
    bad = {"00201208": {"vr": "IS", "Value": ["twelve"]}}
    got = answer(search_for(identifier(NumberOfStudyRelatedInstances=""), Model.STUDY_ROOT), bad)
    assert "NumberOfStudyRelatedInstances" in got


def test_every_answer_encodes() -> None:
    ds = identifier(
        PatientName="", StudyDate="", NumberOfStudyRelatedInstances="", RetrieveAETitle=""
    )
    got = roundtrip(answer(search_for(ds, Model.STUDY_ROOT, "DIRIGO"), study_result()))
    assert got.StudyInstanceUID == STUDY and got.RetrieveAETitle == "DIRIGO"


# --- patients --------------------------------------------------------------------------------


def patient_result(pid: str, study: str, series: int = 1, instances: int = 2) -> dict[str, Any]:
    return {
        "00100020": {"vr": "LO", "Value": [pid]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": f"Name^{pid}"}]},
        "0020000D": {"vr": "UI", "Value": [study]},
        "00201206": {"vr": "IS", "Value": [series]},
        "00201208": {"vr": "IS", "Value": [instances]},
    }


def test_patient_level_searches_studies_and_answers_once_per_patient() -> None:
    search = search_for(identifier("PATIENT", PatientID="", PatientName="N*"), Model.PATIENT_ROOT)
    assert search.resource == "studies"
    assert dict(search.params)["00100010"] == "N*"
    patients = Patients(search)
    first = patients.add([patient_result("P1", STUDY), patient_result("P2", STUDY2)])
    second = patients.add([patient_result("P1", "1.2.3")])
    assert [str(p.PatientID) for p in first] == ["P1", "P2"] and second == []
    assert patients.finish() == []
    assert all(p.QueryRetrieveLevel == "PATIENT" for p in first)
    assert "StudyInstanceUID" not in first[0]


def test_patient_counts_are_summed_over_studies_and_answered_at_the_end() -> None:
    ds = identifier(
        "PATIENT",
        PatientID="",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedInstances="",
    )
    search = search_for(ds, Model.PATIENT_ROOT)
    assert {"00201206", "00201208"} <= set(dict(search.params)["includefield"].split(","))
    patients = Patients(search)
    assert patients.add([patient_result("P1", STUDY, instances=3)]) == []
    assert patients.add([patient_result("P1", STUDY2, instances=4)]) == []
    (only,) = patients.finish()
    assert only.NumberOfPatientRelatedStudies == 2
    assert only.NumberOfPatientRelatedInstances == 7


# --- retrieval -------------------------------------------------------------------------------


def test_a_study_retrieval_lists_instances_by_study_uids() -> None:
    scope = scope_for(identifier(StudyInstanceUID=[STUDY, STUDY2]), Model.STUDY_ROOT)
    assert scope.level is Level.STUDY
    assert dict(instance_search(scope))["0020000D"] == f"{STUDY},{STUDY2}"
    assert "00080016" in dict(instance_search(scope))["includefield"]


def test_a_series_retrieval_is_scoped_by_its_study() -> None:
    ds = identifier("SERIES", StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES)
    assert scope_for(ds, Model.STUDY_ROOT).params == (("0020000D", STUDY), ("0020000E", SERIES))


def test_a_patient_retrieval_lists_instances_by_patient_id() -> None:
    scope = scope_for(identifier("PATIENT", PatientID="P1"), Model.PATIENT_ROOT)
    assert scope.params == (("00100020", "P1"),)
    assert "P1" not in scope.description


def test_a_retrieval_without_its_unique_key_is_a_query_error() -> None:
    with pytest.raises(QueryError, match="SeriesInstanceUID"):
        scope_for(identifier("SERIES", StudyInstanceUID=STUDY), Model.STUDY_ROOT)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("uid", ["1.2.*", "abc", "1..2"])
def test_a_retrieval_by_something_not_a_uid_is_a_query_error(uid: str) -> None:
    with pytest.raises(QueryError, match="not a UID"):
        scope_for(identifier(StudyInstanceUID=uid), Model.STUDY_ROOT)


def test_a_list_above_the_retrieval_level_is_a_query_error() -> None:
    ds = identifier("SERIES", StudyInstanceUID=[STUDY, STUDY2], SeriesInstanceUID=SERIES)
    with pytest.raises(QueryError, match="one UID"):
        scope_for(ds, Model.STUDY_ROOT)


def test_an_instance_result_names_its_uids_and_class() -> None:
    result = {
        "0020000D": {"vr": "UI", "Value": [STUDY]},
        "0020000E": {"vr": "UI", "Value": [SERIES]},
        "00080018": {"vr": "UI", "Value": [SOP]},
        "00080016": {"vr": "UI", "Value": [CT]},
    }
    assert instance_ref(result) == InstanceRef(STUDY, SERIES, SOP, CT, None)
    result["00083002"] = {"vr": "UI", "Value": ["1.2.840.10008.1.2.4.80"]}
    assert instance_ref(result) == InstanceRef(STUDY, SERIES, SOP, CT, "1.2.840.10008.1.2.4.80")


def test_an_instance_result_without_valid_uids_is_skipped() -> None:
    assert instance_ref({"0020000D": {"vr": "UI", "Value": [STUDY]}}) is None
    bad = {tag: {"vr": "UI", "Value": ["x/../y"]} for tag in ("0020000D", "0020000E", "00080018")}
    assert instance_ref({**bad, "00080016": {"vr": "UI", "Value": [CT]}}) is None


@pytest.mark.parametrize("patient_id", ["*", "**", "P*", "P?1", "*1"])
def test_a_patient_retrieval_by_a_wildcard_is_a_query_error_that_never_quotes_it(
    patient_id: str,
) -> None:
    with pytest.raises(QueryError, match="wildcard") as refused:
        scope_for(identifier("PATIENT", PatientID=patient_id), Model.PATIENT_ROOT)
    assert patient_id not in str(refused.value)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_wildcard_in_a_unique_key_above_the_level_is_a_query_error_not_dropped() -> None:
    with pytest.raises(QueryError, match="wildcard"):
        scope_for(identifier(PatientID="*", StudyInstanceUID=STUDY), Model.PATIENT_ROOT)
    with pytest.raises(QueryError, match="not a UID"):
        scope_for(
            identifier("SERIES", StudyInstanceUID="*", SeriesInstanceUID=SERIES), Model.STUDY_ROOT
        )


def test_a_patient_retrieval_names_one_patient() -> None:
    with pytest.raises(QueryError, match="one value"):
        scope_for(identifier("PATIENT", PatientID=["P1", "P2"]), Model.PATIENT_ROOT)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_uid_range_in_a_retrieval_is_a_query_error() -> None:
    with pytest.raises(QueryError, match="no wildcards or ranges"):
        scope_for(identifier(StudyInstanceUID="1.2-1.3"), Model.STUDY_ROOT)
