"""Uploads through real faults: storescu → `dirigo run` → (fault) → the real @tus/server.

The promise under test is the second one ("everything received reaches the cloud exactly once")
together with the fifth ("every stuck item is visible"). The faults are real: the tus server
stopped or killed -9 and started again on the same port and directory; a TCP proxy that resets
the link every so many bytes (requests or answers), hangs it without a reset, or squeezes it to
a rural rate; an HTTP injector in front of the server that answers 500 for a while, 401 from
some moment on, 409 for the offset the server itself reports, 460 for one chunk (or finds one
damaged by its checksum), or 429 with a Retry-After.

Every test ends with the same check: the server holds exactly one upload of the part, complete,
byte-identical to the bundle the agent packed, whose sha256 its metadata carries, and whose
instances are exactly the datasets storescu sent (nothing lost, nothing twice). The one
exception is spelt out where it arises: a lost creation answer leaves an empty upload behind.
"""

from __future__ import annotations

import email.utils
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import bundles, datasets, dcmtk
from tests.support.agent import Agent
from tests.support.faultproxy import FaultProxy
from tests.support.httpfaults import Exchange, HttpFaults
from tests.support.net import LOOPBACK, wait_until
from tests.support.tus import StoredUpload, TusServer

TusFactory = Callable[..., TusServer]

KiB = 1024
CHUNK = 64 * KiB
SLOW = "400kB"
"""`upload.max_bandwidth` where a test must act while the upload is under way (~2 s for it)."""
RETRY_FIRST = 1.0
RETRY_MAX = 2.0
WAIT = 60.0
"""Bound on every wait for the agent or a server; a healthy run needs a few seconds."""
REQUEST_OVERHEAD = 1 * KiB
"""More than the request line and headers of any request the agent sends to the tus server."""


# The agent and its study ----------------------------------------------------------------------


def fault_agent(
    data_dir: Path, upload_url: str, *, timeout: str | None = None, **upload: Any
) -> Agent:
    """Return an agent (not started) uploading to `upload_url` in 64 KiB uncompressed chunks,
    retrying after 1 to 2 s; `upload` overrides upload settings, `timeout` sets cloud.timeout."""
    settings: dict[str, Any] = {
        "chunk_size": f"{CHUNK}B",
        "concurrency": 2,
        "compression": "none",
        "retry_first": f"{RETRY_FIRST:g}s",
        "retry_max": f"{RETRY_MAX:g}s",
    }
    settings.update(upload)
    cloud: dict[str, Any] = {"upload_url": upload_url}
    if timeout is not None:
        cloud["timeout"] = timeout
    return Agent(data_dir, stable_after="1s", extra={"cloud": cloud, "upload": settings})


def small_study(tmp_path: Path, seed: int, slices: int = 12, size: int = 192) -> list[Path]:
    """Return a synthetic CT series of `slices` slices of `size` x `size` pixels (by default
    about 0.9 MB)."""
    return datasets.ct_series(
        tmp_path / f"ct-{seed}", slices=slices, rows=size, cols=size, seed=seed
    )


def send_study(agent: Agent, series: list[Path]) -> None:
    result = dcmtk.storescu(series, agent.port)
    assert len(dcmtk.acknowledged(result)) == len(series), result.stdout + result.stderr


# What the agent's database says --------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    """The part's upload job as committed in the jobs table."""

    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: float | None
    updated_at: float


def upload_job(agent: Agent) -> JobRow:
    (row,) = agent.rows(
        "SELECT state, attempts, last_error, next_attempt_at, updated_at FROM jobs"
        " WHERE kind = 'upload'"
    )
    return JobRow(*row)


def failure_events(agent: Agent) -> list[tuple[str, str]]:
    """Return (level, message) of every failed upload attempt recorded, oldest first."""
    rows = agent.rows(
        "SELECT level, message FROM events WHERE kind = 'upload_failed' ORDER BY at, id"
    )
    return [(str(level), str(message)) for level, message in rows]


