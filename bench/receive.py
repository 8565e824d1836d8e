"""Receive benchmark: storescu → a DICOM receiver, on loopback.

Run from the repository root:

    python bench/receive.py                 # CT series + real images, 3 runs each
    python bench/receive.py --large         # also one 600 MB instance
    python bench/receive.py --repeat 5 --receivers storescp orthanc
    python bench/receive.py --associations 1 4   # also 4 storescu at once, files dealt out

For each payload and receiver, a fresh receiver is started in a fresh
temporary directory (on the same disk as the payload), DCMTK's storescu (with
TCP_NODELAY=1) sends the whole payload in one association (or, with
`--associations N`, N storescu processes at once, the files dealt out among
them round-robin, as a PACS with several send queues does), and we record the
wall time of the storescu run (of the slowest, with several), instances/s,
MB/s (payload file bytes, 10^6, over that wall time) and the receiver's peak
resident memory (VmHWM at the end of the run). The median of `--repeat` runs
is reported; every run is in bench/results/receive.json.

Receivers: DCMTK storescp (default options: the dataset is held in memory,
then written), storescp +B (bit-preserving: streamed to disk as it arrives),
Orthanc (SyncStorageArea true, no compression) and Dirigo itself
(`python -m agent run --config FILE`). Only Orthanc and Dirigo fsync.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the shared peer harness lives in tests/support

from tests.support import datasets, dcmtk, orthanc  # noqa: E402
from tests.support.agent import Agent  # noqa: E402
from tests.support.net import LOOPBACK, free_port  # noqa: E402
from tests.support.process import stop_process, vm_hwm_bytes  # noqa: E402

CALLING_AE = "BENCH"
RESULTS = REPO / "bench" / "results" / "receive.json"
DEFAULT_CACHE = REPO / ".cache" / "bench"
REAL_IMAGES = 8  # the largest distinct uncompressed pydicom-data instances
LARGE_BYTES = 600_000_000


@dataclass(frozen=True)
class Payload:
    """What one storescu run sends."""

    name: str
    files: list[Path]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)


@dataclass(frozen=True)
class Receiver:
    """A running receiver: where to send, and which process to measure."""

    port: int
    ae: str
    pid: int


# A receiver spec: given an empty work directory, run a receiver for the
# duration of a `with` block. Add a receiver by writing one of these.
ReceiverSpec = Callable[[Path], AbstractContextManager[Receiver]]


@contextlib.contextmanager
def storescp_receiver(work_dir: Path, extra_args: tuple[str, ...] = ()) -> Iterator[Receiver]:
    """Run DCMTK storescp writing into work_dir."""
    port = free_port()
    proc = dcmtk.start_storescp(work_dir / "received", port, "STORESCP", extra_args)
    try:
        yield Receiver(port, "STORESCP", proc.pid)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def storescp_bit_preserving_receiver(work_dir: Path) -> Iterator[Receiver]:
    """Run DCMTK storescp +B: each dataset streamed to its file as it arrives."""
    with storescp_receiver(work_dir, ("+B",)) as receiver:
        yield receiver


@contextlib.contextmanager
def orthanc_receiver(work_dir: Path) -> Iterator[Receiver]:
    """Run Orthanc (its own temporary directory; SyncStorageArea true)."""
    del work_dir  # Orthanc makes and removes its own
    with orthanc.Orthanc(aet="ORTHANC", dicomweb=False) as server:
        yield Receiver(server.dicom_port, server.aet, server.pid)


# --- Dirigo ---------------------------------------------------------------------------
# `dirigo run` as the tests start it, ready when it answers a C-ECHO from BENCH. Studies
# never turn stable during a run (stable_after 1h), so only receiving is measured.


@contextlib.contextmanager
def dirigo_receiver(work_dir: Path) -> Iterator[Receiver]:
    """Run `python -m agent run` with a bench configuration in work_dir."""
    data_dir = work_dir / "data"
    data_dir.mkdir()
    peer = {"ae_title": CALLING_AE, "host": LOOPBACK}
    with Agent(data_dir, peers=(peer,), probe_ae=CALLING_AE, stable_after="1h") as agent:
        yield Receiver(agent.port, agent.ae_title, agent.pid)


RECEIVERS: dict[str, ReceiverSpec] = {
    "storescp": storescp_receiver,
    "storescp+B": storescp_bit_preserving_receiver,
    "orthanc": orthanc_receiver,
    "dirigo": dirigo_receiver,
}


# --- measuring ------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One storescu run into one fresh receiver."""

    seconds: float
    acknowledged: int
    peak_rss_bytes: int


def measure_once(spec: ReceiverSpec, payload: Payload, scratch: Path, associations: int = 1) -> Run:
    """Start a receiver from `spec`, send `payload` with `associations` storescu processes at
    once (the files dealt out round-robin), return the measurement.

    Raise RuntimeError if a storescu fails or any instance is not acknowledged.
    """
    work_dir = Path(tempfile.mkdtemp(prefix="receive-", dir=scratch))
    shares = [payload.files[i::associations] for i in range(associations)]
    try:
        with spec(work_dir) as receiver, ThreadPoolExecutor(associations) as senders:

            def send(files: list[Path]) -> subprocess.CompletedProcess[str]:
                return dcmtk.storescu(files, receiver.port, CALLING_AE, receiver.ae, timeout=1800)

            started = time.perf_counter()
            results = list(senders.map(send, shares))
            seconds = time.perf_counter() - started
            peak = vm_hwm_bytes(receiver.pid)
        acked = sum(len(dcmtk.acknowledged(result)) for result in results)
        failed = [result for result in results if result.returncode != 0]
        if failed or acked != len(payload.files):
            result = failed[0] if failed else results[0]
            detail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
            raise RuntimeError(
                f"storescu: exit {result.returncode}, {acked}/{len(payload.files)} "
                f"acknowledged:\n{detail}"
            )
        return Run(seconds, acked, peak)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


