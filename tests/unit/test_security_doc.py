"""docs/security.md shows each control by a test it names: every row of its control tables
names at least one test file, and every file and test it names exists, so a renamed or removed
test cannot leave a control that nothing shows any more."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
TESTS = ROOT / "tests"


def shown_by() -> list[tuple[str, str]]:
    """Return (threat, the 'shown by' cell) of every row of the tables with that column."""
    rows = []
    column = None
    for line in DOC.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if "shown by" in cells:
            column = cells.index("shown by")
        elif column is not None and not set(line) <= set("|- "):
            rows.append((cells[0], cells[column]))
    return rows


def test_the_control_tables_are_found() -> None:
    assert len(shown_by()) >= 25


def resolve(name: str) -> Path:
    if name.startswith("tests/"):
        return ROOT / name
    found = sorted(TESTS.rglob(name))
    assert len(found) == 1, f"{name!r} names {len(found)} test files"
    return found[0]


def test_every_control_is_shown_by_tests_that_exist() -> None:
    problems = []
    for threat, cell in shown_by():
        current: Path | None = None
        named = 0
        for token in re.findall(r"`([^`]+)`", cell):
            if token.startswith("systemd-analyze"):
                continue
            file, _, test = token.partition("::")
            if file.endswith(".py"):
                current = resolve(file)
                named += 1
                if not current.is_file():
                    problems.append(f"{threat[:40]}: no {file}")
                    continue
            elif not test:
                if not token.startswith("test_"):
                    continue  # a command or a setting quoted in the cell
                test = token  # a test of the file named before it
            if test:
                if current is None:
                    problems.append(f"{threat[:40]}: {token} names no file")
                    continue
                prefix = test.rstrip("…")
                end = "" if test.endswith("…") else r"\("
                pattern = "def " + re.escape(prefix) + end
                if not re.search(pattern, current.read_text(encoding="utf-8")):
                    problems.append(f"{threat[:40]}: {current.name} has no {test}")
        if named == 0 and "pyproject.toml" not in cell:
            problems.append(f"{threat[:40]}: shown by no test file")
    assert problems == []
