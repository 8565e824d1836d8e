"""Migrations are explicit: only `dirigo run` and `dirigo migrate` change the schema. Every other
command refuses an older database, naming both versions and `dirigo migrate`, and changes
nothing; a database newer than the code is refused by every command."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from agent.store import MIGRATIONS, Store
from agent.store.maintenance import version_of
from tests.support.agent import Agent

KNOWN = MIGRATIONS[-1].version
OLDER = MIGRATIONS[-2].version

# Every command that reads or writes the database, with arguments that would succeed on a
# current one (ids that do not exist are answered after the schema check).
DATABASE_COMMANDS: list[tuple[str, ...]] = [
    ("status",),
    ("status", "--json"),
    ("queue", "list"),
    ("queue", "retry", "1"),
    ("queue", "cancel", "1"),
    ("quarantine", "list"),
    ("quarantine", "show", "1"),
    ("quarantine", "release", "1"),
    ("quarantine", "purge", "1"),
    ("send", "SENDME"),
    ("doctor",),
    ("audit",),
]


def run(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent.command(*args), capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def agent(tmp_data_dir: Path) -> Agent:
    return Agent(tmp_data_dir)


def database(agent: Agent) -> Path:
    return agent.data_dir / "dirigo.db"


def make_older(agent: Agent) -> None:
    agent.data_dir.mkdir(mode=0o700, exist_ok=True)
    Store.open(database(agent), migrations=MIGRATIONS[:-1]).close()
    assert version_of(database(agent)) == OLDER


def make_newer(agent: Agent) -> None:
    agent.data_dir.mkdir(mode=0o700, exist_ok=True)
    Store.open(database(agent)).close()
    with sqlite3.connect(database(agent)) as db:
        db.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    db.close()


def with_file(args: tuple[str, ...], tmp_path: Path) -> tuple[str, ...]:
    """`send` needs a path to import; any file does, since the schema check comes first."""
    if "SENDME" not in args:
        return args
    (tmp_path / "a.dcm").write_bytes(b"not read")
    return tuple(str(tmp_path / "a.dcm") if a == "SENDME" else a for a in args)


@pytest.mark.parametrize("args", DATABASE_COMMANDS, ids=" ".join)
def test_a_command_on_an_older_database_says_to_migrate_and_changes_nothing(
    agent: Agent, tmp_path: Path, args: tuple[str, ...]
) -> None:
    make_older(agent)
    before = database(agent).read_bytes()
    result = run(agent, *with_file(args, tmp_path))
    assert result.returncode == (1 if args[0] == "doctor" else 65), result.stdout
    said = result.stderr + result.stdout
    assert f"has schema version {OLDER}, this Dirigo needs {KNOWN}" in said, said
    assert "run `dirigo migrate`" in said, said
    assert version_of(database(agent)) == OLDER
    assert database(agent).read_bytes() == before


@pytest.mark.parametrize("args", [*DATABASE_COMMANDS, ("migrate",), ("run",)], ids=" ".join)
def test_every_command_refuses_a_database_newer_than_it_knows(
    agent: Agent, tmp_path: Path, args: tuple[str, ...]
) -> None:
    make_newer(agent)
    result = run(agent, *with_file(args, tmp_path))
    assert result.returncode != 0, result.stdout
    if args in (("run",), ("migrate",)):
        # 65, which the unit's RestartPreventExitStatus names: no restart every 5 s
        assert result.returncode == 65, result.stderr
    said = result.stderr + result.stdout
    assert f"has schema version 99, newer than this Dirigo knows ({KNOWN})" in said, said
    assert version_of(database(agent)) == 99


def test_migrate_brings_an_older_database_up_to_date_and_then_other_commands_work(
    agent: Agent,
) -> None:
    make_older(agent)
    assert run(agent, "migrate", "--schema-version").stdout.strip() == str(OLDER)
    result = run(agent, "migrate")
    assert result.returncode == 0, result.stderr
    assert f"migrated from schema version {OLDER} to {KNOWN}" in result.stdout
    assert version_of(database(agent)) == KNOWN
    assert run(agent, "status").returncode == 0
    again = run(agent, "migrate")
    assert again.returncode == 0 and f"up to date (schema version {KNOWN})" in again.stdout


def test_run_migrates_an_older_database_at_start_up(agent: Agent) -> None:
    make_older(agent)
    with agent:
        assert version_of(database(agent)) == KNOWN
        assert agent.status()["schema_version"] == KNOWN


def test_migrate_refuses_while_an_agent_runs(agent: Agent) -> None:
    with agent:
        result = run(agent, "migrate")
    assert result.returncode == 1
    assert "a dirigo agent is running with data_dir" in result.stderr


def test_backup_copies_an_older_database_as_it_is(agent: Agent, tmp_path: Path) -> None:
    # The step before `dirigo migrate` (the package's upgrade takes it): a copy changes nothing.
    make_older(agent)
    result = run(agent, "backup", "--to", str(tmp_path / "before.db"))
    assert result.returncode == 0, result.stderr
    assert version_of(tmp_path / "before.db") == OLDER
    assert version_of(database(agent)) == OLDER


def test_migrate_without_a_database_says_so(agent: Agent) -> None:
    assert run(agent, "migrate", "--schema-version").stdout.strip() == "0"
    result = run(agent, "migrate")
    assert result.returncode == 1
    assert "no database at" in result.stderr and "`dirigo run` creates it" in result.stderr
