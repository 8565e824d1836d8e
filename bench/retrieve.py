"""Retrieve benchmark: a C-MOVE of a CT study through Dirigo, next to the archive's own C-MOVE.

Run from the repository root:

    python bench/retrieve.py                    # 500-slice CT, 3 interleaved rounds
    python bench/retrieve.py --repeat 5 --slices 100

The archive is one Orthanc (DICOMweb plugin, SyncStorageArea true, no compression) holding the
study, loaded once over its REST API (POST /instances). The destination of every row is one
DCMTK storescp (+xa: every transfer syntax), which writes each instance to a file without
fsync: the cheapest receiver there is, so that the figures are the senders'. The requester is
DCMTK movescu (TCP_NODELAY=1), Study Root, STUDY level, the study's UID, calling as BENCH,
moving to DEST. The time is the wall time of the movescu process: from the C-MOVE request to the
final response, which comes after the last C-STORE was acknowledged.

Rows, one of each per round, rounds interleaved (the order alternates: drift hits every row
alike), the median of `--repeat` rounds reported:

- orthanc: the archive itself is the C-MOVE SCP (SynchronousCMove, its default), reading the
  study from its own storage: the baseline.
- dirigo cold: `dirigo run` with a fresh data_dir, so an empty cache: each instance is listed
  by QIDO-RS, fetched by WADO-RS from the archive into the cache (fsynced), up to 4 ahead of the
  one being sent, then sent by C-STORE.
- dirigo warm: the same move again, to the same agent: every instance from its cache.

Completed and failed are movescu's final response's sub-operation counts; every run also checks
that the destination holds every instance of the study (then empties it) and, for Dirigo, how
many instances the agent fetched and took from its cache (its log). Peak RSS is the C-MOVE
SCP's (Orthanc's or Dirigo's) VmHWM over the move alone (reset just before it). CPU is user +
system time, every thread, over the move: the SCP's, and the archive's (which serves Dirigo's
QIDO-RS and WADO-RS requests; in the baseline it is the SCP). Every run is in
bench/results/retrieve.json, with tool versions and the load average at the start and the end.

Retrieve over a slow link (needs root, `ip` and `tc`):

    python bench/retrieve.py --link-mbit 20 --slices 120 --repeat 3

The archive sits behind a real slow link: the bench makes a network namespace whose loopback
shapes the archive's HTTP port with a token bucket in each direction (tests/support/netns.py), and
runs everything inside it: the archive, Dirigo, two local PACSes (DCMTK storescp: ANY takes every
syntax, PLAIN only uncompressed ones) and movescu. Rows, per round:

- raw bytes: the study's size * 8 / the link's rate, computed, not measured: what moving the bytes
  as held would take at best. Every other row is compared with it ("vs raw").
- http as held, http JPEG-LS: the whole study in one plain WADO-RS request (requests, no gzip),
  asked as held (`transfer-syntax=*`) and as JPEG-LS lossless: the link's real capacity, and
  what compression alone gains.
- dirigo to ANY, dirigo to PLAIN: a C-MOVE through a fresh Dirigo (empty cache, `fetch_syntax:
  auto`) to each PACS. "first" is the time from the C-MOVE request to the first file at the PACS
  (its directory polled every 5 ms; the table shows the slowest round's). Every received file's
  pixels are decoded and compared with
  the original's; a difference fails the bench. "syntax" says how the instances were fetched
  (from the agent's cache: the syntax of each file it holds).

"link MB" is what crossed the shaper during the row, both ways (its counters).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pydicom
import requests
from pydicom import uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the shared peer harness lives in tests/support

from agent.serve import codecs  # noqa: E402
from bench.subject import process_cpu_seconds  # noqa: E402
from tests.support import datasets, dcmtk, netns, orthanc  # noqa: E402
from tests.support.agent import Agent  # noqa: E402
from tests.support.net import LOOPBACK, free_port  # noqa: E402
from tests.support.netns import ShapedNamespace  # noqa: E402
from tests.support.process import reset_vm_hwm, stop_process, vm_hwm_bytes  # noqa: E402

RESULTS = REPO / "bench" / "results" / "retrieve.json"
DEFAULT_CACHE = REPO / ".cache" / "bench"
REQUESTER = "BENCH"
DESTINATION = "DEST"
SUCCESS = 0x0000
ROWS = ("orthanc", "dirigo cold", "dirigo warm")
MOVE_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Study:
    """The payload: one study's files, its UID and what the destination must receive."""

    uid: str
    files: list[Path]
    sop_instances: frozenset[str]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def ct_study(cache: Path, slices: int) -> Study:
    """Return the synthetic CT series of `slices` 512² slices, made once and kept in the cache."""
    files = datasets.ct_series(cache / f"ct{slices}", slices=slices)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    return Study(
        uid=str(headers[0].StudyInstanceUID),
        files=files,
        sop_instances=frozenset(str(h.SOPInstanceUID) for h in headers),
    )


