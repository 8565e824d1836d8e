"""DCMTK command-line tools (storescu, dcmsend, echoscu, findscu, storescp …) as peers.

Two traps this module handles:

- pynetdicom installs console scripts with the same names as DCMTK's tools
  (`storescu`, `echoscu`, `findscu`, `getscu`, `movescu`, `storescp`) into the
  Python environment's bin directory, which is usually first on PATH. Each tool
  is therefore resolved to a binary that reports itself as DCMTK (`--version`
  prints "$dcmtk: …"), not to whatever PATH finds first.
- Debian's DCMTK waits ~40 ms per message (Nagle's algorithm) unless
  `TCP_NODELAY=1` is in its environment; every tool runs with it.

DCMTK 3.6.7's `storescu -v` logs, per file, `I: Sending file: PATH` and then
`I: Received Store Response (Success)` (or `(Warning, …)` / `(Failure, …)`, or
`E: Store Failed, file: PATH:` when the request could not be sent);
`acknowledged()` parses that.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from tests.support.net import LOOPBACK, PeerExited, wait_until
from tests.support.process import stop_process, tail

SETUP_HINT = "run scripts/setup to install dcmtk"
_SEARCH_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/dcmtk/bin")


class ToolMissing(RuntimeError):
    """A DCMTK tool is not installed."""


def dcmtk_env() -> dict[str, str]:
    """Return the environment for DCMTK processes: ours plus TCP_NODELAY=1."""
    return {**os.environ, "TCP_NODELAY": "1"}


def _is_dcmtk(path: str) -> bool:
    # Scripts (pynetdicom's console scripts, pyenv shims) are not DCMTK and
    # can take a second to answer --version; only executables are asked.
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return False
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "$dcmtk:" in out.stdout + out.stderr


@functools.cache
def tool(name: str) -> str:
    """Return the path of DCMTK's `name` tool; raise ToolMissing if none is installed.

    DIRIGO_DCMTK_DIR, when set, is searched first; then PATH, then the usual
    install directories. Non-DCMTK programs of the same name are skipped.
    """
    dirs: list[str] = []
    if override := os.environ.get("DIRIGO_DCMTK_DIR"):
        dirs.append(override)
    dirs.extend(os.environ.get("PATH", "").split(os.pathsep))
    dirs.extend(_SEARCH_DIRS)
    for directory in dict.fromkeys(d for d in dirs if d):
        candidate = shutil.which(name, path=directory)
        if candidate and _is_dcmtk(candidate):
            return candidate
    raise ToolMissing(f"DCMTK's {name} not found ({SETUP_HINT})")


def version() -> str:
    """Return DCMTK's name and version, e.g. 'DCMTK 3.6.7 2022-04-22'."""
    out = subprocess.run(
        [tool("storescu"), "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    # The first line reads "$dcmtk: storescu v3.6.7 2022-04-22 $".
    words = out.stdout.split("\n", 1)[0].strip("$ ").split()
    return f"DCMTK {words[2].lstrip('v')} {words[3]}" if len(words) >= 4 else "DCMTK (unknown)"


def run(
    name: str, args: Sequence[str | os.PathLike[str]], timeout: float = 600.0
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK tool `name` with `args` and TCP_NODELAY=1; return the finished process.

    Output is captured as text; a non-zero exit is not an error here (callers
    check `returncode`). Raise subprocess.TimeoutExpired (after killing it) if
    it runs longer than `timeout` seconds.
    """
    return subprocess.run(
        [tool(name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dcmtk_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _association_args(calling_ae: str, called_ae: str, host: str, port: int) -> list[str]:
    return ["-aet", calling_ae, "-aec", called_ae, host, str(port)]


def _file_args(files_or_dir: Path | Sequence[Path]) -> list[str]:
    if isinstance(files_or_dir, Path):
        if files_or_dir.is_dir():
            return ["+sd", "+r", str(files_or_dir)]
        return [str(files_or_dir)]
    if not files_or_dir:
        raise ValueError("no files to send")
    return [str(p) for p in files_or_dir]


def echoscu(
    port: int,
    calling_ae: str = "PACS",
    called_ae: str = "DIRIGO",
    host: str = LOOPBACK,
    timeout: float = 10.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send one C-ECHO; returncode 0 means the peer accepted and answered."""
    args = ["-to", "5", "-ta", "5", "-td", "5", *extra_args]
    return run("echoscu", [*args, *_association_args(calling_ae, called_ae, host, port)], timeout)


def storescu(
    files_or_dir: Path | Sequence[Path],
    port: int,
    calling_ae: str = "PACS",
    called_ae: str = "DIRIGO",
    extra_args: Sequence[str] = (),
    host: str = LOOPBACK,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess[str]:
    """C-STORE files (or every file under a directory) in one association with storescu.

    storescu proposes uncompressed transfer syntaxes only and aborts the
    association at the first file it cannot send that way; use `dcmsend` for
    compressed files. `-R` makes it propose the SOP classes of the files given
    (as a PACS does) instead of its built-in list, which lacks some retired
    classes that real files use (e.g. Ultrasound Image Storage (Retired)). It
    re-encodes each dataset: files written by pydicom arrive byte for byte,
    some real files (group lengths, sequence lengths, implicit VR) do not.
    Runs verbose so that `acknowledged()` can tell which files got Success.
    """
    args = ["-v", "-R", *extra_args, *_association_args(calling_ae, called_ae, host, port)]
    return run("storescu", [*args, *_file_args(files_or_dir)], timeout)


def dcmsend(
    files_or_dir: Path | Sequence[Path],
    port: int,
    calling_ae: str = "PACS",
    called_ae: str = "DIRIGO",
    extra_args: Sequence[str] = (),
    host: str = LOOPBACK,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess[str]:
    """C-STORE files with dcmsend, which proposes each file's own transfer syntax.

    dcmsend carries on after a failed file. Its exit code does not tell whether
    every file got Success (DCMTK 3.6.7 exits 0 after a 0xC212 failure
    status): check the receiver's side.
    """
    args = ["-v", *extra_args, *_association_args(calling_ae, called_ae, host, port)]
    return run("dcmsend", [*args, *_file_args(files_or_dir)], timeout)


def findscu(
    port: int,
    keys: Sequence[str],
    calling_ae: str = "PACS",
    called_ae: str = "DIRIGO",
    level: str = "STUDY",
    extra_args: Sequence[str] = (),
    host: str = LOOPBACK,
    timeout: float = 60.0,
    model: str = "-S",
    out_dir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Send a C-FIND with `keys` (findscu `-k` values such as 'PatientID=X'); Study Root unless
    `model` is `-P` (Patient Root). With `out_dir`, each answer is written there as
    `rsp0001.dcm` … (see `answers`). Runs with `-d`, so `final_status` can read the status."""
    args = ["-d", model, "-k", f"QueryRetrieveLevel={level}", *extra_args]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        args += ["-X", "-od", str(out_dir)]
    for key in keys:
        args += ["-k", key]
    return run("findscu", [*args, *_association_args(calling_ae, called_ae, host, port)], timeout)


def answers(out_dir: Path) -> list[Path]:
    """Return the C-FIND answers findscu wrote into `out_dir`, in the order they came."""
    return sorted(out_dir.glob("rsp*.dcm"))


def movescu(
    port: int,
    keys: Sequence[str],
    destination: str,
    calling_ae: str = "PACS",
    called_ae: str = "DIRIGO",
    level: str = "STUDY",
    extra_args: Sequence[str] = (),
    host: str = LOOPBACK,
    timeout: float = 600.0,
    model: str = "-S",
) -> subprocess.CompletedProcess[str]:
    """Send a C-MOVE of `keys` to the AE title `destination` (which the SCP must know). Runs
    with `-d`, so `final_status` and `sub_operations` can read the responses."""
    args = ["-d", model, "-aem", destination, "-k", f"QueryRetrieveLevel={level}", *extra_args]
    for key in keys:
        args += ["-k", key]
    return run("movescu", [*args, *_association_args(calling_ae, called_ae, host, port)], timeout)


def getscu(
    port: int,
    keys: Sequence[str],
    out_dir: Path,
    calling_ae: str = "PACS",
    called_ae: str = "DIRIGO",
    level: str = "STUDY",
    extra_args: Sequence[str] = (),
    host: str = LOOPBACK,
    timeout: float = 600.0,
    model: str = "-S",
) -> subprocess.CompletedProcess[str]:
    """Send a C-GET of `keys`; the instances arrive on the same association and are written
    into `out_dir`. getscu proposes uncompressed syntaxes only unless `extra_args` say
    otherwise (e.g. `+xt` to prefer JPEG-LS). Runs with `-d` (see `final_status`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["-d", model, "-od", str(out_dir), "-k", f"QueryRetrieveLevel={level}", *extra_args]
    for key in keys:
        args += ["-k", key]
    return run("getscu", [*args, *_association_args(calling_ae, called_ae, host, port)], timeout)


_DIMSE_STATUS = re.compile(r"DIMSE Status\s*:\s*0x(?P<code>[0-9a-fA-F]{4})")
_SUB_OPERATIONS = re.compile(
    r"(?P<kind>Remaining|Completed|Failed|Warning) Suboperations\s*:\s*(?P<count>[0-9]+)"
)


def statuses(result: subprocess.CompletedProcess[str]) -> list[int]:
    """Return the DIMSE status of each response a `-d` findscu/movescu/getscu run received."""
    output = result.stdout + "\n" + result.stderr
    return [int(m["code"], 16) for m in _DIMSE_STATUS.finditer(output)]


def final_status(result: subprocess.CompletedProcess[str]) -> int | None:
    """Return the status of the last response received (None if there was none)."""
    found = statuses(result)
    return found[-1] if found else None


def sub_operations(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """Return the last sub-operation counts a `-d` movescu/getscu run printed, e.g.
    {'Completed': 5, 'Failed': 0, 'Warning': 0} for a final response."""
    counts: dict[str, int] = {}
    for m in _SUB_OPERATIONS.finditer(result.stdout + "\n" + result.stderr):
        counts[m["kind"]] = int(m["count"])
    return counts


_SENDING = re.compile(r"^I: Sending file: (?P<path>.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((?P<status>[^,)]+)")


def acknowledged(result: subprocess.CompletedProcess[str]) -> list[Path]:
    """Return the files a verbose storescu run got a Success response for, in order."""
    ok: list[Path] = []
    current: Path | None = None
    for line in (result.stdout + "\n" + result.stderr).splitlines():
        if m := _SENDING.match(line):
            current = Path(m["path"])
        elif (m := _RESPONSE.match(line)) and current is not None:
            if m["status"] == "Success":
                ok.append(current)
            current = None
    return ok


def start_storescp(
    out_dir: Path,
    port: int,
    ae: str = "STORESCP",
    extra_args: Sequence[str] = ("+xa",),
    timeout: float = 15.0,
    echo_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start storescp writing received files into `out_dir`; return once it answers C-ECHO
    (sent with `echo_args`: a storescp with `+tls` answers only an echoscu with TLS options).

    `+xa` (default) accepts every transfer syntax DCMTK knows, so dcmsend can
    store compressed files. Output goes to an anonymous temporary file that is
    shown if storescp fails to start. Raise TimeoutError (after stopping it) if
    it does not answer within `timeout` seconds, PeerExited if it exits.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [tool("storescp"), "-aet", ae, "-od", str(out_dir), *extra_args, str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dcmtk_env()
        )
        try:
            wait_until(
                lambda: _answers_echo(proc, port, ae, log, echo_args),
                timeout,
                interval=0.1,
                what=f"storescp on port {port} answering C-ECHO",
            )
        except BaseException:
            stop_process(proc)
            raise
    return proc


def _answers_echo(
    proc: subprocess.Popen[bytes], port: int, ae: str, log: IO[bytes], echo_args: Sequence[str]
) -> bool:
    if proc.poll() is not None:
        raise PeerExited(f"storescp exited with {proc.returncode}:\n{tail(log)}")
    echo = echoscu(port, calling_ae="ECHO", called_ae=ae, timeout=10, extra_args=echo_args)
    return echo.returncode == 0


@contextlib.contextmanager
def storescp(
    out_dir: Path, port: int, ae: str = "STORESCP", extra_args: Sequence[str] = ("+xa",)
) -> Iterator[subprocess.Popen[bytes]]:
    """Run storescp for the duration of a `with` block, stopping it for sure afterwards."""
    proc = start_storescp(out_dir, port, ae, extra_args)
    try:
        yield proc
    finally:
        stop_process(proc)
