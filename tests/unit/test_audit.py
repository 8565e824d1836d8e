"""The audit trail: its rows (filters, retention), the association tally, the DICOM audit
messages built from rows (PS3.15 A.5 structure, event codes, no patient data), their syslog
record and framing, and the sender's bounded queue."""

from __future__ import annotations

import base64
import io
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.filereader import read_dataset

from agent.audit import Associations, Auditor, parse_since, render_entries, summary
from agent.auditmessage import (
    Identity,
    build,
    octet_counted,
    query_bytes,
    render,
    syslog_record,
)
from agent.config import AuditSettings, ConfigError
from agent.config.units import parse_duration
from agent.dimse import Status
from agent.receive import Reply
from agent.store import AuditEntry, AuditEvent, AuditOutcome, Outcome, Store
from agent.syslog import Collector, SyslogSender
from tests.support import auditschema

STUDY = "1.2.826.0.1.3680043.8.498.10"
OTHER = "1.2.826.0.1.3680043.8.498.11"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IDENTITY = Identity("DIRIGO", "hospital-a", "gateway.example", 4242, "dirigo")
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC).timestamp()


def entry(event: AuditEvent, **fields: object) -> AuditEntry:
    return AuditEntry(T0, event, **fields)  # type: ignore[arg-type]


# --- rows -------------------------------------------------------------------------------------


def test_rows_keep_every_field_and_come_back_oldest_first(store: Store) -> None:
    first = entry(
        AuditEvent.STUDY_RECEIVED,
        calling_ae="PACS",
        called_ae="DIRIGO",
        address="10.0.0.5",
        study_uid=STUDY,
        detail={"instances": 2, "sop_classes": {CT: 2}},
    )
    refused = AuditEntry(
        T0 + 1,
        AuditEvent.ASSOCIATION,
        AuditOutcome.FAILURE,
        "calling AE title 'X' is not a configured peer",
        "X",
        "DIRIGO",
        "10.0.0.9",
    )
    stored = store.audit.record([first, refused])
    assert [e.id for e in stored] == [1, 2]
    assert store.audit.entries() == stored
    assert store.audit.entries(limit=1) == stored[1:]


def test_rows_are_chosen_by_time_study_and_peer(store: Store) -> None:
    store.audit.record(
        [
            entry(
                AuditEvent.STUDY_RECEIVED, calling_ae="PACS", address="10.0.0.5", study_uid=STUDY
            ),
            AuditEntry(T0 + 100, AuditEvent.QUERY, calling_ae="VIEWER", address="10.0.0.7"),
            AuditEntry(
                T0 + 200,
                AuditEvent.RETRIEVE,
                calling_ae="VIEWER",
                detail={"destination": "WORKSTATION", "studies": [OTHER, STUDY]},
            ),
        ]
    )

    def events(**filters: object) -> list[str]:
        return [str(e.event) for e in store.audit.entries(**filters)]  # type: ignore[arg-type]

    assert events(since=T0 + 50) == ["query", "retrieve"]
    assert events(study_uid=STUDY) == ["study-received", "retrieve"]
    assert events(study_uid=OTHER) == ["retrieve"]
    assert events(peer="PACS") == ["study-received"]
    assert events(peer="10.0.0.7") == ["query"]
    assert events(peer="WORKSTATION") == ["retrieve"]
    assert events(peer="VIEWER", since=T0 + 150) == ["retrieve"]


def test_retention_removes_only_rows_older_than_keep(store: Store) -> None:
    store.audit.record([AuditEntry(T0 + i * 86400, AuditEvent.QUERY) for i in range(10)])
    auditor = Auditor(store)
    now = T0 + 9 * 86400
    assert auditor.prune(now, keep=parse_duration("7d")) == 2
    assert min(e.at for e in store.audit.entries()) == T0 + 2 * 86400
    # applied at most once an hour: the next call within the hour does nothing
    assert auditor.prune(now + 60, keep=0) == 0
    assert auditor.prune(now + 3601, keep=0) == 8


