"""Power loss, for real: `dirigo run` with its data_dir on LazyFS, which loses every write that
was not fsynced when the power goes (see tests/support/lazyfs.py).

`kill -9` keeps the kernel's page cache, so it cannot show a missing fsync; this does. Each
test cuts the power the faithful way: SIGKILL the agent and everything it started, drop LazyFS's
cache, mount again and start the agent on what the disk really held. The promises under test are
the first two: every instance acknowledged with Success is intact and counted after the power
comes back (at the moment of the last Success, in the middle of a study, while a part is packed,
while it is uploaded), and the cloud ends up with each instance exactly once.

Removing the spool file's fsync, or SQLite's synchronous=FULL, fails these tests: that is what
they are for. The cut points but the first are random; each test prints its seed, and
DIRIGO_FAULT_SEED=<seed> repeats it.
"""

from __future__ import annotations

import collections
import functools
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from agent.spool import PARTIAL
from tests.support import bundles, datasets, dcmtk
from tests.support.agent import Agent
from tests.support.devcloud import DevCloud
from tests.support.faults import WatchedSender
from tests.support.lazyfs import LazyFS, LazyFSMissing, fuse_unavailable, kill_tree, writers_under
from tests.support.net import PeerExited, wait_until

NO_FUSE = fuse_unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NO_FUSE is not None, reason=str(NO_FUSE))]

SLICES = 300
WAIT = 120.0
"""Bound on every wait for the agent or the cloud; a healthy run needs a few seconds."""
SUCCESS = "I: Received Store Response (Success"


# The study and the disk ------------------------------------------------------------------------