def large_study(cache: Path, mib: int) -> Study:
    """Return a study of one multi-frame instance of about `mib` MiB (512² 16-bit frames), made
    once and kept in the cache: a tomosynthesis-sized instance."""
    path = cache / f"large{mib}" / "large.dcm"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.large_instance(path, mib * 2**20)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return Study(str(header.StudyInstanceUID), [path], frozenset({str(header.SOPInstanceUID)}))


# --- the peers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """The storescp every row moves the study to."""

    port: int
    out_dir: Path
    pid: int

    def take(self) -> set[str]:
        """Return the SOP Instance UIDs of the files received since the last call; remove
        the files."""
        found: set[str] = set()
        for path in self.out_dir.iterdir():
            header = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
            )
            found.add(str(header.SOPInstanceUID))
            path.unlink()
        return found


@contextlib.contextmanager
def destination(work_dir: Path) -> Iterator[Destination]:
    """Run DCMTK storescp, accepting every transfer syntax, writing into work_dir."""
    port = free_port()
    out_dir = work_dir / "received"
    proc = dcmtk.start_storescp(out_dir, port, DESTINATION)
    try:
        yield Destination(port, out_dir, proc.pid)
    finally:
        stop_process(proc)


def archive(dest: Destination) -> orthanc.Orthanc:
    """Return (not started) the archive: Orthanc with DICOMweb, knowing the destination and
    answering C-MOVE from any AE (the requester is not one of its modalities)."""
    return orthanc.Orthanc(
        aet="ARCHIVE",
        modalities={DESTINATION: [DESTINATION, LOOPBACK, dest.port]},
        extra_config={"DicomAlwaysAllowMove": True},
    )


def load(server: orthanc.Orthanc, study: Study) -> None:
    """Put the study into the archive directly, over its REST API."""
    for path in study.files:
        response = server.session.post(
            f"{server.http_url}/instances", data=path.read_bytes(), timeout=60
        )
        response.raise_for_status()
    if server.instance_count() != len(study.files):
        raise RuntimeError(f"the archive holds {server.instance_count()} instances")


def dirigo(data_dir: Path, server: orthanc.Orthanc, dest: Destination) -> Agent:
    """Return (not started) `dirigo run` serving the archive's DICOMweb, with an empty cache.
    Studies never turn stable (stable_after 1h): nothing else runs."""
    peers = (
        {"ae_title": REQUESTER, "host": LOOPBACK},
        {"ae_title": DESTINATION, "host": LOOPBACK, "port": dest.port},
    )
    extra = {"cloud": {"dicomweb_url": server.dicomweb_url}}
    return Agent(data_dir, peers=peers, probe_ae=REQUESTER, stable_after="1h", extra=extra)


# --- measuring ------------------------------------------------------------------------

_RETRIEVAL = re.compile(r"(?P<fetched>\d+) fetched, (?P<cached>\d+) from the cache")
_ORTHANC_PROBLEM = re.compile(r"^[EW]\d{4} ")
_DIRIGO_PROBLEM = re.compile(r" (ERROR|WARNING) ")
REASONS = 5  # log lines kept per run with failed sub-operations


@dataclass(frozen=True)
class Scp:
    """A C-MOVE SCP to measure: where to call it, its process, and how its log marks problems
    (the reasons of failed sub-operations are there, not in movescu's answer)."""

    port: int
    ae: str
    pid: int
    log_tail: Callable[[], str]
    problem: re.Pattern[str]

    def problems(self) -> list[str]:
        lines = self.log_tail().splitlines()
        return [line for line in lines if self.problem.search(line)][-REASONS:]


