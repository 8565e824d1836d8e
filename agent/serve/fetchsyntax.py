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
asked for; once PROBE_AFTER seconds passed since the last measure, one fetch is asked as held
again, so the measure follows the link. The very first fetch measures it while the others wait
for its answer (on a slow link, fetching the first few instances of a study as held would cost
more than that wait); after it, an instance too small to measure the link is asked as held.

What it asks for an instance held uncompressed, and why, is told to `told` (the daemon puts it
where `dirigo status` reads it) whenever that or the refused syntaxes change, and every
TELL_EVERY seconds with the link's rate.

A syntax the archive refuses (400, 406 or 500 to that request: Orthanc refuses JPEG 2000 and
HTJ2K) is remembered for the life of the process and the next is asked, down to `*`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
PROBE_AFTER = 30.0
"""Seconds after the last measure of a slow link before one fetch is asked as held again: the
link is followed, at the cost of one instance's extra bytes every so often (counting fetches
instead cost a 120-slice CT seven uncompressed slices, a sixth of its time on a 20 Mbit/s link)."""
TELL_EVERY = 10.0
"""Seconds between two tellings of an unchanged choice (its link rate moves)."""
LEARN_WAIT = 120.0
"""Longest wait for the first fetch of a series to tell how the series is held."""
_SERIES_KEPT = 4096
"""Series whose held syntax is remembered (the most recent)."""


@dataclass(frozen=True)
class Choice:
    """What is asked for an instance the archive holds uncompressed, and why."""

    setting: str
    asks: str
    """A transfer syntax UID, or `*`: as held."""
    why: str
    rate: float | None
    """The link's rate it was chosen by, in bytes per second of one fetch (None: not measured)."""
    refused: tuple[str, ...]
    """The syntaxes the archive refused, in the order it did."""

    def document(self) -> dict[str, Any]:
        """Return the choice as `/status` shows it (`retrieve.fetch_syntax`)."""
        return {
            "setting": self.setting,
            "asks": self.asks,
            "asks_name": "as held" if self.asks == AS_STORED else uid.UID(self.asks).name,
            "why": self.why,
            "link_rate_bytes_per_s": None if self.rate is None else round(self.rate, 1),
            "refused": [{"uid": s, "name": uid.UID(s).name} for s in self.refused],
        }


