"""A slow link, made for real: a network namespace whose loopback carries the traffic of chosen
TCP ports through a kernel token-bucket shaper (`tc qdisc ... tbf`), one bucket per direction.

Everything still talks to 127.0.0.1, but to the namespace's own loopback: the caller enters the
namespace (`with link.inside():`) and every socket, thread and child process it makes from then
on lives there, so the archive, the agent and the PACS are started inside as usual, each on a
free port. Only the ports passed to `shape` are slow; the rest of the namespace's loopback is
as fast as the host's. Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` and `tc`.

    with ShapedNamespace() as link, link.inside():
        archive = start_orthanc(...)        # inside the namespace
        link.shape(archive.http_port, mbit=20)
        ...                                  # the agent fetches over a 20 Mbit/s link

Entering is per thread (setns(2) on the calling thread): enter from the thread that starts the
peers, before it starts them. The namespace is deleted on exit, with whatever still runs in it
losing its network.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from types import TracebackType

CLONE_NEWNET = 0x40000000
_UNLIMITED = ("rate", "10gbit", "quantum", "200000")
MTU = 1500
"""The namespace's loopback MTU: a WAN's, so the shaper meters packets of a real link's size
(loopback's own 64 KiB packets would make the bucket lurch)."""
BURST_BYTES = 32 * 1024
"""Bucket depth: a few packets, as a real access link's shaper allows."""
QUEUE_MS = 200
"""How long a packet may wait in the shaper before it is dropped (`tbf latency`)."""


class NamespaceUnavailable(RuntimeError):
    """This machine cannot make a shaped namespace (not root, no `ip` or `tc`)."""


def available() -> str | None:
    """Return why a shaped namespace cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "making a network namespace needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


class ShapedNamespace:
    """A network namespace of its own, deleted on exit; see the module's docstring."""

    def __init__(self) -> None:
        self.name = f"dirigo-{secrets.token_hex(4)}"
        self._shaped: dict[int, float] = {}

    def __enter__(self) -> ShapedNamespace:
        reason = available()
        if reason is not None:
            raise NamespaceUnavailable(reason)
        _run("ip", "netns", "add", self.name)
        try:
            _run("ip", "-n", self.name, "link", "set", "lo", "mtu", str(MTU), "up")
            # an htb root only sorts packets (its classes pass 10 Gbit/s, as fast as loopback
            # here): 1:1 for every port not shaped, 1:4 and 1:5 for the two shaped directions,
            # where a tbf does the shaping. (This kernel has htb and tbf, not prio.)
            _run(
                *self._tc(
                    "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1"
                )
            )
            for band in (1, 4, 5):
                _run(
                    *self._tc(
                        "class",
                        "add",
                        "dev",
                        "lo",
                        "parent",
                        "1:",
                        "classid",
                        f"1:{band}",
                        "htb",
                        *_UNLIMITED,
                    )
                )
        except BaseException:
            self._delete()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._delete()

    def shape(self, port: int, mbit: float) -> None:
        """Make TCP traffic from and to `port` on the namespace's loopback pass at `mbit`
        megabits per second in each direction (one bucket each way); again to change the
        rate."""
        rate = f"{mbit * 1000:.0f}kbit"
        # every shaped port shares the two buckets, as the ports of one remote host share its link
        first = port not in self._shaped
        for band, match in ((4, "sport"), (5, "dport")):
            verb = "add" if first and not self._shaped else "change"
            _run(
                *self._tc(
                    "qdisc",
                    verb,
                    "dev",
                    "lo",
                    "parent",
                    f"1:{band}",
                    "handle",
                    f"{band}0:",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    str(BURST_BYTES),
                    "latency",
                    f"{QUEUE_MS}ms",
                )
            )
            if first:
                _run(
                    *self._tc(
                        "filter",
                        "add",
                        "dev",
                        "lo",
                        "parent",
                        "1:",
                        "protocol",
                        "ip",
                        "prio",
                        "1",
                        "u32",
                        "match",
                        "ip",
                        match,
                        str(port),
                        "0xffff",
                        "flowid",
                        f"1:{band}",
                    )
                )
        self._shaped[port] = mbit

    def unshape(self) -> None:
        """Make every shaped port fast again (the buckets pass 10 Gbit/s)."""
        for port in list(self._shaped):
            self.shape(port, 10_000)

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run the body with the calling thread in the namespace, and return it to the network
        namespace it was in afterwards. Sockets, threads and processes made inside stay there."""
        libc = ctypes.CDLL(None, use_errno=True)
        with (
            open("/proc/thread-self/ns/net", "rb") as home,
            open(f"/run/netns/{self.name}", "rb") as target,
        ):
            _setns(libc, target.fileno())
            try:
                yield
            finally:
                _setns(libc, home.fileno())

    def counters(self) -> dict[str, int]:
        """Return the bytes each shaped direction has passed: {"from": ..., "to": ...} the
        shaped ports (a check that traffic really went through the shaper)."""
        out = _run(*self._tc("-s", "qdisc", "show", "dev", "lo"))
        sent: dict[str, int] = {}
        current = ""
        for line in out.splitlines():
            words = line.split()
            if words[:1] == ["qdisc"] and "tbf" in words:
                current = "from" if "40:" in words else "to" if "50:" in words else ""
            elif words[:1] == ["Sent"] and current:
                sent[current] = int(words[1])
                current = ""
        return sent

    def _tc(self, *args: str) -> tuple[str, ...]:
        return ("tc", "-n", self.name, *args)

    def _delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def _setns(libc: ctypes.CDLL, fd: int) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NamespaceUnavailable(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout
