"""Stopping child processes for sure, with bounded waits."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from typing import IO, Any


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """Stop `proc`: SIGTERM, wait up to `timeout` s, then SIGKILL. Return its exit code.

    Safe to call on a process that already exited.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return proc.returncode


def tail(log: IO[bytes], limit: int = 4000) -> str:
    """Return the last `limit` characters written to the binary file `log`."""
    log.flush()
    log.seek(0)
    return log.read().decode("utf-8", "replace")[-limit:]


def vm_hwm_bytes(pid: int) -> int:
    """Return the peak resident set size (VmHWM) of a live process, in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def reset_vm_hwm(pid: int) -> None:
    """Reset the peak resident set size (VmHWM) of a live process of ours to its current
    resident size (Linux 4.0+: `clear_refs` 5), so that the next `vm_hwm_bytes` is the peak
    of what it did since. Raise OSError if the kernel does not allow it."""
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")


@contextlib.contextmanager
def stopped_on_failure(
    name: str, stop: Callable[[], object], log_tail: Callable[[], str]
) -> Iterator[None]:
    """Around a peer's start-up checks: on any failure stop the peer, and add its log to a
    timeout's message (what it printed is usually why it never got ready)."""
    try:
        yield
    except TimeoutError as exc:
        log = log_tail()
        stop()
        raise TimeoutError(f"{exc}; {name}'s log:\n{log}") from None
    except BaseException:
        stop()
        raise
