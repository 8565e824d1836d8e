"""Which instances of a retrieval stream in one request per series, and which are fetched one
by one (`Retriever.streams`), without an archive: the cache decides."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.serve.cache import InstanceCache
from agent.serve.query import InstanceRef
from agent.serve.retrieve import STREAM_LEAST, Listing, Retriever, _series_groups

CT = "1.2.840.10008.5.1.4.1.1.2"


def refs(series: str, count: int) -> list[InstanceRef]:
    return [InstanceRef("1.2", series, f"{series}.{i}", CT, None) for i in range(1, count + 1)]


@pytest.fixture
def retriever(tmp_path: Path) -> Retriever:
    cache = InstanceCache(tmp_path / "cache", 2**30).open()
    return Retriever(None, cache, 100)  # type: ignore[arg-type]  # no archive is asked


def cache(retriever: Retriever, ref: InstanceRef) -> None:
    retriever.cache.put(ref.sop_instance, lambda out: out.write(b"\0" * 128 + b"DICM"))
    retriever.cache.release(ref.sop_instance)


def test_a_series_not_cached_streams_whole_and_a_small_one_does_not(retriever: Retriever) -> None:
    big, small = refs("1.2.3", 10), refs("1.2.4", STREAM_LEAST - 1)
    assert retriever.streams(big) == big
    assert retriever.streams(small) is None


def test_a_series_more_than_a_quarter_cached_is_fetched_one_by_one(retriever: Retriever) -> None:
    series = refs("1.2.3", 8)
    cache(retriever, series[0])
    cache(retriever, series[1])  # a quarter: the rest still streams
    assert retriever.streams(series) == series[2:]
    cache(retriever, series[2])  # more than a quarter: a resumed retrieval
    assert retriever.streams(series) is None


def test_instances_are_grouped_series_by_series_even_when_listed_interleaved(
    tmp_path: Path,
) -> None:
    a, b = refs("1.2.3", 4), refs("1.2.4", 3)
    interleaved = [a[0], b[0], a[1], b[1], a[2], b[2], a[3]]  # as an archive lists arrivals
    listing = Listing(tmp_path)
    for ref in interleaved:
        listing.add(ref)
    assert list(_series_groups(listing)) == [a, b]
    # anything that cannot be read twice goes in runs of one series, as listed
    assert [len(group) for group in _series_groups(iter(interleaved))] == [1] * 7
    listing.close()
