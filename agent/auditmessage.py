"""DICOM audit messages (PS3.15 A.5, the RFC 3881-derived `AuditMessage` XML) built from audit
rows, and the RFC 5424 syslog record that carries one.

How Dirigo's events map to the messages PS3.15 A.5.3 defines:

| audit row | message (EventID) | EventActionCode, type |
|---|---|---|
| application-start / -stop | Application Activity (110100) | E; Application Start/Stop 110120/1 |
| association refused | Security Alert (110113) | E; Node Authentication 110126, outcome 4 |
| association accepted | none: the transfers and queries on it carry its participants |
| study-received | DICOM Instances Transferred (110104) | C (created here), sender as Source |
| quarantine | DICOM Instances Transferred (110104) | C, outcome 4, the reason as description |
| part-sent | DICOM Instances Transferred (110104) | R, Dirigo as Source, the cloud as Destination |
| part-confirmed | DICOM Instances Transferred (110104) | R, life cycle 4 (Verification) |
| query | Query (110112) | E; the query keys without patient data |
| retrieve | DICOM Instances Transferred (110104) | R, the C-MOVE/C-GET destination |

No message carries a patient's name or ID: studies are named by UID, queries by their UID keys.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import pwd
import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from agent.store.audit import AuditEntry, AuditEvent, AuditOutcome

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
FACILITY_AUTHPRIV = 10
"""Security/authorization messages (RFC 5424 facility 10), as IHE ATNA asks."""
SEVERITY = {AuditOutcome.SUCCESS: 5, AuditOutcome.FAILURE: 4}
"""Notice for what went as asked, warning for what did not."""
MSGID = "IHE+RFC-3881"
"""The MSGID IHE ATNA (ITI-20) gives a syslog record carrying an audit message."""


@dataclass(frozen=True)
class Code:
    """A coded value (`csd-code`, `codeSystemName`, `originalText` in the schema)."""

    code: str
    meaning: str
    system: str = "DCM"


APPLICATION_ACTIVITY = Code("110100", "Application Activity")
DICOM_INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
APPLICATION = Code("110150", "Application")
APPLICATION_LAUNCHER = Code("110151", "Application Launcher")
DESTINATION = Code("110152", "Destination Role ID")
SOURCE = Code("110153", "Source Role ID")
STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "SOP Class UID")


@dataclass(frozen=True)
class Identity:
    """Who reports: this agent's AE title, site, host and process."""

    ae_title: str
    site: str
    host: str
    pid: int
    user: str
    """The operating system user the agent runs as (the launcher of Application Activity)."""

    @classmethod
    def here(cls, ae_title: str, site: str) -> Identity:
        try:
            user = os.getlogin()
        except OSError:  # no controlling terminal (a service)
            user = pwd.getpwuid(os.geteuid()).pw_name
        return cls(ae_title, site, socket.gethostname(), os.getpid(), user)


@dataclass(frozen=True)
class Participant:
    user_id: str
    requestor: bool
    role: Code | None = None
    address: str | None = None
    alternative: str | None = None


def build(entry: AuditEntry, identity: Identity) -> ET.Element | None:
    """Return the `AuditMessage` for `entry`, or None for an event that has no message of its
    own (an accepted association)."""
    event = entry.event
    if event in (AuditEvent.APPLICATION_START, AuditEvent.APPLICATION_STOP):
        start = event is AuditEvent.APPLICATION_START
        kind = APPLICATION_START if start else APPLICATION_STOP
        participants = [
            _self(identity, APPLICATION, requestor=False),
            Participant(identity.user, True, APPLICATION_LAUNCHER),
        ]
        return _message(entry, identity, APPLICATION_ACTIVITY, "E", [kind], participants, [])
    if event is AuditEvent.ASSOCIATION:
        if entry.outcome is AuditOutcome.SUCCESS:
            return None
        participants = [_peer(entry, role=None), _self(identity, None, False, entry.called_ae)]
        return _message(
            entry, identity, SECURITY_ALERT, "E", [NODE_AUTHENTICATION], participants, []
        )
    if event is AuditEvent.QUERY:
        participants = [_peer(entry, SOURCE), _self(identity, DESTINATION, False, entry.called_ae)]
        return _message(entry, identity, QUERY, "E", [], participants, [_query(entry.detail)])
    if event in (AuditEvent.STUDY_RECEIVED, AuditEvent.QUARANTINE):
        participants = [_peer(entry, SOURCE), _self(identity, DESTINATION, False, entry.called_ae)]
        objects = _studies(entry)
        return _message(
            entry, identity, DICOM_INSTANCES_TRANSFERRED, "C", [], participants, objects
        )
    if event in (AuditEvent.PART_SENT, AuditEvent.PART_CONFIRMED):
        cloud = Participant(entry.address or "cloud", False, DESTINATION, entry.address)
        participants = [_self(identity, SOURCE, requestor=True), cloud]
        life_cycle = "4" if event is AuditEvent.PART_CONFIRMED else None
        objects = _studies(entry, life_cycle)
        return _message(
            entry, identity, DICOM_INSTANCES_TRANSFERRED, "R", [], participants, objects
        )
    if event is AuditEvent.RETRIEVE:
        return _retrieve(entry, identity)
    return None


