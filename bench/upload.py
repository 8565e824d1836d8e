"""Upload benchmark: tus over loopback, packing, and a study's way from C-STORE to the cloud.

Run from the repository root:

    python bench/upload.py                      # everything, 3 runs each (about 8 minutes)
    python bench/upload.py --repeat 1           # about 5 minutes
    python bench/upload.py --size 500MB --skip-e2e
    python bench/upload.py --sections upload pack
    python bench/upload.py --sections auto      # as root (a network namespace); ~10 minutes

Sections, measured in one run and printed as one table:

- upload: one file of `--size` deterministic random bytes (default 1 GB; as incompressible as
  a zstd bundle; made once and kept in the cache) sent to a fresh @tus/server (devcloud/tus) on
  loopback by (a) one `curl` PATCH of the whole file after a POST creating the upload: the
  server's ceiling; (b) Dirigo's TusClient in 8 MiB and in 32 MiB chunks, create then PATCH
  loop (each PATCH a byte range of the file) as agent/upload.py sends a bundle (without the
  store's bookkeeping); (c) tuspy in 8 MiB chunks, when it is installed (`pip install
  tuspy`). MB/s is the data phase (first PATCH to last answer); CPU s/GB is the client's own
  process CPU time over that phase; the server's CPU per GB is in the note and the JSON.
  Every upload is checked complete and its sha256 compared.
- pack: agent.pack.pack() of a spooled part (copies adopted into a Spool, described as the
  store describes them) for compression none, zstd levels 1, 3, 9, 19 (threads 0: one per CPU)
  and lossless transcoding (jpeg-ls, htj2k) before zstd-3, on the 500-slice CT series and on
  the real uncompressed images of pydicom-data. MB/s is input bytes over the pack's wall time
  (which includes the bundle's fsync, as in the agent); CPU s/GB counts every thread and the
  transcoding workers. zstd-19 runs once whatever --repeat (minutes per run). "libzstd alone"
  rows compress the same files, already in memory, in one call: the compression's own cost.
- memory: the packing process's peak RSS (VmHWM) for a 100-slice and a 500-slice CT and a
  study of one 600 MB instance, zstd level 3.
- e2e: `dirigo run` (stable_after 1s, chunk_size 8MiB, no DICOMweb, so `sent` is the final
  state) receives the 500-slice CT, then (a fresh agent) the 600 MB instance, from storescu;
  seconds from storescu's return (the last C-STORE acknowledged) to the part's `sent` time as
  the agent recorded it, confirmed with `dirigo status --json` (studies.sent == 1). The note
  splits it into its phases; peak RSS is the agent's.
- auto: the same way to `sent` for the 500-slice CT with `upload.transcode` none, jpeg-ls,
  htj2k and auto, each on a fresh agent and tus server, on loopback and behind a `--mbit`
  (20) Mbit/s link: a network namespace (tests/support/netns.py) holding the tus server, the
  agent and storescu, the tus port shaped each way. Needs root. The note of each auto row says
  what auto chose; a last row per link gives the best fixed choice and auto's time over it.

Each measurement runs in a child process of its own (bench/subject.py, or curl), so that its
CPU time and peak memory are its own. The median of `--repeat` runs is reported (runs are
interleaved across the compared choices); every run is in bench/results/upload.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the shared peer harness lives in tests/support

from agent.instance import inspect  # noqa: E402
from agent.spool import Spool  # noqa: E402
from agent.store.uploads import PartFile  # noqa: E402
from bench.subject import process_cpu_seconds, run_child  # noqa: E402
from tests.support import datasets, dcmtk  # noqa: E402
from tests.support.agent import Agent  # noqa: E402
from tests.support.net import LOOPBACK, wait_until  # noqa: E402
from tests.support.netns import ShapedNamespace  # noqa: E402
from tests.support.process import vm_hwm_bytes  # noqa: E402
from tests.support.tus import SERVER_DIR, TusServer  # noqa: E402

SUBJECT = REPO / "bench" / "subject.py"
RESULTS = REPO / "bench" / "results" / "upload.json"
DEFAULT_CACHE = REPO / ".cache" / "bench"
CALLING_AE = "BENCH"
MiB = 1024 * 1024
CHUNK_SIZE = 8 * MiB  # the agent's default upload.chunk_size
DIRIGO_LARGE_CHUNK = 32 * MiB
LARGE_BYTES = 600_000_000  # the same instance as bench/receive.py --large
SECTIONS = ("upload", "pack", "memory", "e2e", "auto")


@dataclass(frozen=True)
class Choice:
    """One packing choice: upload.compression, compression_level and transcode."""

    method: str
    level: int = 3
    transcode: str = "none"

    @property
    def name(self) -> str:
        compression = f"zstd-{self.level}" if self.method == "zstd" else self.method
        return compression if self.transcode == "none" else f"{self.transcode} + {compression}"

    @property
    def once(self) -> bool:
        """Measured once whatever --repeat: minutes per run, and its spread changes nothing."""
        return self.method == "zstd" and self.level >= 19


PACK_CHOICES = (
    Choice("none"),
    *(Choice("zstd", level) for level in (1, 3, 9, 19)),
    Choice("zstd", 3, "jpeg-ls"),
    Choice("zstd", 3, "htj2k"),
    Choice("zstd", 1, "htj2k"),
)
MEMORY_CHOICE = Choice("zstd", 3)
CEILING_LEVELS = (1, 3)  # libzstd alone, in memory: the reference for the pack rows


# --- one row of the table -------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """The median of several runs of one measurement (None: does not apply)."""

    section: str
    payload: str
    what: str
    input_bytes: int
    output_bytes: int | None = None
    seconds: float | None = None
    cpu_s_per_gb: float | None = None
    peak_rss_mb: float | None = None
    spread_pct: float | None = None
    note: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float | None:
        return self.input_bytes / 1e6 / self.seconds if self.seconds else None

    @property
    def ratio(self) -> float | None:
        return self.input_bytes / self.output_bytes if self.output_bytes else None


def median_row(
    section: str, payload: str, what: str, input_bytes: int, runs: list[dict[str, Any]], note: str
) -> Row:
    """Return the row of `runs`: each figure is the median of its own values across the runs."""
    times = [r["seconds"] for r in runs]
    seconds = statistics.median(times)
    outputs = [r["output_bytes"] for r in runs if "output_bytes" in r]
    cpus = [r["cpu_seconds"] for r in runs if r.get("cpu_seconds") is not None]
    peaks = [r["peak_rss_bytes"] for r in runs if r.get("peak_rss_bytes")]
    return Row(
        section=section,
        payload=payload,
        what=what,
        input_bytes=input_bytes,
        output_bytes=int(statistics.median(outputs)) if outputs else None,
        seconds=round(seconds, 3),
        cpu_s_per_gb=round(statistics.median(cpus) / (input_bytes / 1e9), 2) if cpus else None,
        peak_rss_mb=round(statistics.median(peaks) / 1e6, 1) if peaks else None,
        spread_pct=round(100 * (max(times) - min(times)) / seconds) if seconds else None,
        note=note,
        runs=runs,
    )


HEADER = (
    f"{'section':<7} {'payload':<14} {'what':<24} {'in MB':>7} {'out MB':>7} {'ratio':>5} "
    f"{'s':>7} {'MB/s':>7} {'CPU s/GB':>8} {'RSS MB':>7} {'spread':>6}  note"
)


def format_row(row: Row) -> str:
    def num(value: float | None, width: int, digits: int) -> str:
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    spread = f"{row.spread_pct:>5.0f}%" if row.spread_pct is not None else f"{'-':>6}"
    out_mb = row.output_bytes / 1e6 if row.output_bytes is not None else None
    return (
        f"{row.section:<7} {row.payload:<14} {row.what:<24} {row.input_bytes / 1e6:>7.1f} "
        f"{num(out_mb, 7, 1)} {num(row.ratio, 5, 2)} {num(row.seconds, 7, 3)} "
        f"{num(row.mb_per_s, 7, 1)} {num(row.cpu_s_per_gb, 8, 2)} {num(row.peak_rss_mb, 7, 1)} "
        f"{spread}  {row.note}"
    ).rstrip()


# --- child processes ------------------------------------------------------------------


def subject(*args: str | Path) -> dict[str, Any]:
    """Run one bench/subject.py measurement and return its JSON result."""
    child = run_child([sys.executable, str(SUBJECT), *map(str, args)])
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    result["process_cpu_seconds"] = child.cpu_seconds  # with interpreter start-up and imports
    result["process_seconds"] = child.seconds
    return result


# --- upload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    path: Path
    size: int
    sha256: str


def upload_payload(cache: Path, size: int) -> Payload:
    """Return the upload payload of `size` bytes, writing it into the cache the first time.

    Deterministic random bytes (seed 0): a zstd bundle is as incompressible, and neither the
    server nor the connection compresses. The sidecar is written last, so a half-written file
    is made again.
    """
    path = cache / "upload" / f"payload-{size}.bin"
    sidecar = path.with_suffix(".json")
    try:
        known = json.loads(sidecar.read_text())
        if known["size"] == size == path.stat().st_size:
            return Payload(path, size, known["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = rng.bytes(min(left, 64 * MiB))
            digest.update(block)
            f.write(block)
            left -= len(block)
    sidecar.write_text(json.dumps({"size": size, "sha256": digest.hexdigest(), "seed": 0}))
    return Payload(path, size, digest.hexdigest())


def create_upload(endpoint: str, size: int) -> str:
    """Create a tus upload of `size` bytes and return its URL (for curl, which only PATCHes)."""
    headers = {"Tus-Resumable": "1.0.0", "Upload-Length": str(size)}
    response = requests.post(endpoint, headers=headers, timeout=30)
    response.raise_for_status()
    return requests.compat.urljoin(endpoint, response.headers["Location"])


def curl_client(server: TusServer, payload: Payload) -> dict[str, Any]:
    """One curl PATCH of the whole file, streamed from disk: the server's ceiling."""
    url = create_upload(server.url, payload.size)
    headers = [
        "Tus-Resumable: 1.0.0",
        "Upload-Offset: 0",
        "Content-Type: application/offset+octet-stream",
        "Expect:",  # no 100-continue round trip
    ]
    args = ["curl", "-sS", "-o", os.devnull, "-w", "%{http_code}", "-X", "PATCH"]
    for header in headers:
        args += ["-H", header]
    child = run_child([*args, "-T", str(payload.path), url])
    if child.stdout.strip() != "204":
        raise RuntimeError(f"curl PATCH answered {child.stdout.strip()}")
    return {
        "seconds": child.seconds,
        "cpu_seconds": child.cpu_seconds,
        "user_seconds": child.user_seconds,
        "system_seconds": child.system_seconds,
        "peak_rss_bytes": child.peak_rss_bytes,
        "chunks": 1,
    }