def test_durations_of_weeks_and_years_for_retention() -> None:
    assert parse_duration("1y") == 365 * 86400
    assert parse_duration("2w") == 14 * 86400


# --- associations -----------------------------------------------------------------------------


class Recorded:
    def __init__(self) -> None:
        self.batches: list[tuple[AuditEntry, ...]] = []

    def __call__(self, *entries: AuditEntry) -> None:
        self.batches.append(entries)


def test_an_association_is_written_when_it_ends_with_one_row_per_study() -> None:
    recorded = Recorded()
    clock = iter([T0, T0 + 5]).__next__
    associations = Associations(recorded, clock)
    key = object()
    associations.admitted(key, "PACS ", "DIRIGO", "10.0.0.5")
    for study, sop_class in ((STUDY, CT), (STUDY, CT), (STUDY, MR), (OTHER, CT)):
        stored = Reply(
            Status.SUCCESS, outcome=Outcome.STORED, study_uid=study, sop_class_uid=sop_class
        )
        associations.stored(key, stored)
    associations.stored(key, Reply(Status.OUT_OF_RESOURCES, "disk full"))
    assert recorded.batches == []  # nothing is written while instances arrive
    associations.ended(key)
    associations.ended(key)  # a second close event writes nothing more

    (batch,) = recorded.batches
    association, *studies = batch
    assert association.event is AuditEvent.ASSOCIATION and association.at == T0
    assert (association.calling_ae, association.called_ae, association.address) == (
        "PACS",
        "DIRIGO",
        "10.0.0.5",
    )
    assert association.detail == {
        "ended_at": T0 + 5,
        "instances": {"stored": 4, "out_of_resources": 1},
        "tls": False,
    }
    assert {s.study_uid: dict(s.detail) for s in studies} == {
        STUDY: {"instances": 3, "sop_classes": {CT: 2, MR: 1}},
        OTHER: {"instances": 1, "sop_classes": {CT: 1}},
    }


def test_an_admitted_association_that_negotiated_nothing_is_recorded_as_refused() -> None:
    recorded = Recorded()
    associations = Associations(recorded, lambda: T0)
    associations.admitted("key", "PACS", "DIRIGO", "10.0.0.5")
    associations.ended("key", failure="no presentation context was accepted")
    ((row,),) = recorded.batches
    assert (row.outcome, row.reason) == (
        AuditOutcome.FAILURE,
        "no presentation context was accepted",
    )
    message = build(row, IDENTITY)
    assert message is not None and code(message[0].find("EventID"))[0] == "110113"


def test_imported_files_become_study_rows_without_an_association() -> None:
    recorded = Recorded()
    associations = Associations(recorded, lambda: T0)
    associations.flush_imports()  # nothing imported: nothing written
    for _ in range(3):
        reply = Reply(Status.SUCCESS, outcome=Outcome.STORED, study_uid=STUDY, sop_class_uid=CT)
        associations.imported("DIRIGO", reply)
    associations.flush_imports()
    ((study,),) = recorded.batches
    assert (study.event, study.calling_ae, study.called_ae, study.address) == (
        AuditEvent.STUDY_RECEIVED,
        "IMPORT",
        "DIRIGO",
        "local",
    )
    assert study.detail == {"instances": 3, "sop_classes": {CT: 3}}


def test_a_refused_association_is_written_at_once_with_its_reason() -> None:
    recorded = Recorded()
    Associations(recorded, lambda: T0).refused("EVIL ", "DIRIGO", "10.6.6.6", "not a peer")
    ((refused,),) = recorded.batches
    assert refused.outcome is AuditOutcome.FAILURE
    assert (refused.calling_ae, refused.reason) == ("EVIL", "not a peer")


# --- messages ---------------------------------------------------------------------------------


def code(element: ET.Element | None) -> tuple[str, str, str]:
    assert element is not None
    return (
        element.get("csd-code", ""),
        element.get("codeSystemName", ""),
        element.get("originalText", ""),
    )


def check_structure(message: ET.Element) -> None:
    """The message conforms to PS3.15 A.5.1's schema (`tests.support.auditschema`)."""
    assert auditschema.problems(message) == []