def _retrieve(entry: AuditEntry, identity: Identity) -> ET.Element:
    """C-MOVE: Dirigo sends to the destination on the requester's behalf (the requester is a
    participant without a role); C-GET: to the requester itself; `dirigo retrieve`: to the
    destination on the operator's behalf."""
    detail = entry.detail
    destination = str(detail.get("destination") or entry.calling_ae or "")
    where = detail.get("destination_address")
    participants = [_self(identity, SOURCE, False)]
    if detail.get("operation") == "C-GET":
        participants.append(Participant(destination, True, DESTINATION, entry.address))
    else:
        participants.append(Participant(destination, False, DESTINATION, _text_or_none(where)))
        if entry.calling_ae and entry.calling_ae != identity.ae_title:
            participants.append(Participant(entry.calling_ae, True, None, entry.address))
        elif detail.get("operator"):
            participants.append(Participant(str(detail["operator"]), True))
    return _message(
        entry, identity, DICOM_INSTANCES_TRANSFERRED, "R", [], participants, _studies(entry)
    )


def _message(
    entry: AuditEntry,
    identity: Identity,
    event_id: Code,
    action: str,
    types: list[Code],
    participants: list[Participant],
    objects: list[ET.Element],
) -> ET.Element:
    """Assemble the message in the schema's order: event, participants, source, objects."""
    root = ET.Element("AuditMessage")
    failed = entry.outcome is AuditOutcome.FAILURE
    event = ET.SubElement(
        root,
        "EventIdentification",
        EventActionCode=action,
        EventDateTime=_datetime(entry.at),
        EventOutcomeIndicator="4" if failed else "0",
    )
    _code(event, "EventID", event_id)
    for kind in types:
        _code(event, "EventTypeCode", kind)
    if failed and entry.reason:
        ET.SubElement(event, "EventOutcomeDescription").text = entry.reason
    for participant in participants:
        _participant(root, participant)
    source = ET.SubElement(
        root,
        "AuditSourceIdentification",
        AuditEnterpriseSiteID=identity.site,
        AuditSourceID=f"{identity.ae_title}@{identity.host}",
    )
    # 4: an application server process (PS3.15 A.5.1.2.1)
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})
    root.extend(objects)
    return root


def _self(
    identity: Identity, role: Code | None, requestor: bool, ae_title: str | None = None
) -> Participant:
    return Participant(
        ae_title or identity.ae_title, requestor, role, identity.host, str(identity.pid)
    )


def _peer(entry: AuditEntry, role: Code | None) -> Participant:
    return Participant(entry.calling_ae or entry.address or "unknown", True, role, entry.address)


def _participant(root: ET.Element, participant: Participant) -> None:
    attributes = {"UserID": participant.user_id}
    if participant.alternative:
        attributes["AlternativeUserID"] = participant.alternative
    attributes["UserIsRequestor"] = "true" if participant.requestor else "false"
    if participant.address:
        attributes["NetworkAccessPointID"] = participant.address
        attributes["NetworkAccessPointTypeCode"] = "2" if _is_ip(participant.address) else "1"
    element = ET.SubElement(root, "ActiveParticipant", attributes)
    if participant.role is not None:
        _code(element, "RoleIDCode", participant.role)


