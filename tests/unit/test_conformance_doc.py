"""docs/conformance.md against the code: the lists a PACS administrator relies on (SOP classes,
transfer syntaxes, Query/Retrieve levels and keys, statuses, configuration keys and defaults)
must be what the code defines, so that a change to either side without the other fails here."""

from __future__ import annotations

import ast
import re
import ssl
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import UID as UIDName
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, sop_class
from pynetdicom.presentation import build_context, negotiate_unrestricted
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from agent import dicom, receive, tls
from agent.config import parse_config
from agent.dimse import QRStatus, RejectReason, Status
from agent.instance import MAX_SEQUENCE_DEPTH
from agent.serve import query, retrieve, syntax
from agent.serve.fetchsyntax import LADDERS
from agent.serve.handlers import MAX_SUB_OPERATIONS

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
UID = re.compile(r"`(1\.2\.840\.10008\.[0-9.]+)`")
FLAT = " ".join(DOC.split())
"""The document with every run of white space as one space: phrases are found across lines."""
HEX = re.compile(r"`?(0x[0-9A-F]{2,4})`?")


def section(title: str) -> str:
    """Return the text under the heading that contains `title`, up to the next heading of the
    same or a higher level."""
    lines = DOC.splitlines()
    for start, line in enumerate(lines):
        match = re.match(r"(#+) ", line)
        if match and title in line:
            level = len(match.group(1))
            end = next(
                (
                    i
                    for i in range(start + 1, len(lines))
                    if (m := re.match(r"(#+) ", lines[i])) and len(m.group(1)) <= level
                ),
                len(lines),
            )
            return "\n".join(lines[start + 1 : end])
    raise AssertionError(f"docs/conformance.md has no heading with {title!r}")


def table(text: str, first_header: str) -> list[dict[str, str]]:
    """Return the rows of the Markdown table in `text` whose first header is `first_header`."""
    lines = [line.strip() for line in text.splitlines()]
    for index, line in enumerate(lines):
        cells = _cells(line)
        if cells and cells[0] == first_header:
            rows = []
            for row in lines[index + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(cells, _cells(row), strict=True)))
            return rows
    raise AssertionError(f"no table starting with {first_header!r}")


def _cells(line: str) -> list[str]:
    if not line.startswith("|"):
        return []
    return [cell.strip() for cell in line.strip("|").split("|")]


def _uid(cell: str) -> str:
    match = UID.search(cell)
    assert match, f"no UID in {cell!r}"
    return match.group(1)


# --- SOP classes ---------------------------------------------------------------------------


def test_the_sop_class_table_lists_exactly_the_non_storage_classes_the_ae_serves() -> None:
    rows = table(section("3.2.1 SOP classes"), "SOP class")
    listed = {_uid(row["UID"]): row for row in rows if UID.search(row["UID"])}
    assert set(listed) == set(dicom.SERVICE_OF_CLASS)
    assert set(query.MODELS) == set(dicom.QUERY_RETRIEVE_SOP_CLASSES)
    assert {uid for uid, row in listed.items() if row["SCP"] == "yes"} == set(listed)
    # the only one Dirigo also uses as SCU is Verification (`dirigo echo`)
    assert {uid for uid, row in listed.items() if row["SCU"] == "yes"} == {Verification}
    for uid, row in listed.items():
        model = query.MODELS.get(uid)
        if model is not None:
            assert row["SOP class"].startswith(model.value), uid


def test_the_storage_class_count_and_pynetdicom_version_are_those_installed() -> None:
    text = section("3.2.1 SOP classes")
    count = len(AllStoragePresentationContexts)
    phrase = f"the {count} storage SOP classes pynetdicom {pynetdicom.__version__} knows"
    assert phrase in " ".join(text.split())


def test_the_non_storage_classes_pynetdicom_takes_for_storage_are_named_and_refused() -> None:
    """With unrestricted storage, pynetdicom accepts a known SOP class whose keyword it does
    not recognise as if it were an unknown storage class; the doc names each such class, and
    the Gate refuses each one (`dicom.offered`)."""
    known = {
        value
        for name, value in vars(sop_class).items()
        if not name.startswith("_") and isinstance(value, str) and value.startswith("1.2.840")
    }
    storage = {str(c.abstract_syntax) for c in AllStoragePresentationContexts}
    candidates = sorted(known - storage - set(dicom.SERVICE_OF_CLASS))
    proposed = [build_context(uid) for uid in candidates]
    for number, context in enumerate(proposed):
        context.context_id = 2 * number + 1
    supported = [build_context(uid) for uid in dicom.SERVICE_OF_CLASS]
    results, _roles = negotiate_unrestricted(proposed, supported)
    accepted = {str(c.abstract_syntax) for c in results if c.result == 0}
    paragraph = section("3.2.1 SOP classes").split("Not supported:")[1]
    assert accepted == set(UID.findall(paragraph))
    assert f"with {_number_word(len(accepted))} exceptions" in " ".join(paragraph.split())
    assert not any(dicom.offered(uid) for uid in accepted)
    assert all(dicom.offered(str(c.abstract_syntax)) for c in AllStoragePresentationContexts)


