"""The transfer syntax asked of the archive: compressed only for what it holds uncompressed, by
the setting or, with `auto`, by the link measured; refusals remembered."""

from __future__ import annotations

import threading

import pytest
from pydicom import uid

from agent.serve.fetchsyntax import (
    AS_STORED,
    FAST_FETCH,
    MEASURED_SIZE,
    PROBE_AFTER,
    TELL_EVERY,
    Choice,
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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_auto_compresses_only_once_a_slow_link_is_measured_and_still_probes_it() -> None:
    clock = Clock()
    chooser = SyntaxChooser("auto", clock=clock)
    assert chooser.choices(ref()) == ([AS_STORED], True), "the first fetch measures the link"
    chooser.fetched(ref(), AS_STORED, uid.ExplicitVRLittleEndian, int(FAST_FETCH * 2), 1.0)
    chooser.settled(ref())
    assert asked(chooser, ref()) == [AS_STORED], "a fast link"
    for _ in range(30):
        chooser.fetched(ref(), AS_STORED, uid.ExplicitVRLittleEndian, int(FAST_FETCH / 10), 1.0)
    assert chooser.rate is not None and chooser.rate < FAST_FETCH
    compressed = [JPEG_LS, JPEG_LOSSLESS, AS_STORED]
    assert [asked(chooser, ref()) for _ in range(50)] == [compressed] * 50
    clock.now += PROBE_AFTER
    choices = [asked(chooser, ref()) for _ in range(50)]
    assert choices == [[AS_STORED]] + [compressed] * 49, "one probe measures the link again"


def test_the_first_measure_holds_the_other_fetches_until_it_ends() -> None:
    chooser = SyntaxChooser("auto")
    assert chooser.choices(ref()) == ([AS_STORED], True)
    others: list[tuple[list[str], bool]] = []
    waiting = threading.Thread(target=lambda: others.append(chooser.choices(ref())))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive(), "waits for the first measure"
    chooser.fetched(ref(), AS_STORED, uid.ExplicitVRLittleEndian, int(FAST_FETCH / 10), 1.0)
    chooser.settled(ref())
    waiting.join(5)
    assert others == [([JPEG_LS, JPEG_LOSSLESS, AS_STORED], False)], "a slow link: compressed"


def test_the_choice_is_told_when_it_changes_with_the_rate_and_refusals() -> None:
    clock = Clock()
    chooser = SyntaxChooser("auto", clock=clock)
    told: list[Choice] = []
    chooser.told = told.append
    chooser.fetched(ref(), AS_STORED, uid.ExplicitVRLittleEndian, int(FAST_FETCH / 10), 1.0)
    chooser.fetched(ref(), JPEG_LS, JPEG_LS, MEASURED_SIZE, 1.0)
    assert [(c.asks, c.refused) for c in told] == [(JPEG_LS, ())], "told once: unchanged"
    assert told[0].rate == FAST_FETCH / 10
    assert told[0].why == "the link measured 10.0 Mbit/s, below 100 Mbit/s"
    chooser.refused(JPEG_LS, "HTTP 400")
    assert (told[-1].asks, told[-1].refused) == (JPEG_LOSSLESS, (JPEG_LS,))
    clock.now += TELL_EVERY
    chooser.fetched(ref(), AS_STORED, uid.ExplicitVRLittleEndian, int(FAST_FETCH * 10), 1.0)
    assert told[-1].asks == AS_STORED and "not below 100 Mbit/s" in told[-1].why


def test_neither_a_compressed_fetch_nor_a_small_one_measures_the_link() -> None:
    chooser = SyntaxChooser("auto")
    chooser.fetched(ref(), JPEG_LS, JPEG_LS, MEASURED_SIZE * 4, 1.0)
    chooser.fetched(ref(), AS_STORED, uid.ExplicitVRLittleEndian, MEASURED_SIZE - 1, 1.0)
    assert chooser.rate is None


def test_an_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="fetch syntax"):
        SyntaxChooser("webp")
