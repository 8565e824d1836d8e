"""Real faults against `dirigo run`: kill -9 mid-transfer, a disk that fills up, the high-water
mark, and one very large instance. The promise under test is the first one: a C-STORE Success is
only ever sent for an instance that is durable in the spool and committed in the database.

Each test reports what it measured on stdout (`pytest -s` shows it; a failure always does).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.support import dcmtk
from tests.support.agent import Agent
from tests.support.datasets import ct_series, dataset_sha256, file_meta_length, large_instance
from tests.support.faults import (
    WatchedSender,
    free_bytes,
    store_responses,
    tmpfs,
    write_ballast,
)
from tests.support.net import wait_until
from tests.support.process import vm_hwm_bytes

pytestmark = pytest.mark.slow

MiB = 1024**2
KILL_ITERATIONS = 8
KILL_SLICES = 300
FILL_SLICES = 120  # 256 x 256 CT slices of about 132 kB: about 16 MB in all
OUT_OF_RESOURCES = "Refused: OutOfResources"  # how DCMTK 3.6.7 names status 0xA700


# Data ----------------------------------------------------------------------------------------


def cached_dir(request: pytest.FixtureRequest, name: str) -> Path:
    """Return a directory in pytest's cache (kept between runs), or a fresh one without a cache."""
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    if cache is None:
        folder: Path = request.getfixturevalue("tmp_path") / name
        folder.mkdir(exist_ok=True)
        return folder
    cached: Path = cache.mkdir(name)
    return cached


def small_ct(request: pytest.FixtureRequest, seed: int, slices: int) -> list[Path]:
    """Return a cached 256 x 256 synthetic CT series (distinct UIDs per seed)."""
    folder = cached_dir(request, f"ct_series_{slices}x256") / f"seed-{seed}"
    return ct_series(folder, slices=slices, rows=256, cols=256, seed=seed)


@functools.cache
def sent(path: Path) -> tuple[str, str]:
    """Return (SOP Instance UID, dataset sha256) of a file we send (files never change)."""
    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return uid, dataset_sha256(path)


@pytest.fixture(scope="module")
def instance_600mb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return large_instance(tmp_path_factory.mktemp("large") / "600mb.dcm", 600 * MiB)


# What the agent holds ------------------------------------------------------------------------


def query(agent: Agent, sql: str) -> list[tuple[Any, ...]]:
    """Run a read-only query against the agent's database, closing the connection at once.

    (`Agent.rows` leaves its connection to the garbage collector, and an open file keeps a
    tmpfs from being unmounted.)
    """
    uri = f"file:{agent.data_dir / 'dirigo.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return db.execute(sql).fetchall()


def current_rows(agent: Agent) -> dict[str, tuple[str, str]]:
    """Return {SOP Instance UID: (spool path, sha256)} for every current instance row."""
    rows = query(agent, "SELECT sop_instance_uid, path, sha256 FROM instances WHERE superseded = 0")
    return {uid: (path, sha) for uid, path, sha in rows}


def spool_files(data_dir: Path) -> set[str]:
    """Return every file in the spool, as the data_dir-relative path a row records."""
    return {
        p.relative_to(data_dir).as_posix() for p in (data_dir / "spool").rglob("*") if p.is_file()
    }


def incoming(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "incoming").iterdir())


def assert_stored_intact(agent: Agent, files: Sequence[Path], where: str = "") -> None:
    """Every file has a current row whose spool file exists and holds the very dataset sent."""
    rows = current_rows(agent)
    for path in files:
        uid, sha = sent(path)
        assert uid in rows, f"{where}acknowledged {path.name} ({uid}) has no instance row"
        spool_path, row_sha = rows[uid]
        stored = agent.data_dir / spool_path
        assert stored.is_file(), f"{where}{path.name}: row points at missing {spool_path}"
        assert row_sha == sha, f"{where}{path.name}: row sha256 differs from the sent dataset"
        assert dataset_sha256(stored) == sha, f"{where}{path.name}: spool file differs from sent"


def assert_nothing_unacknowledged_left(agent: Agent, where: str = "") -> None:
    """incoming/ is empty, and the spool holds exactly the files that rows reference."""
    assert incoming(agent.data_dir) == [], f"{where}partial receives left in incoming/"
    referenced = {path for (path,) in query(agent, "SELECT path FROM instances")}
    on_disk = spool_files(agent.data_dir)
    assert on_disk - referenced == set(), f"{where}spool files no row references"
    assert referenced - on_disk == set(), f"{where}rows whose spool file is missing"


def wait_for_empty(directory: Path, timeout: float) -> list[str]:
    """Wait up to `timeout` s for `directory` to empty; return what is still in it (if anything)."""
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not any(directory.iterdir()), timeout, what=f"{directory} empty")
    return sorted(p.name for p in directory.iterdir())