@dataclass(frozen=True)
class Run:
    """One C-MOVE of the study to the destination."""

    seconds: float
    completed: int
    failed: int
    peak_rss_bytes: int
    scp_cpu_seconds: float  # the C-MOVE SCP's, every thread, over the move
    archive_cpu_seconds: float  # Orthanc's over the move (the SCP's own in the baseline)
    fetched: int | None = None  # Dirigo only: by WADO-RS during this move
    from_cache: int | None = None
    problems: tuple[str, ...] = ()  # the SCP's log lines, when sub-operations failed


def move_study(
    port: int, called_ae: str, study: Study, destination: str
) -> subprocess.CompletedProcess[str]:
    """C-MOVE the whole study to `destination` with movescu, calling as the requester."""
    keys = [f"StudyInstanceUID={study.uid}"]
    return dcmtk.movescu(
        port, keys, destination, calling_ae=REQUESTER, called_ae=called_ae, timeout=MOVE_TIMEOUT
    )


def move_once(scp: Scp, archive_pid: int, study: Study, dest: Destination) -> Run:
    """C-MOVE the study from `scp` to the destination with movescu; return the measurement,
    failed sub-operations included (with what the SCP logged about them). Raise RuntimeError if
    movescu got no final response, or the destination's files do not match the counts."""
    os.sync()  # the previous run's writeback is not this one's
    reset_vm_hwm(scp.pid)
    scp_cpu, archive_cpu = process_cpu_seconds(scp.pid), process_cpu_seconds(archive_pid)
    started = time.perf_counter()
    result = move_study(scp.port, scp.ae, study, DESTINATION)
    seconds = time.perf_counter() - started
    peak = vm_hwm_bytes(scp.pid)
    scp_cpu = process_cpu_seconds(scp.pid) - scp_cpu
    archive_cpu = process_cpu_seconds(archive_pid) - archive_cpu
    counts = dcmtk.sub_operations(result)
    status = dcmtk.final_status(result)
    received = dest.take()
    completed, failed = counts.get("Completed", 0), counts.get("Failed", 0)
    complete = status == SUCCESS and completed == len(study.files)
    if (
        status is None
        or not received <= study.sop_instances
        or len(received) < completed
        or (complete and received != study.sop_instances)
    ):
        detail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise RuntimeError(
            f"movescu: final status {status}, {completed} completed, {failed} failed, "
            f"{len(received)} received:\n{detail}"
        )
    problems = () if complete else (f"final status 0x{status:04X}", *scp.problems())
    return Run(
        round(seconds, 3),
        completed,
        failed,
        peak,
        round(scp_cpu, 2),
        round(archive_cpu, 2),
        problems=problems,
    )


def baseline_move(server: orthanc.Orthanc, study: Study, dest: Destination) -> Run:
    """Move the study with the archive itself as the C-MOVE SCP."""
    scp = Scp(server.dicom_port, server.aet, server.pid, server.log_tail, _ORTHANC_PROBLEM)
    return move_once(scp, server.pid, study, dest)


def dirigo_move(
    agent: Agent, server: orthanc.Orthanc, study: Study, dest: Destination, expect_fetched: int
) -> Run:
    """Move the study through the agent; if every instance was sent, check from its log that it
    fetched `expect_fetched` instances and took the rest from its cache."""
    scp = Scp(agent.port, agent.ae_title, agent.pid, agent.log_tail, _DIRIGO_PROBLEM)
    run = move_once(scp, server.pid, study, dest)
    found = list(_RETRIEVAL.finditer(agent.log_tail(4000)))
    if not found:
        raise RuntimeError(f"no retrieval summary in the agent's log:\n{agent.log_tail()}")
    fetched, cached = int(found[-1]["fetched"]), int(found[-1]["cached"])
    expected = (expect_fetched, len(study.files) - expect_fetched)
    if not run.problems and (fetched, cached) != expected:
        raise RuntimeError(f"the agent fetched {fetched} and took {cached} from its cache")
    return Run(**{**asdict(run), "fetched": fetched, "from_cache": cached})