@dataclass(frozen=True)
class Row:
    """The median of several runs of one payload into one receiver."""

    payload: str
    receiver: str
    associations: int
    instances: int
    payload_bytes: int
    seconds: float
    instances_per_s: float
    mb_per_s: float
    peak_rss_mb: float
    spread_pct: float  # (slowest - fastest) / median run time
    runs: list[Run]


def measure(
    name: str,
    spec: ReceiverSpec,
    payload: Payload,
    repeat: int,
    scratch: Path,
    associations: int = 1,
) -> Row:
    runs = [measure_once(spec, payload, scratch, associations) for _ in range(repeat)]
    times = [r.seconds for r in runs]
    seconds = statistics.median(times)
    size = payload.size
    return Row(
        payload=payload.name,
        receiver=name,
        associations=associations,
        instances=len(payload.files),
        payload_bytes=size,
        seconds=round(seconds, 3),
        instances_per_s=round(len(payload.files) / seconds, 1),
        mb_per_s=round(size / 1e6 / seconds, 1),
        peak_rss_mb=round(statistics.median(r.peak_rss_bytes for r in runs) / 1e6, 1),
        spread_pct=round(100 * (max(times) - min(times)) / seconds),
        runs=runs,
    )


# --- payloads -------------------------------------------------------------------------


def payloads(cache: Path, large: bool, slices: int = 500) -> list[Payload]:
    """Return the payloads: the CT of `slices` slices, the largest real images, optionally
    600 MB."""
    real = datasets.distinct_instances(datasets.uncompressed_files())
    largest = sorted(real, key=lambda p: p.stat().st_size, reverse=True)[:REAL_IMAGES]
    found = [
        Payload(f"ct-{slices}-slices", datasets.ct_series(cache / f"ct{slices}", slices=slices)),
        Payload(f"real-{len(largest)}-largest", largest),
    ]
    if large:
        path = cache / "large" / "large-600MB.dcm"
        if not path.exists():
            datasets.large_instance(path, LARGE_BYTES)
        found.append(Payload("one-600MB-instance", [path]))
    return found


# --- report ---------------------------------------------------------------------------

HEADER = (
    f"{'payload':<22} {'receiver':<11} {'assoc':>5} {'inst':>5} {'MB':>7} {'s':>7} "
    f"{'inst/s':>8} {'MB/s':>7} {'peak RSS MB':>11} {'spread':>6}"
)


def format_row(row: Row) -> str:
    return (
        f"{row.payload:<22} {row.receiver:<11} {row.associations:>5} {row.instances:>5} "
        f"{row.payload_bytes / 1e6:>7.1f} {row.seconds:>7.3f} {row.instances_per_s:>8.1f} "
        f"{row.mb_per_s:>7.1f} {row.peak_rss_mb:>11.1f} {row.spread_pct:>5.0f}%"
    )


def environment() -> dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "dcmtk": dcmtk.version(),
        "orthanc": orthanc.version(),
        "sender": "DCMTK storescu -R, TCP_NODELAY=1; `associations` storescu at once per payload",
        "mb": "10^6 bytes",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--large", action="store_true", help="also send one 600 MB instance")
    parser.add_argument(
        "--slices", type=int, default=500, help="slices of the 512² CT payload (default 500)"
    )
    parser.add_argument(
        "--receivers",
        nargs="+",
        choices=sorted(RECEIVERS),
        default=["storescp", "storescp+B", "orthanc", "dirigo"],
    )
    parser.add_argument(
        "--associations",
        nargs="+",
        type=int,
        default=[1],
        metavar="N",
        help="measure each payload with N storescu at once, for each N given (default 1)",
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="where generated payloads are kept"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    args.cache.mkdir(parents=True, exist_ok=True)
    loads = payloads(args.cache, args.large, args.slices)
    env = environment()
    print(
        f"# {env['dcmtk']}, {env['orthanc']}, {env['cpus']} CPUs, "
        f"load {env['load_average_at_start']}; median of {args.repeat} runs"
    )
    print(HEADER)
    rows: list[Row] = []
    failures: list[str] = []
    # Scratch space beside the payload cache: same disk, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="scratch-", dir=args.cache) as scratch:
        for payload, associations, name in (
            (payload, n, name)
            for payload in loads
            for n in args.associations
            if n <= len(payload.files)
            for name in args.receivers
        ):
            try:
                row = measure(
                    name, RECEIVERS[name], payload, args.repeat, Path(scratch), associations
                )
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                failures.append(f"{payload.name} in {associations} → {name}: {exc}")
                print(f"{payload.name:<22} {name:<11} {associations:>5} FAILED", flush=True)
                continue
            rows.append(row)
            print(format_row(row), flush=True)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "environment": env,
                "repeat": args.repeat,
                "rows": [asdict(r) for r in rows],
                "failures": failures,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"# written to {args.output}")
    for failure in failures:
        print(f"\nFAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
