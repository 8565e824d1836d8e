"""The codec choice of `upload.transcode: auto`: estimates, learning, staleness and fallbacks."""

from __future__ import annotations

import pytest

from agent.codecchoice import (
    DEFAULTS,
    FRESH,
    LEARNED_SIZE,
    PROBED_SIZE,
    CodecChooser,
    Estimate,
)

CT = 263_000_000
MBIT = 1e6 / 8


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def chooser_at(mbit: float, clock: Clock | None = None) -> CodecChooser:
    chooser = CodecChooser("zstd", clock=clock or Clock())
    chooser.sent(8 * 1024 * 1024, 8 * 1024 * 1024 / (mbit * MBIT))
    return chooser


def test_estimated_time_is_pack_time_plus_upload_time() -> None:
    assert Estimate(100e6, 0.4).seconds(200_000_000, 10e6) == pytest.approx(2 + 8)


def test_a_slow_link_chooses_a_codec_and_a_fast_one_zstd_alone() -> None:
    slow = chooser_at(20).choose(CT)
    fast = chooser_at(2000).choose(CT)
    assert slow.codec in ("jpeg-ls", "htj2k")
    assert fast.codec == "none"


def test_the_reason_names_every_estimate_and_the_link_rate() -> None:
    choice = chooser_at(20).choose(CT)
    assert choice.reason.startswith(f"{choice.codec}: est. ")
    for codec in {"none", "jpeg-ls", "htj2k"} - {choice.codec}:
        assert f"{codec} " in choice.reason
    assert "at 20.0 Mbit/s" in choice.reason and "263.0 MB" in choice.reason


def test_the_choice_matches_the_least_estimate_computed_by_hand() -> None:
    chooser = chooser_at(50)
    goodput = 50 * MBIT
    by_hand = {c: e.seconds(CT, goodput) for c, e in DEFAULTS["zstd"].items()}
    assert chooser.choose(CT).codec == min(by_hand, key=lambda c: by_hand[c])


def test_packs_teach_speed_and_ratio_so_a_slow_codec_loses_its_place() -> None:
    chooser = chooser_at(20)
    first = chooser.choose(CT).codec
    assert first != "none"
    for _ in range(20):  # this machine packs it ten times slower, for barely a gain
        chooser.packed(first, CT, int(CT * 0.36), CT / 5e6)
    assert chooser.estimate(first).pack_speed == pytest.approx(5e6, rel=0.01)
    assert chooser.estimate(first).ratio == pytest.approx(0.36, rel=0.01)
    assert chooser.choose(CT).codec != first


def test_small_packs_teach_the_ratio_but_not_the_speed() -> None:
    chooser = CodecChooser("zstd")
    before = chooser.estimate("htj2k")
    chooser.packed("htj2k", LEARNED_SIZE - 1, (LEARNED_SIZE - 1) // 2, 10.0)
    after = chooser.estimate("htj2k")
    assert after.pack_speed == before.pack_speed
    assert after.ratio > before.ratio


def test_small_patches_do_not_measure_the_link() -> None:
    chooser = CodecChooser("zstd")
    chooser.sent(1000, 0.001)
    assert chooser.goodput is None


def test_goodput_follows_recent_patches_and_restarts_after_a_stale_one() -> None:
    clock = Clock()
    chooser = chooser_at(20, clock)
    clock.now += 1
    chooser.sent(8_000_000, 8_000_000 / (100 * MBIT))
    mixed = chooser.goodput
    assert mixed is not None and 20 * MBIT < mixed < 100 * MBIT
    clock.now += FRESH + 1
    chooser.sent(8_000_000, 8_000_000 / (100 * MBIT))
    assert chooser.goodput == pytest.approx(100 * MBIT)


def test_a_large_part_asks_for_a_probe_when_the_measure_is_stale_a_small_one_never() -> None:
    clock = Clock()
    chooser = CodecChooser("zstd", clock=clock)
    assert chooser.needs_probe(PROBED_SIZE)
    assert not chooser.needs_probe(PROBED_SIZE - 1)
    chooser.sent(1024 * 1024, 0.1)
    assert not chooser.needs_probe(PROBED_SIZE)
    clock.now += FRESH + 1
    assert chooser.needs_probe(PROBED_SIZE)
    assert chooser.choose(1000).codec in ("none", "jpeg-ls", "htj2k")  # the old measure serves


def test_without_a_measure_of_the_link_the_part_goes_zstd_only() -> None:
    choice = CodecChooser("zstd").choose(CT)
    assert choice.codec == "none" and "until the link is measured" in choice.reason


def test_without_zstd_the_codecs_win_on_a_much_faster_link() -> None:
    assert chooser_at(200).choose(CT).codec == "none"
    plain = CodecChooser("none")
    plain.sent(8 * 1024 * 1024, 8 * 1024 * 1024 / (200 * MBIT))
    assert plain.choose(CT).codec != "none"
