"""Pieces of the cloud client that need no server: tus metadata encoding and the throttle."""

from __future__ import annotations

import base64
import time

import pytest

from agent.cloud import Throttle, encode_metadata


def test_metadata_values_are_base64_and_an_empty_value_leaves_the_key_alone() -> None:
    header = encode_metadata({"filename": "a b,c.tar.zst", "part": "2", "flag": ""})
    pairs = header.split(",")
    assert pairs[0] == "filename " + base64.b64encode(b"a b,c.tar.zst").decode()
    assert pairs[1] == "part Mg=="
    assert pairs[2] == "flag"


@pytest.mark.parametrize("key", ["", "two words", "a,b", "clé"])
def test_metadata_keys_that_tus_cannot_carry_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="invalid tus metadata key"):
        encode_metadata({key: "x"})


def test_the_throttle_holds_the_average_rate() -> None:
    throttle = Throttle(400_000)
    started = time.monotonic()
    for _ in range(10):
        throttle.take(40_000)  # 400 kB in all: about a second, less the initial burst
    assert time.monotonic() - started >= 0.6


def test_no_rate_means_no_wait() -> None:
    throttle = Throttle(None)
    started = time.monotonic()
    throttle.take(10**12)
    assert time.monotonic() - started < 0.1
