"""Liveness: a part is healthy while it beats within its deadline and its thread lives."""

from __future__ import annotations

import threading

from agent.liveness import Liveness


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_part_that_beats_within_its_deadline_is_healthy() -> None:
    clock = Clock()
    liveness = Liveness(clock)
    liveness.watch("upload-1", 10.0)
    for _ in range(5):
        clock.now += 9.0
        liveness.beat("upload-1")
    health = liveness.check()
    assert health.healthy
    assert health.summary() == "healthy"
    assert health.document()["parts"]["upload-1"]["healthy"] is True


def test_a_part_silent_past_its_deadline_fails_and_is_named() -> None:
    clock = Clock()
    liveness = Liveness(clock)
    liveness.watch("supervisor", 60.0)
    liveness.watch("upload-1", 10.0)
    clock.now += 11.0
    liveness.beat("supervisor")
    health = liveness.check()
    assert not health.healthy
    assert [part.name for part in health.failing] == ["upload-1"]
    assert health.document()["failing"] == ["upload-1"]
    assert "upload-1 made no progress for 11s (deadline 10s)" in health.summary()
    liveness.beat("upload-1")
    assert liveness.check().healthy


def test_a_part_whose_thread_died_fails_at_once() -> None:
    liveness = Liveness(Clock())
    thread = threading.Thread(target=lambda: None, name="upload-2")
    thread.start()
    thread.join()
    liveness.watch("upload-2", 3600.0, thread)
    health = liveness.check()
    assert [(part.name, part.problem) for part in health.failing] == [("upload-2", "is dead")]


def test_a_beat_without_a_name_counts_for_the_calling_threads_part() -> None:
    clock = Clock()
    liveness = Liveness(clock)
    liveness.watch("upload-3", 5.0)
    clock.now += 6.0
    thread = threading.Thread(target=liveness.beat, name="upload-3")
    thread.start()
    thread.join()
    assert liveness.check().healthy


def test_an_unwatched_part_is_no_longer_judged() -> None:
    clock = Clock()
    liveness = Liveness(clock)
    liveness.watch("upload-1", 1.0)
    liveness.beat("nobody-watches-this")
    clock.now += 5.0
    liveness.unwatch("upload-1")
    assert liveness.check().healthy
    assert liveness.check().parts == ()


def test_a_part_that_is_not_essential_impairs_the_agent_but_leaves_it_healthy() -> None:
    clock = Clock()
    liveness = Liveness(clock)
    liveness.watch("supervisor", 60.0)
    liveness.watch("watch", 10.0, essential=False)
    clock.now += 11.0
    liveness.beat("supervisor")
    health = liveness.check()
    assert health.healthy
    assert health.impaired
    assert [part.name for part in health.failing] == ["watch"]
    assert health.document()["parts"]["watch"]["essential"] is False
    assert health.summary().startswith("healthy but impaired: watch made no progress")
    clock.now += 61.0
    health = liveness.check()
    assert not health.healthy
    assert health.summary().startswith("unhealthy: supervisor")