def _number_word(n: int) -> str:
    words = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight"]
    return words[n] if n < len(words) else str(n)


# --- transfer syntaxes ---------------------------------------------------------------------


def annex_a() -> list[dict[str, str]]:
    return table(section("Annex A. Transfer syntaxes"), "UID")


def column(name: str, value: str = "yes") -> set[str]:
    return {_uid(row["UID"]) for row in annex_a() if row[name] == value}


def test_annex_a_lists_each_transfer_syntax_pynetdicom_knows_once_with_its_name() -> None:
    rows = annex_a()
    uids = [_uid(row["UID"]) for row in rows]
    assert uids == list(ALL_TRANSFER_SYNTAXES)  # Annex A's order is the acceptor's preference
    for row in rows:
        assert row["name"] == UIDName(_uid(row["UID"])).name


def test_q_r_and_verification_accept_every_syntax_of_annex_a() -> None:
    assert column("Q/R, Verification") == set(ALL_TRANSFER_SYNTAXES)


def test_the_decompressed_and_lossy_columns_are_what_the_retrieve_plan_uses() -> None:
    assert column("decompressed") == set(syntax.LOSSLESS)
    assert column("lossy") == set(syntax.LOSSY)


def test_the_proposed_column_is_what_is_proposed_to_a_destination() -> None:
    assert column("proposed", "always") == set(syntax.UNCOMPRESSED_LE)
    assert column("proposed", "if unknown") == set(syntax.COMMON_COMPRESSED)
    # and the proposals really are these, for a class whose instances' syntaxes are unknown
    contexts = syntax.proposals({"1.2.840.10008.5.1.4.1.1.2": [None]})
    proposed = {ts for context in contexts for ts in context.transfer_syntax}
    assert proposed == set(syntax.UNCOMPRESSED_LE) | set(syntax.COMMON_COMPRESSED)


def test_the_fetched_column_is_every_syntax_a_fetch_setting_asks_for() -> None:
    assert column("fetched") == {s for ladder in LADDERS.values() for s in ladder}


# --- Query/Retrieve ------------------------------------------------------------------------


def test_the_level_table_is_the_levels_unique_keys_and_resources_of_the_code() -> None:
    rows = table(section("3.2.4.3.3"), "level")
    assert [row["level"].strip("`") for row in rows] == [level.value for level in query.Level]
    for row in rows:
        level = query.Level(row["level"].strip("`"))
        tag = query.UNIQUE_KEY[level]
        assert f"({tag >> 16:04X},{tag & 0xFFFF:04X})" in row["unique key"], level
        assert row["QIDO-RS resource searched"] == f"`{query.RESOURCE[level]}`", level
        for model, name in (
            (query.Model.PATIENT_ROOT, "Patient Root"),
            (query.Model.STUDY_ROOT, "Study Root"),
        ):
            ds = Dataset()
            ds.QueryRetrieveLevel = level.value
            try:
                query.level_of(ds, model)
                served = True
            except query.QueryError:
                served = False
            assert row[name].startswith("yes") == served, (level, name)


def test_the_keys_dirigo_answers_itself_are_the_ones_named() -> None:
    text = section("3.2.4.3.3")
    for tag in (
        query.PATIENT_RELATED_STUDIES,
        query.PATIENT_RELATED_SERIES,
        query.PATIENT_RELATED_INSTANCES,
    ):
        assert f"({tag >> 16:04X},{tag & 0xFFFF:04X})" in text
    # "Every attribute ... (except Specific Character Set, Query/Retrieve Level and Retrieve AE
    # Title) is sent to the archive as a matching parameter"
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 100"
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.RetrieveAETitle = "ELSEWHERE"
    identifier.Modality = "CT"
    identifier.StudyDate = "20200101-20201231"
    identifier.StudyInstanceUID = ["1.2.3", "1.2.4"]
    identifier.PatientName = "*"
    search = query.search_for(identifier, query.Model.STUDY_ROOT, "DIRIGO")
    matching = {name: value for name, value in search.params if name != "includefield"}
    assert matching == {
        "00080060": "CT",
        "00080020": "20200101-20201231",
        "0020000D": "1.2.3,1.2.4",
    }


