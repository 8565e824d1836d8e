"""PS3.15 A.5.1's audit message schema, as checks: the content model of `AuditMessage` and of
each element in it (the children in their order, the attributes allowed and required, the
enumerated values, coded values, base64 and xsd types). No RELAX NG validator is installed
here, so the tests check a message against these rules; `problems` names every departure."""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET
from datetime import datetime

CODED = {"csd-code", "codeSystemName", "displayName", "originalText"}
CODED_REQUIRED = {"csd-code", "codeSystemName", "originalText"}
ACTION_CODES = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}
ACCESS_POINT_TYPES = {"1", "2", "3", "4", "5"}
OBJECT_TYPES = {"1", "2", "3", "4"}
OBJECT_ROLES = {str(n) for n in range(1, 27)}
LIFE_CYCLES = {str(n) for n in range(1, 16)}
BOOLEANS = {"true", "false", "1", "0"}

# each content model as a regular expression over the children's tags, one letter per tag
MESSAGE = ("E(A)+S(P)*", {"EventIdentification": "E", "ActiveParticipant": "A"})
MESSAGE[1].update({"AuditSourceIdentification": "S", "ParticipantObjectIdentification": "P"})
EVENT = ("I(T)*(O)?", {"EventID": "I", "EventTypeCode": "T", "EventOutcomeDescription": "O"})
PARTICIPANT = ("(R)*(M)?", {"RoleIDCode": "R", "MediaIdentifier": "M"})
SOURCE = ("(C)*", {"AuditSourceTypeCode": "C"})
OBJECT = (
    "I(N|Q)?(D)*(X)*",
    {
        "ParticipantObjectIDTypeCode": "I",
        "ParticipantObjectName": "N",
        "ParticipantObjectQuery": "Q",
        "ParticipantObjectDetail": "D",
        "ParticipantObjectDescription": "X",
    },
)
DESCRIPTION = (
    "(M)*(A)*(S)*(C)?(E)?(N)?",
    {
        "MPPS": "M",
        "Accession": "A",
        "SOPClass": "S",
        "ParticipantObjectContainsStudy": "C",
        "Encrypted": "E",
        "Anonymized": "N",
    },
)


def problems(message: ET.Element) -> list[str]:
    """Return every way `message` departs from the schema (empty when it conforms)."""
    found: list[str] = []
    if message.tag != "AuditMessage":
        return [f"the root is {message.tag}, not AuditMessage"]
    _children(message, MESSAGE, found)
    _attributes(message, set(), set(), found)
    for child in message:
        check = _CHECKS.get(child.tag)
        if check is not None:
            check(child, found)
    return found


def _event(element: ET.Element, found: list[str]) -> None:
    _children(element, EVENT, found)
    allowed = {"EventActionCode", "EventDateTime", "EventOutcomeIndicator"}
    _attributes(element, allowed, {"EventDateTime", "EventOutcomeIndicator"}, found)
    _enumerated(element, "EventActionCode", ACTION_CODES, found)
    _enumerated(element, "EventOutcomeIndicator", OUTCOMES, found)
    when = element.get("EventDateTime", "")
    try:
        moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            found.append(f"EventDateTime {when!r} has no time zone")
    except ValueError:
        found.append(f"EventDateTime {when!r} is not an xsd:dateTime")
    for child in element:
        if child.tag in ("EventID", "EventTypeCode"):
            _coded(child, found)
        elif child.tag == "EventOutcomeDescription":
            _attributes(child, set(), set(), found)


def _participant(element: ET.Element, found: list[str]) -> None:
    _children(element, PARTICIPANT, found)
    allowed = {"UserID", "AlternativeUserID", "UserName", "UserIsRequestor"}
    allowed |= {"NetworkAccessPointID", "NetworkAccessPointTypeCode"}
    _attributes(element, allowed, {"UserID", "UserIsRequestor"}, found)
    _enumerated(element, "UserIsRequestor", BOOLEANS, found)
    _enumerated(element, "NetworkAccessPointTypeCode", ACCESS_POINT_TYPES, found)
    for child in element.iter("RoleIDCode"):
        _coded(child, found)


