"""C-FIND and C-MOVE/C-GET identifiers to QIDO-RS searches, and QIDO-RS results back to C-FIND
answers. Pure functions: no I/O.

Matching (PS3.4 C.2.2.2) carries over to QIDO-RS (PS3.18 8.3.4) nearly as it is: an empty value
is universal matching and becomes no parameter; a single value, `*`/`?` wildcards and date/time
ranges (`20200101-20201231`, `-20201231`, `20200101-`) pass through unchanged; a list of values
(backslash-separated in DICOM) becomes QIDO's comma-separated list. A value of only `*` is
universal matching too (PS3.4 C.2.2.2.4), and goes as no parameter: some archives would leave
out the answers whose value is empty. Sequences are return keys only. QIDO's `fuzzymatching` is
not DICOM's wildcard matching and is never asked for.

Every key of the identifier comes back in each answer (`includefield`), empty when the archive
has no value, with the Query/Retrieve Level, the unique keys of the level and those above it,
and a Specific Character Set that covers the values (DICOM JSON is Unicode).

QIDO-RS has no patient resource: a PATIENT-level query searches studies with the patient keys
and answers once per patient (Patient ID and its issuer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
QUERY_RETRIEVE_LEVEL = 0x00080052
RETRIEVE_AE_TITLE = 0x00080054
AVAILABLE_TRANSFER_SYNTAX_UID = 0x00083002
PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
PATIENT_NAME = 0x00100010
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
STUDY_RELATED_SERIES = 0x00201206
STUDY_RELATED_INSTANCES = 0x00201208
PATIENT_RELATED_STUDIES = 0x00201200
PATIENT_RELATED_SERIES = 0x00201202
PATIENT_RELATED_INSTANCES = 0x00201204
UTF8 = "ISO_IR 192"
_NOT_MATCHED = frozenset({SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE})
"""Keys that are about this answer, not the archive's data: never sent as matching keys."""
_PATIENT_COUNTS = (PATIENT_RELATED_STUDIES, PATIENT_RELATED_SERIES, PATIENT_RELATED_INSTANCES)
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class Level(StrEnum):
    """Query/Retrieve levels (PS3.4 C.3)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class Model(Enum):
    """Query/Retrieve information models Dirigo answers."""

    PATIENT_ROOT = "Patient Root"
    STUDY_ROOT = "Study Root"


MODELS: Mapping[str, Model] = {
    "1.2.840.10008.5.1.4.1.2.1.1": Model.PATIENT_ROOT,  # FIND
    "1.2.840.10008.5.1.4.1.2.1.2": Model.PATIENT_ROOT,  # MOVE
    "1.2.840.10008.5.1.4.1.2.1.3": Model.PATIENT_ROOT,  # GET
    "1.2.840.10008.5.1.4.1.2.2.1": Model.STUDY_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.2": Model.STUDY_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.3": Model.STUDY_ROOT,
}
"""The model of each Query/Retrieve SOP class Dirigo supports."""

RESOURCE = {
    Level.PATIENT: "studies",
    Level.STUDY: "studies",
    Level.SERIES: "series",
    Level.IMAGE: "instances",
}
UNIQUE_KEY = {
    Level.PATIENT: PATIENT_ID,
    Level.STUDY: STUDY_INSTANCE_UID,
    Level.SERIES: SERIES_INSTANCE_UID,
    Level.IMAGE: SOP_INSTANCE_UID,
}
_ORDER = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)


class QueryError(ValueError):
    """The identifier does not fit the information model (PS3.4 C.4: 'Identifier does not match
    SOP Class'); the message says why, for the peer's Error Comment and the log."""


@dataclass(frozen=True)
class Search:
    """A QIDO-RS search for a C-FIND: `resource` with `params` (matching keys and
    `includefield`, no paging), and the keys (tag, VR) each answer carries."""

    level: Level
    resource: str
    params: tuple[tuple[str, str], ...]
    keys: tuple[tuple[int, str], ...]
    charset: str | None = None
    """The identifier's Specific Character Set: None if absent, "" if empty."""
    retrieve_ae: str = ""


@dataclass(frozen=True)
class InstanceRef:
    """One instance a retrieval will deliver, as QIDO-RS listed it."""

    study: str
    series: str
    sop_instance: str
    sop_class: str
    transfer_syntax: str | None = None


@dataclass(frozen=True)
class Scope:
    """What a C-MOVE or C-GET asks for: the QIDO-RS matching keys of its instances."""

    level: Level
    params: tuple[tuple[str, str], ...]

    @property
    def description(self) -> str:
        """The scope as it goes in a log line: the unique keys (no patient data)."""
        parts = [f"{name}={value}" for name, value in self.params if name != _hex(PATIENT_ID)]
        return f"{self.level} " + (" ".join(parts) or "(by patient)")


def level_of(identifier: Dataset, model: Model) -> Level:
    """Return the identifier's Query/Retrieve Level. Raise QueryError if it is missing, not a
    level, or PATIENT in the Study Root model."""
    value = identifier.get("QueryRetrieveLevel")
    text = str(value).strip().upper() if value is not None else ""
    try:
        level = Level(text)
    except ValueError:
        raise QueryError(f"Query/Retrieve Level {text or '(missing)'!r} is not a level") from None
    if level is Level.PATIENT and model is Model.STUDY_ROOT:
        raise QueryError("PATIENT level is not part of the Study Root model")
    return level


def search_for(identifier: Dataset, model: Model, retrieve_ae: str = "") -> Search:
    """Return the QIDO-RS search that answers a C-FIND identifier. Raise QueryError if the
    identifier does not fit `model`. `retrieve_ae` fills Retrieve AE Title when it is asked
    for: the PACS retrieves what it finds from us."""
    level = level_of(identifier, model)
    keys: dict[int, str] = {}
    params: list[tuple[str, str]] = []
    for element in identifier:
        tag = int(element.tag)
        if tag >> 16 in (0x0000, 0x0002) or tag in (SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL):
            continue
        keys[tag] = element.VR
        value = matching_value(element) if tag not in _NOT_MATCHED else None
        if value is not None:
            params.append((_hex(tag), value))
    for unique in _unique_keys(level, model):
        keys.setdefault(unique, dictionary_VR(unique))
    include = [tag for tag in keys if tag != RETRIEVE_AE_TITLE]
    if level is Level.PATIENT:
        include += [ISSUER_OF_PATIENT_ID, PATIENT_NAME]
        if any(tag in keys for tag in _PATIENT_COUNTS):
            include += [STUDY_RELATED_SERIES, STUDY_RELATED_INSTANCES]
    params.append(("includefield", ",".join(_hex(tag) for tag in dict.fromkeys(include))))
    return Search(
        level=level,
        resource=RESOURCE[level],
        params=tuple(params),
        keys=tuple(sorted(keys.items())),
        charset=_charset(identifier),
        retrieve_ae=retrieve_ae,
    )


def matching_value(element: DataElement) -> str | None:
    """Return the QIDO-RS value of a matching key, or None for universal matching (an empty
    value, a lone `*`, a sequence, binary data)."""
    texts = _texts(element)
    if not texts or texts == ["*"]:
        return None
    return ",".join(texts)


def _texts(element: DataElement) -> list[str]:
    """Return the values of a text element, each without its padding, empty ones left out (none
    for a sequence or binary data)."""
    if element.VR == "SQ" or element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return []
    value = element.value
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    texts = [str(v).strip() for v in values if v is not None and not isinstance(v, bytes)]
    return [text for text in texts if text]


def answer(search: Search, result: Mapping[str, Any]) -> Dataset:
    """Return the C-FIND answer for one QIDO-RS result (DICOM JSON): each key of the search,
    with the archive's value or empty, plus the level and the character set."""
    found = _elements(result, {tag for tag, _ in search.keys})
    ds = Dataset()
    for tag, vr in search.keys:
        if tag == RETRIEVE_AE_TITLE:
            ds.add_new(tag, "AE", search.retrieve_ae or None)
        elif tag in found and found[tag].VR != "UN":
            ds.add(found[tag])
        else:
            ds.add_new(tag, vr, None)
    ds.QueryRetrieveLevel = search.level.value
    if _has_non_ascii(ds):
        ds.SpecificCharacterSet = UTF8
    elif search.charset is not None:
        ds.SpecificCharacterSet = search.charset or None  # asked for: answered, maybe empty
    return ds


def instance_ref(result: Mapping[str, Any]) -> InstanceRef | None:
    """Return the instance a QIDO-RS instance-level result names, or None if a UID it needs is
    missing or not a UID."""
    tags = (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID, SOP_CLASS_UID)
    uids = [_first_text(result, tag) for tag in tags]
    if not all(uid and _UID.fullmatch(uid) and len(uid) <= 64 for uid in uids):
        return None
    syntax = _first_text(result, AVAILABLE_TRANSFER_SYNTAX_UID)
    study, series, sop_instance, sop_class = (str(uid) for uid in uids)
    return InstanceRef(study, series, sop_instance, sop_class, syntax or None)


def scope_for(identifier: Dataset, model: Model) -> Scope:
    """Return what a C-MOVE or C-GET identifier asks for. Raise QueryError if the level's unique
    key is missing or empty, or a unique key holds a wildcard or a range, or a UID is not a UID
    (PS3.4 C.4.2.2.1: unique keys only, no wildcards or ranges; a list of UIDs at the level of
    the retrieval, one value above it; one Patient ID)."""
    level = level_of(identifier, model)
    params: list[tuple[str, str]] = []
    for tag in _unique_keys(level, model):
        element = identifier.get(BaseTag(tag))
        value = _retrieve_value(element, tag) if element is not None else None
        if value is None:
            if tag == UNIQUE_KEY[level]:
                name = _keyword(tag)
                raise QueryError(f"a {level} level retrieval needs {name}")
            continue
        if tag != UNIQUE_KEY[level] and "," in value:
            raise QueryError(f"{_keyword(tag)} above the {level} level must be one UID")
        params.append((_hex(tag), value))
    return Scope(level, tuple(params))


def _retrieve_value(element: DataElement, tag: int) -> str | None:
    """Return the QIDO-RS value of a retrieval's unique key, or None if it is empty. Raise
    QueryError if it is a wildcard or range (even a lone `*`, universal matching in a C-FIND),
    more than one Patient ID, or a UID that is not a UID. The message never quotes a Patient
    ID: it goes to the log."""
    texts = _texts(element)
    if tag == PATIENT_ID:
        if any("*" in text or "?" in text for text in texts):
            raise QueryError("PatientID holds a wildcard: a retrieval names its patient exactly")
        if len(texts) > 1:
            raise QueryError("PatientID must be one value in a retrieval")
    elif not all(_UID.fullmatch(text) for text in texts):
        value = ",".join(texts)
        raise QueryError(
            f"{_keyword(tag)} {value!r} is not a UID or a list of UIDs"
            " (a retrieval takes no wildcards or ranges)"
        )
    return ",".join(texts) or None


def study_scope(study_uid: str) -> Scope:
    """Return the scope of one whole study. Raise QueryError if `study_uid` is not a UID."""
    ds = Dataset()
    ds.QueryRetrieveLevel = Level.STUDY.value
    ds.StudyInstanceUID = study_uid.strip()
    return scope_for(ds, Model.STUDY_ROOT)


def instance_search(scope: Scope) -> tuple[tuple[str, str], ...]:
    """Return the QIDO-RS parameters that list the instances of `scope` with what a
    retrieval needs of each (its UIDs, SOP class and, when the archive says, syntax)."""
    fields = (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID, SOP_CLASS_UID)
    include = ",".join(_hex(tag) for tag in (*fields, AVAILABLE_TRANSFER_SYNTAX_UID))
    return (*scope.params, ("includefield", include))


@dataclass
class _Patient:
    answer: Dataset
    studies: int = 0
    series: int = 0
    instances: int = 0


@dataclass
class Patients:
    """PATIENT-level answers from study-level results: one answer per patient (Patient ID and
    its issuer; the name when there is no ID). When the identifier asks for the patient's
    Number of … Related Studies/Series/Instances, every study must be counted first, so the
    answers come at the end (`finish`); otherwise each comes as soon as its patient is new."""

    search: Search
    _seen: dict[tuple[str, str, str], _Patient] = field(default_factory=dict)

    @property
    def counted(self) -> bool:
        return any(tag in _PATIENT_COUNTS for tag, _ in self.search.keys)

    def add(self, results: Iterable[Mapping[str, Any]]) -> list[Dataset]:
        """Take a page of study results; return the answers for patients not seen before
        (none when answers wait for the counts)."""
        new: list[Dataset] = []
        for result in results:
            key = (
                _first_text(result, PATIENT_ID),
                _first_text(result, ISSUER_OF_PATIENT_ID),
                "" if _first_text(result, PATIENT_ID) else _first_text(result, PATIENT_NAME),
            )
            patient = self._seen.get(key)
            if patient is None:
                patient = self._seen[key] = _Patient(answer(self.search, result))
                if not self.counted:
                    new.append(patient.answer)
            patient.studies += 1
            patient.series += _first_int(result, STUDY_RELATED_SERIES)
            patient.instances += _first_int(result, STUDY_RELATED_INSTANCES)
        return new

    def finish(self) -> list[Dataset]:
        """Return the answers held back for their counts (none if nothing was held back)."""
        if not self.counted:
            return []
        answers = []
        for patient in self._seen.values():
            counts = (patient.studies, patient.series, patient.instances)
            for tag, count in zip(_PATIENT_COUNTS, counts, strict=True):
                if tag in patient.answer:
                    # A new element, not a new value: the first study's JSON may have given the
                    # key another VR (an AE), which cannot hold a count.
                    patient.answer.add_new(tag, _dictionary_vr(tag), count)
            answers.append(patient.answer)
        return answers


def _unique_keys(level: Level, model: Model) -> list[int]:
    """Return the unique keys of `level` and the levels above it, top down (no PatientID in the
    Study Root model)."""
    top = 0 if model is Model.PATIENT_ROOT else 1
    return [UNIQUE_KEY[lv] for lv in _ORDER[top : _ORDER.index(level) + 1]]


def _charset(identifier: Dataset) -> str | None:
    """Return the identifier's Specific Character Set: None if it is absent, "" if empty."""
    if "SpecificCharacterSet" not in identifier:
        return None
    value = identifier.SpecificCharacterSet
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    return "\\".join(str(v).strip() for v in values if v)


def _elements(result: Mapping[str, Any], wanted: set[int]) -> dict[int, DataElement]:
    """Return the elements of a DICOM JSON result whose tags are `wanted`; an element the JSON
    gets wrong is left out (answered empty) rather than failing the whole answer."""
    found: dict[int, DataElement] = {}
    for key, entry in result.items():
        try:
            tag = int(key, 16)
        except (TypeError, ValueError):
            continue
        if tag not in wanted or not isinstance(entry, dict):
            continue
        vr = entry.get("vr") or _dictionary_vr(tag)
        value_key = next((k for k in ("Value", "BulkDataURI", "InlineBinary") if k in entry), None)
        try:
            element = DataElement.from_json(
                Dataset, key, vr, entry.get(value_key) if value_key else None, value_key, _no_bulk
            )
        except Exception:  # pydicom's JSON reader raises whatever bad JSON provokes
            continue
        if value_key == "BulkDataURI":
            continue  # a URI to fetch is no answer to give
        if _encodable(element):
            found[tag] = element
    return found


def _encodable(element: DataElement) -> bool:
    """Return whether `element` can go into a C-FIND answer as it is: a value the archive's
    JSON gives that its VR cannot hold (text in an FL, an empty UN sequence) would otherwise
    fail the encoding of the whole answer, and with it the C-FIND. Checked in Explicit VR
    Little Endian (its 16-bit lengths are the stricter) and UTF-8 (what `answer` declares for
    text beyond ASCII)."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    try:
        _ = element.value  # a raw (UN) value is decoded on access, as the encoder would
        write_data_element(out, element, encodings=["utf_8"])
    except Exception:  # pydicom raises whatever a value of the wrong type provokes
        return False
    return True


def _no_bulk(tag: str, vr: str, uri: str) -> None:
    return None


def _first_text(result: Mapping[str, Any], tag: int) -> str:
    entry = result.get(_hex(tag))
    values = entry.get("Value") if isinstance(entry, dict) else None
    if not isinstance(values, list) or not values:
        return ""
    first = values[0]
    if isinstance(first, dict):  # a person name: its alphabetic group
        first = first.get("Alphabetic", "")
    return str(first).strip()


def _first_int(result: Mapping[str, Any], tag: int) -> int:
    try:
        return int(_first_text(result, tag) or 0)
    except ValueError:
        return 0


def _has_non_ascii(ds: Dataset) -> bool:
    for element in ds.iterall():
        value = element.value
        values = list(value) if isinstance(value, MultiValue | list) else [value]
        if any(not str(v).isascii() for v in values if v is not None and not isinstance(v, bytes)):
            return True
    return False


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or _hex(tag)


def _hex(tag: int | BaseTag) -> str:
    return f"{int(Tag(tag)):08X}"