def dirigo_client(server: TusServer, payload: Payload, chunk_size: int) -> dict[str, Any]:
    return subject(
        "tus-dirigo", server.url, payload.path, "--chunk-size", str(chunk_size), "--sha256",
        payload.sha256,
    )  # fmt: skip


def tuspy_client(server: TusServer, payload: Payload, chunk_size: int) -> dict[str, Any]:
    return subject("tus-tuspy", server.url, payload.path, "--chunk-size", str(chunk_size))


UploadClient = Callable[[TusServer, Payload], dict[str, Any]]


def upload_clients() -> tuple[dict[str, UploadClient], list[Row]]:
    """Return the clients to measure, curl first, and a row for each one that cannot run here.

    Dirigo's client runs with the default chunk size and with DIRIGO_LARGE_CHUNK, where the
    server's own cost per PATCH no longer caps the rate (docs/performance.md)."""
    clients: dict[str, UploadClient] = {"curl PATCH (ceiling)": curl_client}
    for chunk_size in (CHUNK_SIZE, DIRIGO_LARGE_CHUNK):
        name = f"Dirigo TusClient, {chunk_size // MiB} MiB"
        clients[name] = functools.partial(dirigo_client, chunk_size=chunk_size)
    skipped: list[Row] = []
    if shutil.which("curl") is None:
        raise RuntimeError("curl is needed for the server's ceiling")
    tuspy = f"tuspy, {CHUNK_SIZE // MiB} MiB"
    if tool_version("tuspy") is None:
        skipped.append(Row("upload", "", tuspy, 0, note="skipped: pip install tuspy"))
    else:
        clients[tuspy] = functools.partial(tuspy_client, chunk_size=CHUNK_SIZE)
    return clients, skipped


