"""Which transfer syntax to ask the archive for when fetching an instance by WADO-RS
(`serve.fetch_syntax`): as it holds it (`transfer-syntax=*`), or losslessly compressed, which
crosses a slow link in a third of the bytes (JPEG-LS lossless on a CT: 3.6 times fewer).

Only an instance held uncompressed is asked for compressed: the archive's listing says how it is
held, or else the first instance of its series fetched as held does. One held compressed stays
as it is, lossy ones above all: transcoding a lossy original would hide that its pixels are not
the modality's. A destination that does not accept the syntax fetched gets it decompressed
(`syntax.plan`), with the very pixels the archive holds.

With `auto`, the link decides: the instances fetched as held measure it (bytes per second of one
fetch of at least MEASURED_SIZE, smoothed), and while that stays below FAST_FETCH compression is
asked for; one fetch in PROBE_EVERY is still asked as held, so the measure follows the link.
Until a first measure, instances are asked as held.

A syntax the archive refuses (400, 406 or 500 to that request: Orthanc refuses JPEG 2000 and
HTJ2K) is remembered for the life of the process and the next is asked, down to `*`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from pydicom import uid

from agent.serve.query import InstanceRef
from agent.serve.syntax import UNCOMPRESSED

logger = logging.getLogger(__name__)

AS_STORED = "*"
LADDERS: dict[str, tuple[str, ...]] = {
    "auto": (uid.JPEGLSLossless, uid.JPEGLosslessSV1),
    "jpeg-ls": (uid.JPEGLSLossless, uid.JPEGLosslessSV1),
    "htj2k": (uid.HTJ2KLossless, uid.JPEGLSLossless, uid.JPEGLosslessSV1),
    "as-stored": (),
}
"""The compressed syntaxes asked for, in turn, per setting; `*` always comes last."""
REFUSALS = frozenset({400, 406, 500})
"""The answers that mean the archive will not give an instance in the syntax asked."""
FAST_FETCH = 12.5e6
"""Bytes per second of one fetch (100 Mbit/s) from which `auto` asks as held: faster, the
archive's encoding and the local decoding cost more than the bytes saved."""
MEASURED_SIZE = 256 * 1024
"""Smaller fetches do not measure the link: their time is the request's latency, not bytes."""
SMOOTHING = 0.2
"""Weight of a new measure in the link's smoothed rate."""
PROBE_EVERY = 16
LEARN_WAIT = 120.0
"""Longest wait for the first fetch of a series to tell how the series is held."""
_SERIES_KEPT = 4096
"""Series whose held syntax is remembered (the most recent)."""


class SyntaxChooser:
    """The syntaxes to ask one archive for, per instance, by `setting`. Thread-safe."""

    def __init__(self, setting: str = "auto") -> None:
        if setting not in LADDERS:
            raise ValueError(f"fetch syntax {setting!r} is not one of {', '.join(LADDERS)}")
        self.setting = setting
        self._lock = threading.Lock()
        self._refused: set[str] = set()
        self._held: OrderedDict[str, str] = OrderedDict()
        self._rate: float | None = None
        self._asked = 0
        self._learning: dict[str, threading.Event] = {}

    @property
    def rate(self) -> float | None:
        """The link's smoothed rate in bytes per second of one fetch, once measured."""
        with self._lock:
            return self._rate

    def held(self, ref: InstanceRef) -> str | None:
        """Return how the archive holds `ref`, if its listing or its series told."""
        if ref.transfer_syntax:
            return ref.transfer_syntax
        with self._lock:
            return self._held.get(ref.series)

    def compressible(self, ref: InstanceRef) -> tuple[str, ...]:
        """Return the compressed syntaxes `ref` may be fetched in (not yet refused), or none if
        it is held compressed, its syntax is unknown, or the setting is `as-stored`."""
        if self.held(ref) not in UNCOMPRESSED:
            return ()
        with self._lock:
            return tuple(s for s in LADDERS[self.setting] if s not in self._refused)

    def choices(self, ref: InstanceRef) -> tuple[list[str], bool]:
        """Return the syntaxes to ask for `ref`, in turn, the last `*`; and True if this fetch
        is to tell how the archive holds `ref`'s series, in which case the caller calls
        `settled` when it ends, however it ends. Fetches of a series whose syntax is not known
        wait for the first one's answer (at most LEARN_WAIT seconds)."""
        if self.setting == "as-stored" or (self.setting == "auto" and not self._slow()):
            return [AS_STORED], False
        if self.held(ref) is None:
            with self._lock:
                gate = self._learning.get(ref.series)
                if gate is None:
                    self._learning[ref.series] = threading.Event()
                    return [AS_STORED], True
            gate.wait(LEARN_WAIT)
        ladder = self.compressible(ref)
        if ladder and self.setting == "auto":
            with self._lock:
                self._asked += 1
                if self._asked % PROBE_EVERY == 0:
                    ladder = ()
        return [*ladder, AS_STORED], False

    def _slow(self) -> bool:
        with self._lock:
            return self._rate is not None and self._rate < FAST_FETCH

    def settled(self, ref: InstanceRef) -> None:
        """End the fetch that was to tell how `ref`'s series is held: the others go on."""
        with self._lock:
            gate = self._learning.pop(ref.series, None)
        if gate is not None:
            gate.set()

    def refused(self, syntax: str, why: str) -> None:
        """Remember that the archive will not answer in `syntax`."""
        with self._lock:
            new = syntax not in self._refused
            self._refused.add(syntax)
        if new:
            name = uid.UID(syntax).name
            logger.warning("the archive refused %s (%s): asking for the next syntax", name, why)

    def fetched(self, ref: InstanceRef, asked: str, syntax: str, size: int, took: float) -> None:
        """Learn from one fetch: asked as `asked`, answered in `syntax`, `size` bytes in `took`
        seconds. Only fetches as held measure the link and tell a series' syntax."""
        if asked != AS_STORED:
            return
        with self._lock:
            self._held[ref.series] = syntax
            self._held.move_to_end(ref.series)
            while len(self._held) > _SERIES_KEPT:
                self._held.popitem(last=False)
            if took > 0 and size >= MEASURED_SIZE:
                rate = size / took
                previous = self._rate
                self._rate = rate if previous is None else previous + SMOOTHING * (rate - previous)
