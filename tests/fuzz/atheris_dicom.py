"""Coverage-guided fuzzing of Dirigo's own DICOM structure check with atheris (libFuzzer), for long
runs by hand; the pytest suite in this folder is what CI runs.

    pip install atheris
    mkdir -p /tmp/found
    python -m tests.fuzz.atheris_dicom /tmp/found tests/fuzz/corpus/dicom -max_total_time=600

The target is what every received or imported instance goes through before it is acknowledged
(`agent.instance.inspect`, and `layout` as transcoding and retrieval read a spooled file): any
exception but InvalidInstance (and ValueError from `layout` for a deflated file) is a crash,
and libFuzzer writes the input that caused it into the working directory (`crash-…`). Put it
into tests/fuzz/corpus/dicom with the fix, named for the answer it must get.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from agent import instance
    from agent.instance import InvalidInstance

SCRATCH = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
PATH = SCRATCH / "input.dcm"
TAGS = {0x7FE00010, 0x00080018, 0x0020000D}


def one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    with contextlib.suppress(InvalidInstance):
        instance.inspect(PATH)
    with contextlib.suppress(InvalidInstance, ValueError):
        instance.layout(io.BytesIO(data), len(data), TAGS)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