def _studies(entry: AuditEntry, life_cycle: str | None = None) -> list[ET.Element]:
    """One participant object per study: its UID, and its instances by SOP class."""
    by_study: Mapping[str, Any] = entry.detail.get("by_study") or {}
    if not by_study and entry.study_uid:
        by_study = {entry.study_uid: entry.detail.get("sop_classes") or {}}
    objects = []
    for study_uid, classes in by_study.items():
        attributes = {
            "ParticipantObjectID": study_uid,
            "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "3",  # report (PS3.15's role for a study)
        }
        if life_cycle is not None:
            attributes["ParticipantObjectDataLifeCycle"] = life_cycle
        element = ET.Element("ParticipantObjectIdentification", attributes)
        _code(element, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
        if classes:
            description = ET.SubElement(element, "ParticipantObjectDescription")
            for sop_class, count in sorted(dict(classes).items()):
                ET.SubElement(
                    description, "SOPClass", UID=sop_class, NumberOfInstances=str(int(count))
                )
        objects.append(element)
    return objects


def _query(detail: Mapping[str, Any]) -> ET.Element:
    """The query as its SOP class and, base64, the identifier's level and UID keys encoded as
    Explicit VR Little Endian (a patient's name or ID is never among them)."""
    element = ET.Element(
        "ParticipantObjectIdentification",
        ParticipantObjectID=str(detail.get("sop_class") or ""),
        ParticipantObjectTypeCode="2",
        ParticipantObjectTypeCodeRole="3",
    )
    _code(element, "ParticipantObjectIDTypeCode", SOP_CLASS_UID)
    ET.SubElement(element, "ParticipantObjectQuery").text = _b64(
        query_bytes(detail.get("level"), detail.get("keys") or {})
    )
    ET.SubElement(
        element,
        "ParticipantObjectDetail",
        type="TransferSyntax",
        value=_b64(EXPLICIT_VR_LITTLE_ENDIAN.encode("ascii")),
    )
    return element


def query_bytes(level: object, keys: Mapping[str, Any]) -> bytes:
    """Return the identifier `level` and `keys` (keyword: value) as Explicit VR Little Endian."""
    ds = Dataset()
    if level:
        ds.QueryRetrieveLevel = str(level)
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _code(parent: ET.Element, name: str, code: Code) -> None:
    ET.SubElement(
        parent,
        name,
        {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning},
    )


def _datetime(at: float) -> str:
    return (
        datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _text_or_none(value: object) -> str | None:
    return str(value) if value else None


XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'


def to_xml(message: ET.Element) -> bytes:
    """Return the message as an XML document in UTF-8, on one line (a collector that stores
    one record per line keeps it whole)."""
    return XML_DECLARATION + ET.tostring(message, encoding="unicode").encode("utf-8")


def syslog_record(
    message: ET.Element, entry: AuditEntry, identity: Identity, app_name: str = "dirigo"
) -> bytes:
    """Return the RFC 5424 record carrying `message`: PRI (facility authpriv, severity by the
    outcome), version 1, the event's time, host, app, process, MSGID, no structured data, and
    the XML as the UTF-8 MSG (with its BOM, as RFC 5424 6.4 asks of UTF-8 text)."""
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY[entry.outcome]
    header = " ".join(
        (
            f"<{pri}>1",
            _datetime(entry.at),
            _header_field(identity.host, 255),
            _header_field(app_name, 48),
            _header_field(str(identity.pid), 128),
            MSGID,
            "-",
        )
    )
    return header.encode("ascii") + b" \xef\xbb\xbf" + to_xml(message)


def _header_field(text: str, most: int) -> str:
    """RFC 5424 header fields are printable US-ASCII without spaces, or `-` when empty."""
    cleaned = "".join(c for c in text if "!" <= c <= "~")[:most]
    return cleaned or "-"


def octet_counted(record: bytes) -> bytes:
    """Frame `record` for syslog over TCP or TLS by octet counting (RFC 6587 3.4.1, RFC 5425
    4.3): its length in ASCII digits, a space, then the record."""
    return str(len(record)).encode("ascii") + b" " + record


def render(entry: AuditEntry, identity: Identity) -> bytes | None:
    """Return the framed syslog record for `entry`, or None if it has no message."""
    message = build(entry, identity)
    if message is None:
        return None
    return octet_counted(syslog_record(message, entry, identity))