@pytest.fixture
def study(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Return a 300-slice 256 x 256 synthetic CT (about 40 MB), cached between runs."""
    cache = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`
    folder = cache.mkdir("power_loss_ct") if cache else tmp_path_factory.mktemp("ct")
    return datasets.ct_series(folder, slices=SLICES, rows=256, cols=256, seed=17)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LazyFS]:
    """Return a mounted LazyFS whose cache outlasts everything a test writes between two cuts."""
    try:
        fs = LazyFS(tmp_path / "lazyfs", cache_size="256mb")
    except LazyFSMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    with fs:
        yield fs


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("DIRIGO_FAULT_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\npower loss seed {seed} (DIRIGO_FAULT_SEED={seed} repeats the same cut points)")
    return random.Random(seed)


def agent_on(disk: LazyFS, **settings: Any) -> Agent:
    """Return an agent (not started) whose data_dir is the LazyFS mount itself: its config file
    lands beside the mount, off the disk that loses power."""
    return Agent(disk.mount_dir, **settings)


def send(agent: Agent, files: Sequence[Path]) -> None:
    result = dcmtk.storescu(files, agent.port)
    assert len(dcmtk.acknowledged(result)) == len(files), result.stdout + result.stderr


def power_loss(disk: LazyFS, agent: Agent) -> None:
    """Cut the power under a running agent: SIGKILL it with every process it started, drop
    every write not fsynced, and mount the disk again (the machine boots)."""
    assert agent.proc is not None and agent.proc.poll() is None, agent.log_tail()
    kill_tree(agent.proc)
    assert writers_under(disk.mount_dir) == [], "a process still writes under the mount"
    disk.clear_cache()
    disk.remount()


# What the agent holds --------------------------------------------------------------------------


@functools.cache
def sent(path: Path) -> tuple[str, str]:
    """Return (SOP Instance UID, dataset sha256) of a file we send (files never change)."""
    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return uid, datasets.dataset_sha256(path)


def assert_every_instance_intact(agent: Agent, files: Sequence[Path], in_flight: int = 0) -> None:
    """Each file has exactly one current row whose spool file holds the very dataset sent, and
    the agent counts no instance more (but `in_flight`: committed, the power cut its answer)."""
    rows = agent.rows("SELECT sop_instance_uid, path, sha256 FROM instances WHERE superseded = 0")
    found = {uid: (path, sha) for uid, path, sha in rows}
    assert len(rows) == len(found), "two current rows for one instance"
    assert len(files) <= len(rows) <= len(files) + in_flight, f"{len(rows)} rows, {len(files)} sent"
    damaged = []
    for path in files:
        uid, sha = sent(path)
        assert uid in found, f"acknowledged {path.name} ({uid}) has no instance row"
        spool_path, row_sha = found[uid]
        stored = agent.data_dir / spool_path
        assert row_sha == sha, f"{path.name}: the row's sha256 differs from the sent dataset"
        try:
            if datasets.dataset_sha256(stored) != sha:
                damaged.append(f"{path.name} (its dataset differs)")
        except (OSError, ValueError) as exc:  # missing, or cut before its File Meta ends
            damaged.append(f"{path.name} ({type(exc).__name__})")
    assert not damaged, f"{len(damaged)} acknowledged instance(s) damaged: {damaged[:5]}"
    assert sum(agent.status()["instances"].values()) == len(rows)


def assert_no_leftovers(agent: Agent) -> None:
    """Nothing half-received is left, and the spool holds exactly the files rows refer to."""
    assert not any((agent.data_dir / "incoming").iterdir()), "partial receives left in incoming/"
    spool = agent.data_dir / "spool"
    on_disk = {path.relative_to(agent.data_dir).as_posix() for path in spool.rglob("*.dcm")}
    assert on_disk == {path for (path,) in agent.rows("SELECT path FROM instances")}


# What reached the cloud ------------------------------------------------------------------------


def cloud_agent(disk: LazyFS, cloud: DevCloud, **upload: Any) -> Agent:
    """Return an agent on `disk` that packs a study after 1 s of quiet and uploads it to
    `cloud` in 1 MiB chunks, retrying after 1 to 2 s; `upload` overrides upload settings."""
    # transcode none: the cloud's datasets are compared with those sent, byte for byte, and a
    # bundle's growth stands for time (`upload.transcode: auto` may re-encode them)
    settings = {
        "chunk_size": "1MiB",
        "retry_first": "1s",
        "retry_max": "2s",
        "transcode": "none",
        **upload,
    }
    cloud_settings = {"upload_url": cloud.upload_url, "dicomweb_url": cloud.dicomweb_url}
    return agent_on(disk, stable_after="1s", extra={"cloud": cloud_settings, "upload": settings})


def wait_for_sent(agent: Agent, count: int) -> None:
    """Wait until the agent counts `count` instances sent; on a timeout, say what it counts."""
    status: dict[str, Any] = {}

    def all_sent() -> bool:
        if agent.proc is not None and agent.proc.poll() is not None:
            raise PeerExited(f"dirigo exited with {agent.proc.returncode}:\n{agent.log_tail()}")
        status.update(agent.status())
        return bool(status["instances"].get("sent") == count)

    try:
        wait_until(all_sent, WAIT, 0.2, what=f"the agent counting {count} instances sent")
    except TimeoutError as exc:
        counts = {key: status.get(key) for key in ("studies", "instances", "jobs", "last_error")}
        raise TimeoutError(f"{exc}; it counts {counts}") from None


def assert_in_the_cloud_once(cloud: DevCloud, files: Sequence[Path]) -> None:
    """The complete uploads hold every dataset sent exactly once and nothing else, each was
    ingested, and the archive lists every instance. An upload left incomplete holds no byte:
    only a creation whose answer the power cut off may leave one, which tus cannot find again."""
    uploads = cloud.tus.uploads()
    complete = [u for u in uploads if u.complete]
    assert all(u.offset == 0 for u in uploads if not u.complete), uploads
    digests = collections.Counter(
        datasets.dataset_digest(body)
        for upload in complete
        for name, body in bundles.members(upload.data())
        if name != "manifest.json"
    )
    expected = collections.Counter(sent(path)[1] for path in files)
    twice = {sha: n for sha, n in digests.items() if n > 1}
    assert twice == {}, f"{len(twice)} dataset(s) uploaded more than once"
    assert digests == expected, (
        f"{len(expected - digests)} missing, {len(digests - expected)} alien"
    )
    for upload in complete:
        record = cloud.wait_until_settled(upload.id, timeout=WAIT)
        assert record["outcome"] == "ingested", record
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    archived = cloud.wait_for_study(study_uid, len(files), timeout=WAIT)
    assert archived == {sent(path)[0] for path in files}


# 1. while a study is received -----------------------------------------------------------------


def test_power_lost_right_after_the_last_success_keeps_every_acknowledged_instance(
    disk: LazyFS, study: list[Path]
) -> None:
    with agent_on(disk) as agent:  # nothing is packed: the study stays open for an hour
        with WatchedSender(study, agent.port) as sender:
            wait_until(
                lambda: sum(line.startswith(SUCCESS) for line in sender.lines) == len(study),
                WAIT,
                0.001,
                what=f"{len(study)} C-STORE Successes",
            )
            power_loss(disk, agent)
            result = sender.wait(timeout=WAIT)
        assert dcmtk.acknowledged(result) == study
        agent.start()
        assert_every_instance_intact(agent, study)
        assert agent.status()["instances"] == {**agent.status()["instances"], "received": SLICES}


def test_power_lost_mid_study_keeps_what_was_acknowledged_and_a_resend_completes_it(
    disk: LazyFS, study: list[Path], rng: random.Random
) -> None:
    target = rng.randrange(10, len(study) - 10)
    delay = rng.uniform(0.0, 0.015)
    with agent_on(disk) as agent:
        with WatchedSender(study, agent.port) as sender:
            sender.wait_for_file(target, timeout=WAIT)
            time.sleep(delay)  # not a readiness wait: where in the instance the power goes
            power_loss(disk, agent)
            result = sender.wait(timeout=WAIT)
        acknowledged = dcmtk.acknowledged(result)
        print(f"cut the power {delay * 1000:.1f} ms into file {target}: {len(acknowledged)} acked")
        assert len(acknowledged) < len(study), "the cut did not interrupt the transfer"
        agent.start()
        # storescu sends one instance at a time: at most one was committed but not answered.
        assert_every_instance_intact(agent, acknowledged, in_flight=1)
        assert_no_leftovers(agent)
        send(agent, study)
        assert_every_instance_intact(agent, study)
        assert_no_leftovers(agent)


# 2. while a part is packed ---------------------------------------------------------------------


def test_power_lost_while_packing_loses_nothing_and_the_cloud_gets_each_instance_once(
    tmp_path: Path, disk: LazyFS, study: list[Path], rng: random.Random
) -> None:
    # Uncompressed, the bundle grows to the size of the study: a point in it is a point in time.
    total = sum(path.stat().st_size for path in study)
    cut_at = int(rng.uniform(0.05, 0.9) * total)
    bundles_dir = disk.mount_dir / "bundles"

    def packed_so_far() -> bool:
        entries = list(bundles_dir.iterdir())
        partial = [entry for entry in entries if entry.name.endswith(PARTIAL)]
        if entries and not partial:
            raise PeerExited("the part was packed before the cut")
        return bool(partial) and partial[0].stat().st_size >= cut_at

    with (
        DevCloud(tmp_path / "cloud") as cloud,
        cloud_agent(disk, cloud, compression="none") as agent,
    ):
        send(agent, study)
        wait_until(packed_so_far, WAIT, 0.001, what=f"{cut_at} bytes of the bundle packed")
        print(f"cut the power with {cut_at} of about {total} bytes packed")
        power_loss(disk, agent)
        agent.start()
        assert_every_instance_intact(agent, study)
        wait_for_sent(agent, len(study))
        assert_in_the_cloud_once(cloud, study)


# 3. while a part is uploaded -------------------------------------------------------------------


def test_power_lost_while_uploading_loses_nothing_and_the_cloud_gets_each_instance_once(
    tmp_path: Path, disk: LazyFS, study: list[Path], rng: random.Random
) -> None:
    fraction = rng.uniform(0.05, 0.9)

    def uploaded_so_far() -> int:
        found = cloud.tus.uploads()
        if len(found) != 1 or found[0].size is None:
            return 0
        if found[0].complete:
            raise PeerExited("the part was uploaded before the cut")
        return found[0].offset if found[0].offset >= fraction * found[0].size else 0

    # At most 8 MB/s: the ~15 MB bundle takes about two seconds, and the cut leaves at least a
    # tenth of it (~190 ms) for a poll that a loaded machine delays to land in time.
    with (
        DevCloud(tmp_path / "cloud") as cloud,
        cloud_agent(disk, cloud, max_bandwidth="8MB") as agent,
    ):
        send(agent, study)
        offset = wait_until(uploaded_so_far, WAIT, 0.001, what=f"{fraction:.0%} uploaded")
        print(f"cut the power with {offset} bytes uploaded ({fraction:.0%} asked)")
        power_loss(disk, agent)
        agent.start()
        assert_every_instance_intact(agent, study)
        wait_for_sent(agent, len(study))
        assert_in_the_cloud_once(cloud, study)
