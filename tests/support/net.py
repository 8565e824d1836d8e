"""Loopback ports and bounded waits.

Every wait in the test suite goes through `wait_until`: it polls, never sleeps a
fixed time for readiness, and raises `TimeoutError` naming what it waited for.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


class PeerExited(RuntimeError):
    """A peer process exited while we waited for it; `wait_until` stops at once."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (bind to port 0); the socket is closed before
    returning, so another process could take it in between, which is unlikely
    on a test machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    interval: float = 0.05,
    what: str | None = None,
) -> object:
    """Poll `predicate` until it returns a truthy value and return that value.

    Raise TimeoutError after `timeout` seconds, naming `what` (or the
    predicate) and the last exception the predicate raised, if any. Exceptions
    from the predicate count as "not yet", except PeerExited, which is raised
    at once.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except PeerExited:
            raise
        except Exception as exc:  # "not ready yet"; reported if it never gets ready
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            detail = f"; last error: {last_error!r}" if last_error is not None else ""
            raise TimeoutError(f"{name} not true after {timeout:.1f} s{detail}")
        time.sleep(interval)


def port_is_open(host: str, port: int) -> bool:
    """Return True if a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Wait until host:port accepts TCP connections; raise TimeoutError if not."""
    wait_until(
        lambda: port_is_open(host, port),
        timeout,
        what=f"TCP port {host}:{port} accepting connections",
    )
