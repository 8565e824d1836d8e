"""The status snapshot: one description of the agent's state for `dirigo status` (and, later, the
health endpoints). Built from the store and the disk, never from a running process's memory, so it
works the same whether or not the daemon is up."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agent import __version__
from agent.config import Settings
from agent.config.units import rough_duration
from agent.spool import Spool
from agent.store import UPLOAD, JobRecord, JobState, Store
from agent.store.choices import FETCH_SYNTAX

FAILED_SHOWN = 10
"""Failed items `render` lists one per line; the rest are counted (all are in the JSON)."""


def snapshot(settings: Settings, store: Store, spool: Spool) -> dict[str, Any]:
    """Return the documented status document (see README, "Operations").

    Keys are stable: `studies`, `instances` and `jobs` hold a count for every state (0 included),
    `disk` the data filesystem, `last_error` the newest error event or null, `uploads` every part
    a worker is sending right now and how far it got, `failed` every failed job with its last
    error and next attempt (null: it waits for an operator).
    """
    state = store.status()
    disk = spool.disk_usage()
    # A part stays `uploading` between attempts; only a claimed job is being sent right now.
    sending = {
        (j.study_uid, j.part) for j in store.jobs.in_states([JobState.CLAIMED]) if j.kind == UPLOAD
    }
    uploads = [u for u in store.uploads.in_progress() if (u.study_uid, u.part) in sending]
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
        "transcode": _transcode(settings, store),
        "schema_version": state.schema_version,
        "uploads": [
            {
                "study_uid": upload.study_uid,
                "part": upload.part,
                "bytes_sent": upload.confirmed_offset,
                "bytes_total": upload.size,
                "rate_bytes_per_s": round(upload.rate, 1),
            }
            for upload in uploads
        ],
        "retrieve": {"fetch_syntax": _fetch_syntax(store)},
        "failed": [
            {
                "id": job.id,
                "kind": job.kind,
                "study_uid": job.study_uid,
                "part": job.part,
                "attempts": job.attempts,
                "last_error": job.last_error,
                "next_attempt_at": iso_time(job.next_attempt_at),
            }
            for job in store.jobs.failed()
        ],
    }


def _transcode(settings: Settings, store: Store) -> dict[str, Any]:
    """Return `upload.transcode` and the newest codec choice `auto` recorded, with its reason."""
    choice = store.uploads.last_codec_choice()
    last = None
    if choice is not None:
        last = {"at": iso_time(choice.at), "study_uid": choice.study_uid, "reason": choice.reason}
    return {"setting": settings.upload.transcode, "last_choice": last}


def _fetch_syntax(store: Store) -> dict[str, Any] | None:
    """Return the fetch syntax Query/Retrieve chose last, why, and when; None before any."""
    found = store.choices.latest(FETCH_SYNTAX)
    if found is None:
        return None
    document, at = found
    return {**document, "at": iso_time(at)}


def job_document(job: JobRecord) -> dict[str, Any]:
    """Return a job as `dirigo queue list --json` shows it (times in ISO-8601 UTC, or null)."""
    return {
        "id": job.id,
        "kind": job.kind,
        "state": str(job.state),
        "study_uid": job.study_uid,
        "part": job.part,
        "attempts": job.attempts,
        "next_attempt_at": iso_time(job.next_attempt_at),
        "last_error": job.last_error,
        "lease_owner": job.lease_owner,
        "lease_expires_at": iso_time(job.lease_expires_at),
        "updated_at": iso_time(job.updated_at),
    }


def iso_time(epoch: float | None) -> str | None:
    """Return epoch seconds as ISO-8601 in UTC (as `last_error.at` is), or None for None."""
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC).isoformat()


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
    transcode = status["transcode"]
    if transcode["last_choice"]:
        choice = transcode["last_choice"]
        lines.append(
            f"transcode  {transcode['setting']}, last {choice['study_uid']} {choice['reason']}"
        )
    else:
        lines.append(f"transcode  {transcode['setting']}")
    lines += [f"uploading  {_upload_line(upload)}" for upload in status["uploads"]]
    if not status["uploads"]:
        lines.append("uploading  none")
    lines.append(f"retrieve   {fetch_syntax_line(status['retrieve']['fetch_syntax'])}")
    failed = status["failed"]
    lines += [f"failed     {_failed_line(item)}" for item in failed[:FAILED_SHOWN]]
    if len(failed) > FAILED_SHOWN:
        more = len(failed) - FAILED_SHOWN
        lines.append(f"failed     … and {more} more (`dirigo queue list --state failed`)")
    if not failed:
        lines.append("failed     none")
    return "\n".join(lines)


def render_jobs(jobs: list[dict[str, Any]]) -> str:
    """Return job documents (see `job_document`) as a table an operator reads at a terminal."""
    if not jobs:
        return "no jobs"
    header = ("ID", "KIND", "STATE", "ATTEMPTS", "STUDY", "PART", "NEXT ATTEMPT", "LAST ERROR")
    rows = [header]
    for job in jobs:
        rows.append(
            (
                str(job["id"]),
                job["kind"],
                job["state"],
                str(job["attempts"]),
                job["study_uid"],
                str(job["part"]),
                _next_attempt(job),
                job["last_error"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)), row[-1]]
        )
        for row in rows
    )


def _upload_line(upload: dict[str, Any]) -> str:
    where = f"{upload['study_uid']} part {upload['part']}"
    total = upload["bytes_total"]
    if not total:
        return f"{where}: packing"
    sent = upload["bytes_sent"]
    return (
        f"{where}: {sent / 1e6:.1f} of {total / 1e6:.1f} MB ({100 * sent // total}%)"
        f" at {upload['rate_bytes_per_s'] / 1e6:.1f} MB/s"
    )


def fetch_syntax_line(choice: dict[str, Any] | None) -> str:
    """Return what retrieval asks the archive for, and why (`/status`'s
    `retrieve.fetch_syntax`), in one line."""
    if choice is None:
        return "nothing fetched yet"
    line = f"fetching as {choice['asks_name']}: {choice['why']}"
    refused = ", ".join(syntax["name"] for syntax in choice["refused"])
    return line + (f"; the archive refused {refused}" if refused else "")


def _failed_line(item: dict[str, Any]) -> str:
    if item["next_attempt_at"] is None:
        when = f"never: needs `dirigo queue retry {item['id']}`"
    else:
        when = _when(item["next_attempt_at"])
    return (
        f"job {item['id']} {item['kind']} {item['study_uid']} part {item['part']},"
        f" {item['attempts']} attempt(s): {item['last_error']}; next attempt {when}"
    )


def _next_attempt(job: dict[str, Any]) -> str:
    if job["state"] == JobState.CLAIMED:
        return f"running ({job['lease_owner']})"
    if job["state"] == JobState.DONE:
        return "-"
    if job["next_attempt_at"] is None:
        return "never (retry by hand)"
    return _when(job["next_attempt_at"])


def _when(iso: str) -> str:
    """Return an ISO-8601 time as `2026-11-23 09:12:48 UTC (in 42s)` for people."""
    at = datetime.fromisoformat(iso)
    seconds = (at - datetime.now(tz=UTC)).total_seconds()
    relative = "due now" if seconds <= 0 else f"in {rough_duration(seconds)}"
    return f"{at:%Y-%m-%d %H:%M:%S} UTC ({relative})"