class SyntaxChooser:
    """The syntaxes to ask one archive for, per instance, by `setting`. Thread-safe."""

    def __init__(self, setting: str = "auto", clock: Callable[[], float] = time.monotonic) -> None:
        if setting not in LADDERS:
            raise ValueError(f"fetch syntax {setting!r} is not one of {', '.join(LADDERS)}")
        self.setting = setting
        self.told: Callable[[Choice], None] | None = None
        """Told the choice when it changes (see the module's docstring)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._refused: dict[str, None] = {}
        self._held: OrderedDict[str, str] = OrderedDict()
        self._rate: float | None = None
        self._measured_at = 0.0
        self._learning: dict[str, threading.Event] = {}
        self._measurer: tuple[str, threading.Event] | None = None
        self._link_asked = False
        self._last_told: tuple[Choice, float] | None = None

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
        is to tell how the archive holds `ref`'s series or to measure the link first, in which
        case the caller calls `settled` when it ends, however it ends. Fetches of a series whose
        syntax is not known wait for the first one's answer (at most LEARN_WAIT seconds), as
        all wait for the first measure of `auto`."""
        if self.setting == "auto" and self._first_measure(ref):
            return [AS_STORED], True
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
                now = self._clock()
                if now - self._measured_at >= PROBE_AFTER:
                    self._measured_at = now  # one probe at a time: the next waits its turn
                    ladder = ()
        return [*ladder, AS_STORED], False

    def series_choices(self, ref: InstanceRef) -> list[str] | None:
        """Return the syntaxes to ask, in turn, for the whole series of `ref` in one request, as
        `choices` would for `ref` itself; or None while one instance fetched alone must come
        first: the link's first measure, how the series is held, or a probe of a slow link is
        due (that instance's own `choices` does it). A series' answer never measures the link:
        its parts wait on the sending of the ones before them."""
        with self._lock:
            measuring = self.setting == "auto" and (
                not self._link_asked or self._measurer is not None
            )
        if measuring:
            return None
        if self.setting == "as-stored" or (self.setting == "auto" and not self._slow()):
            return [AS_STORED]
        if self.held(ref) is None:
            return None
        ladder = self.compressible(ref)
        if ladder and self.setting == "auto":
            with self._lock:
                if self._clock() - self._measured_at >= PROBE_AFTER:
                    return None
        return [*ladder, AS_STORED]

    def _first_measure(self, ref: InstanceRef) -> bool:
        """Return True if this fetch is the one to measure the link first (the caller calls
        `settled`); else wait until that one ended, if it runs, and return False."""
        with self._lock:
            if not self._link_asked:
                self._link_asked = True
                self._measurer = (ref.sop_instance, threading.Event())
                return True
            gate = None if self._measurer is None else self._measurer[1]
        if gate is not None:
            gate.wait(LEARN_WAIT)
        return False

    def _slow(self) -> bool:
        with self._lock:
            return self._rate is not None and self._rate < FAST_FETCH

    def settled(self, ref: InstanceRef) -> None:
        """End the fetch that was to tell how `ref`'s series is held, or to measure the link
        first: the others go on."""
        with self._lock:
            gates = [self._learning.pop(ref.series, None)]
            if self._measurer is not None and self._measurer[0] == ref.sop_instance:
                gates.append(self._measurer[1])
                self._measurer = None
        for gate in gates:
            if gate is not None:
                gate.set()

    def refused(self, syntax: str, why: str) -> None:
        """Remember that the archive will not answer in `syntax`."""
        with self._lock:
            new = syntax not in self._refused
            self._refused[syntax] = None
        if new:
            name = uid.UID(syntax).name
            logger.warning("the archive refused %s (%s): asking for the next syntax", name, why)
            self._tell()

    def choice(self) -> Choice:
        """Return what is asked now for an instance the archive holds uncompressed, and why."""
        with self._lock:
            rate, refused = self._rate, tuple(self._refused)
        ladder = [s for s in LADDERS[self.setting] if s not in refused]
        if self.setting != "auto":
            why = f"serve.fetch_syntax is {self.setting}"
        elif rate is None:
            why, ladder = "the link is not measured yet", []
        else:
            fast = rate >= FAST_FETCH
            why = (
                f"the link measured {rate * 8 / 1e6:.1f} Mbit/s, {'not ' * fast}below {_FAST_MBIT}"
            )
            ladder = [] if fast else ladder
            if not fast and not ladder:
                why += ", but the archive refused every compressed syntax"
        return Choice(self.setting, ladder[0] if ladder else AS_STORED, why, rate, refused)

    def _tell(self) -> None:
        """Tell `told` the choice if what it asks or the refusals changed, or else if its rate
        did and TELL_EVERY seconds passed since the last telling."""
        if self.told is None:
            return
        choice, now = self.choice(), self._clock()
        with self._lock:
            last = self._last_told
            unchanged = last is not None and (last[0].asks, last[0].refused) == (
                choice.asks,
                choice.refused,
            )
            recent = last is not None and (
                last[0].rate == choice.rate or now - last[1] < TELL_EVERY
            )
            if unchanged and recent:
                return
            self._last_told = (choice, now)
        self.told(choice)

    def fetched(self, ref: InstanceRef, asked: str, syntax: str, size: int, took: float) -> None:
        """Learn from one fetch: asked as `asked`, answered in `syntax`, `size` bytes in `took`
        seconds. Only fetches as held measure the link and tell a series' syntax."""
        if asked != AS_STORED:
            self._tell()
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
                self._measured_at = self._clock()
        self._tell()


_FAST_MBIT = f"{FAST_FETCH * 8 / 1e6:.0f} Mbit/s"