def dirigo_round(
    server: orthanc.Orthanc, study: Study, dest: Destination, scratch: Path
) -> tuple[Run, Run]:
    """Start a fresh agent (empty cache), move the study twice: cold, then warm."""
    work_dir = Path(tempfile.mkdtemp(prefix="retrieve-", dir=scratch))
    try:
        with dirigo(work_dir / "data", server, dest) as agent:
            cold = dirigo_move(agent, server, study, dest, expect_fetched=len(study.files))
            warm = dirigo_move(agent, server, study, dest, expect_fetched=0)
        return cold, warm
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def measure(study: Study, repeat: int, scratch: Path) -> dict[str, list[Run]]:
    """Run `repeat` rounds of the three rows, alternating Orthanc first and Dirigo first."""
    runs: dict[str, list[Run]] = {name: [] for name in ROWS}
    with contextlib.ExitStack() as stack:
        dest = stack.enter_context(destination(scratch))
        server = stack.enter_context(archive(dest))
        load(server, study)
        for index in range(repeat):
            baseline_first = index % 2 == 0
            if baseline_first:
                runs["orthanc"].append(baseline_move(server, study, dest))
            cold, warm = dirigo_round(server, study, dest, scratch)
            runs["dirigo cold"].append(cold)
            runs["dirigo warm"].append(warm)
            if not baseline_first:
                runs["orthanc"].append(baseline_move(server, study, dest))
            print(f"# round {index + 1}/{repeat} done", file=sys.stderr, flush=True)
    return runs


@dataclass(frozen=True)
class Row:
    """The median of several runs of one row."""

    what: str
    instances: int
    payload_bytes: int
    seconds: float
    instances_per_s: float
    mb_per_s: float
    completed: int
    failed: int
    peak_rss_mb: float
    scp_cpu_s: float
    archive_cpu_s: float
    spread_pct: float  # (slowest - fastest) / median run time
    runs: list[Run]


def summarise(what: str, study: Study, runs: list[Run]) -> Row:
    times = [r.seconds for r in runs]
    seconds = statistics.median(times)
    return Row(
        what=what,
        instances=len(study.files),
        payload_bytes=study.size,
        seconds=round(seconds, 3),
        instances_per_s=round(len(study.files) / seconds, 1),
        mb_per_s=round(study.size / 1e6 / seconds, 1),
        completed=min(r.completed for r in runs),
        failed=max(r.failed for r in runs),
        peak_rss_mb=round(statistics.median(r.peak_rss_bytes for r in runs) / 1e6, 1),
        scp_cpu_s=round(statistics.median(r.scp_cpu_seconds for r in runs), 2),
        archive_cpu_s=round(statistics.median(r.archive_cpu_seconds for r in runs), 2),
        spread_pct=round(100 * (max(times) - min(times)) / seconds),
        runs=runs,
    )


# --- over a slow link ----------------------------------------------------------------

LINK_ROWS = ("http as held", "http JPEG-LS", "dirigo to ANY", "dirigo to PLAIN")
POLL = 0.005
"""How often a PACS's directory is looked at for its first file (seconds)."""
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax={}'


@dataclass(frozen=True)
class LinkRun:
    """One row's run over the shaped link."""

    seconds: float
    link_bytes: int  # what crossed the shaper, both ways
    first_seconds: float | None = None  # C-MOVE request to the first file at the PACS
    completed: int | None = None
    failed: int | None = None
    identical: int | None = None  # instances received with the original's pixels
    fetched_as: tuple[tuple[str, int], ...] = ()  # syntax name, instances the agent fetched so
    problems: tuple[str, ...] = ()


def link_bytes(link: ShapedNamespace) -> int:
    return sum(link.counters().values())


def wado_study(
    server: orthanc.Orthanc, study: Study, syntax: str, link: ShapedNamespace
) -> LinkRun:
    """Fetch the whole study in one WADO-RS request, as `syntax`, discarding the answer."""
    before = link_bytes(link)
    started = time.perf_counter()
    with requests.get(
        f"{server.dicomweb_url}/studies/{study.uid}",
        headers={"Accept": WADO_ACCEPT.format(syntax), "Accept-Encoding": "identity"},
        stream=True,
        timeout=MOVE_TIMEOUT,
    ) as response:
        response.raise_for_status()
        for _ in response.iter_content(1 << 16):
            pass
    return LinkRun(round(time.perf_counter() - started, 3), link_bytes(link) - before)


