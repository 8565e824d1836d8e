"""The one backoff policy: exponential with full jitter, capped. Its state (attempts, next attempt,
last error) lives in the job row, so it survives restarts; this module only computes delays."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

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


def retried(
    call: Callable[[], T],
    *,
    attempts: int,
    backoff: Backoff,
    deadline: float,
    stop: threading.Event,
    again: Callable[[Exception], tuple[bool, float | None]],
    what: str,
) -> T:
    """Return what `call` returns, calling it up to `attempts` times while it raises an
    exception that `again` says may pass (`again` also gives the server's hint, Retry-After),
    waiting `backoff`'s delay between calls. For work done within one request (a retrieval the
    PACS waits on), not for jobs, whose retries live in their row.

    Raise the last exception when it may not pass, the attempts are spent, the next wait would
    end after `deadline` (a `time.monotonic()` value), or `stop` is set while waiting."""
    attempt = 1
    while True:
        try:
            return call()
        except Exception as exc:
            passing, hint = again(exc)
            if not passing or attempt >= attempts:
                raise
            wait = backoff.delay(attempt, hint=hint)
            if time.monotonic() + wait > deadline:
                raise
            logger.info("%s: try %d failed (%s); again in %.1f s", what, attempt, exc, wait)
            if stop.wait(wait):
                raise
            attempt += 1
