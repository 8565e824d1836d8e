"""The STOW-RS mechanism without a network: the multipart body, batching, and the answer."""

from __future__ import annotations

import email.parser
import email.policy
import json
from pathlib import Path

import pytest
from pydicom import dcmread

from agent.cloud import Throttle
from agent.dimse import describe, is_out_of_resources
from agent.spool import SpoolFileError
from agent.store.uploads import PartFile
from agent.stow import (
    MultipartBody,
    SpoolFile,
    StowAnswer,
    batches,
    check_file,
    parse_answer,
)
from tests.support import datasets


def part_file(path: Path) -> PartFile:
    header = dcmread(path, stop_before_pixels=True)
    return PartFile(
        str(header.SOPInstanceUID),
        str(header.SOPClassUID),
        str(header.file_meta.TransferSyntaxUID),
        path.name,
        path.stat().st_size,
        datasets.dataset_sha256(path),
    )


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=7)


def spool_files(series: list[Path]) -> list[SpoolFile]:
    return [check_file(path, part_file(path)) for path in series]


def body_bytes(body: MultipartBody) -> bytes:
    # Each block is a view of one reused buffer: copy it before the next is read.
    return b"".join(bytes(block) for block in body)


# --- the multipart body ----------------------------------------------------------------------


def test_the_body_is_a_multipart_related_of_the_files_as_they_are_and_of_its_stated_length(
    series: list[Path],
) -> None:
    body = MultipartBody(spool_files(series))
    data = body_bytes(body)
    assert len(data) == len(body)
    assert body.content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {body.content_type}\r\n\r\n".encode() + data
    )
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["application/dicom"] * len(series)
    assert [p.get_payload(decode=True) for p in parts] == [p.read_bytes() for p in series]


def test_the_body_reads_through_one_buffer_and_pays_the_throttle_for_every_file_byte(
    series: list[Path],
) -> None:
    paid: list[int] = []

    class Counting(Throttle):
        def take(self, amount: int) -> None:
            paid.append(amount)

    body = MultipartBody(spool_files(series), Counting(10**9))
    buffers = {id(block.obj) for block in body if isinstance(block, memoryview)}
    assert len(buffers) == 1
    assert sum(paid) == sum(path.stat().st_size for path in series)


def test_a_file_changed_since_it_was_received_stops_the_body_before_its_last_block(
    series: list[Path],
) -> None:
    files = spool_files(series)
    data = bytearray(series[1].read_bytes())
    data[-1] ^= 0xFF  # a flipped pixel, same size
    series[1].write_bytes(bytes(data))
    sent = bytearray()
    with pytest.raises(SpoolFileError, match="changed since it was received"):
        for block in MultipartBody(files):
            sent += block
    assert series[0].read_bytes() in sent
    assert bytes(data[-1000:]) not in sent  # the damaged file never left whole


def test_a_missing_or_resized_spool_file_is_refused_before_anything_is_sent(
    series: list[Path],
) -> None:
    record = part_file(series[0])
    series[0].write_bytes(series[0].read_bytes() + b"\0")
    with pytest.raises(SpoolFileError, match="bytes,"):
        check_file(series[0], record)
    series[0].unlink()
    with pytest.raises(SpoolFileError, match="is missing"):
        check_file(series[0], record)


def test_batches_stay_within_the_limit_and_a_larger_file_goes_alone() -> None:
    files = [
        PartFile(str(i), "c", "t", f"p{i}", size, "s") for i, size in enumerate([3, 4, 2, 9, 1])
    ]
    sizes = [[f.size for f in batch] for batch in batches(files, 7)]
    assert sizes == [[3, 4], [2], [9], [1]]
    assert list(batches([], 7)) == []


# --- the answer --------------------------------------------------------------------------------


def referenced(uid: str, warning: int | None = None) -> dict[str, object]:
    item: dict[str, object] = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00081155": {"vr": "UI", "Value": [uid]},
        "00081190": {"vr": "UR", "Value": [f"http://x/studies/1/series/2/instances/{uid}"]},
    }
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def failed(uid: str, reason: int) -> dict[str, object]:
    return {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}


def answer(stored: list[dict[str, object]], refused: list[dict[str, object]]) -> bytes:
    """Return an answer as Orthanc writes it (an empty sequence has no Value)."""
    dataset = {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
        "00081198": {"vr": "SQ", **({"Value": refused} if refused else {})},
        "00081199": {"vr": "SQ", **({"Value": stored} if stored else {})},
    }
    return json.dumps(dataset, indent="\t").encode()


def test_the_answer_lists_stored_refused_and_warned_instances() -> None:
    body = answer([referenced("1.1"), referenced("1.2", 0xB000)], [failed("1.3", 0xA900)])
    parsed = parse_answer(202, body)
    assert parsed == StowAnswer(202, frozenset({"1.1", "1.2"}), {"1.3": 0xA900}, {"1.2": 0xB000})


def test_an_answer_wrapped_in_a_list_is_read_and_anything_else_is_refused() -> None:
    assert parse_answer(200, b"[" + answer([referenced("1.1")], []) + b"]").stored == {"1.1"}
    for bad in (b"not json", b"[]", b'{"00080005": {"vr": "CS"}}', b"42"):
        with pytest.raises(ValueError):
            parse_answer(200, bad)


def test_every_instance_stored_or_already_present_is_held_without_error() -> None:
    parsed = parse_answer(200, answer([referenced("1.1")], [failed("1.2", 0x0111)]))
    held, error = parsed.verdict({"1.1", "1.2"})
    assert (held, error) == ({"1.1", "1.2"}, None)


def test_a_permanent_refusal_is_not_retryable_and_names_the_instance_and_reason() -> None:
    parsed = parse_answer(409, answer([], [failed("1.2", 0x0110)]))
    held, error = parsed.verdict({"1.2"})
    assert held == set() and error is not None and not error.retryable
    assert "1.2: 0x0110 (processing failure)" in str(error)


def test_a_refusal_for_lack_of_resources_is_retried_and_the_stored_ones_are_kept() -> None:
    parsed = parse_answer(202, answer([referenced("1.1")], [failed("1.2", 0xA701)]))
    held, error = parsed.verdict({"1.1", "1.2"})
    assert held == {"1.1"} and error is not None and error.retryable


def test_an_instance_left_out_of_the_answer_is_retried_after_2xx_but_not_after_400() -> None:
    body = answer([referenced("1.1")], [])
    _, after_ok = parse_answer(200, body).verdict({"1.1", "1.2"})
    _, after_bad = parse_answer(400, body).verdict({"1.1", "1.2"})
    assert after_ok is not None and after_ok.retryable and "1.2: not in its answer" in str(after_ok)
    assert after_bad is not None and not after_bad.retryable


def test_reasons_are_named_and_only_resource_shortages_are_transient() -> None:
    assert describe(0xA900) == "0xA900 (data set does not match SOP class)"
    assert describe(0xA7FF) == "0xA7FF (out of resources)"
    assert describe(0x1234) == "0x1234"
    assert [is_out_of_resources(c) for c in (0xA700, 0xA7FF, 0x0213, 0x0110, 0xC000, 0xA900)] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
