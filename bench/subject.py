"""A measurement in a child process of its own: what bench/upload.py measures (the child's
side, run as a script) and how it runs and measures a child (the parent's side, `run_child`).

    python bench/subject.py tus-dirigo URL FILE --chunk-size N --sha256 HEX
    python bench/subject.py tus-tuspy URL FILE --chunk-size N
    python bench/subject.py pack DATA_DIR FILES_JSON --method zstd --level 3 --threads 0 \
                                 [--transcode jpeg-ls]
    python bench/subject.py zstd-ceiling DATA_DIR FILES_JSON --level 3

A child of its own so that the figures belong to this work alone: its CPU time is
`getrusage(RUSAGE_SELF)` taken around the work (interpreter start-up and imports left out;
every thread of the process counted, zstd's workers included), and its peak resident memory is
its own `VmHWM`, which no earlier measurement has raised. Each prints one JSON object on stdout:
`seconds` (wall time of the work), `cpu_seconds`, `start_rss_bytes` (VmHWM after the imports,
before the work) and `peak_rss_bytes`, plus what the work produced.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the agent package, when run from a checkout


def vm_hwm_bytes(pid: int | str = "self") -> int:
    """Return a process's peak resident set size (VmHWM), in bytes (this one's by default)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def cpu_seconds() -> tuple[float, float]:
    """Return this process's (user, system) CPU seconds so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def measured(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `work` and return what it returned plus its wall time, CPU time and memory."""
    start_rss = vm_hwm_bytes()
    user, system = cpu_seconds()
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    user_after, system_after = cpu_seconds()
    return {
        **result,
        "seconds": seconds,
        "cpu_seconds": user_after - user + system_after - system,
        "user_seconds": user_after - user,
        "system_seconds": system_after - system,
        "start_rss_bytes": start_rss,
        "peak_rss_bytes": vm_hwm_bytes(),
    }


# --- the parent's side: run a child and measure it ---------------------------------


@dataclass(frozen=True)
class Child:
    """A finished child process: wall time, its own CPU time and peak RSS, its output."""

    seconds: float
    user_seconds: float
    system_seconds: float
    peak_rss_bytes: int
    stdout: str

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.system_seconds


def run_child(args: list[str], timeout: float = 1800.0) -> Child:
    """Run `args` and return its measurements. Raise RuntimeError if it exits non-zero or
    runs longer than `timeout` seconds.

    CPU time comes from wait4's rusage, so it is the child's own. Its ru_maxrss is not: the
    child is forked from this process (vfork), and the kernel keeps the larger of the RSS
    before and after exec. Peak RSS is therefore the child's VmHWM, read every 20 ms while it
    runs (VmHWM only grows; a program whose memory is flat is caught at its peak).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        peak = [0]
        done = threading.Event()
        sampler = threading.Thread(target=_sample_vm_hwm, args=(proc.pid, peak, done))
        sampler.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
            sampler.join()
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} exited {proc.returncode}: {stderr[-2000:]}")
    return Child(seconds, usage.ru_utime, usage.ru_stime, peak[0], stdout)


def _sample_vm_hwm(pid: int, peak: list[int], done: threading.Event) -> None:
    while not done.wait(0.02):
        try:
            peak[0] = vm_hwm_bytes(pid)
        except (OSError, RuntimeError, ValueError):  # exited, or a zombie without VmHWM
            return


def process_cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system, all threads) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- tus clients ----------------------------------------------------------------------
# Each one creates the upload (timed apart, as `create_seconds`) and then sends the whole file
# in chunks; `seconds` is the data phase only, from the first PATCH to the last answer.


def tus_dirigo(url: str, path: Path, chunk_size: int, sha256: str) -> dict[str, Any]:
    """Upload `path` with Dirigo's TusClient, chunk by chunk as agent/upload.py sends a bundle:
    PATCH the byte range of the file from the confirmed offset, continue from the offset the
    server names. The store's bookkeeping between chunks is left out (the end-to-end run
    includes it)."""
    from agent.cloud import CloudHttp, TusClient, build_session
    from agent.config import CloudSettings

    settings = CloudSettings(upload_url=url)
    client = TusClient(CloudHttp(build_session(settings), settings.timeout), url)
    size = path.stat().st_size
    metadata = {"filename": path.name, "sha256": sha256, "format": "dicom-tar+zstd"}

    created = time.perf_counter()
    upload_url = client.create(size, metadata)
    create_seconds = time.perf_counter() - created

    def send() -> dict[str, Any]:
        offset, chunks = 0, 0
        with path.open("rb") as f:
            while offset < size:
                length = min(chunk_size, size - offset)
                new_offset = client.patch(upload_url, offset, f, length)
                if not offset < new_offset <= offset + length:
                    raise RuntimeError(f"PATCH at {offset} answered with offset {new_offset}")
                offset, chunks = new_offset, chunks + 1
        return {"url": upload_url, "chunks": chunks, "create_seconds": create_seconds}

    result = measured(send)
    client.close()
    return result


def tus_tuspy(url: str, path: Path, chunk_size: int) -> dict[str, Any]:
    """Upload `path` with tuspy's synchronous Uploader (a new connection per request)."""
    from tusclient.client import TusClient

    uploader = TusClient(url).uploader(
        file_path=str(path), chunk_size=chunk_size, metadata={"filename": path.name}
    )
    created = time.perf_counter()
    uploader.set_url(uploader.create_url())
    create_seconds = time.perf_counter() - created
    size = path.stat().st_size

    def send() -> dict[str, Any]:
        chunks = 0
        while uploader.offset < size:
            uploader.upload_chunk()
            chunks += 1
        return {"url": uploader.url, "chunks": chunks, "create_seconds": create_seconds}

    return measured(send)


