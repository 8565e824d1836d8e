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
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the shared peer harness lives in tests/support

from bench.subject import process_cpu_seconds  # noqa: E402
from tests.support import datasets, dcmtk, orthanc  # noqa: E402
from tests.support.agent import Agent  # noqa: E402
from tests.support.net import LOOPBACK, free_port  # noqa: E402
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


def move_once(scp: Scp, archive_pid: int, study: Study, dest: Destination) -> Run:
    """C-MOVE the study from `scp` to the destination with movescu; return the measurement,
    failed sub-operations included (with what the SCP logged about them). Raise RuntimeError if
    movescu got no final response, or the destination's files do not match the counts."""
    os.sync()  # the previous run's writeback is not this one's
    reset_vm_hwm(scp.pid)
    scp_cpu, archive_cpu = process_cpu_seconds(scp.pid), process_cpu_seconds(archive_pid)
    started = time.perf_counter()
    result = dcmtk.movescu(
        scp.port,
        [f"StudyInstanceUID={study.uid}"],
        DESTINATION,
        calling_ae=REQUESTER,
        called_ae=scp.ae,
        timeout=MOVE_TIMEOUT,
    )
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
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)

    args.cache.mkdir(parents=True, exist_ok=True)
    study = ct_study(args.cache, args.slices)
    env = environment()
    print(
        f"# {env['dcmtk']}, {env['orthanc']}, {env['cpus']} CPUs, "
        f"load {env['load_average_at_start']}; CT {args.slices} slices, "
        f"{study.size / 1e6:.1f} MB; median of {args.repeat} rounds",
        flush=True,
    )
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