class FirstArrival:
    """Watches a PACS's directory from `start` on, in a thread of its own, for its first file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> FirstArrival:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if any(self.directory.iterdir()):
                self.at = time.perf_counter()
                return
            self._stop.wait(POLL)


def identical_pixels(received: Path, study: Study) -> tuple[int, list[str]]:
    """Return how many received files hold their original's very pixels, and what differs."""
    codecs.register()
    originals = {}
    for path in study.files:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        originals[str(header.SOPInstanceUID)] = path
    same, problems = 0, []
    for path in sorted(received.iterdir()):
        got = pydicom.dcmread(path)
        original = originals.get(str(got.SOPInstanceUID))
        if original is None:
            problems.append(f"{path.name}: not an instance of the study")
        elif np.array_equal(got.pixel_array, pydicom.dcmread(original).pixel_array):
            same += 1
        else:
            problems.append(f"{path.name}: pixels differ ({got.file_meta.TransferSyntaxUID.name})")
    return same, problems


def fetched_as(data_dir: Path) -> tuple[tuple[str, int], ...]:
    """Return how many instances the agent's cache holds in each syntax."""
    found: dict[str, int] = {}
    for path in (data_dir / "cache").glob("??/*.dcm"):
        name = pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID.name
        found[name] = found.get(name, 0) + 1
    return tuple(sorted(found.items(), key=lambda item: -item[1]))