def upload_once(client: UploadClient, payload: Payload, scratch: Path) -> dict[str, Any]:
    """Upload `payload` with `client` to a fresh tus server; check what the server stored."""
    work = Path(tempfile.mkdtemp(prefix="tus-", dir=scratch))
    try:
        with TusServer(work / "uploads") as server:
            before = process_cpu_seconds(server.pid)
            run = client(server, payload)
            run["server_cpu_seconds"] = process_cpu_seconds(server.pid) - before
            stored = server.uploads()
        if len(stored) != 1 or not stored[0].complete or stored[0].size != payload.size:
            raise RuntimeError(f"the server holds {stored}, not one complete upload")
        if file_sha256(stored[0].data_path) != payload.sha256:
            raise RuntimeError("the stored upload's sha256 differs from the file's")
        return run
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()  # the next run does not pay for this one's writeback


def measure_uploads(
    payload: Payload, repeat: int, scratch: Path, emit: Callable[[Row], None]
) -> None:
    clients, skipped = upload_clients()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    for _ in range(repeat):
        for name, client in clients.items():  # interleaved: drift hits every client alike
            runs[name].append(upload_once(client, payload, scratch))
    ceiling: float | None = None
    for name, client_runs in runs.items():
        server_cpu = statistics.median(r["server_cpu_seconds"] for r in client_runs)
        label = f"{payload.size / 1e9:g} GB random"
        row = median_row("upload", label, name, payload.size, client_runs, "")
        assert row.mb_per_s is not None
        ceiling = ceiling or row.mb_per_s  # the curl row comes first
        share = f"{100 * row.mb_per_s / ceiling:.0f}% of ceiling; " if ceiling else ""
        note = f"{share}server {server_cpu / (payload.size / 1e9):.2f} CPU-s/GB"
        emit(Row(**{**asdict(row), "note": note}))
    for row in skipped:
        emit(row)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


