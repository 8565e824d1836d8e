"""The one backoff policy: exponential with full jitter, capped. Its state (attempts, next attempt,
last error) lives in the job row, so it survives restarts; this module only computes delays."""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_DOUBLINGS = 64
"""The step stops doubling here: 2**64 times any first wait is far past any cap, and an
unbounded power outgrows a float after about a thousand failures (eight days of an outage at a
ten-minute cap) and raises OverflowError instead of a delay."""


@dataclass(frozen=True)
class Backoff:
    """Wait about `first` seconds after the first failure, doubling per attempt up to `cap`.

    Full jitter (a uniform draw between half the step and the step) spreads the retries of
    many sites that lost the cloud at the same moment, so they do not all come back at once.
    """

    first: float
    cap: float

    def delay(
        self, attempts: int, rng: random.Random | None = None, hint: float | None = None
    ) -> float:
        """Return seconds to wait after failed attempt number `attempts` (1 for the first).

        A server's own `hint` (Retry-After) is honoured when longer, up to the cap.
        """
        doublings = min(max(attempts - 1, 0), MAX_DOUBLINGS)
        step = min(self.cap, self.first * 2.0**doublings)
        draw = (rng or random).uniform(step / 2, step)
        if hint is not None:
            draw = max(draw, min(hint, self.cap))
        return draw