# --- packing --------------------------------------------------------------------------


def pack(
    data_dir: Path, files_json: Path, method: str, level: int, threads: int, transcode: str
) -> dict[str, Any]:
    """Pack the part described in `files_json` (PartFile fields, in order) from the spool at
    `data_dir` with agent.pack.pack, as the upload worker does; the bundle is left in the
    spool for the caller to inspect and remove.

    Transcoding runs in worker processes under multiprocessing's forkserver; the forkserver
    is stopped after the pack (it reaps the workers, and we reap it), so that their CPU time
    is in `children_cpu_seconds` and the largest one's peak RSS in `children_peak_rss_bytes`.
    """
    import multiprocessing.forkserver

    from agent.pack import Compression, PartInfo
    from agent.pack import pack as pack_part
    from agent.spool import Spool
    from agent.store.uploads import PartFile

    spool = Spool(data_dir, high_water=100.0)
    files = [PartFile(**entry) for entry in json.loads(files_json.read_text())]
    info = PartInfo(site="bench", study_uid="1.2.826.0.1.3680043.8.498.1", part=1)
    options = {"transcode": transcode} if transcode != "none" else {}
    compression = Compression(method=method, level=level, threads=threads, **options)

    def work() -> dict[str, Any]:
        bundle = pack_part(spool, info, files, compression)
        return {"bundle": bundle.path, "output_bytes": bundle.size}

    warm_up = 0.0
    if transcode != "none":
        # The agent's forkserver lives as long as the agent: only its first pack pays for
        # starting it (importing numpy and the codecs). Start it before the clock, as a
        # running agent has, and leave its start-up CPU out of the children's total.
        from agent.transcode import _PRELOAD

        multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
        multiprocessing.forkserver.ensure_running()
        deadline = time.monotonic() + 30
        pid = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
        while time.monotonic() < deadline:  # until its preload imports are done
            warm_up, time_before = process_cpu_seconds(pid), warm_up
            if warm_up > 0 and warm_up == time_before:
                break
            time.sleep(0.2)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = measured(work)
    multiprocessing.forkserver._forkserver._stop()  # a private method, there for this
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime - warm_up
    result["forkserver_start_cpu_seconds"] = warm_up
    result["children_cpu_seconds"] = children
    result["children_peak_rss_bytes"] = after.ru_maxrss * 1024 if children else 0
    result["cpu_seconds"] += children
    return result


def zstd_ceiling(files_json: Path, data_dir: Path, level: int) -> dict[str, Any]:
    """Compress the part's files, read into memory first, in one call to libzstd with the
    agent's settings (one worker per CPU): what the compression alone costs, without reading,
    tar, hashing or writing. A reference for agent.pack, as curl is for the tus client."""
    import zstandard

    data = b"".join(
        (data_dir / entry["path"]).read_bytes() for entry in json.loads(files_json.read_text())
    )
    compressor = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
    result = measured(lambda: {"output_bytes": len(compressor.compress(data))})
    result["input_bytes"] = len(data)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("tus-dirigo", "tus-tuspy"):
        command = commands.add_parser(name)
        command.add_argument("url")
        command.add_argument("file", type=Path)
        command.add_argument("--chunk-size", type=int, required=True)
        command.add_argument("--sha256", default="")
    command = commands.add_parser("pack")
    command.add_argument("data_dir", type=Path)
    command.add_argument("files_json", type=Path)
    command.add_argument("--method", choices=("zstd", "none"), required=True)
    command.add_argument("--level", type=int, default=3)
    command.add_argument("--threads", type=int, default=0)
    command.add_argument("--transcode", default="none")
    command = commands.add_parser("zstd-ceiling")
    command.add_argument("data_dir", type=Path)
    command.add_argument("files_json", type=Path)
    command.add_argument("--level", type=int, default=3)
    args = parser.parse_args(argv)

    if args.command == "tus-dirigo":
        result = tus_dirigo(args.url, args.file, args.chunk_size, args.sha256)
    elif args.command == "tus-tuspy":
        result = tus_tuspy(args.url, args.file, args.chunk_size)
    elif args.command == "zstd-ceiling":
        result = zstd_ceiling(args.files_json, args.data_dir, args.level)
    else:
        result = pack(
            args.data_dir, args.files_json, args.method, args.level, args.threads, args.transcode
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