def test_the_schema_checks_catch_what_the_schema_forbids() -> None:
    good = build(entry(AuditEvent.QUERY, calling_ae="VIEWER", detail={"sop_class": CT}), IDENTITY)
    assert good is not None and auditschema.problems(good) == []
    reordered = ET.fromstring(ET.tostring(good))
    source = reordered.find("AuditSourceIdentification")
    assert source is not None
    reordered.remove(source)
    reordered.insert(1, source)
    participant = reordered.find("ActiveParticipant")
    assert participant is not None
    del participant.attrib["UserIsRequestor"]
    participant.set("NetworkAccessPointTypeCode", "9")
    obj = reordered.find("ParticipantObjectIdentification")
    assert obj is not None
    query = obj.find("ParticipantObjectQuery")
    assert query is not None
    query.text = "not base64!"
    found = auditschema.problems(reordered)
    assert len(found) == 4, found
    assert any("order" in p for p in found) and any("UserIsRequestor" in p for p in found)


def roles(message: ET.Element) -> dict[str, tuple[str, str]]:
    """Return {UserID: (role code, UserIsRequestor)} of the message's participants."""
    found = {}
    for participant in message.iter("ActiveParticipant"):
        role = participant.find("RoleIDCode")
        found[participant.get("UserID", "")] = (
            role.get("csd-code", "") if role is not None else "",
            participant.get("UserIsRequestor", ""),
        )
    return found


