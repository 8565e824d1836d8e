"""Exercise the agent's codecs in this process and print what happened, as JSON, for a test
that runs this script under a unit's restrictions (tests/support/confine.py).

`python codec_workout.py WORK_DIR SOURCE... -- COMPRESSED:REFERENCE...`: each SOURCE (an
uncompressed grayscale file) is transcoded to JPEG-LS and to HTJ2K by the agent's own worker pool
(forkserver processes, as in `dirigo run`), and each result decompressed again through the agent's
decoder plugin; each COMPRESSED file (JPEG-LS, JPEG 2000, JPEG lossless) is decompressed and
compared with REFERENCE, the same image uncompressed; a bundle-sized buffer goes through zstd with
several threads. Finally two probes show the restrictions were really in force: a writable and
executable mapping, and the kernel's report of seccomp filters on this process.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import zstandard

from agent import transcode
from agent.serve.syntax import decompress
from tests.support.datasets import dataset_sha256


def pixels_after_decompress(path: str) -> Any:
    ds = pydicom.dcmread(path)
    decompress(ds)
    return ds.pixel_array


def write_exec_mapping_refused() -> bool:
    """Return True if asking for memory both writable and executable fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    prot = 0x1 | 0x2 | 0x4  # PROT_READ | PROT_WRITE | PROT_EXEC
    address = libc.mmap(None, 4096, prot, 0x02 | 0x20, -1, 0)  # MAP_PRIVATE | MAP_ANONYMOUS
    if address in (None, ctypes.c_void_p(-1).value):
        return True
    libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(4096))
    return False


def main(argv: list[str]) -> None:
    split = argv.index("--")
    work, sources, pairs = Path(argv[0]), argv[1:split], argv[split + 1 :]
    report: dict[str, Any] = {"transcoded": {}, "decompressed": {}}
    for method in ("jpeg-ls", "htj2k"):
        jobs = [
            transcode.Source(path, str(work / f"{method}-{i}.dcm"), dataset_sha256(Path(path)))
            for i, path in enumerate(sources)
        ]
        with transcode.Transcoder(method, workers=2) as pool:
            outcomes = list(pool.run(jobs))
        for job, outcome in zip(jobs, outcomes, strict=True):
            entry: dict[str, Any] = {"outcome": type(outcome).__name__}
            if isinstance(outcome, transcode.Transcoded):
                entry["syntax"] = outcome.transfer_syntax
                original = pydicom.dcmread(job.path).pixel_array
                entry["identical"] = bool(
                    np.array_equal(pixels_after_decompress(job.target), original)
                )
            else:
                entry["reason"] = outcome.reason
            report["transcoded"][f"{method}:{Path(job.path).name}"] = entry
    for pair in pairs:
        compressed, reference = pair.split(":")
        same = np.array_equal(
            pixels_after_decompress(compressed), pydicom.dcmread(reference).pixel_array
        )
        report["decompressed"][Path(compressed).name] = bool(same)
    data = os.urandom(1 << 16) * 64  # 4 MiB, compressible
    compressor = zstandard.ZstdCompressor(level=3, threads=2)
    report["zstd"] = zstandard.ZstdDecompressor().decompress(compressor.compress(data)) == data
    report["write_exec_refused"] = write_exec_mapping_refused()
    status = Path("/proc/self/status").read_text()
    report["seccomp"] = next(
        line.split(":")[1].strip() for line in status.splitlines() if line.startswith("Seccomp:")
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