# --- packing --------------------------------------------------------------------------


@dataclass(frozen=True)
class SpooledPart:
    """A study part in a spool of its own, as the upload worker would pack it."""

    name: str
    data_dir: Path
    files_json: Path
    input_bytes: int
    instances: int


def spool_part(name: str, sources: Iterable[Path], scratch: Path) -> SpooledPart:
    """Copy `sources` into a new spool as the receiver would, and describe them as the store
    does (PartFile); return where the part is."""
    data_dir = scratch / f"spool-{name}" / "data"
    spool = Spool(data_dir, high_water=100.0)
    spool.prepare()
    entries = []
    for index, source in enumerate(sources):
        incoming = spool.incoming / f"{index:06d}.dcm"
        shutil.copyfile(source, incoming)
        relative = spool.adopt(incoming)
        header = inspect(spool.path(relative))
        part_file = PartFile(
            header.sop_instance_uid,
            header.sop_class_uid,
            header.transfer_syntax,
            relative,
            header.size,
            header.sha256,
        )
        entries.append(asdict(part_file))
    files_json = data_dir.parent / "files.json"
    files_json.write_text(json.dumps(entries))
    os.sync()  # the copies are on disk before anything is timed
    total = sum(e["size"] for e in entries)
    return SpooledPart(name, data_dir, files_json, total, len(entries))


def pack_once(part: SpooledPart, choice: Choice) -> dict[str, Any]:
    """Pack `part` once in a child process; remove the bundle; return the measurement."""
    args = ["pack", part.data_dir, part.files_json, "--method", choice.method]
    args += ["--level", str(choice.level), "--threads", "0", "--transcode", choice.transcode]
    run = subject(*args)
    (part.data_dir / run["bundle"]).unlink()
    os.sync()
    return run


def ceiling_once(part: SpooledPart, level: int) -> dict[str, Any]:
    return subject("zstd-ceiling", part.data_dir, part.files_json, "--level", str(level))