def _source(element: ET.Element, found: list[str]) -> None:
    _children(element, SOURCE, found)
    _attributes(element, {"AuditEnterpriseSiteID", "AuditSourceID"}, {"AuditSourceID"}, found)
    for child in element:
        code = child.get("csd-code", "")
        if not code:
            found.append("AuditSourceTypeCode without csd-code")
        elif not re.fullmatch("[1-9]", code) and "codeSystemName" not in child.attrib:
            found.append(f"AuditSourceTypeCode {code!r} needs a codeSystemName")
        _attributes(child, CODED, {"csd-code"}, found)


def _object(element: ET.Element, found: list[str]) -> None:
    _children(element, OBJECT, found)
    allowed = {"ParticipantObjectID", "ParticipantObjectTypeCode"}
    allowed |= {"ParticipantObjectTypeCodeRole", "ParticipantObjectDataLifeCycle"}
    allowed |= {"ParticipantObjectSensitivity"}
    _attributes(element, allowed, {"ParticipantObjectID"}, found)
    _enumerated(element, "ParticipantObjectTypeCode", OBJECT_TYPES, found)
    _enumerated(element, "ParticipantObjectTypeCodeRole", OBJECT_ROLES, found)
    _enumerated(element, "ParticipantObjectDataLifeCycle", LIFE_CYCLES, found)
    for child in element:
        if child.tag == "ParticipantObjectIDTypeCode":
            _coded(child, found)
        elif child.tag == "ParticipantObjectQuery":
            _base64(child.text or "", child.tag, found)
        elif child.tag == "ParticipantObjectDetail":
            _attributes(child, {"type", "value"}, {"type", "value"}, found)
            _base64(child.get("value", ""), "ParticipantObjectDetail value", found)
        elif child.tag == "ParticipantObjectDescription":
            _description(child, found)


def _description(element: ET.Element, found: list[str]) -> None:
    _children(element, DESCRIPTION, found)
    for child in element:
        if child.tag in ("MPPS",):
            _attributes(child, {"UID"}, {"UID"}, found)
        elif child.tag == "Accession":
            _attributes(child, {"Number"}, {"Number"}, found)
        elif child.tag == "SOPClass":
            _attributes(child, {"UID", "NumberOfInstances"}, {"NumberOfInstances"}, found)
            if not re.fullmatch(r"[+-]?[0-9]+", child.get("NumberOfInstances", "")):
                found.append(f"SOPClass NumberOfInstances {child.get('NumberOfInstances')!r}")
            for instance in child:
                if instance.tag != "Instance":
                    found.append(f"SOPClass holds {instance.tag}")
                _attributes(instance, {"UID"}, {"UID"}, found)
        elif child.tag in ("Encrypted", "Anonymized") and child.text not in BOOLEANS:
            found.append(f"{child.tag} {child.text!r} is not an xsd:boolean")


def _children(element: ET.Element, model: tuple[str, dict[str, str]], found: list[str]) -> None:
    pattern, letters = model
    tags = [child.tag for child in element]
    unknown = [tag for tag in tags if tag not in letters]
    if unknown:
        found.append(f"{element.tag} holds {', '.join(unknown)}, which the schema does not")
        return
    if not re.fullmatch(pattern, "".join(letters[tag] for tag in tags)):
        found.append(f"{element.tag}'s children {tags} do not follow the schema's order")


def _attributes(
    element: ET.Element, allowed: set[str], required: set[str], found: list[str]
) -> None:
    extra = set(element.attrib) - allowed
    missing = required - set(element.attrib)
    if extra:
        found.append(f"{element.tag} has attributes the schema does not: {sorted(extra)}")
    if missing:
        found.append(f"{element.tag} lacks {sorted(missing)}")


def _coded(element: ET.Element, found: list[str]) -> None:
    _attributes(element, CODED, CODED_REQUIRED, found)


def _enumerated(element: ET.Element, name: str, values: set[str], found: list[str]) -> None:
    value = element.get(name)
    if value is not None and value not in values:
        found.append(f"{element.tag} {name}={value!r} is not one of the schema's values")


def _base64(text: str, what: str, found: list[str]) -> None:
    try:
        base64.b64decode(text, validate=True)
    except binascii.Error:
        found.append(f"{what} is not base64")


_CHECKS = {
    "EventIdentification": _event,
    "ActiveParticipant": _participant,
    "AuditSourceIdentification": _source,
    "ParticipantObjectIdentification": _object,
}
