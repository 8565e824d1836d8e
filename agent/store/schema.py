"""The database schema, as numbered migrations applied in order (see `Store.open`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One schema change. Released migrations are never edited: a change is a new version."""

    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema",
        (
            """CREATE TABLE studies (
                id INTEGER PRIMARY KEY,
                study_uid TEXT NOT NULL,
                part INTEGER NOT NULL,
                state TEXT NOT NULL CHECK (state IN
                    ('open', 'stable', 'queued', 'uploading', 'sent', 'confirmed')),
                first_received_at REAL,
                last_received_at REAL,
                stable_at REAL,
                UNIQUE (study_uid, part)
            )""",
            "CREATE INDEX studies_by_state ON studies (state, last_received_at)",
            """CREATE TABLE instances (
                id INTEGER PRIMARY KEY,
                study_id INTEGER NOT NULL REFERENCES studies (id),
                sop_instance_uid TEXT NOT NULL,
                sop_class_uid TEXT NOT NULL,
                series_uid TEXT NOT NULL,
                transfer_syntax TEXT NOT NULL,
                path TEXT NOT NULL,
                size INTEGER NOT NULL,
                sha256 TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('received', 'packed', 'sent')),
                calling_ae TEXT NOT NULL,
                received_at REAL NOT NULL,
                replaced_count INTEGER NOT NULL DEFAULT 0,
                superseded INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE UNIQUE INDEX instances_current_sop_uid
                ON instances (sop_instance_uid) WHERE superseded = 0""",
            "CREATE INDEX instances_by_path ON instances (path)",
            "CREATE INDEX instances_by_study ON instances (study_id)",
            """CREATE TABLE quarantine (
                id INTEGER PRIMARY KEY,
                at REAL NOT NULL,
                reason TEXT NOT NULL,
                path TEXT NOT NULL,
                calling_ae TEXT NOT NULL,
                sop_instance_uid TEXT NULL
            )""",
            """CREATE TABLE events (
                id INTEGER PRIMARY KEY,
                at REAL NOT NULL,
                level TEXT NOT NULL CHECK (level IN ('info', 'warning', 'error')),
                kind TEXT NOT NULL,
                study_uid TEXT NULL,
                sop_instance_uid TEXT NULL,
                message TEXT NOT NULL
            )""",
            "CREATE INDEX events_by_level ON events (level, at)",
            """CREATE TABLE jobs (
                id INTEGER PRIMARY KEY,
                kind TEXT NOT NULL,
                study_id INTEGER NOT NULL REFERENCES studies (id),
                state TEXT NOT NULL CHECK (state IN ('ready', 'claimed', 'done', 'failed')),
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at REAL,
                lease_owner TEXT NULL,
                lease_expires_at REAL NULL,
                last_error TEXT NULL,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                UNIQUE (kind, study_id)
            )""",
            "CREATE INDEX jobs_due ON jobs (kind, state, next_attempt_at)",
        ),
    ),
    Migration(
        2,
        "uploads",
        (
            # One row per study part on its way to the cloud: its bundle once packed, its tus
            # upload once created. `confirmed_offset` is what the server last acknowledged;
            # `sent_to` is the furthest byte ever put on the wire for `url`, so that an offset
            # the server reports beyond it is recognised as not ours.
            """CREATE TABLE uploads (
                study_id INTEGER PRIMARY KEY REFERENCES studies (id),
                bundle_path TEXT NULL,
                bundle_size INTEGER NULL,
                bundle_sha256 TEXT NULL,
                bundle_format TEXT NULL,
                instances INTEGER NOT NULL DEFAULT 0,
                url TEXT NULL,
                confirmed_offset INTEGER NOT NULL DEFAULT 0,
                sent_to INTEGER NOT NULL DEFAULT 0,
                attempt_offset INTEGER NOT NULL DEFAULT 0,
                attempt_started_at REAL NULL,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                sent_at REAL NULL,
                confirmed_at REAL NULL,
                purged_at REAL NULL
            )""",
            "CREATE INDEX uploads_by_confirmed ON uploads (purged_at, confirmed_at)",
        ),
    ),
    Migration(
        3,
        "stow-rs per instance",
        (
            # With `upload.protocol: stow-rs` each instance goes up on its own (in batches):
            # when the archive acknowledged it as stored, so that a resumed part sends only
            # the instances not acknowledged yet.
            "ALTER TABLE instances ADD COLUMN stow_stored_at REAL NULL",
        ),
    ),
    Migration(
        4,
        "quarantine by content",
        (
            # One copy per sender and content (sha256 of the whole file): a sender retrying
            # the same bad instance counts `repeats` instead of adding a copy each time.
            # `size` and `last_at` bound the quarantine (spool.quarantine_max and
            # quarantine_keep). Rows from before have no sha256 and never match.
            "ALTER TABLE quarantine ADD COLUMN sha256 TEXT NULL",
            "ALTER TABLE quarantine ADD COLUMN size INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE quarantine ADD COLUMN repeats INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE quarantine ADD COLUMN last_at REAL NULL",
            "UPDATE quarantine SET last_at = at",
            "CREATE UNIQUE INDEX quarantine_by_content ON quarantine (calling_ae, sha256)",
            "CREATE INDEX quarantine_by_age ON quarantine (last_at)",
        ),
    ),
    Migration(
        5,
        "activity by time",
        (
            # The status page charts instances received and sent per minute and per half hour
            # from these rows (see `Activity`): without these indexes each refresh would read
            # every instance the site ever received.
            "CREATE INDEX instances_by_received ON instances (received_at)",
            "CREATE INDEX uploads_by_sent ON uploads (sent_at)",
            "CREATE INDEX studies_by_last_received ON studies (last_received_at)",
        ),
    ),
    Migration(
        6,
        "choices",
        (
            # What the running agent chose by what it measured, and why (a JSON document per
            # choice, e.g. `fetch_syntax`), so that `dirigo status`, another process, shows it.
            """CREATE TABLE choices (
                name TEXT PRIMARY KEY,
                document TEXT NOT NULL,
                at REAL NOT NULL
            )""",
        ),
    ),
    Migration(
        7,
        "audit trail",
        (
            # Who did what to which study, when, and how it ended (`dirigo audit`, and the DICOM
            # audit messages sent to syslog from these rows' values). UIDs, AE titles and
            # addresses only: never a patient's name or ID. `detail` is a JSON object whose
            # keys depend on `event` (instance counts by SOP class, query keys, a destination).
            """CREATE TABLE audit (
                id INTEGER PRIMARY KEY,
                at REAL NOT NULL,
                event TEXT NOT NULL,
                outcome TEXT NOT NULL CHECK (outcome IN ('success', 'failure')),
                reason TEXT NULL,
                calling_ae TEXT NULL,
                called_ae TEXT NULL,
                address TEXT NULL,
                study_uid TEXT NULL,
                detail TEXT NOT NULL DEFAULT '{}'
            )""",
            "CREATE INDEX audit_by_time ON audit (at)",
            "CREATE INDEX audit_by_study ON audit (study_uid, at)",
        ),
    ),
)

SCHEMA_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at REAL NOT NULL
)"""


def latest_version(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """The schema version that `migrations` bring a database to: the one this code runs."""
    return max((m.version for m in migrations), default=0)


def schema_version(db: sqlite3.Connection) -> int:
    """The schema version of the database behind `db`: 0 when nothing was ever migrated."""
    try:
        (version,) = db.execute(
            "SELECT coalesce(max(version), 0) FROM schema_migrations"
        ).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return 0
    return int(version)


def outdated(path: object, current: int, known: int) -> str:
    """Why a command other than `dirigo run` and `dirigo migrate` refuses an older database."""
    return (
        f"the database at {path} has schema version {current}, this Dirigo needs {known}:"
        " run `dirigo migrate` (after a `dirigo backup`, to be able to go back)"
    )


def too_new(path: object, current: int, known: int) -> str:
    """Why every command refuses a database written by a newer Dirigo."""
    return (
        f"the database at {path} has schema version {current}, newer than this Dirigo knows"
        f" ({known}): upgrade Dirigo, or restore a backup written by this version"
    )
