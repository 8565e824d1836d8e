"""The instance cache (agent.serve.cache): atomic placement, least-recently-used eviction."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import BinaryIO

import pytest

from agent.serve.cache import InstanceCache, NotDicom

UID1, UID2, UID3 = "1.2.3.1", "1.2.3.2", "1.2.3.3"


def part10(size: int) -> bytes:
    """Bytes that pass for a Part-10 file: a preamble, 'DICM', then padding to `size`."""
    return (b"\0" * 128 + b"DICM").ljust(size, b"\0")


def writer(data: bytes) -> Callable[[BinaryIO], None]:
    def write(out: BinaryIO) -> None:
        out.write(data)

    return write


def put(cache: InstanceCache, uid: str, size: int = 1000) -> Path:
    path = cache.put(uid, writer(part10(size)))
    cache.release(uid)
    return path


def age(cache: InstanceCache, uid: str, seconds_ago: float) -> None:
    """Make an instance look last used `seconds_ago` (its mtime), as after a restart."""
    path = cache.path(uid)
    stamp = path.stat().st_mtime - seconds_ago
    os.utime(path, (stamp, stamp))


def test_a_stored_instance_is_found_under_its_uid(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path / "cache", 10_000).open()
    path = put(cache, UID1)
    assert path.read_bytes() == part10(1000)
    assert cache.get(UID1) == path
    cache.release(UID1)
    assert cache.get(UID2) is None
    assert cache.size == 1000


def test_only_whole_files_are_ever_under_a_final_name(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path / "cache", 10_000).open()

    def broken(out: BinaryIO) -> None:
        out.write(part10(500))
        raise ConnectionError("cut off")

    with pytest.raises(ConnectionError):
        cache.put(UID1, broken)
    assert UID1 not in cache and not cache.path(UID1).exists()
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_what_is_not_part10_is_not_kept(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path / "cache", 10_000).open()
    with pytest.raises(NotDicom):
        cache.put(UID1, writer(b"<html>error</html>"))
    assert not cache.path(UID1).exists()


def test_a_crash_leaves_only_temporaries_which_the_next_open_removes(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = InstanceCache(root, 10_000).open()
    put(cache, UID1)
    (root / "tmp" / f"{UID2}.abcd.partial").write_bytes(part10(300))  # killed mid-write
    reopened = InstanceCache(root, 10_000).open()
    assert UID1 in reopened and UID2 not in reopened
    assert list((root / "tmp").iterdir()) == []
    assert reopened.size == 1000


def test_the_least_recently_used_go_first_when_over_the_limit(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path / "cache", 2500).open()
    put(cache, UID1)
    put(cache, UID2)
    assert cache.get(UID1) is not None  # UID1 is now the most recent
    cache.release(UID1)
    put(cache, UID3)
    assert UID1 in cache and UID3 in cache and UID2 not in cache
    assert not cache.path(UID2).exists()
    assert cache.size <= 2500


def test_the_size_follows_every_change_and_eviction_passes_over_what_is_held(
    tmp_path: Path,
) -> None:
    cache = InstanceCache(tmp_path / "cache", 100_000).open()
    uids = [f"1.2.3.{n}" for n in range(100)]
    for number, uid in enumerate(uids):
        put(cache, uid, 200 + number)
    put(cache, uids[0], 700)  # the same instance again, another size
    files = sum(cache.path(uid).stat().st_size for uid in uids)
    assert cache.size == files == 700 + sum(200 + n for n in range(1, 100))
    held = [cache.get(uid) for uid in uids[:70]]  # the 70 least recently used, in use
    assert all(held)
    cache.limit = 1000
    put(cache, "1.2.4.1", 100)  # evicts all it may: what is not held, itself once released
    assert all(cache.path(uid).exists() for uid in uids[:70])
    assert not any(cache.path(uid).exists() for uid in [*uids[70:], "1.2.4.1"])
    assert cache.size == sum(cache.path(uid).stat().st_size for uid in uids[:70])
    for uid in uids[:70]:
        cache.release(uid)
    assert cache.size <= 1000
    assert InstanceCache(tmp_path / "cache", 1000).open().size == cache.size


def test_recency_survives_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = InstanceCache(root, 10_000).open()
    put(cache, UID1)
    put(cache, UID2)
    age(cache, UID2, 3600)
    age(cache, UID1, 60)
    smaller = InstanceCache(root, 1500).open()  # trimmed at open
    assert UID1 in smaller and UID2 not in smaller


def test_an_instance_in_use_is_not_evicted_even_with_a_zero_limit(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path / "cache", 0).open()
    path = cache.put(UID1, writer(part10(1000)))
    assert path.exists()  # held until released
    cache.release(UID1)
    assert not path.exists() and cache.size == 0


def test_a_file_removed_behind_its_back_is_a_miss(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path / "cache", 10_000).open()
    path = put(cache, UID1)
    path.unlink()  # another process evicted it
    assert cache.get(UID1) is None
    assert cache.size == 0


@pytest.mark.parametrize("bad", ["../etc/passwd", "1.2/3", "", "1." * 40])
def test_only_uids_become_file_names(tmp_path: Path, bad: str) -> None:
    cache = InstanceCache(tmp_path / "cache", 10_000).open()
    with pytest.raises(ValueError, match="not a UID"):
        cache.path(bad)


# --- two processes, one limit; the disk's high-water mark --------------------------------------
# Two InstanceCache objects on one directory behave as two processes do: each has its own
# connection to the index and its own open files, hence its own locks.


def test_two_caches_on_one_directory_share_one_limit(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    agent, command = InstanceCache(root, 2500).open(), InstanceCache(root, 2500).open()
    put(agent, UID1)
    put(command, UID2)
    put(agent, UID3)
    on_disk = sum(p.stat().st_size for p in root.glob("??/*.dcm"))
    assert on_disk <= 2500
    assert not agent.path(UID1).exists()
    assert agent.size == command.size == on_disk


def test_an_instance_one_process_holds_is_never_evicted_by_the_other(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    agent = InstanceCache(root, 10_000).open()
    path = agent.put(UID1, writer(part10(1000)))  # held: being sent
    command = InstanceCache(root, 0).open()  # trims to nothing at open
    assert path.exists()
    agent.release(UID1)
    command.trim()
    assert not path.exists() and command.size == 0


def test_a_put_in_progress_survives_another_process_opening_the_cache(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    agent = InstanceCache(root, 10_000).open()

    def write_while_another_opens(out: BinaryIO) -> None:
        out.write(part10(1000))
        InstanceCache(root, 10_000).open()  # removes what crashed processes left, not this

    path = agent.put(UID1, write_while_another_opens)
    assert path.read_bytes() == part10(1000)


def test_above_high_water_the_cache_evicts_first_and_keeps_only_what_is_in_use(
    tmp_path: Path,
) -> None:
    full = [False]
    cache = InstanceCache(tmp_path / "cache", 10_000, pressure=lambda: full[0]).open()
    put(cache, UID1)
    put(cache, UID2)
    full[0] = True
    path = cache.put(UID3, writer(part10(1000)))
    assert UID1 not in cache and UID2 not in cache
    assert path.exists(), "held for the retrieval that fetched it"
    cache.release(UID3)
    assert not path.exists() and cache.size == 0


def test_housekeeping_empties_the_cache_while_the_disk_is_above_high_water(
    tmp_path: Path,
) -> None:
    full = [False]
    cache = InstanceCache(tmp_path / "cache", 10_000, pressure=lambda: full[0]).open()
    put(cache, UID1)
    cache.trim()
    assert UID1 in cache
    full[0] = True
    cache.trim()
    assert UID1 not in cache and not cache.path(UID1).exists()


def _hold_and_wait(root: Path, ready: Connection) -> None:
    """In a child process: put an instance, keep holding it, say so, then wait to be killed."""
    cache = InstanceCache(root, 10_000).open()
    cache.put(UID1, writer(part10(1000)))
    ready.send(True)
    ready.recv()  # never comes: the parent kills this process


def test_a_hold_ends_with_its_process_however_it_ends(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    InstanceCache(root, 10_000).open()
    parent_end, child_end = multiprocessing.get_context("fork").Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_hold_and_wait, args=(root, child_end)
    )
    child.start()
    try:
        assert parent_end.poll(30) and parent_end.recv()
        other = InstanceCache(root, 0).open()  # the limit says: nothing
        assert other.path(UID1).exists(), "held by the other process"
    finally:
        child.kill()  # as kill -9: no release, no clean-up
        child.join(30)
    other.trim()
    assert not other.path(UID1).exists() and other.size == 0


def test_a_damaged_index_is_made_anew_from_the_files(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path, 2**30).open()
    cache.put("1.2.3", lambda out: out.write(part10(1000)))
    cache.release("1.2.3")
    cache.close()
    (tmp_path / "index.sqlite").write_bytes(b"SQLite format 3\0" + b"\xff" * 4080)  # a crash's

    again = InstanceCache(tmp_path, 2**30).open()

    assert "1.2.3" in again and again.size == len(part10(1000))
    assert not (tmp_path / "index.sqlite-wal").exists(), "no WAL: nothing maps its files"
    again.close()