def wait_for_failure(
    agent: Agent,
    mentions: str,
    *,
    retryable: bool,
    after_attempt: int = 0,
    in_status: bool = True,
) -> JobRow:
    """Wait until the job is `failed` with `mentions` in its last error, a next attempt time
    exactly when `retryable`, after attempt number `after_attempt` at least, and (if
    `in_status`) `dirigo status` counts it as failed; return its row.

    `dirigo status` takes about a second; `in_status=False` catches a failure that may be
    retried sooner than that (the job row alone is read in milliseconds).
    """

    def failed() -> JobRow | None:
        job = upload_job(agent)
        if job.state != "failed" or mentions not in (job.last_error or ""):
            return None
        if (job.next_attempt_at is not None) != retryable or job.attempts < after_attempt:
            return None
        if in_status and agent.status()["jobs"]["failed"] != 1:
            return None  # retried in between: catch the next failure
        return job

    what = f"the upload job failed ({'retryable' if retryable else 'permanent'}) with {mentions!r}"
    found = wait_until(failed, WAIT, what=what)
    assert isinstance(found, JobRow)
    return found


def wait_for_sent(agent: Agent, tus: TusServer) -> None:
    wait_until(lambda: any(u.complete for u in tus.uploads()), WAIT, what="a complete upload")
    wait_until(lambda: agent.status()["studies"]["sent"] == 1, WAIT, what="the part marked sent")


def wait_for_offset(tus: TusServer, at_least: int) -> int:
    """Wait until the server holds at least `at_least` bytes of a not yet complete upload."""

    def under_way() -> int:
        found = tus.uploads()
        if len(found) == 1 and at_least <= found[0].offset and not found[0].complete:
            return found[0].offset
        return 0

    offset = wait_until(under_way, WAIT, 0.02, what=f"{at_least} bytes uploaded, not all")
    assert isinstance(offset, int)
    return offset


def stays_flat(value: Callable[[], int], seconds: float) -> int:
    """Watch `value` for `seconds` and return it; fail the test the moment it changes."""
    start = value()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = value()
        assert now == start, f"changed from {start} to {now} within {seconds:.0f} s"
        time.sleep(0.1)
    return start


# What reached the cloud -----------------------------------------------------------------------


def assert_instances_in(bundle: bytes, series: list[Path]) -> None:
    """The bundle holds every dataset sent, each exactly once, and then its manifest."""
    members = bundles.members(bundle)
    assert members[-1][0] == "manifest.json"
    received = sorted(datasets.dataset_digest(body) for _, body in members[:-1])
    assert received == sorted(datasets.dataset_sha256(path) for path in series)


def packed_bundle(agent: Agent) -> bytes:
    """Return the bundle file the agent packed for the (one) part."""
    ((path,),) = agent.rows("SELECT bundle_path FROM uploads")
    assert path is not None, "the agent recorded no bundle"
    return (agent.data_dir / str(path)).read_bytes()


def assert_delivered_once(agent: Agent, tus: TusServer, series: list[Path]) -> StoredUpload:
    """Exactly one upload on the server, complete, byte-identical to the agent's bundle, with
    its sha256 in the metadata and every instance sent in it; the agent counts it all sent."""
    uploads = tus.uploads()
    assert len(uploads) == 1, [(u.id, u.offset, u.size) for u in uploads]
    (upload,) = uploads
    assert upload.complete, (upload.offset, upload.size)
    data = upload.data()
    assert upload.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    assert data == packed_bundle(agent)
    assert upload.metadata["instances"] == str(len(series))
    assert_instances_in(data, series)
    status = agent.status()
    assert status["studies"]["sent"] == 1
    assert status["instances"]["sent"] == len(series)
    assert status["jobs"] == {**status["jobs"], "done": 1, "failed": 0, "claimed": 0}
    return upload


# The tus server goes away ---------------------------------------------------------------------


@pytest.mark.parametrize("death", ["stopped", "killed"])
def test_a_tus_server_that_dies_mid_upload_and_restarts_gets_the_bundle_once_and_intact(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory, death: str
) -> None:
    series = small_study(tmp_path, seed=31)
    tus = tus_server()
    # Slower still: a stopping server serves a busy keep-alive connection for 2 s more.
    with fault_agent(tmp_data_dir, tus.url, max_bandwidth="150kB") as agent:
        send_study(agent, series)
        wait_for_offset(tus, at_least=100_000)
        if death == "stopped":
            tus.stop()
        else:
            tus.kill()
        held = tus.uploads()[0].offset  # what a new server on this directory will report
        first = wait_for_failure(agent, "connection failed", retryable=True)
        assert first.next_attempt_at is not None
        assert RETRY_FIRST / 2 <= first.next_attempt_at - first.updated_at <= RETRY_MAX
        # Backing off, it keeps trying while the server is down, and fails again.
        wait_for_failure(
            agent, "connection failed", retryable=True, after_attempt=first.attempts + 1
        )
        tus.start()
        wait_for_sent(agent, tus)
        assert f"resuming at {held} of " in agent.log_tail(200_000)
        assert_delivered_once(agent, tus, series)