def test_a_study_received_is_dicom_instances_transferred_created_here() -> None:
    received = entry(
        AuditEvent.STUDY_RECEIVED,
        calling_ae="PACS",
        called_ae="DIRIGO",
        address="10.0.0.5",
        study_uid=STUDY,
        detail={"instances": 3, "sop_classes": {CT: 2, MR: 1}},
    )
    message = build(received, IDENTITY)
    assert message is not None
    check_structure(message)
    event = message[0]
    assert code(event.find("EventID")) == ("110104", "DCM", "DICOM Instances Transferred")
    assert (event.get("EventActionCode"), event.get("EventOutcomeIndicator")) == ("C", "0")
    assert event.get("EventDateTime") == "2026-12-01T08:00:00.000Z"
    assert roles(message) == {"PACS": ("110153", "true"), "DIRIGO": ("110152", "false")}
    (study,) = message.iter("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == STUDY
    assert code(study.find("ParticipantObjectIDTypeCode"))[0] == "110180"
    classes = {c.get("UID"): c.get("NumberOfInstances") for c in study.iter("SOPClass")}
    assert classes == {CT: "2", MR: "1"}
    source = message.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditEnterpriseSiteID") == "hospital-a"


def test_a_refused_association_is_a_security_alert_and_an_accepted_one_no_message() -> None:
    refused = entry(
        AuditEvent.ASSOCIATION,
        outcome=AuditOutcome.FAILURE,
        reason="calling AE title 'EVIL' is not a configured peer",
        calling_ae="EVIL",
        called_ae="DIRIGO",
        address="10.6.6.6",
    )
    message = build(refused, IDENTITY)
    assert message is not None
    check_structure(message)
    event = message[0]
    assert code(event.find("EventID"))[0] == "110113"
    assert code(event.find("EventTypeCode"))[0] == "110126"
    assert event.get("EventOutcomeIndicator") == "4"
    assert event.findtext("EventOutcomeDescription") == refused.reason
    assert build(entry(AuditEvent.ASSOCIATION, calling_ae="PACS"), IDENTITY) is None


def test_a_query_carries_its_uid_keys_and_never_a_patient() -> None:
    query = entry(
        AuditEvent.QUERY,
        calling_ae="VIEWER",
        called_ae="DIRIGO",
        address="10.0.0.7",
        detail={
            "sop_class": STUDY_ROOT_FIND,
            "level": "STUDY",
            "keys": {"StudyInstanceUID": STUDY},
            "other_keys": ["PatientName"],
            "matches": 1,
        },
    )
    message = build(query, IDENTITY)
    assert message is not None
    check_structure(message)
    assert code(message[0].find("EventID"))[0] == "110112"
    (obj,) = message.iter("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectID") == STUDY_ROOT_FIND
    assert code(obj.find("ParticipantObjectIDTypeCode"))[0] == "110181"
    encoded = base64.b64decode(obj.findtext("ParticipantObjectQuery") or "")
    identifier = read_dataset(io.BytesIO(encoded), is_implicit_VR=False, is_little_endian=True)
    assert identifier.QueryRetrieveLevel == "STUDY"
    assert identifier.StudyInstanceUID == STUDY
    assert "PatientName" not in identifier


def test_a_retrieve_names_its_destination_its_requester_and_each_study() -> None:
    retrieve = entry(
        AuditEvent.RETRIEVE,
        calling_ae="VIEWER",
        called_ae="DIRIGO",
        address="10.0.0.7",
        detail={
            "operation": "C-MOVE",
            "destination": "WORKSTATION",
            "destination_address": "10.0.0.8",
            "by_study": {STUDY: {CT: 10}, OTHER: {MR: 2}},
            "studies": [STUDY, OTHER],
        },
    )
    message = build(retrieve, IDENTITY)
    assert message is not None
    check_structure(message)
    assert code(message[0].find("EventID"))[0] == "110104"
    assert message[0].get("EventActionCode") == "R"
    assert roles(message) == {
        "DIRIGO": ("110153", "false"),
        "WORKSTATION": ("110152", "false"),
        "VIEWER": ("", "true"),
    }
    studies = [
        o.get("ParticipantObjectID") for o in message.iter("ParticipantObjectIdentification")
    ]
    assert studies == [STUDY, OTHER]


def test_application_start_and_stop_are_application_activity() -> None:
    for event, type_code in (
        (AuditEvent.APPLICATION_START, "110120"),
        (AuditEvent.APPLICATION_STOP, "110121"),
    ):
        message = build(entry(event, calling_ae="DIRIGO"), IDENTITY)
        assert message is not None
        check_structure(message)
        assert code(message[0].find("EventID"))[0] == "110100"
        assert code(message[0].find("EventTypeCode"))[0] == type_code
        assert roles(message) == {"DIRIGO": ("110150", "false"), "dirigo": ("110151", "true")}


def test_parts_sent_and_confirmed_and_quarantine_have_messages() -> None:
    sent = entry(
        AuditEvent.PART_SENT,
        address="exchange.example",
        study_uid=STUDY,
        detail={"sop_classes": {CT: 4}},
    )
    confirmed = entry(AuditEvent.PART_CONFIRMED, address="exchange.example", study_uid=STUDY)
    quarantined = entry(
        AuditEvent.QUARANTINE,
        outcome=AuditOutcome.FAILURE,
        reason="not a DICOM file",
        calling_ae="PACS",
        address="10.0.0.5",
    )
    for row, action, outcome in ((sent, "R", "0"), (confirmed, "R", "0"), (quarantined, "C", "4")):
        message = build(row, IDENTITY)
        assert message is not None
        check_structure(message)
        assert (message[0].get("EventActionCode"), message[0].get("EventOutcomeIndicator")) == (
            action,
            outcome,
        )
    message = build(confirmed, IDENTITY)
    assert message is not None
    (study,) = message.iter("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectDataLifeCycle") == "4"  # verification


def test_the_syslog_record_is_rfc_5424_with_the_xml_as_utf8_message() -> None:
    failed = entry(
        AuditEvent.QUARANTINE, outcome=AuditOutcome.FAILURE, reason="bad", calling_ae="PACS"
    )
    message = build(failed, IDENTITY)
    assert message is not None
    record = syslog_record(message, failed, IDENTITY)
    header, _, body = record.partition(b" \xef\xbb\xbf")
    # authpriv (10) * 8 + warning (4); version 1; time; host; app; pid; MSGID; no SD
    assert (
        header.decode()
        == "<84>1 2026-12-01T08:00:00.000Z gateway.example dirigo 4242 IHE+RFC-3881 -"
    )
    assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?><AuditMessage>')
    assert b"\n" not in record
    assert ET.fromstring(body).tag == "AuditMessage"


def test_octet_counting_frames_a_record_with_its_length_in_bytes() -> None:
    record = "<85>1 - - - - - - \u00e9".encode()
    framed = octet_counted(record)
    match = re.match(rb"(\d+) ", framed)
    assert match is not None and int(match[1]) == len(record) == len(framed) - match.end()
    assert render(entry(AuditEvent.ASSOCIATION, calling_ae="PACS"), IDENTITY) is None


def test_query_bytes_encode_an_identifier_that_reads_back() -> None:
    data = query_bytes("SERIES", {"StudyInstanceUID": STUDY, "SeriesInstanceUID": OTHER})
    back = read_dataset(io.BytesIO(data), is_implicit_VR=False, is_little_endian=True)
    assert (back.QueryRetrieveLevel, back.StudyInstanceUID, back.SeriesInstanceUID) == (
        "SERIES",
        STUDY,
        OTHER,
    )


# --- the sender's queue, and what `dirigo audit` shows -----------------------------------------


def test_a_full_queue_drops_and_counts_instead_of_waiting() -> None:
    sender: SyslogSender[int] = SyslogSender(
        Collector("127.0.0.1", 9, False), lambda i: None, capacity=2
    )
    assert [sender.submit(i) for i in range(5)] == [True, True, False, False, False]
    assert (sender.queued, sender.dropped) == (2, 3)
    sender.stop(flush=0)  # never started: what is queued counts as dropped too
    assert (sender.queued, sender.dropped) == (0, 5)


def test_a_collector_address_is_parsed_with_its_tls_and_ca() -> None:
    collector = Collector.parse("tcp+tls://audit.example:6514", Path("/etc/ca.pem"))
    assert (collector.host, collector.port, collector.tls, collector.ca) == (
        "audit.example",
        6514,
        True,
        Path("/etc/ca.pem"),
    )
    assert str(Collector.parse("tcp://10.0.0.1:514")) == "tcp://10.0.0.1:514"


def test_a_ca_that_cannot_be_used_stops_the_start_naming_the_key(
    store: Store, tmp_path: Path
) -> None:
    not_a_ca = tmp_path / "not-a-ca.pem"
    not_a_ca.write_text("hello")
    for ca in (tmp_path / "missing.pem", not_a_ca):
        settings = AuditSettings(syslog="tcp+tls://audit.example:6514", ca=ca)
        with pytest.raises(ConfigError) as raised:
            Auditor.open(store, settings, IDENTITY)
        (problem,) = raised.value.problems
        assert problem.startswith(f"At 'audit.ca': cannot use {ca}: ")


def test_since_takes_a_duration_or_an_iso_date() -> None:
    now = T0 + 86400
    assert parse_since("24h", now) == T0
    assert parse_since("2026-12-01T08:00", now) == T0
    assert parse_since("2026-12-01", now) == T0 - 8 * 3600
    assert parse_since("2026-12-01T09:00+01:00", now) == T0
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("yesterday", now)


def test_the_table_shows_who_what_and_why() -> None:
    rows = [
        entry(
            AuditEvent.ASSOCIATION,
            outcome=AuditOutcome.FAILURE,
            reason="not a peer",
            calling_ae="EVIL",
            called_ae="DIRIGO",
            address="10.6.6.6",
        ),
        entry(
            AuditEvent.QUERY,
            calling_ae="VIEWER",
            detail={"level": "STUDY", "keys": {"StudyInstanceUID": STUDY}, "matches": 1},
        ),
    ]
    table = list(render_entries(rows))
    assert table[0].split() == [
        "WHEN",
        "(UTC)",
        "EVENT",
        "OUTCOME",
        "WHO",
        "ADDRESS",
        "STUDY",
        "WHAT",
    ]
    assert "EVIL -> DIRIGO" in table[1] and table[1].endswith("not a peer")
    assert summary(rows[1]) == f"STUDY StudyInstanceUID={STUDY}: 1 match(es)"
    assert list(render_entries([])) == ["no audit records match"]