def test_the_q_r_status_table_is_every_status_the_scp_answers_with() -> None:
    rows = table(section("3.2.4.3.4"), "status")
    listed = {int(HEX.search(row["status"]).group(1), 16) for row in rows}  # type: ignore[union-attr]
    assert listed == {int(status) for status in QRStatus}


def test_the_c_store_status_table_is_every_status_the_receiver_answers_with() -> None:
    """Every `Status.NAME` the receiver's module names (and each problem's status) is listed,
    and nothing else."""
    tree = ast.parse(Path(receive.__file__).read_text(encoding="utf-8"))
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "Status"
    }
    codes = {int(getattr(Status, name)) for name in used}
    rows = table(section("3.2.4.3.1 Storage SCP"), "status")
    listed = {int(HEX.search(row["status"]).group(1), 16) for row in rows}  # type: ignore[union-attr]
    assert listed == codes


def test_the_admission_table_names_the_reject_reasons_the_gate_sends() -> None:
    text = section("3.2.4.1 Admission")
    named = {int(code, 16) for code in re.findall(r"\((0x[0-9A-F]{2})\)", text)}
    assert named == {int(reason) for reason in RejectReason}


# --- numbers and identifiers quoted in the text --------------------------------------------


@pytest.mark.parametrize(
    "phrase",
    [
        f"At most {syntax.MAX_CONTEXTS} contexts are proposed",
        f"({dicom.PENDING_PER_SLOT} per association slot",
        f"at most {MAX_SUB_OPERATIONS}",
        f"up to {retrieve.FETCH_ATTEMPTS} times within three `cloud.timeout`s",
        f"up to {retrieve.PREFETCH} being fetched ahead of the one being sent",
        f"at least {retrieve.STREAM_LEAST} instances not cached",
        f"nesting at most {MAX_SEQUENCE_DEPTH} levels",
        "first probe after {} s of silence, then every {} s, closed after {} unanswered".format(
            *(value for _name, value in dicom.KEEPALIVE)
        ),
        f"Implementation Class UID `{pynetdicom.PYNETDICOM_IMPLEMENTATION_UID}`",
        f"Implementation Version Name `{pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION}`",
        f"Specific Character Set `{query.UTF8}`",
    ],
)
def test_the_text_quotes_the_code(phrase: str) -> None:
    assert phrase in FLAT


# --- configuration -------------------------------------------------------------------------


def test_each_configuration_key_exists_with_the_default_the_doc_gives() -> None:
    base: dict[str, Any] = {"site": "s", "cloud": {"upload_url": "https://exchange.example/files/"}}
    defaults = parse_config(base)
    for row in table(section("3.4 Configuration"), "key"):
        path = row["key"].strip("`").split(".")
        value: Any = defaults
        for name in path:
            assert hasattr(value, name), row["key"]
            value = getattr(value, name)
        if row["default"] == "none":
            assert value in (None, ()), row["key"]
            continue
        data = yaml.safe_load(yaml.safe_dump(base))
        node = data
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = yaml.safe_load(row["default"].strip("`"))
        assert parse_config(data) == defaults, row["key"]


# --- security profiles -----------------------------------------------------------------------


def test_the_tls_profile_lists_the_cipher_suites_and_versions_the_contexts_allow() -> None:
    """The TLS 1.2 suites the statement names (IANA names) are exactly those an SSL context
    with Dirigo's profile enables (OpenSSL names), and its floor is the version named."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls._profile(context)
    enabled = {
        _iana(cipher["name"]) for cipher in context.get_ciphers() if cipher["protocol"] == "TLSv1.2"
    }
    text = section("6.1 Security profiles")
    named = set(re.findall(r"`(TLS_ECDHE_\w+)`", text))
    assert named == enabled
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert "TLS 1.2 or 1.3, never older" in text


def _iana(openssl_name: str) -> str:
    match = re.fullmatch(r"ECDHE-(RSA|ECDSA)-AES(128|256)-GCM-(SHA\d+)", openssl_name)
    assert match, f"{openssl_name} is outside the profile"
    auth, bits, mac = match.groups()
    return f"TLS_ECDHE_{auth}_WITH_AES_{bits}_GCM_{mac}"