# The TCP path breaks --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_link_reset_every_n_bytes_still_delivers_the_bundle_once_resending_little(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory, seed: int
) -> None:
    every = random.Random(seed).randint(150_000, 400_000)
    series = small_study(tmp_path, seed=40 + seed)
    tus = tus_server()
    with FaultProxy(LOOPBACK, tus.port) as proxy:
        proxy.cut_every(every)
        with fault_agent(tmp_data_dir, proxy.url_for("/files/")) as agent:
            send_study(agent, series)
            wait_for_sent(agent, tus)
            upload = assert_delivered_once(agent, tus, series)
            failures = failure_events(agent)
        sent, cuts = proxy.bytes_upstream, proxy.cuts
    assert upload.size is not None
    assert cuts >= upload.size // every, f"only {cuts} cut(s) every {every} bytes"
    assert len(failures) >= cuts, failures  # each cut is a failed attempt, resumed
    requests = upload.size // CHUNK + 1 + 3 * (cuts + 1)  # PATCHes, plus OPTIONS/POST/HEADs
    # The bundle once, at most one chunk again per cut, and the requests' headers.
    assert sent <= upload.size + cuts * CHUNK + requests * REQUEST_OVERHEAD, (sent, cuts)


@pytest.mark.parametrize("seed", [4, 5])
def test_answers_lost_every_n_bytes_cost_no_chunk_twice_and_leave_one_complete_upload(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory, seed: int
) -> None:
    # Answers are ~0.5 to 1.3 kB: a reset every few of them, the creation answer included.
    every = random.Random(seed).randint(1_500, 4_000)
    series = small_study(tmp_path, seed=45 + seed, slices=6)
    tus = tus_server()
    with FaultProxy(LOOPBACK, tus.port) as proxy:
        proxy.cut_every(every, "downstream")
        with fault_agent(tmp_data_dir, proxy.url_for("/files/")) as agent:
            send_study(agent, series)
            wait_for_sent(agent, tus)
            uploads = tus.uploads()
            (upload,) = [u for u in uploads if u.complete]
            assert upload.metadata["sha256"] == hashlib.sha256(upload.data()).hexdigest()
            assert upload.data() == packed_bundle(agent)
            assert_instances_in(upload.data(), series)
            assert agent.status()["instances"]["sent"] == len(series)
        sent, cuts = proxy.bytes_upstream, proxy.cuts
    assert cuts >= 1
    # A lost creation answer leaves an upload the agent never learnt of: tus 1.0 gives a client
    # no way to find it again. It holds no byte of the bundle, and the server expires it.
    assert all(u.offset == 0 for u in uploads if u is not upload), uploads
    assert upload.size is not None
    # A lost PATCH answer costs a HEAD, never the chunk again: the server had it.
    requests = upload.size // CHUNK + 1 + 3 * (cuts + 1)
    assert sent <= upload.size + requests * REQUEST_OVERHEAD, (sent, cuts)


