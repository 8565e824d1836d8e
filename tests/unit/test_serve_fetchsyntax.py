"""The transfer syntax asked of the archive: compressed only for what it holds uncompressed, by
the setting or, with `auto`, by the link measured; refusals remembered."""

from __future__ import annotations

import pytest
from pydicom import uid

from agent.serve.fetchsyntax import (
    AS_STORED,
    FAST_FETCH,
    MEASURED_SIZE,
    PROBE_EVERY,
    SyntaxChooser,
)
from agent.serve.query import InstanceRef

JPEG_LS, JPEG_LOSSLESS, HTJ2K = uid.JPEGLSLossless, uid.JPEGLosslessSV1, uid.HTJ2KLossless


def ref(syntax: str | None = uid.ExplicitVRLittleEndian, series: str = "1.2.3") -> InstanceRef:
    return InstanceRef("1.2", series, "1.2.3.4", uid.CTImageStorage, syntax)


def asked(chooser: SyntaxChooser, instance: InstanceRef) -> list[str]:
    choices, _learner = chooser.choices(instance)
    return choices


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("jpeg-ls", [JPEG_LS, JPEG_LOSSLESS, AS_STORED]),
        ("htj2k", [HTJ2K, JPEG_LS, JPEG_LOSSLESS, AS_STORED]),
        ("as-stored", [AS_STORED]),
    ],
)
def test_an_uncompressed_instance_is_asked_in_the_setting_s_syntaxes_then_as_held(
    setting: str, expected: list[str]
) -> None:
    assert asked(SyntaxChooser(setting), ref()) == expected


@pytest.mark.parametrize("held", [uid.JPEGBaseline8Bit, uid.JPEG2000, uid.JPEG2000Lossless])
def test_an_instance_held_compressed_lossy_or_not_is_asked_as_held(held: str) -> None:
    assert asked(SyntaxChooser("jpeg-ls"), ref(held)) == [AS_STORED]


def test_a_refused_syntax_is_not_asked_again() -> None:
    chooser = SyntaxChooser("htj2k")
    chooser.refused(HTJ2K, "HTTP 400")
    assert asked(chooser, ref()) == [JPEG_LS, JPEG_LOSSLESS, AS_STORED]


def test_an_unlisted_series_is_told_by_its_first_fetch_as_held() -> None:
    chooser = SyntaxChooser("jpeg-ls")
    first, learner = chooser.choices(ref(None))
    assert (first, learner) == ([AS_STORED], True)
    chooser.fetched(ref(None), AS_STORED, uid.ExplicitVRLittleEndian, 1000, 0.01)
    chooser.settled(ref(None))
    assert chooser.choices(ref(None)) == ([JPEG_LS, JPEG_LOSSLESS, AS_STORED], False)
    chooser.fetched(ref(None, "9.9"), AS_STORED, uid.JPEGBaseline8Bit, 1000, 0.01)
    assert asked(chooser, ref(None, "9.9")) == [AS_STORED], "a lossy series stays as held"


def test_auto_compresses_only_once_a_slow_link_is_measured_and_still_probes_it() -> None:
    chooser = SyntaxChooser("auto")
    assert asked(chooser, ref()) == [AS_STORED], "nothing measured yet"
    chooser.fetched(ref(), AS_STORED, uid.ExplicitVRLittleEndian, int(FAST_FETCH * 2), 1.0)
    assert asked(chooser, ref()) == [AS_STORED], "a fast link"
    for _ in range(30):
        chooser.fetched(ref(), AS_STORED, uid.ExplicitVRLittleEndian, int(FAST_FETCH / 10), 1.0)
    assert chooser.rate is not None and chooser.rate < FAST_FETCH
    choices = [asked(chooser, ref()) for _ in range(PROBE_EVERY)]
    assert choices.count([AS_STORED]) == 1, "one in PROBE_EVERY measures the link again"
    assert choices.count([JPEG_LS, JPEG_LOSSLESS, AS_STORED]) == PROBE_EVERY - 1


def test_neither_a_compressed_fetch_nor_a_small_one_measures_the_link() -> None:
    chooser = SyntaxChooser("auto")
    chooser.fetched(ref(), JPEG_LS, JPEG_LS, MEASURED_SIZE * 4, 1.0)
    chooser.fetched(ref(), AS_STORED, uid.ExplicitVRLittleEndian, MEASURED_SIZE - 1, 1.0)
    assert chooser.rate is None


def test_an_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="fetch syntax"):
        SyntaxChooser("webp")