# 1. kill -9 ----------------------------------------------------------------------------------


def test_kill_9_at_random_moments_never_loses_an_acknowledged_instance(
    request: pytest.FixtureRequest, tmp_data_dir: Path
) -> None:
    seed = int(os.environ.get("DIRIGO_FAULT_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nkill -9 seed {seed} (DIRIGO_FAULT_SEED={seed} repeats the same kill points)")
    rng = random.Random(seed)
    series = [small_ct(request, i, KILL_SLICES) for i in range(KILL_ITERATIONS)]
    acknowledged: list[Path] = []
    mid_instance_kills = 0
    agent = Agent(tmp_data_dir)
    try:
        agent.start()
        for i, files in enumerate(series):
            where = f"seed {seed}, iteration {i}: "
            # Kill while file `target` is on its way: being received, checked, fsynced,
            # committed or answered; `delay` spreads the kills over that instance's ~10 ms.
            target = rng.randrange(1, len(files) - 10)
            delay = rng.uniform(0.0, 0.015)
            with WatchedSender(files, agent.port) as sender:
                sender.wait_for_file(target, timeout=60)
                time.sleep(delay)  # not a readiness wait: where in the instance the kill lands
                assert sender.running(), f"{where}storescu finished before the kill"
                agent.kill9()
                result = sender.wait(timeout=60)
            acked = dcmtk.acknowledged(result)
            assert len(acked) < len(files), f"{where}the kill did not interrupt the transfer"
            acknowledged += acked
            partial = incoming(tmp_data_dir)
            uncommitted = len(spool_files(tmp_data_dir))

            agent.start()
            uncommitted -= query(agent, "SELECT count(*) FROM instances")[0][0]
            mid_instance_kills += bool(partial or uncommitted)
            print(
                f"iteration {i}: killed during file {target} (+{delay * 1000:.1f} ms): "
                f"{len(acked)} acknowledged, {len(partial)} partial in incoming/, "
                f"{uncommitted} placed but not committed"
            )
            assert_stored_intact(agent, acknowledged, where)
            assert_nothing_unacknowledged_left(agent, where)
            assert dcmtk.echoscu(agent.port).returncode == 0, f"{where}no C-ECHO after restart"
        # The sweep proves nothing if every kill fell between two instances.
        assert mid_instance_kills > 0, f"seed {seed}: no kill landed inside an instance"

        everything = [path for files in series for path in files]
        started = time.monotonic()
        result = dcmtk.storescu(everything, agent.port, timeout=300)
        print(f"re-sent all {len(everything)} instances in {time.monotonic() - started:.1f} s")
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(dcmtk.acknowledged(result)) == len(everything)
        assert query(agent, "SELECT count(*) FROM instances") == [(len(everything),)]
        assert_stored_intact(agent, everything)
        assert_nothing_unacknowledged_left(agent)
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()
        agent.log.close()


# 2. a full disk ------------------------------------------------------------------------------


@contextlib.contextmanager
def agent_on_tmpfs(tmp_path: Path, size_bytes: int, high_water: str) -> Iterator[Agent]:
    """Run an agent whose data_dir is on a fresh tmpfs of `size_bytes`."""
    with (
        tmpfs(tmp_path / "disk", size_bytes) as disk,
        Agent(disk / "data", high_water=high_water) as agent,
    ):
        yield agent


def test_a_full_disk_never_loses_an_acknowledged_instance_and_the_agent_recovers(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    files = small_ct(request, 1000, FILL_SLICES)
    with agent_on_tmpfs(tmp_path, 24 * MiB, high_water="100%") as agent:
        # Leave room for about half the series; the rest meets a really full disk.
        ballast = write_ballast(
            agent.data_dir.parent / "ballast", free_bytes(agent.data_dir) - 8 * MiB
        )
        result = dcmtk.storescu(files, agent.port, extra_args=["-nh"])
        acked = dcmtk.acknowledged(result)
        responses = store_responses(result)
        aborted = "Peer aborted Association" in result.stderr
        print(
            f"\nfull disk: {len(acked)} of {len(files)} acknowledged; other responses: "
            f"{sorted(set(responses) - {'Success'}) or 'none'}; "
            f"association aborted: {'yes' if aborted else 'no'}; "
            f"left in incoming/: {incoming(agent.data_dir)}"
        )
        assert 0 < len(acked) < len(files), "the disk did not fill up mid-series"
        assert_stored_intact(agent, acked)
        assert agent.proc is not None and agent.proc.poll() is None, agent.log_tail()
        assert dcmtk.echoscu(agent.port).returncode == 0

        ballast.unlink()
        again = dcmtk.storescu(files, agent.port)
        assert again.returncode == 0, again.stderr[-2000:]
        assert len(dcmtk.acknowledged(again)) == len(files)
        assert len(current_rows(agent)) == len(files)
        assert_stored_intact(agent, files)


def test_a_receive_cut_off_by_a_full_disk_leaves_no_partial_file_behind(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    files = small_ct(request, 1000, FILL_SLICES)[:3]
    with agent_on_tmpfs(tmp_path, 8 * MiB, high_water="100%") as agent:
        # Less room than one instance: the write of the very first one hits ENOSPC half-way.
        write_ballast(agent.data_dir.parent / "ballast", free_bytes(agent.data_dir) - 64 * 1024)
        result = dcmtk.storescu(files, agent.port)
        if dcmtk.acknowledged(result):
            pytest.fail("an instance was stored on a disk too full to hold it")
        assert wait_for_empty(agent.data_dir / "incoming", timeout=3) == []


def test_a_sender_cut_off_mid_instance_leaves_no_partial_file_behind(
    instance_600mb: Path, tmp_data_dir: Path
) -> None:
    with Agent(tmp_data_dir) as agent, WatchedSender([instance_600mb], agent.port) as sender:
        folder = agent.data_dir / "incoming"
        wait_until(
            lambda: sum(p.stat().st_size for p in folder.iterdir()) > 64 * MiB,
            60,
            what="64 MiB received",
        )
        sender.kill()
        sender.wait()
        assert wait_for_empty(folder, timeout=3) == []


# 3. the high-water mark ----------------------------------------------------------------------


@contextlib.contextmanager
def filled_to_high_water(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Agent, list[Path], list[Path], list[str]]]:
    """Send a 16 MB series to an agent on a 16 MiB tmpfs whose high-water mark is 50%.

    Yield (agent, files sent, files acknowledged, status of each response).
    """
    files = small_ct(request, 1000, FILL_SLICES)
    with agent_on_tmpfs(tmp_path, 16 * MiB, high_water="50%") as agent:
        result = dcmtk.storescu(files, agent.port, extra_args=["-nh"])
        yield agent, files, dcmtk.acknowledged(result), store_responses(result)


def test_the_high_water_mark_refuses_with_out_of_resources_before_the_disk_is_full(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with filled_to_high_water(request, tmp_path) as (agent, files, acked, responses):
        refused = len(files) - len(acked)
        print(
            f"\nhigh water 50%: {len(acked)} acknowledged, then "
            f"{responses.count(OUT_OF_RESOURCES)} x {OUT_OF_RESOURCES}"
        )
        assert 0 < len(acked) < len(files)
        # Accepted until the mark, then refused, one response per file: no abort, no gap.
        assert responses == ["Success"] * len(acked) + [OUT_OF_RESOURCES] * refused
        assert acked == files[: len(acked)]
        disk = agent.status()["disk"]
        assert disk["used_percent"] < 55, "the mark should stop intake well before a full disk"
        assert_stored_intact(agent, acked)
        assert_nothing_unacknowledged_left(agent)
        assert len(current_rows(agent)) == len(acked)
        assert "disk above high-water mark" in agent.log_tail(20_000)


def test_status_says_not_accepting_while_the_high_water_mark_refuses(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with filled_to_high_water(request, tmp_path) as (agent, _files, _acked, responses):
        if OUT_OF_RESOURCES not in responses:
            pytest.fail("nothing was refused")
        disk = agent.status()["disk"]
        print(f"\nafter refusals: used {disk['used_percent']}%, accepting {disk['accepting']}")
        assert disk["accepting"] is False


# 4. one very large instance ------------------------------------------------------------------


def test_a_600_mb_instance_is_received_with_flat_memory(
    instance_600mb: Path, tmp_data_dir: Path
) -> None:
    with Agent(tmp_data_dir) as agent:
        idle_peak = vm_hwm_bytes(agent.pid)
        started = time.monotonic()
        result = dcmtk.storescu([instance_600mb], agent.port)
        elapsed = time.monotonic() - started
        peak = vm_hwm_bytes(agent.pid)
        size = instance_600mb.stat().st_size
        rate = size / 1e6 / elapsed
        print(
            f"\n600 MB instance: {size / 1e6:.0f} MB in {elapsed:.1f} s = {rate:.0f} MB/s; "
            f"agent peak RSS {peak / 1e6:.1f} MB (idle {idle_peak / 1e6:.1f} MB)"
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert dcmtk.acknowledged(result) == [instance_600mb]
        rows = query(agent, "SELECT path, size, sha256 FROM instances WHERE superseded = 0")
        assert len(rows) == 1
        spool_path, row_size, row_sha = rows[0]
        stored = agent.data_dir / spool_path
        assert row_size == stored.stat().st_size
        # The File Meta is the receiver's own; the dataset after it must be the one sent.
        assert row_size - file_meta_length(stored) == size - file_meta_length(instance_600mb)
        assert row_sha == dataset_sha256(instance_600mb) == dataset_sha256(stored)
        assert peak < 200 * 10**6