def test_a_stalled_link_times_out_and_the_upload_resumes_once_it_flows_again(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    series = small_study(tmp_path, seed=51)
    tus = tus_server()
    with FaultProxy(LOOPBACK, tus.port) as proxy:
        agent = fault_agent(
            tmp_data_dir, proxy.url_for("/files/"), timeout="2s", max_bandwidth=SLOW
        )
        with agent:
            send_study(agent, series)
            wait_for_offset(tus, at_least=200_000)
            proxy.stall()
            stalled = time.monotonic()
            wait_for_failure(agent, "timed out", retryable=True)
            assert time.monotonic() - stalled >= 2.0  # the read timeout, not a reset
            assert proxy.cuts == 0 and proxy.open_connections >= 1
            (level, message), *_ = failure_events(agent)
            assert level == "warning" and "send a chunk: timed out" in message
            proxy.resume()
            wait_for_sent(agent, tus)
            assert_delivered_once(agent, tus, series)


def test_a_rural_link_under_a_bandwidth_cap_delivers_no_faster_than_the_cap(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    cap = 150_000
    series = small_study(tmp_path, seed=61, slices=6)
    tus = tus_server()
    with FaultProxy(LOOPBACK, tus.port) as proxy:
        proxy.throttle(200_000)  # bytes per second each way
        agent = fault_agent(tmp_data_dir, proxy.url_for("/files/"), max_bandwidth=f"{cap}B")
        with agent:
            send_study(agent, series)
            wait_until(tus.uploads, WAIT, 0.02, what="the upload created")
            created = time.monotonic()
            wait_for_sent(agent, tus)
            took = time.monotonic() - created
            upload = assert_delivered_once(agent, tus, series)
    assert upload.size is not None
    # The agent's bucket may start with a quarter second's worth; allow for polling slack.
    assert took >= 0.8 * (upload.size - cap / 4) / cap, (took, upload.size)


# The cloud answers with an error --------------------------------------------------------------


def test_the_http_fault_injector_passes_a_clean_upload_through_unchanged(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    series = small_study(tmp_path, seed=70, slices=4)
    tus = tus_server()
    with (
        HttpFaults(LOOPBACK, tus.port) as faults,
        fault_agent(tmp_data_dir, faults.url_for("/files/")) as agent,
    ):
        send_study(agent, series)
        wait_for_sent(agent, tus)
        upload = assert_delivered_once(agent, tus, series)
    assert upload.size is not None
    exchanges = faults.exchanges()
    assert not any(e.injected for e in exchanges)
    assert all(e.status is not None and 200 <= e.status < 300 for e in exchanges), exchanges
    # Two OPTIONS: the cloud probe's at start-up (the health server is on) and the uploader's.
    assert faults.counts() == {"OPTIONS": 2, "POST": 1, "PATCH": math.ceil(upload.size / CHUNK)}
    assert sum(e.body_bytes for e in faults.exchanges("PATCH")) == upload.size
    assert all(e.checksum is None for e in exchanges)  # not advertised: not sent, not checked


def test_a_cloud_answering_500_for_a_while_fails_the_job_retryably_then_completes(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    series = small_study(tmp_path, seed=71)
    tus = tus_server()
    with (
        HttpFaults(LOOPBACK, tus.port) as faults,
        fault_agent(tmp_data_dir, faults.url_for("/files/"), max_bandwidth=SLOW) as agent,
    ):
        send_study(agent, series)
        wait_until(lambda: faults.count("PATCH") >= 2, WAIT, what="two chunks sent")
        faults.fail_all(500, body=b"the archive is restarting")
        job = wait_for_failure(agent, "HTTP 500", retryable=True)
        assert "the archive is restarting" in (job.last_error or "")
        assert job.next_attempt_at is not None and job.next_attempt_at > job.updated_at
        wait_for_failure(agent, "HTTP 500", retryable=True, after_attempt=job.attempts + 1)
        faults.clear()
        wait_for_sent(agent, tus)
        assert_delivered_once(agent, tus, series)
        events = failure_events(agent)
    injected = [e for e in faults.exchanges() if e.injected]
    assert len(injected) >= 2 and all(e.status == 500 for e in injected)
    assert len(events) >= 2 and all(level == "warning" for level, _ in events), events


def test_a_401_fails_the_job_for_good_shows_it_in_status_and_sends_nothing_more(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    series = small_study(tmp_path, seed=72)
    tus = tus_server()
    with (
        HttpFaults(LOOPBACK, tus.port) as faults,
        fault_agent(tmp_data_dir, faults.url_for("/files/"), max_bandwidth=SLOW) as agent,
    ):
        send_study(agent, series)
        wait_until(lambda: faults.count("PATCH") >= 2, WAIT, what="two chunks sent")
        faults.fail_all(401, body=b"token revoked")
        job = wait_for_failure(agent, "HTTP 401", retryable=False)
        assert job.next_attempt_at is None and "token revoked" in (job.last_error or "")
        status = agent.status()
        assert status["last_error"] is not None
        assert "HTTP 401" in status["last_error"]["message"]
        assert status["studies"]["sent"] == 0
        # Nothing is retried: not within several backoff periods.
        stays_flat(faults.count, seconds=3 * RETRY_MAX)
        assert upload_job(agent) == job
        # Nothing lost: every instance is packed in the bundle the agent keeps for a retry.
        states = agent.rows("SELECT state, count(*) FROM instances GROUP BY state")
        assert states == [("packed", len(series))]
        assert_instances_in(packed_bundle(agent), series)
    (upload,) = tus.uploads()  # the one upload, left incomplete; no other
    assert not upload.complete


def test_a_409_for_the_offset_the_server_reports_backs_off_instead_of_spinning(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    series = small_study(tmp_path, seed=75)
    tus = tus_server()
    with (
        HttpFaults(LOOPBACK, tus.port) as faults,
        fault_agent(tmp_data_dir, faults.url_for("/files/"), max_bandwidth=SLOW) as agent,
    ):
        send_study(agent, series)
        wait_until(lambda: faults.count("PATCH") >= 2, WAIT, what="two chunks sent")
        faults.fail_all(409, method="PATCH", body=b"offset mismatch")
        job = wait_for_failure(agent, "(409)", retryable=True)
        wait_for_failure(agent, "(409)", retryable=True, after_attempt=job.attempts + 1)
        faults.clear()
        wait_for_sent(agent, tus)
        assert_delivered_once(agent, tus, series)
        events = failure_events(agent)
    conflicts = [e for e in faults.exchanges("PATCH") if e.status == 409]
    # Each 409 ends an attempt (asked HEAD first, then waiting out a backoff), never a loop.
    assert 2 <= len(conflicts) == len(events), (conflicts, events)


def damaged_by_checksum_test(
    tmp_path: Path, tmp_data_dir: Path, tus: TusServer, fault: Callable[[HttpFaults], None]
) -> list[Exchange]:
    """Upload through a checksum-advertising injector, apply `fault` once two chunks went up;
    return the PATCH exchanges once the part is delivered (checked)."""
    series = small_study(tmp_path, seed=73)
    with (
        HttpFaults(LOOPBACK, tus.port, advertise_checksum=True) as faults,
        fault_agent(tmp_data_dir, faults.url_for("/files/"), max_bandwidth=SLOW) as agent,
    ):
        send_study(agent, series)
        wait_until(lambda: faults.count("PATCH") >= 2, WAIT, what="two chunks sent")
        fault(faults)
        wait_for_sent(agent, tus)
        upload = assert_delivered_once(agent, tus, series)
        events = failure_events(agent)
    patches = faults.exchanges("PATCH")
    refused = [e for e in patches if e.status == 460]
    assert len(refused) == 1, patches
    assert len(events) == 1 and "HTTP 460" in events[0][1], events
    assert upload.size is not None
    stored = [e for e in patches if e.status == 204]
    assert len(stored) == math.ceil(upload.size / CHUNK), "a chunk stored twice or not at all"
    assert all(e.checksum == "ok" for e in stored)
    return patches


def test_a_chunk_the_server_refuses_with_460_is_sent_again_and_every_chunk_has_a_checksum(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    def refuse_one(faults: HttpFaults) -> None:
        faults.fail_next(460, method="PATCH", body=b"checksum mismatch")

    patches = damaged_by_checksum_test(tmp_path, tmp_data_dir, tus_server(), refuse_one)
    assert all(e.checksum == "ok" for e in patches)  # correct sha256 on every PATCH


def test_a_chunk_damaged_in_transit_is_refused_by_its_checksum_and_never_stored(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory
) -> None:
    def damage_one(faults: HttpFaults) -> None:
        faults.damage_next("PATCH")

    patches = damaged_by_checksum_test(tmp_path, tmp_data_dir, tus_server(), damage_one)
    assert [e.checksum for e in patches].count("mismatch") == 1


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_a_429_retry_after_is_the_earliest_next_attempt(
    tmp_path: Path, tmp_data_dir: Path, tus_server: TusFactory, form: str
) -> None:
    delay = 3  # longer than any backoff after a first failure (at most retry_first)
    series = small_study(tmp_path, seed=74)
    tus = tus_server()
    with (
        HttpFaults(LOOPBACK, tus.port) as faults,
        fault_agent(
            tmp_data_dir, faults.url_for("/files/"), max_bandwidth=SLOW, retry_max="5s"
        ) as agent,
    ):
        send_study(agent, series)
        wait_until(lambda: faults.count("PATCH") >= 1, WAIT, what="a chunk sent")
        date = math.ceil(time.time()) + delay + 1
        value = str(delay) if form == "seconds" else email.utils.formatdate(date, usegmt=True)
        faults.fail_next(429, method="PATCH", body=b"slow down", headers={"Retry-After": value})
        job = wait_for_failure(agent, "HTTP 429", retryable=True, in_status=False)
        assert job.next_attempt_at is not None
        earliest = job.updated_at + delay if form == "seconds" else date
        assert job.next_attempt_at >= earliest - 0.01, (job, earliest)
        wait_for_sent(agent, tus)
        assert_delivered_once(agent, tus, series)
    exchanges = faults.exchanges()
    (limited,) = [e for e in exchanges if e.status == 429]
    assert limited.answered is not None
    retry = min(e.arrived for e in exchanges if e.arrived > limited.answered)
    assert retry >= earliest - 0.01, (retry, earliest)
