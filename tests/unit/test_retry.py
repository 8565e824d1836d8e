"""The one backoff policy: doubling steps with jitter, a cap, and the server's hint honoured."""

from __future__ import annotations

import random
import threading
import time

import pytest

from agent.retry import Backoff, retried


def test_each_failure_doubles_the_wait_within_half_to_full_step() -> None:
    backoff = Backoff(first=10, cap=1000)
    rng = random.Random(1)
    for attempts, step in ((1, 10), (2, 20), (3, 40), (4, 80)):
        for _ in range(50):
            assert step / 2 <= backoff.delay(attempts, rng) <= step


def test_the_wait_never_exceeds_the_cap_even_after_many_failures() -> None:
    backoff = Backoff(first=10, cap=900)
    rng = random.Random(2)
    assert all(450 <= backoff.delay(500, rng) <= 900 for _ in range(50))


@pytest.mark.parametrize(("hint", "low", "high"), [(300, 300, 300), (5000, 900, 900), (1, 5, 10)])
def test_a_retry_after_hint_is_honoured_when_longer_up_to_the_cap(
    hint: float, low: float, high: float
) -> None:
    backoff = Backoff(first=10, cap=900)
    assert low <= backoff.delay(1, random.Random(3), hint=hint) <= high


def test_jitter_spreads_sites_that_failed_together() -> None:
    backoff = Backoff(first=60, cap=900)
    delays = {round(backoff.delay(3, random.Random(seed)), 3) for seed in range(20)}
    assert len(delays) == 20


@pytest.mark.parametrize("attempts", [1025, 10_000])
def test_a_job_failing_for_weeks_waits_the_cap_instead_of_overflowing(attempts: int) -> None:
    backoff = Backoff(first=30.0, cap=600.0)  # as the settings hold them: seconds, float
    assert 300 <= backoff.delay(attempts, random.Random(4)) <= 600


class Flaky:
    """Fails `failures` times with `error`, then returns "done"; counts its calls."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def passing(exc: Exception) -> tuple[bool, float | None]:
    return isinstance(exc, ConnectionError), None


def call(flaky: Flaky, *, deadline: float = 60.0, stop: threading.Event | None = None) -> str:
    return retried(
        flaky,
        attempts=3,
        backoff=Backoff(first=0.001, cap=0.001),
        deadline=time.monotonic() + deadline,
        stop=stop or threading.Event(),
        again=passing,
        what="test",
    )


def test_retried_calls_again_until_a_passing_failure_passes() -> None:
    flaky = Flaky(2, ConnectionError("reset"))
    assert call(flaky) == "done"
    assert flaky.calls == 3


def test_retried_gives_up_after_its_attempts_with_the_last_failure() -> None:
    flaky = Flaky(3, ConnectionError("reset"))
    with pytest.raises(ConnectionError):
        call(flaky)
    assert flaky.calls == 3


def test_retried_raises_a_failure_that_will_not_pass_at_once() -> None:
    flaky = Flaky(1, ValueError("bad"))
    with pytest.raises(ValueError):
        call(flaky)
    assert flaky.calls == 1


@pytest.mark.parametrize("stopped", [True, False])
def test_retried_stops_when_told_or_when_the_next_wait_passes_the_deadline(stopped: bool) -> None:
    stop = threading.Event()
    if stopped:
        stop.set()
    flaky = Flaky(1, ConnectionError("reset"))
    with pytest.raises(ConnectionError):
        call(flaky, deadline=60.0 if stopped else 0.0, stop=stop)
    assert flaky.calls == 1
