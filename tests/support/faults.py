"""Real faults for integration tests: a small tmpfs to fill up, and a sender watched as it works.

- `tmpfs` mounts a size-limited tmpfs for the duration of a `with` block, so that a test can run
  the agent on a disk that really fills up (ENOSPC from the kernel, nothing mocked). Mounting
  needs root (CAP_SYS_ADMIN); without it the test fails and says so.
- `WatchedSender` runs DCMTK's `storescu -v` in the background and reads its log line by line
  while it runs, so that a test can act (kill the agent, cut the sender off) at a chosen point of a
  transfer, then collect the whole log for `dcmtk.acknowledged()`.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support import dcmtk
from tests.support.net import LOOPBACK, PeerExited, wait_until


class MountFailed(RuntimeError):
    """A tmpfs could not be mounted (usually: not running as root)."""


@contextlib.contextmanager
def tmpfs(directory: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of `size_bytes` on `directory` (created if needed) for a `with` block.

    Unmount it afterwards, waiting a bounded time for processes that just exited to let go of
    it, and detaching it lazily if it stays busy, so that no mount outlives the test. Raise
    MountFailed if it cannot be mounted.
    """
    directory.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes},mode=0755"
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        raise MountFailed(
            f"cannot mount a tmpfs on {directory} (fault tests need root): {mount.stderr.strip()}"
        )
    try:
        yield directory
    finally:
        _unmount(directory)


def _unmount(directory: Path) -> None:
    def unmounted() -> bool:
        result = subprocess.run(["umount", str(directory)], capture_output=True, check=False)
        return result.returncode == 0 or not os.path.ismount(directory)

    try:
        wait_until(unmounted, 15, interval=0.2, what=f"unmounting the tmpfs on {directory}")
    except TimeoutError:
        subprocess.run(["umount", "--lazy", str(directory)], capture_output=True, check=False)
        raise


def free_bytes(directory: Path) -> int:
    """Return the bytes an unprivileged writer could still put on `directory`'s filesystem."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def write_ballast(path: Path, size_bytes: int) -> Path:
    """Write `size_bytes` of real (allocated, not sparse) data to `path`; return `path`."""
    block = b"\xa5" * (1 << 20)
    with path.open("wb") as f:
        remaining = size_bytes
        while remaining > 0:
            remaining -= f.write(block[: min(remaining, len(block))])
    return path


_SENDING = "I: Sending file: "
_RESPONSE = re.compile(r"^I: Received Store Response \((?P<status>[^)]*)\)")


class WatchedSender:
    """`storescu -v -R` sending `files` to `port` in the background, its log read as it is written.

    DCMTK writes its log to stderr (unbuffered); `lines` grows while it runs. Its stdout carries
    only progress dots, kept for the record.
    """

    def __init__(
        self,
        files: Sequence[Path],
        port: int,
        calling_ae: str = "PACS",
        called_ae: str = "DIRIGO",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.lines: list[str] = []
        self._files_started = 0
        self._stdout = tempfile.TemporaryFile()  # noqa: SIM115 (closed in wait)
        args = [dcmtk.tool("storescu"), "-v", "-R", *extra_args]
        args += ["-aet", calling_ae, "-aec", called_ae, LOOPBACK, str(port), *map(str, files)]
        self.proc = subprocess.Popen(
            args,
            stdout=self._stdout,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=dcmtk.dcmtk_env(),
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="storescu-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._files_started += line.startswith(_SENDING)

    def files_started(self) -> int:
        """Return how many files storescu has begun to send so far."""
        return self._files_started

    def wait_for_file(self, number: int, timeout: float) -> None:
        """Wait until storescu has begun to send its `number`-th file (1-based).

        Raise PeerExited if storescu exits first, TimeoutError after `timeout` seconds.
        """

        def started() -> bool:
            if self.files_started() >= number:
                return True
            if self.proc.poll() is not None:
                raise PeerExited(
                    f"storescu exited with {self.proc.returncode} before file {number}"
                )
            return False

        # A 1 ms poll: a CT slice takes about 10 ms end to end, and the point is to land inside one.
        wait_until(started, timeout, interval=0.001, what=f"storescu sending file {number}")

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Kill storescu with SIGKILL: its connection is cut wherever it was."""
        self.proc.kill()

    def wait(self, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Wait for storescu to end; return its run as `dcmtk.storescu` would have.

        Raise subprocess.TimeoutExpired (after killing it) if it runs longer than `timeout`.
        """
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.close()
        self._stdout.seek(0)
        stdout = self._stdout.read().decode("utf-8", "replace")
        self._stdout.close()
        stderr = "".join(f"{line}\n" for line in self.lines)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)

    def close(self) -> None:
        """Make sure storescu is gone and its log fully read (safe to call more than once)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> WatchedSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self._stdout.close()


def store_responses(result: subprocess.CompletedProcess[str]) -> list[str]:
    """Return the status text of every C-STORE response storescu logged, in order.

    DCMTK 3.6.7 names them as in `Success` or `Refused: OutOfResources` (0xA700).
    """
    text = result.stdout + "\n" + result.stderr
    return [m["status"] for line in text.splitlines() if (m := _RESPONSE.match(line))]
