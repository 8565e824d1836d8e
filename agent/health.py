"""The status snapshot: one description of the agent's state for `dirigo status` (and, later, the
health endpoints). Built from the store and the disk, never from a running process's memory, so it
works the same whether or not the daemon is up."""

from __future__ import annotations

from typing import Any

from agent import __version__
from agent.config import Settings
from agent.spool import Spool
from agent.store import Store


def snapshot(settings: Settings, store: Store, spool: Spool) -> dict[str, Any]:
    """Return the documented status document (see README, "Operations").

    Keys are stable: `studies`, `instances` and `jobs` hold a count for every state (0 included),
    `disk` the data filesystem, `last_error` the newest error event or null.
    """
    state = store.status()
    disk = spool.disk_usage()
    return {
        "site": settings.site,
        "version": __version__,
        "data_dir": str(settings.data_dir),
        "studies": dict(state.studies),
        "instances": dict(state.instances),
        "jobs": dict(state.jobs),
        "disk": {
            "total_bytes": disk.total,
            "used_bytes": disk.used,
            "free_bytes": disk.free,
            "used_percent": round(disk.percent, 1),
            "high_water_percent": settings.spool.high_water,
            "accepting": not spool.above_high_water(),
        },
        "last_error": state.last_error,
        "schema_version": state.schema_version,
    }


def render(status: dict[str, Any]) -> str:
    """Return the snapshot as the short text an operator reads at a terminal."""

    def counts(group: dict[str, int]) -> str:
        return "  ".join(f"{name} {count}" for name, count in group.items())

    disk = status["disk"]
    lines = [
        f"Dirigo {status['version']}  site {status['site']}  data {status['data_dir']}",
        f"studies    {counts(status['studies'])}",
        f"instances  {counts(status['instances'])}",
        f"jobs       {counts(status['jobs'])}",
        f"disk       {disk['used_percent']}% used of {disk['total_bytes'] / 1e9:.1f} GB, "
        f"high water {disk['high_water_percent']}%"
        + ("" if disk["accepting"] else "  (REFUSING new instances)"),
    ]
    error = status["last_error"]
    if error:
        lines.append(f"last error {error['at']} {error['kind']}: {error['message']}")
    else:
        lines.append("last error none")
    return "\n".join(lines)
