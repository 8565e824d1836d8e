"""Which parts of the running agent are alive and making progress: what `GET /healthz` answers,
and what the systemd watchdog is fed by.

Each watched part (the DICOM acceptor, each upload worker, the supervisor loop) reports progress
with `beat` from its own loop and is given a deadline: it fails once it has been silent for longer
than that, or at once when the thread that runs it has died. A part that is merely idle still
loops, so it still beats; only a part stuck in one step, or gone, falls silent.

A part is *essential* unless said otherwise: the agent is unhealthy (and the systemd watchdog
starves, so systemd restarts it) when an essential part fails. A part that a restart cannot cure
and whose stall must not interrupt DICOM receive (the watch folders: a hard-mounted share that
stopped answering stays stuck after a restart) is watched with `essential=False`: its failure is
shown, and makes the agent *degraded*, never unhealthy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PartHealth:
    """One watched part as `Liveness.check` found it."""

    name: str
    healthy: bool
    silent_for: float
    """Seconds since the part last made progress (or since it was watched, if it never did)."""
    deadline: float
    problem: str | None
    """Why the part fails, in a few words; None when it is healthy."""
    essential: bool = True
    """Whether its failure makes the agent unhealthy (else only degraded)."""


@dataclass(frozen=True)
class Health:
    """Every watched part at one moment; healthy when all of them are."""

    parts: tuple[PartHealth, ...]

    @property
    def healthy(self) -> bool:
        """Whether every essential part is healthy."""
        return all(part.healthy for part in self.parts if part.essential)

    @property
    def impaired(self) -> bool:
        """Whether a part that is not essential fails (the agent is then degraded)."""
        return any(not part.healthy for part in self.parts if not part.essential)

    @property
    def failing(self) -> tuple[PartHealth, ...]:
        return tuple(part for part in self.parts if not part.healthy)

    def summary(self) -> str:
        """Return one line: `healthy`, or the failing parts with their problems."""
        if not self.failing:
            return "healthy"
        problems = "; ".join(f"{part.name} {part.problem}" for part in self.failing)
        return f"{'healthy but impaired' if self.healthy else 'unhealthy'}: {problems}"

    def document(self) -> dict[str, Any]:
        """Return the health as `/healthz` and `/status` show it."""
        return {
            "healthy": self.healthy,
            "failing": [part.name for part in self.failing],
            "parts": {
                part.name: {
                    "healthy": part.healthy,
                    "silent_seconds": round(part.silent_for, 1),
                    "deadline_seconds": part.deadline,
                    "problem": part.problem,
                    "essential": part.essential,
                }
                for part in self.parts
            },
        }


@dataclass
class _Watched:
    deadline: float
    last: float
    thread: threading.Thread | None
    essential: bool


class Liveness:
    """The watched parts of one agent process and when each last made progress; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._parts: dict[str, _Watched] = {}

    def watch(
        self,
        name: str,
        deadline: float,
        thread: threading.Thread | None = None,
        *,
        essential: bool = True,
    ) -> None:
        """Watch part `name` from now on (again, if it was): it must beat at least every
        `deadline` seconds, and when `thread` is given, that thread must be alive. A part not
        `essential` that fails makes the agent degraded, not unhealthy."""
        with self._lock:
            self._parts[name] = _Watched(deadline, self._clock(), thread, essential)

    def unwatch(self, name: str) -> None:
        """Stop watching `name` (it was stopped on purpose)."""
        with self._lock:
            self._parts.pop(name, None)

    def beat(self, name: str | None = None) -> None:
        """Record progress of part `name`, by default the part named as the calling thread.

        A beat from a part nobody watches (code shared with `dirigo send`, say) is ignored."""
        part = threading.current_thread().name if name is None else name
        with self._lock:
            watched = self._parts.get(part)
            if watched is not None:
                watched.last = self._clock()

    def check(self) -> Health:
        """Return the health of every watched part, in the order they were first watched."""
        now = self._clock()
        with self._lock:
            parts = list(self._parts.items())
        return Health(tuple(_judge(name, watched, now) for name, watched in parts))


def _judge(name: str, watched: _Watched, now: float) -> PartHealth:
    silent = max(now - watched.last, 0.0)
    problem = None
    if watched.thread is not None and not watched.thread.is_alive():
        problem = "is dead"
    elif silent > watched.deadline:
        problem = f"made no progress for {silent:.0f}s (deadline {watched.deadline:g}s)"
    return PartHealth(name, problem is None, silent, watched.deadline, problem, watched.essential)