def measure_packing(
    parts: list[SpooledPart], repeat: int, emit: Callable[[Row], None]
) -> dict[str, Row]:
    """Pack every part with every choice `repeat` times (interleaved), and compress it with
    libzstd alone; emit and return the rows."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for turn in range(repeat):
        for part in parts:
            for choice in PACK_CHOICES:
                if turn == 0 or not choice.once:
                    runs.setdefault((part.name, choice.name), []).append(pack_once(part, choice))
            for level in CEILING_LEVELS:
                key = (part.name, f"libzstd-{level} alone")
                runs.setdefault(key, []).append(ceiling_once(part, level))
    rows: dict[str, Row] = {}
    for part in parts:
        for choice in PACK_CHOICES:
            row = pack_row("pack", part, choice.name, runs[(part.name, choice.name)])
            if choice.once and repeat > 1:
                row = Row(**{**asdict(row), "note": row.note + "; 1 run"})
            rows[f"{part.name} {choice.name}"] = row
            emit(row)
        for level in CEILING_LEVELS:
            name = f"libzstd-{level} alone"
            note = "in memory, no tar/hash/IO: the compression's own cost"
            emit(
                median_row("pack", part.name, name, part.input_bytes, runs[(part.name, name)], note)
            )
    return rows


def pack_row(section: str, part: SpooledPart, name: str, runs: list[dict[str, Any]]) -> Row:
    row = median_row(section, part.name, name, part.input_bytes, runs, "")
    start = statistics.median(r["start_rss_bytes"] for r in runs) / 1e6
    note = f"{part.instances} files; RSS {start:.0f} MB before packing"
    workers = statistics.median(r["children_peak_rss_bytes"] for r in runs) / 1e6
    if workers:
        note += f"; largest transcoding worker {workers:.0f} MB"
    return Row(**{**asdict(row), "note": note})


def measure_memory(
    parts: list[SpooledPart], known: dict[str, Row], repeat: int, emit: Callable[[Row], None]
) -> None:
    """Emit the packing process's peak RSS for each part at the default compression."""
    name = MEMORY_CHOICE.name
    for part in parts:
        row = known.get(f"{part.name} {name}")
        if row is None:
            runs = [pack_once(part, MEMORY_CHOICE) for _ in range(repeat)]
            row = pack_row("memory", part, name, runs)
        emit(Row(**{**asdict(row), "section": "memory"}))


# --- end to end -----------------------------------------------------------------------

_PACKED = re.compile(r"packed (\d+) instance\(s\), (\d+) → (\d+) bytes in ([\d.]+)s")


def e2e_once(
    files: list[Path], scratch: Path, transcode: str | None = None, mbit: float | None = None
) -> dict[str, Any]:
    """Send `files` to a fresh agent uploading to a fresh tus server; time the way to `sent`.
    With `transcode`, the agent packs so (else its default); with `mbit`, the tus server, the
    agent and storescu run in a network namespace where the tus port passes `mbit` Mbit/s."""
    with contextlib.ExitStack() as stack:
        shape = None
        if mbit is not None:
            link = stack.enter_context(ShapedNamespace())
            stack.enter_context(link.inside())
            shape = functools.partial(link.shape, mbit=mbit)
        return _e2e_run(files, scratch, transcode, shape)