def dirigo_over_link(
    server: orthanc.Orthanc,
    study: Study,
    pacs: Destination,
    ae: str,
    peers: tuple[dict[str, object], ...],
    link: ShapedNamespace,
    scratch: Path,
) -> LinkRun:
    """C-MOVE the study through a fresh Dirigo (empty cache) to the PACS `ae`; check every
    instance arrived with its original's pixels, then empty the PACS."""
    work_dir = Path(tempfile.mkdtemp(prefix="link-", dir=scratch))
    try:
        extra = {"cloud": {"dicomweb_url": server.dicomweb_url}}
        agent = Agent(work_dir / "data", peers=peers, probe_ae=REQUESTER, extra=extra)
        with agent:
            os.sync()
            before = link_bytes(link)
            started = time.perf_counter()
            with FirstArrival(pacs.out_dir) as first:
                result = move_study(agent.port, agent.ae_title, study, ae)
                seconds = time.perf_counter() - started
            crossed = link_bytes(link) - before
            log = agent.log_tail()
        counts = dcmtk.sub_operations(result)
        same, problems = identical_pixels(pacs.out_dir, study)
        for path in pacs.out_dir.iterdir():
            path.unlink()
        completed = counts.get("Completed", 0)
        if dcmtk.final_status(result) != SUCCESS or completed != len(study.files):
            problems.append(f"final status {dcmtk.final_status(result)}")
            problems += [line for line in log.splitlines() if _DIRIGO_PROBLEM.search(line)][
                -REASONS:
            ]
        return LinkRun(
            round(seconds, 3),
            crossed,
            first_seconds=None if first.at is None else round(first.at - started, 3),
            completed=completed,
            failed=counts.get("Failed", 0),
            identical=same,
            fetched_as=fetched_as(work_dir / "data"),
            problems=tuple(problems),
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def measure_link(study: Study, repeat: int, mbit: float, scratch: Path) -> dict[str, list[LinkRun]]:
    """Run `repeat` rounds of the link rows inside a fresh shaped namespace, the order of the
    rows turned by one each round."""
    runs: dict[str, list[LinkRun]] = {name: [] for name in LINK_ROWS}
    with ShapedNamespace() as link, link.inside(), contextlib.ExitStack() as stack:
        pacses = {}
        for ae, extra_args in (("ANY", ("+xa",)), ("PLAIN", ())):
            port = free_port()
            proc = dcmtk.start_storescp(scratch / ae, port, ae, extra_args=extra_args)
            stack.callback(stop_process, proc)
            pacses[ae] = Destination(port, scratch / ae, proc.pid)
        server = stack.enter_context(orthanc.Orthanc(aet="ARCHIVE"))
        load(server, study)  # over the namespace's fast loopback: the link is shaped after
        link.shape(server.http_port, mbit)
        peers = (
            {"ae_title": REQUESTER, "host": LOOPBACK},
            *({"ae_title": ae, "host": LOOPBACK, "port": d.port} for ae, d in pacses.items()),
        )
        rows: dict[str, Callable[[], LinkRun]] = {
            "http as held": lambda: wado_study(server, study, "*", link),
            "http JPEG-LS": lambda: wado_study(server, study, uid.JPEGLSLossless, link),
            "dirigo to ANY": lambda: dirigo_over_link(
                server, study, pacses["ANY"], "ANY", peers, link, scratch
            ),
            "dirigo to PLAIN": lambda: dirigo_over_link(
                server, study, pacses["PLAIN"], "PLAIN", peers, link, scratch
            ),
        }
        for index in range(repeat):
            turn = index % len(LINK_ROWS)
            for name in LINK_ROWS[turn:] + LINK_ROWS[:turn]:
                runs[name].append(rows[name]())
            print(f"# round {index + 1}/{repeat} done", file=sys.stderr, flush=True)
    return runs


LINK_HEADER = (
    f"{'over the link':<16} {'s':>7} {'vs raw':>7} {'link MB':>8} {'first s':>7} "
    f"{'done':>5} {'failed':>6} {'same px':>7} {'spread':>6}  fetched as"
)


def link_report(
    study: Study, mbit: float, runs: dict[str, list[LinkRun]]
) -> list[dict[str, object]]:
    """Print the link rows (medians) and return them for the JSON."""
    raw = study.size * 8 / (mbit * 1e6)
    print(LINK_HEADER)
    print(f"{'raw bytes':<16} {raw:>7.3f} {1:>6.2f}x {study.size / 1e6:>8.1f}")
    rows: list[dict[str, object]] = [{"what": "raw bytes", "seconds": round(raw, 3)}]
    for name, row_runs in runs.items():
        times = [r.seconds for r in row_runs]
        seconds = statistics.median(times)
        moved = statistics.median(r.link_bytes for r in row_runs)
        firsts = [r.first_seconds for r in row_runs if r.first_seconds is not None]
        dirigo = row_runs[0].completed is not None
        first = f"{max(firsts):>7.3f}" if firsts else f"{'-':>7}"
        done = f"{min(r.completed or 0 for r in row_runs):>5}" if dirigo else f"{'-':>5}"
        failed = f"{max(r.failed or 0 for r in row_runs):>6}" if dirigo else f"{'-':>6}"
        same = f"{min(r.identical or 0 for r in row_runs):>7}" if dirigo else f"{'-':>7}"
        syntax = ", ".join(f"{n} {c}" for n, c in row_runs[-1].fetched_as)
        print(
            f"{name:<16} {seconds:>7.3f} {raw / seconds:>6.2f}x {moved / 1e6:>8.1f} {first} "
            f"{done} {failed} {same} {100 * (max(times) - min(times)) / seconds:>5.0f}%  {syntax}"
        )
        rows.append(
            {"what": name, "seconds": round(seconds, 3), "runs": [asdict(r) for r in row_runs]}
        )
    for name, row_runs in runs.items():
        for number, run in enumerate(row_runs, 1):
            if run.problems:
                print(f"# {name}, run {number}: " + "; ".join(run.problems))
    return rows


def link_main(args: argparse.Namespace, study: Study, env: dict[str, object]) -> int:
    """The bench over a slow link (`--link-mbit`): print the table, write the JSON."""
    reason = netns.available()
    if reason is not None:
        print(f"cannot make the slow link: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="scratch-", dir=args.cache) as scratch:
        runs = measure_link(study, args.repeat, args.link_mbit, Path(scratch))
    env["load_average_at_end"] = load_average()
    rows = link_report(study, args.link_mbit, runs)
    print(f"# load at the end {env['load_average_at_end']}")
    failed = [name for name, row_runs in runs.items() for run in row_runs if run.problems]
    output = args.output if args.output != RESULTS else RESULTS.with_name("retrieve-link.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "environment": env,
        "repeat": args.repeat,
        "slices": args.slices,
        "payload_bytes": study.size,
        "link_mbit": args.link_mbit,
        "rows": rows,
    }
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"# written to {output}")
    if failed:
        print(f"\nFAILED: problems in {', '.join(sorted(set(failed)))}", file=sys.stderr)
        return 1
    return 0


# --- report ---------------------------------------------------------------------------

HEADER = (
    f"{'C-MOVE SCP':<12} {'inst':>5} {'MB':>7} {'s':>7} {'inst/s':>7} {'MB/s':>6} "
    f"{'vs orthanc':>10} {'done':>5} {'failed':>6} {'peak RSS MB':>11} {'SCP CPU s':>9} "
    f"{'archive CPU s':>13} {'spread':>6}"
)


def format_row(row: Row, baseline: Row) -> str:
    # in the baseline the archive is the SCP: its CPU is already in the SCP's column
    archive = "-" if row is baseline else f"{row.archive_cpu_s:.2f}"
    return (
        f"{row.what:<12} {row.instances:>5} {row.payload_bytes / 1e6:>7.1f} "
        f"{row.seconds:>7.3f} {row.instances_per_s:>7.1f} {row.mb_per_s:>6.1f} "
        f"{row.seconds / baseline.seconds:>9.2f}x {row.completed:>5} {row.failed:>6} "
        f"{row.peak_rss_mb:>11.1f} {row.scp_cpu_s:>9.2f} {archive:>13} {row.spread_pct:>5.0f}%"
    )


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pynetdicom": package_version("pynetdicom"),
        "pydicom": package_version("pydicom"),
        "dcmtk": dcmtk.version(),
        "orthanc": orthanc.version(),
        "load_average_at_start": load_average(),
        "requester": "DCMTK movescu -S, STUDY level, TCP_NODELAY=1; wall time of the process",
        "destination": "DCMTK storescp +xa, files, no fsync",
        "archive": "Orthanc with DICOMweb, SyncStorageArea true, no compression",
        "mb": "10^6 bytes",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Rows: orthanc (the archive's own C-MOVE), dirigo cold (empty cache: every "
        "instance fetched by WADO-RS first), dirigo warm (the same move again, from the cache).",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="interleaved rounds of all rows (median; default 3)"
    )
    parser.add_argument(
        "--slices", type=int, default=500, help="slices of the 512² CT study (default 500)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the generated CT series is kept between runs (default .cache/bench)",
    )
    parser.add_argument(
        "--large-mib",
        type=int,
        default=None,
        help="move one multi-frame instance of this many MiB instead of the CT (memory flat with"
        " instance size: 1100 is a tomosynthesis instance)",
    )
    parser.add_argument(
        "--link-mbit",
        type=float,
        default=None,
        help="run the slow-link rows instead: the archive behind a link of this many Mbit/s "
        "each way (needs root; JSON in bench/results/retrieve-link.json)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)

    args.cache.mkdir(parents=True, exist_ok=True)
    if args.large_mib is not None:
        study, what = large_study(args.cache, args.large_mib), f"one {args.large_mib} MiB instance"
    else:
        study, what = ct_study(args.cache, args.slices), f"CT {args.slices} slices"
    env = environment()
    print(
        f"# {env['dcmtk']}, {env['orthanc']}, {env['cpus']} CPUs, "
        f"load {env['load_average_at_start']}; {what}, "
        f"{study.size / 1e6:.1f} MB; median of {args.repeat} rounds"
        + ("" if args.link_mbit is None else f"; archive behind {args.link_mbit:g} Mbit/s"),
        flush=True,
    )
    if args.link_mbit is not None:
        return link_main(args, study, env)
    failure: str | None = None
    rows: list[Row] = []
    # Scratch space beside the payload cache: same disk, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="scratch-", dir=args.cache) as scratch:
        try:
            runs = measure(study, args.repeat, Path(scratch))
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
        else:
            rows = [summarise(name, study, runs[name]) for name in ROWS]
    env["load_average_at_end"] = load_average()
    if rows:
        print(HEADER)
        for row in rows:
            print(format_row(row, rows[0]))
        for row in rows:
            for number, run in enumerate(row.runs, 1):
                if run.problems:
                    print(
                        f"# {row.what}, run {number}: {run.failed} failed; "
                        + "; ".join(run.problems)
                    )
    print(f"# load at the end {env['load_average_at_end']}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "environment": env,
                "repeat": args.repeat,
                "slices": args.slices,
                "large_mib": args.large_mib,
                "rows": [asdict(r) for r in rows],
                "failure": failure,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"# written to {args.output}")
    if failure is not None:
        print(f"\nFAILED {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
