"""Every DICOM status code Dirigo answers with or reads, by name, and the association-level
answers it gives.

Storage and Query/Retrieve give some codes different meanings (0xB000 is "coercion of data
elements" in a C-STORE response and "sub-operations failed" in a C-MOVE's), so each service has
its own enum. The 0xC2xx storage failures and 0xC0Dx Query/Retrieve failures are Dirigo's own,
in the ranges the standard leaves to implementations ("cannot understand", "unable to process"),
so senders treat them as failures of that one request and carry on. This module imports nothing
of pynetdicom: the cloud side reads the same names from a STOW-RS answer.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """Storage and Verification statuses (PS3.4 B.2.3; the general ones of PS3.7 C): what
    Dirigo answers a C-STORE or C-ECHO with, and what a storage SCP (a C-MOVE's destination,
    `dirigo retrieve`'s PACS) or a STOW-RS archive answers Dirigo with."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_INSTANCE = 0x0112
    INVALID_SOP_INSTANCE = 0x0117
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    RESOURCE_LIMITATION = 0x0213
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    CANNOT_UNDERSTAND = 0xC000
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    MALFORMED_DATASET = 0xC210
    MISSING_ATTRIBUTE = 0xC211
    SOP_INSTANCE_MISMATCH = 0xC212


STORAGE_WARNINGS = frozenset(
    {
        Status.COERCION_OF_DATA_ELEMENTS,
        Status.ELEMENTS_DISCARDED,
        Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    }
)
"""Storage answers that mean "stored, with a warning"."""

_MEANINGS = {
    Status.SUCCESS: "success",
    Status.PROCESSING_FAILURE: "processing failure",
    Status.DUPLICATE_SOP_INSTANCE: "duplicate SOP instance",
    Status.NO_SUCH_SOP_INSTANCE: "no such SOP instance",
    Status.INVALID_SOP_INSTANCE: "invalid SOP instance",
    Status.SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
    Status.NOT_AUTHORIZED: "not authorized",
    Status.DUPLICATE_INVOCATION: "duplicate invocation",
    Status.UNRECOGNIZED_OPERATION: "unrecognized operation",
    Status.MISTYPED_ARGUMENT: "mistyped argument",
    Status.RESOURCE_LIMITATION: "resource limitation",
    Status.OUT_OF_RESOURCES: "out of resources",
    Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS: "data set does not match SOP class",
    Status.COERCION_OF_DATA_ELEMENTS: "coercion of data elements",
    Status.ELEMENTS_DISCARDED: "elements discarded",
    Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING: "data set does not match SOP class",
    Status.CANNOT_UNDERSTAND: "cannot understand",
    Status.TRANSFER_SYNTAX_NOT_SUPPORTED: "referenced transfer syntax not supported",
    Status.MALFORMED_DATASET: "malformed data set",
    Status.MISSING_ATTRIBUTE: "missing attribute",
    Status.SOP_INSTANCE_MISMATCH: "SOP Instance UID mismatch",
}


def is_out_of_resources(code: int) -> bool:
    """Return True if a storage answer says the other side lacked resources (0xA7xx, or the
    general 0x0213): sent again later, the same instance may be stored."""
    return code == Status.RESOURCE_LIMITATION or code & 0xFF00 == Status.OUT_OF_RESOURCES


def describe(code: int) -> str:
    """Return a storage status as `0x0110 (processing failure)`."""
    try:
        meaning: str | None = _MEANINGS[Status(code)]
    except ValueError:
        meaning = _MEANINGS[Status.OUT_OF_RESOURCES] if is_out_of_resources(code) else None
    return f"0x{code:04X}" + (f" ({meaning})" if meaning else "")


class QRStatus(IntEnum):
    """Query/Retrieve statuses Dirigo answers with (PS3.4 C.4; 0xC0Dx are ours)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    CANCEL = 0xFE00
    SUB_OPERATIONS_FAILED = 0xB000
    FIND_OUT_OF_RESOURCES = 0xA700
    CANNOT_COUNT_MATCHES = 0xA701
    CANNOT_PERFORM_SUB_OPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_MISMATCH = 0xA900
    UNABLE_TO_PROCESS = 0xC000
    NOT_CONFIGURED = 0xC0D1
    CLOUD_REFUSED = 0xC0D2


class RejectResult(IntEnum):
    """The result of an A-ASSOCIATE-RJ (PS3.8 9.3.4)."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """Who rejects an association (PS3.8 9.3.4)."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ diagnostics that Dirigo uses: the first with SERVICE_USER, the second
    with SERVICE_PROVIDER_PRESENTATION."""

    CALLING_AE_NOT_RECOGNIZED = 0x03
    LOCAL_LIMIT_EXCEEDED = 0x02


class ContextResult(IntEnum):
    """The result of one presentation context in an A-ASSOCIATE-AC (PS3.8 9.3.3.2)."""

    ACCEPTANCE = 0x00
    USER_REJECTION = 0x01