def _e2e_run(
    files: list[Path], scratch: Path, transcode: str | None, shape: Callable[[int], None] | None
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="e2e-", dir=scratch))
    try:
        with TusServer(work / "uploads") as server:
            if shape is not None:
                shape(server.port)
            data_dir = work / "data"
            data_dir.mkdir()
            upload: dict[str, Any] = {"chunk_size": "8MiB"}
            if transcode is not None:
                upload["transcode"] = transcode
            extra = {"cloud": {"upload_url": server.url}, "upload": upload}
            peer = {"ae_title": CALLING_AE, "host": LOOPBACK}
            with Agent(
                data_dir, peers=(peer,), probe_ae=CALLING_AE, stable_after="1s", extra=extra
            ) as agent:
                result = dcmtk.storescu(files, agent.port, CALLING_AE, agent.ae_title, timeout=600)
                stored_at = time.time()
                acked = len(dcmtk.acknowledged(result))
                if result.returncode != 0 or acked != len(files):
                    raise RuntimeError(f"storescu: exit {result.returncode}, {acked} acknowledged")
                wait_until(lambda: _sent(agent), 600, 0.1, "the part sent")
                seen_at = time.time()
                status = agent.status()
                peak = vm_hwm_bytes(agent.pid)
                times = _recorded_times(agent)
                packed = _PACKED.findall(agent.log_tail(1_000_000))
                choice = status["transcode"]["last_choice"]
            if status["studies"].get("sent") != 1:
                raise RuntimeError(f"dirigo status --json: studies {status['studies']}")
            stored = server.uploads()
        if len(stored) != 1 or not stored[0].complete or stored[0].size != times["bundle_size"]:
            raise RuntimeError(f"the server holds {stored}, not the bundle")
        pack_seconds = float(packed[-1][3]) if packed else None
        return {
            "seconds": times["sent_at"] - stored_at,
            "observed_seconds": seen_at - stored_at,
            "last_received_to_stored": stored_at - times["last_received_at"],
            "stable_wait": times["stable_at"] - times["last_received_at"],
            "claim_wait": times["attempt_started_at"] - times["stable_at"],
            "pack_seconds": pack_seconds,
            "send_seconds": times["sent_at"] - times["attempt_started_at"] - (pack_seconds or 0),
            "output_bytes": times["bundle_size"],
            "peak_rss_bytes": peak,
            "choice": choice["reason"] if choice else None,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()


def _sent(agent: Agent) -> bool:
    rows = agent.rows("SELECT state FROM studies")
    return bool(rows) and all(state in ("sent", "confirmed") for (state,) in rows)


def _recorded_times(agent: Agent) -> dict[str, float]:
    (row,) = agent.rows(
        "SELECT s.last_received_at, s.stable_at, u.attempt_started_at, u.sent_at, u.bundle_size"
        " FROM studies s JOIN uploads u ON u.study_id = s.id"
    )
    keys = ("last_received_at", "stable_at", "attempt_started_at", "sent_at", "bundle_size")
    return dict(zip(keys, row, strict=True))


def measure_e2e(
    name: str, files: list[Path], repeat: int, scratch: Path, emit: Callable[[Row], None]
) -> None:
    runs = [e2e_once(files, scratch) for _ in range(repeat)]
    size = sum(p.stat().st_size for p in files)
    row = median_row("e2e", name, "last C-STORE → sent", size, runs, "")

    def phase(key: str) -> float:
        return statistics.median(r[key] or 0.0 for r in runs)

    note = (
        f"stable_after 1.0 s included: quiet {phase('stable_wait'):.2f}, "
        f"claim {phase('claim_wait'):.2f}, pack {phase('pack_seconds'):.2f}, "
        f"send {phase('send_seconds'):.2f} s; RSS = agent"
    )
    emit(Row(**{**asdict(row), "note": note}))


AUTO_CHOICES = ("none", "jpeg-ls", "htj2k", "auto")


def measure_auto(
    files: list[Path], repeat: int, mbit: float, scratch: Path, emit: Callable[[Row], None]
) -> None:
    """Time `files` from the last C-STORE to sent with each fixed codec and with `auto`, on
    loopback and behind `mbit` Mbit/s (runs interleaved); emit a row each, then one comparing
    auto with the best fixed choice of the same link."""
    size = sum(p.stat().st_size for p in files)
    for link, rate in (("loopback", None), (f"{mbit:g} Mbit/s", mbit)):
        runs: dict[str, list[dict[str, Any]]] = {choice: [] for choice in AUTO_CHOICES}
        for _ in range(repeat):
            for choice in AUTO_CHOICES:
                runs[choice].append(e2e_once(files, scratch, choice, rate))
        rows = {}
        for choice, choice_runs in runs.items():
            name = f"transcode {choice}"
            row = median_row("auto", f"ct-500 {link}", name, size, choice_runs, "")
            if choice == "auto":
                chosen = [(r["choice"] or "?").split(":")[1].strip() for r in choice_runs]
                row = Row(**{**asdict(row), "note": f"chose {', '.join(chosen)}"})
            rows[choice] = row
            emit(row)
        fixed = [c for c in AUTO_CHOICES if c != "auto"]
        best = min(fixed, key=lambda c: rows[c].seconds or float("inf"))
        best_s, auto_s = rows[best].seconds or 0.0, rows["auto"].seconds or 0.0
        note = f"best fixed: {best} {best_s:.2f} s; auto {auto_s:.2f} s = {auto_s / best_s:.2f}x"
        emit(Row("auto", f"ct-500 {link}", "auto / best fixed", size, note=note))


# --- environment ----------------------------------------------------------------------


def tool_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def command_output(*args: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def node_package_version(name: str) -> str:
    try:
        package = json.loads((SERVER_DIR / "node_modules" / name / "package.json").read_text())
    except (OSError, ValueError):
        return "missing"
    return str(package.get("version", "unknown"))


def environment() -> dict[str, object]:
    import zstandard

    dirty = command_output("git", "-C", str(REPO), "status", "--porcelain", "--", "agent")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": command_output("git", "-C", str(REPO), "rev-parse", "HEAD"),
        "agent_modified": dirty not in ("unknown", ""),
        "node": command_output("node", "--version"),
        "tus_server": f"@tus/server {node_package_version('@tus/server')}, "
        f"@tus/file-store {node_package_version('@tus/file-store')}",
        "curl": " ".join(command_output("curl", "--version").split()[:2]),
        "requests": tool_version("requests"),
        "urllib3": tool_version("urllib3"),
        "tuspy": tool_version("tuspy") or "not installed",
        "zstandard": f"{zstandard.__version__} (libzstd "
        f"{'.'.join(map(str, zstandard.ZSTD_VERSION))})",
        "dcmtk": dcmtk.version(),
        "mb": "10^6 bytes; GB 10^9 bytes",
    }


def parse_size(text: str) -> int:
    """Return a byte count from '1000000000', '500MB', '1GB', '256MiB' or '1GiB'."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "MIB": MiB, "GIB": 1024 * MiB}
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match[2].upper() not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 500MB, 1GiB)")
    return int(match[1]) * units[match[2].upper()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument(
        "--size", type=parse_size, default=10**9, help="upload payload size (default 1GB)"
    )
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the end-to-end run")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="what to measure (default: all)",
    )
    parser.add_argument(
        "--mbit", type=float, default=20.0, help="the shaped link of the auto section (Mbit/s)"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="where generated payloads are kept"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections if not (s == "e2e" and args.skip_e2e)]

    args.cache.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(
        f"# {env['cpus']} CPUs, load {env['load_average_at_start']}; {env['tus_server']} on "
        f"node {env['node']}; {env['curl']}; zstandard {env['zstandard']}; "
        f"tuspy {env['tuspy']}; median of {args.repeat} runs",
        flush=True,
    )
    print(HEADER, flush=True)
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        print(format_row(row), flush=True)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scratch-", dir=args.cache) as tmp:
        scratch = Path(tmp)
        if "upload" in sections:
            payload = upload_payload(args.cache, args.size)
            measure_uploads(payload, args.repeat, scratch, emit)
        ct500 = datasets.ct_series(args.cache / "ct500", slices=500)
        known: dict[str, Row] = {}
        if "pack" in sections or "memory" in sections:
            ct_part = spool_part("ct-500", ct500, scratch)
        if "pack" in sections:
            real = spool_part("real-images", datasets.uncompressed_files(), scratch)
            known = measure_packing([ct_part, real], args.repeat, emit)
        large = args.cache / "large" / "large-600MB.dcm"
        if ("memory" in sections or "e2e" in sections) and not large.exists():
            datasets.large_instance(large, LARGE_BYTES)
        if "memory" in sections:
            ct100 = datasets.ct_series(args.cache / "ct100", slices=100)
            parts = [
                spool_part("ct-100", ct100, scratch),
                ct_part,
                spool_part("one-600MB", [large], scratch),
            ]
            measure_memory(parts, known, args.repeat, emit)
        if "e2e" in sections:
            measure_e2e("ct-500", ct500, args.repeat, scratch, emit)
            measure_e2e("one-600MB", [large], args.repeat, scratch, emit)
        if "auto" in sections:
            measure_auto(ct500, args.repeat, args.mbit, scratch, emit)

    env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    env["total_seconds"] = round(time.monotonic() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "environment": env,
        "repeat": args.repeat,
        "rows": [{**asdict(r), "mb_per_s": r.mb_per_s, "ratio": r.ratio} for r in rows],
    }
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"# load at the end {env['load_average_at_end']}; {env['total_seconds']} s in all")
    print(f"# written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
