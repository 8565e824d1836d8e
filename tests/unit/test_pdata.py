"""P-DATA-TF framing: the bytes Dirigo writes for a C-STORE are the bytes pynetdicom would."""

from __future__ import annotations

import io
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF

from agent import pdata


def pynetdicom_bytes(command: bytes, data: bytes, max_pdu: int, tmp: Path) -> bytes:
    """The PDUs pynetdicom encodes for a C-STORE of a file holding `data` (the command set is
    pynetdicom's own; `command` is only checked against it)."""
    source = tmp / "dataset.bin"
    source.write_bytes(data)
    request = C_STORE()
    request.MessageID = 7
    request.Priority = 2
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = "1.2.3.4.5"
    request._dataset_path = (source, 0)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    assert encode(message.command_set, True, True) == command
    out = bytearray()
    for primitive in message.encode_msg(3, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    return bytes(out)


def command_set() -> bytes:
    request = C_STORE()
    request.MessageID = 7
    request.Priority = 2
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = "1.2.3.4.5"
    request._dataset_path = (Path("unused"), 0)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


def ours(command: bytes, data: bytes, max_pdu: int) -> bytes:
    with tempfile.TemporaryFile() as source:
        source.write(b"preamble" + data)
        source.flush()
        blocks = pdata.data_set(source.fileno(), 8, len(data), 3, max_pdu)
        return pdata.command(command, 3, max_pdu) + b"".join(bytes(b) for b in blocks)


def items(stream: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split a stream of P-DATA-TF PDUs into (PDU length, context ID, control, fragment)."""
    found = []
    at = 0
    while at < len(stream):
        kind, _reserved, length = struct.unpack_from(">BBI", stream, at)
        assert kind == pdata.P_DATA_TF
        pdu = P_DATA_TF()
        pdu.decode(stream[at : at + 6 + length])
        (item,) = pdu.presentation_data_value_items
        value = item.presentation_data_value
        found.append((length, item.presentation_context_id, value[0], value[1:]))
        at += 6 + length
    return found


SIZES = st.one_of(
    # a few fragments, with odd maximums (odd fragments), lengths on fragment boundaries, and
    # data sets of several blocks (several writes to the socket)
    st.tuples(
        st.one_of(
            st.integers(0, 40_000),
            st.sampled_from([4090, 4091, 8180, 8186, 16378]),
            st.integers(pdata.WRITE - 20_000, 3 * pdata.WRITE),
        ),
        st.sampled_from([4096, 4097, 4099, 16384, 131072]),
    ),
    # one- and two-byte fragments: every boundary at once
    st.tuples(st.integers(0, 300), st.sampled_from([7, 8])),
)


@given(sizes=SIZES)
def test_the_pdus_of_a_c_store_from_a_file_are_pynetdicoms_byte_for_byte(
    tmp_path_factory: pytest.TempPathFactory, sizes: tuple[int, int]
) -> None:
    length, max_pdu = sizes
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    command = command_set()
    expected = pynetdicom_bytes(command, data, max_pdu, tmp_path_factory.mktemp("pdu"))
    assert ours(command, data, max_pdu) == expected


@given(length=st.integers(0, 3 * pdata.UNLIMITED_FRAGMENT // 2))
def test_without_a_maximum_pdu_the_data_set_goes_whole_in_large_fragments(length: int) -> None:
    data = b"\x5a" * length
    command = command_set()
    found = items(ours(command, data, 0))
    assert found[0] == (len(command) + 6, 3, 0x03, command)
    fragments = found[1:]
    assert b"".join(f[3] for f in fragments) == data
    assert [f[2] for f in fragments] == [0x00] * (len(fragments) - 1) + [0x02]
    assert all(len(f[3]) <= pdata.UNLIMITED_FRAGMENT for f in fragments)


def test_a_file_shorter_than_its_data_set_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"\0" * 100)
    fd = os.open(tmp_path / "short", os.O_RDONLY)
    try:
        for offset, length in ((0, 101), (50, 51), (0, 3 * pdata.WRITE)):
            with pytest.raises(EOFError, match="ends at byte 100"):
                list(pdata.data_set(fd, offset, length, 1, 4096))
    finally:
        os.close(fd)


def test_a_maximum_pdu_without_room_for_data_is_refused() -> None:
    with pytest.raises(ValueError, match="no room"):
        pdata.fragment_length(6)


UIDS = st.from_regex(r"\A[12](\.[1-9][0-9]{0,8}){1,6}\Z")
AE_TITLES = st.from_regex(r"\A[A-Z0-9_ ]{0,15}[A-Z0-9_]\Z")


@given(
    message_id=st.integers(0, 65535),
    priority=st.sampled_from([0, 1, 2]),
    sop_class=UIDS,
    sop_instance=UIDS,
    originator=st.one_of(st.none(), st.tuples(AE_TITLES, st.integers(0, 65535))),
)
def test_a_c_store_command_set_is_pynetdicoms_byte_for_byte(
    message_id: int,
    priority: int,
    sop_class: str,
    sop_instance: str,
    originator: tuple[str, int] | None,
) -> None:
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = priority
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    if originator is not None:
        request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID = originator
    request._dataset_path = (Path("unused"), 0)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    expected = encode(message.command_set, True, True)
    assert expected == pdata.store_command(
        message_id,
        priority,
        sop_class,
        sop_instance,
        request.MoveOriginatorApplicationEntityTitle,
        request.MoveOriginatorMessageID,
    )


@given(
    kind=st.sampled_from(["C-MOVE", "C-GET"]),
    responding_to=st.integers(0, 65535),
    sop_class=UIDS,
    counts=st.tuples(*[st.integers(0, 65535)] * 4),
)
def test_a_pending_retrieve_response_is_pynetdicoms_byte_for_byte(
    kind: str, responding_to: int, sop_class: str, counts: tuple[int, int, int, int]
) -> None:
    primitive, message = (C_MOVE(), C_MOVE_RSP()) if kind == "C-MOVE" else (C_GET(), C_GET_RSP())
    primitive.MessageIDBeingRespondedTo = responding_to
    primitive.AffectedSOPClassUID = sop_class
    primitive.Status = 0xFF00
    primitive.Identifier = None
    (
        primitive.NumberOfRemainingSuboperations,
        primitive.NumberOfCompletedSuboperations,
        primitive.NumberOfFailedSuboperations,
        primitive.NumberOfWarningSuboperations,
    ) = counts
    message.primitive_to_message(primitive)
    (pdv,) = message.encode_msg(5, 16384)
    pdu = P_DATA_TF()
    pdu.from_primitive(pdv)
    expected = pdu.encode()
    encoded = pdata.pending_command(kind, responding_to, sop_class, counts)
    assert pdata.command(encoded, 5, 16384) == expected


def store_response(responding_to: int, status: int, comment: str | None) -> bytes:
    """The command set pynetdicom encodes for a C-STORE response."""
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = responding_to
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"
    primitive.Status = status
    if comment is not None:
        primitive.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


@given(
    responding_to=st.integers(0, 65535),
    status=st.sampled_from([0x0000, 0x0001, 0xB000, 0xB007, 0xA700, 0xA900, 0xC000, 0x0110]),
    comment=st.one_of(st.none(), st.from_regex(r"\A[A-Za-z ]{1,20}\Z")),
)
def test_only_a_c_store_response_saying_success_and_nothing_more_is_read_without_pydicom(
    responding_to: int, status: int, comment: str | None
) -> None:
    encoded = store_response(responding_to, status, comment)
    plain = status == 0x0000 and comment is None
    assert pdata.store_success(encoded) == (responding_to if plain else None)
    decoded = decode(io.BytesIO(encoded), True, True)  # what pynetdicom reads from the same
    assert decoded.MessageIDBeingRespondedTo == responding_to and decoded.Status == status


def test_no_other_message_and_no_cut_or_garbled_response_is_taken_for_a_success() -> None:
    success = store_response(7, 0x0000, None)
    assert pdata.store_success(success) == 7
    for cut in range(len(success)):
        assert pdata.store_success(success[:cut]) is None
    pending = pdata.pending_command("C-MOVE", 7, "1.2.840.10008.5.1.4.1.2.2.2", (1, 2, 0, 0))
    assert pdata.store_success(pending) is None
    request = pdata.store_command(7, 2, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5")
    assert pdata.store_success(request) is None


@given(st.binary(max_size=200))
def test_any_bytes_read_as_a_success_or_not_never_raise(encoded: bytes) -> None:
    assert pdata.store_success(encoded) in {None, *range(65536)}


@given(
    responding_to=st.integers(0, 65535),
    sop_class=st.one_of(st.none(), UIDS),
    sop_instance=st.one_of(st.none(), UIDS),
)
def test_a_c_store_success_response_is_pynetdicoms_byte_for_byte(
    responding_to: int, sop_class: str | None, sop_instance: str | None
) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = responding_to
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    expected = encode(message.command_set, True, True)
    encoded = pdata.store_response(responding_to, sop_class, sop_instance)
    assert encoded == expected
    assert pdata.store_success(encoded) == responding_to
