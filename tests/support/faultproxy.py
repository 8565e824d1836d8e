"""A TCP fault proxy on loopback: real resets, stalls, slow links and refusals between two peers.

Integration tests put `FaultProxy` between an HTTP client (the agent's uploader) and a real
server, then break the path on purpose: reset a connection after an exact number of bytes, hold
every byte without closing anything, squeeze the link to a rural bit rate, or turn every new
connection away. The peers see real kernel-level faults (a RST, a read that never returns, a slow
socket), so the code under test is exercised the way a bad network would exercise it, with
nothing mocked.

One thread runs a `selectors` loop over non-blocking sockets. Every socket is touched only while
`_lock` is held, so the public methods can change the rules (and reset connections) from the test
thread at any time, and a rule is in force by the time the method returns.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from tests.support.net import LOOPBACK

try:  # The unsent-bytes ioctl is Linux's; elsewhere a cut does not wait for the send queue.
    import fcntl
    import termios

    _TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
except ImportError:  # pragma: no cover - not on Linux
    _TIOCOUTQ = None

Direction = Literal["upstream", "downstream"]
UPSTREAM: Direction = "upstream"
DOWNSTREAM: Direction = "downstream"
DIRECTIONS: tuple[Direction, ...] = (UPSTREAM, DOWNSTREAM)

CHUNK = 64 * 1024
"""Most bytes read or written in one call, and most bytes held per direction per connection."""

IDLE_TICK = 0.25
"""Longest select() wait; the waker makes changes prompt, this only bounds a missed wake-up."""

DRAIN_TICK = 0.005
DRAIN_LIMIT = 2.0
"""Most seconds a cut waits for the bytes up to the limit to leave the proxy's send queue.

A reset throws away whatever is still queued, so resetting at once could deliver fewer bytes
than the limit; a peer that stopped reading must not hold the cut off for ever, though.
"""

STOP_TIMEOUT = 5.0
"""Default bound on `close()`: the loop never blocks longer than IDLE_TICK, so this is ample."""

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_LINGER_ZERO = struct.pack("ii", 1, 0)


def _hard_close(sock: socket.socket) -> None:
    """Close `sock` with SO_LINGER 0, so that the peer gets a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


def _unsent_bytes(sock: socket.socket) -> int:
    """Return the bytes still in `sock`'s send queue (not yet acknowledged), 0 if unknown."""
    if _TIOCOUTQ is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, struct.pack("i", 0))
    except (OSError, ValueError):
        return 0
    unsent: int = struct.unpack("i", raw)[0]
    return unsent


@dataclass
class _CutRule:
    """Reset the connection that would forward byte `remaining + 1` in one direction."""

    remaining: int
    every: int | None  # None: fire once; else re-arm with this many bytes after each cut


