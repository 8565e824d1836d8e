"""The one backoff policy: exponential with full jitter, capped. Its state (attempts, next attempt,
last error) lives in the job row, so it survives restarts; this module only computes delays."""

from __future__ import annotations

import random
from dataclasses import dataclass


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
        step = min(self.cap, self.first * 2 ** max(attempts - 1, 0))
        draw = (rng or random).uniform(step / 2, step)
        if hint is not None:
            draw = max(draw, min(hint, self.cap))
        return draw
