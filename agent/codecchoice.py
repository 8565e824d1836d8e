"""Which lossless codec packs a study part with `upload.transcode: auto`: none (zstd alone),
JPEG-LS or HTJ2K, whichever makes the time from stable to uploaded least.

The upload worker packs a part whole and only then sends it (`Uploader._process`), so for a part
of `size` bytes each codec is estimated at

    size / pack_speed[codec]  +  size * ratio[codec] / goodput

where `pack_speed` is input bytes per second of a pack on this machine, `ratio` the bundle's
bytes over the input's, and `goodput` the link's bytes per second in the data phase of recent
PATCHes. Pack speed and ratio start from conservative figures measured on a 2-core machine
(DEFAULTS) and follow every pack of the codec chosen (a moving average, SMOOTHING); goodput
follows every PATCH of at least MEASURED_SIZE. A codec never chosen keeps its starting figures.

A goodput older than FRESH seconds no longer describes the link (clinical traffic comes and
goes), so before choosing for a part of PROBED_SIZE or more the worker measures it again with a
probe upload (`Uploader`), unless PATCHes measured it just now. A smaller part is not worth the
probe's bytes: it is chosen with the last goodput, however old. Without any measure (the probe
failed: the cloud is down and nothing will be sent for now anyway) the part goes zstd-only, as
before this choice existed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CODECS = ("none", "jpeg-ls", "htj2k")
"""In order of preference when estimates tie: the cheaper in CPU first."""
FRESH = 20.0
"""Seconds a goodput measure describes the link."""
MEASURED_SIZE = 256 * 1024
"""Smaller PATCHes do not measure the link: their time is the request's latency, not bytes."""
PROBED_SIZE = 8_000_000
"""Parts of this many bytes or more are worth a probe of the link when its measure is stale."""
LEARNED_SIZE = 16_000_000
"""Smaller packs do not measure the codec's speed: starting the workers dominates their time."""
SMOOTHING = 0.3
"""Weight of a new measure in each moving estimate."""


@dataclass(frozen=True)
class Estimate:
    """What a codec costs on this machine: input bytes per second packed, and the bundle's size
    over the input's."""

    pack_speed: float
    ratio: float

    def seconds(self, size: int, goodput: float) -> float:
        """Return the estimated time to pack then send `size` bytes at `goodput` bytes/s."""
        return size / self.pack_speed + size * self.ratio / goodput


DEFAULTS = {
    "zstd": {
        "none": Estimate(100e6, 0.37),
        "jpeg-ls": Estimate(45e6, 0.29),
        "htj2k": Estimate(70e6, 0.33),
    },
    "none": {
        "none": Estimate(300e6, 1.0),
        "jpeg-ls": Estimate(45e6, 0.30),
        "htj2k": Estimate(70e6, 0.34),
    },
}
"""Starting figures per `upload.compression`, a little below those measured packing a CT on a
2-core machine (docs/performance.md: zstd-3 129 MB/s at 2.72, JPEG-LS 57 MB/s at 3.51, HTJ2K
96 MB/s at 3.04), so that a codec must earn its CPU."""


@dataclass(frozen=True)
class Choice:
    """The codec chosen for one part, and why, in words an operator reads in `dirigo status`."""

    codec: str
    reason: str


class CodecChooser:
    """Chooses the codec of each part and learns from packs and PATCHes. Thread-safe."""

    def __init__(
        self,
        compression: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._estimates = dict(DEFAULTS[compression])
        self._goodput: float | None = None
        self._measured_at: float | None = None

    def estimate(self, codec: str) -> Estimate:
        with self._lock:
            return self._estimates[codec]

    @property
    def goodput(self) -> float | None:
        """The link's smoothed goodput in bytes per second, once measured."""
        with self._lock:
            return self._goodput

    def needs_probe(self, size: int) -> bool:
        """Whether the link should be measured before choosing for a part of `size` bytes."""
        if size < PROBED_SIZE:
            return False
        with self._lock:
            at = self._measured_at
        return at is None or self.clock() - at > FRESH

    def sent(self, size: int, seconds: float) -> None:
        """Learn from one PATCH (or probe) of `size` bytes whose data phase took `seconds`."""
        if size < MEASURED_SIZE or seconds <= 0:
            return
        rate = size / seconds
        with self._lock:
            fresh = self._measured_at is not None and self.clock() - self._measured_at <= FRESH
            previous = self._goodput
            # A stale average describes another link: start again from this measure.
            self._goodput = rate if previous is None or not fresh else _mix(previous, rate)
            self._measured_at = self.clock()

    def packed(self, codec: str, size: int, output: int, seconds: float) -> None:
        """Learn from one pack of `size` input bytes into `output` bytes in `seconds`."""
        if size <= 0 or codec not in self._estimates:
            return
        with self._lock:
            old = self._estimates[codec]
            speed = old.pack_speed
            if size >= LEARNED_SIZE and seconds > 0:
                speed = _mix(old.pack_speed, size / seconds)
            self._estimates[codec] = Estimate(speed, _mix(old.ratio, output / size))

    def choose(self, size: int) -> Choice:
        """Return the codec estimated to pack and send `size` bytes soonest, with its reason."""
        goodput = self.goodput
        if goodput is None:
            return Choice("none", "none: zstd only until the link is measured")
        seconds = {codec: self.estimate(codec).seconds(size, goodput) for codec in CODECS}
        best = min(CODECS, key=lambda codec: seconds[codec])
        others = ", ".join(f"{c} {seconds[c]:.1f} s" for c in CODECS if c != best)
        reason = f"{best}: est. {seconds[best]:.1f} s"
        if others:
            reason += f" vs {others}"
        return Choice(best, f"{reason} for {size / 1e6:.1f} MB at {goodput * 8 / 1e6:.1f} Mbit/s")


def _mix(old: float, new: float) -> float:
    return old + SMOOTHING * (new - old)