@dataclass
class _Bucket:
    """A token bucket: `rate` bytes a second, bursts of at most `capacity` bytes.

    The burst is a tenth of a second of traffic (at most one chunk), so that a throttled
    transfer is smooth at the scale of a test yet is not written one byte at a time.
    """

    rate: int
    capacity: int = 0
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.capacity = max(1, min(CHUNK, self.rate // 10))
        self.tokens = float(self.capacity)

    def refill(self, now: float) -> None:
        self.tokens = min(float(self.capacity), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def threshold(self, pending: int) -> int:
        """Tokens to wait for before writing `pending` bytes: all of them, or a full burst."""
        return min(pending, self.capacity)

    def seconds_until(self, tokens: int) -> float:
        return max(0.0, (tokens - self.tokens) / self.rate)


class _Pipe:
    """One direction of one connection: bytes read from `src` and not yet written to `dst`."""

    def __init__(
        self, link: _Link, direction: Direction, src: socket.socket, dst: socket.socket
    ) -> None:
        self.link = link
        self.direction = direction
        self.src = src
        self.dst = dst
        self.buffer = bytearray()
        self.eof = False  # src sent its FIN
        self.shut = False  # that FIN was passed on to dst


class _Link:
    """A client connection and the proxy's own connection to the target for it."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.connected = False
        self.closed = False
        self.pipes = (
            _Pipe(self, UPSTREAM, client, upstream),
            _Pipe(self, DOWNSTREAM, upstream, client),
        )
        self.cut_dst: socket.socket | None = None  # set while a cut waits for its send queue
        self.cut_deadline = 0.0

    def pipe_from(self, sock: socket.socket) -> _Pipe:
        return self.pipes[0] if sock is self.client else self.pipes[1]

    def pipe_to(self, sock: socket.socket) -> _Pipe:
        return self.pipes[1] if sock is self.client else self.pipes[0]


class FaultProxy:
    """Forward TCP from a free 127.0.0.1 port to `target_host:target_port`, faults on demand.

    Use it as a context manager (`with FaultProxy(host, port) as proxy:`) or call `start()`
    and `close()`. Point the client at `proxy.url_for("/path")`; every client connection gets
    its own connection to the target, and bytes flow both ways unchanged until a fault is
    asked for. "Upstream" is client to target, "downstream" is target to client.

    Counters: `bytes_upstream` and `bytes_downstream` (bytes forwarded), `connections`
    (client connections forwarded), `refused` (client connections turned away by `refuse()`),
    `cuts` (connections the proxy reset on purpose, by a cut rule or `reset_all()`) and
    `open_connections`.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = LOOPBACK
        self._lock = threading.RLock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.bind((self.host, 0))
            self._listener.listen(128)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._interest: dict[socket.socket, int] = {}
        self._links: set[_Link] = set()
        self._rules: dict[Direction, _CutRule] = {}
        self._buckets: dict[Direction, _Bucket] = {}
        self._stalled = False
        self._refusing = False
        self._bytes: dict[Direction, int] = {UPSTREAM: 0, DOWNSTREAM: 0}
        self._connections = 0
        self._refused = 0
        self._cuts = 0
        self._thread: threading.Thread | None = None
        self._closing = False
        self._torn_down = False
        self._error: BaseException | None = None

    # Life cycle ----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start forwarding in a background thread; return self. Calling it twice is harmless."""
        with self._lock:
            if self._closing:
                raise RuntimeError("FaultProxy is closed")
            if self._thread is None:
                self._selector.register(self._listener, _READ, None)
                self._selector.register(self._wake_r, _READ, None)
                self._thread = threading.Thread(
                    target=self._run, name=f"faultproxy-{self.port}", daemon=True
                )
                self._thread.start()
        return self

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the loop and reset every connection; wait at most `timeout` s for the thread.

        Open connections are reset rather than closed cleanly, so that nothing lingers in
        TIME_WAIT or half-closed after a test. Raise RuntimeError if the thread does not stop
        in time, or if the loop died of an exception: either is a bug in the proxy, and a test
        that passed through a broken proxy should not pass unnoticed.
        """
        with self._lock:
            if self._closing:
                thread = None
            else:
                self._closing = True
                thread = self._thread
                if thread is None:
                    self._teardown()
        if thread is None:
            return
        self._wake()
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"FaultProxy thread did not stop within {timeout:.1f} s")
        if self._error is not None:
            raise RuntimeError("FaultProxy loop failed; it stopped forwarding") from self._error

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def url_for(self, path: str) -> str:
        """Return the http:// URL of `path` through the proxy."""
        return f"http://{self.host}:{self.port}{path}"

    # Faults --------------------------------------------------------------------------------

    def cut_after(self, n_bytes: int, direction: Direction = UPSTREAM) -> None:
        """Reset the connection that would forward more than `n_bytes` more bytes in `direction`.

        Bytes are counted from this call, across all connections. The connection that crosses
        the limit gets exactly up to the limit forwarded (and, on Linux, out of the proxy's send
        queue) before both of its sides are reset. The rule fires once; after it the proxy
        passes traffic again, so a client can reconnect and resume. It replaces any cut rule
        already set for `direction`.
        """
        self._set_rule(direction, _CutRule(remaining=self._check_bytes(n_bytes, 0), every=None))

    def cut_every(self, n_bytes: int, direction: Direction = UPSTREAM) -> None:
        """Like `cut_after`, but re-armed after each cut: a link that drops every `n_bytes`."""
        n = self._check_bytes(n_bytes, 1)
        self._set_rule(direction, _CutRule(remaining=n, every=n))

    def stop_cutting(self, direction: Direction | None = None) -> None:
        """Drop the cut rule for `direction` (both directions if None)."""
        with self._lock:
            for d in DIRECTIONS if direction is None else (self._check_direction(direction),):
                self._rules.pop(d, None)
        self._wake()

    def stall(self) -> None:
        """Stop forwarding anything, without closing or resetting: a link that hangs.

        Bytes already read stay held, sockets stay open, and new connections are accepted but
        stall too, until `resume()`. A client sees reads that never return.
        """
        with self._lock:
            self._stalled = True
        self._wake()

    def resume(self) -> None:
        """Forward again after `stall()`, held bytes first."""
        with self._lock:
            self._stalled = False
        self._wake()

    def throttle(self, bytes_per_second: int | None) -> None:
        """Limit each direction to `bytes_per_second` (a token bucket); None lifts the limit.

        The limit is for the whole link, shared by all connections, as on a slow uplink.
        """
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError(f"bytes_per_second must be positive or None, not {bytes_per_second}")
        with self._lock:
            if bytes_per_second is None:
                self._buckets.clear()
            else:
                self._buckets = {d: _Bucket(bytes_per_second) for d in DIRECTIONS}
        self._wake()

    def refuse(self) -> None:
        """Turn every new client connection away at once, as a dead cloud service would.

        The kernel completes the TCP handshake before the proxy sees the connection, so the
        client gets a reset rather than "connection refused": in connect() itself if the reset
        arrives in time, else in its first read or write. Either way an HTTP client fails at
        once with a connection error. Connections already open are left alone (`reset_all()`).
        """
        with self._lock:
            self._refusing = True
        self._wake()

    def accept(self) -> None:
        """Forward new client connections again after `refuse()`."""
        with self._lock:
            self._refusing = False
        self._wake()

    def reset_all(self) -> int:
        """Reset both sides of every open connection now; return how many were reset."""
        with self._lock:
            links = list(self._links)
            for link in links:
                self._cuts += 1
                self._reset_link(link)
        self._wake()
        return len(links)

    # Counters ------------------------------------------------------------------------------

    @property
    def bytes_upstream(self) -> int:
        with self._lock:
            return self._bytes[UPSTREAM]

    @property
    def bytes_downstream(self) -> int:
        with self._lock:
            return self._bytes[DOWNSTREAM]

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def refused(self) -> int:
        with self._lock:
            return self._refused

    @property
    def cuts(self) -> int:
        with self._lock:
            return self._cuts

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    # Rules, checked on the caller's thread -------------------------------------------------

    @staticmethod
    def _check_direction(direction: str) -> Direction:
        for d in DIRECTIONS:
            if direction == d:
                return d
        raise ValueError(f"direction must be 'upstream' or 'downstream', not {direction!r}")

    @staticmethod
    def _check_bytes(n_bytes: int, minimum: int) -> int:
        if n_bytes < minimum:
            raise ValueError(f"n_bytes must be at least {minimum}, not {n_bytes}")
        return n_bytes

    def _set_rule(self, direction: Direction, rule: _CutRule) -> None:
        d = self._check_direction(direction)
        with self._lock:
            self._rules[d] = rule
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    # The loop, on its own thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    timeout = self._prepare(time.monotonic())
                events = self._selector.select(timeout)
                with self._lock:
                    if self._closing:
                        return
                    for key, mask in events:
                        self._dispatch(key, mask)
        except BaseException as exc:  # a bug in the proxy: close() reports it
            self._error = exc
            raise
        finally:
            with self._lock:
                self._teardown()

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        for link in list(self._links):
            self._reset_link(link)
        for sock in (self._listener, self._wake_r, self._wake_w):
            self._forget(sock)
            sock.close()
        self._selector.close()

    def _prepare(self, now: float) -> float:
        """Finish due cuts, pass on pending FINs, set what each socket waits for; return timeout."""
        timeout = IDLE_TICK
        for link in list(self._links):
            if link.cut_dst is not None:
                if not self._finish_cut(link, now):
                    timeout = min(timeout, DRAIN_TICK)
                continue
            if link.connected and not self._stalled:
                for pipe in link.pipes:
                    self._pass_fin(pipe)
                if link.closed:
                    continue
            up, down = link.pipes
            client_events = _READ if self._can_read(up) else 0
            upstream_events = 0
            if not link.connected:
                upstream_events = _WRITE  # writable once the connect completes
            else:
                if self._can_read(down):
                    upstream_events |= _READ
                wait = self._write_wait(up, now)
                if wait == 0.0:
                    upstream_events |= _WRITE
                elif wait is not None:
                    timeout = min(timeout, wait)
                wait = self._write_wait(down, now)
                if wait == 0.0:
                    client_events |= _WRITE
                elif wait is not None:
                    timeout = min(timeout, wait)
            self._set_interest(link.client, client_events, link)
            self._set_interest(link.upstream, upstream_events, link)
        return timeout

    def _can_read(self, pipe: _Pipe) -> bool:
        return not self._stalled and not pipe.eof and len(pipe.buffer) < CHUNK

    def _write_wait(self, pipe: _Pipe, now: float) -> float | None:
        """Return 0.0 if `pipe` may write now, seconds to wait for tokens, None if nothing to do."""
        if self._stalled or not pipe.buffer:
            return None
        bucket = self._buckets.get(pipe.direction)
        if bucket is None:
            return 0.0
        bucket.refill(now)
        return bucket.seconds_until(bucket.threshold(len(pipe.buffer)))

    def _set_interest(self, sock: socket.socket, events: int, link: _Link) -> None:
        current = self._interest.get(sock, 0)
        if events == current:
            return
        if current == 0:
            self._selector.register(sock, events, link)
        elif events == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, events, link)
        if events:
            self._interest[sock] = events
        else:
            del self._interest[sock]

    def _forget(self, sock: socket.socket) -> None:
        if self._interest.pop(sock, 0) or sock in (self._listener, self._wake_r):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(sock)

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        sock = key.fileobj
        if sock is self._wake_r:
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
            return
        if sock is self._listener:
            self._accept_all()
            return
        link = key.data
        # An event may be stale: its link was reset, or its fd was reused, since select().
        if not isinstance(link, _Link) or link.closed or link.cut_dst is not None:
            return
        if sock is not link.client and sock is not link.upstream:
            return
        if not link.connected:
            if sock is link.upstream and mask & _WRITE:
                self._finish_connect(link)
            if sock is link.client and mask & _READ:
                self._read(link.pipe_from(sock))
            return
        if mask & _READ:
            self._read(link.pipe_from(sock))
        if mask & _WRITE and not link.closed and link.cut_dst is None:
            self._forward(link.pipe_to(sock))

    def _accept_all(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNABORTED, EMFILE: try again on the next event
                return
            if self._refusing:
                self._refused += 1
                _hard_close(client)
                continue
            self._open_link(client)

    def _open_link(self, client: socket.socket) -> None:
        client.setblocking(False)
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream)
        self._links.add(link)
        self._connections += 1
        try:
            err = upstream.connect_ex(self.target)
        except OSError as exc:  # the target name did not resolve
            err = exc.errno or errno.EHOSTUNREACH
        if err == 0:
            link.connected = True
        elif err not in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            self._reset_link(link)  # the target is not there: the client sees a reset

    def _finish_connect(self, link: _Link) -> None:
        err = link.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            self._reset_link(link)
            return
        link.connected = True
        for pipe in link.pipes:
            self._forward(pipe)

    def _read(self, pipe: _Pipe) -> None:
        link = pipe.link
        if not self._can_read(pipe):
            return
        try:
            data = pipe.src.recv(CHUNK - len(pipe.buffer))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the peer reset: the other peer sees a reset too, as on a real path
            self._reset_link(link)
            return
        if data:
            pipe.buffer += data
        else:
            pipe.eof = True
        if link.connected:
            self._forward(pipe)

    def _forward(self, pipe: _Pipe) -> None:
        """Write what `pipe` holds, as far as stall, throttle, cut rule and dst allow."""
        link = pipe.link
        while pipe.buffer and not self._stalled and not link.closed and link.cut_dst is None:
            n = min(len(pipe.buffer), CHUNK)
            bucket = self._buckets.get(pipe.direction)
            if bucket is not None:
                bucket.refill(time.monotonic())
                if bucket.tokens < bucket.threshold(n):
                    return
                n = min(n, int(bucket.tokens))
            rule = self._rules.get(pipe.direction)
            if rule is not None:
                if rule.remaining == 0:
                    self._cut(link, pipe)
                    return
                n = min(n, rule.remaining)
            try:
                sent = pipe.dst.send(pipe.buffer[:n])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._reset_link(link)
                return
            del pipe.buffer[:sent]
            self._bytes[pipe.direction] += sent
            if bucket is not None:
                bucket.tokens -= sent
            if rule is not None:
                rule.remaining -= sent
        if not link.closed and link.cut_dst is None and not self._stalled:
            self._pass_fin(pipe)

    def _pass_fin(self, pipe: _Pipe) -> None:
        """Pass on a FIN once everything before it was forwarded; close the link when both did."""
        if not pipe.eof or pipe.buffer or pipe.shut:
            return
        link = pipe.link
        try:
            pipe.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self._reset_link(link)
            return
        pipe.shut = True
        if all(p.shut for p in link.pipes):
            self._close_link(link)

    def _cut(self, link: _Link, pipe: _Pipe) -> None:
        """Fire the cut rule of `pipe`'s direction on `link`: reset it once its queue drained."""
        rule = self._rules[pipe.direction]
        if rule.every is None:
            del self._rules[pipe.direction]
        else:
            rule.remaining = rule.every
        link.cut_dst = pipe.dst
        link.cut_deadline = time.monotonic() + DRAIN_LIMIT
        self._set_interest(link.client, 0, link)
        self._set_interest(link.upstream, 0, link)
        self._finish_cut(link, time.monotonic())

    def _finish_cut(self, link: _Link, now: float) -> bool:
        """Reset a cut link if its last forwarded bytes left (or waited long enough)."""
        assert link.cut_dst is not None
        if _unsent_bytes(link.cut_dst) > 0 and now < link.cut_deadline:
            return False
        self._cuts += 1
        self._reset_link(link)
        return True

    def _reset_link(self, link: _Link) -> None:
        self._drop_link(link, reset=True)

    def _close_link(self, link: _Link) -> None:
        self._drop_link(link, reset=False)

    def _drop_link(self, link: _Link, *, reset: bool) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        for sock in (link.client, link.upstream):
            self._forget(sock)
            if reset:
                _hard_close(sock)
            else:
                sock.close()
