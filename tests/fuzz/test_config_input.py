"""The configuration file is input an operator edits by hand: whatever it holds, loading it gives
Settings or one ConfigError naming every problem, each on one line, each problem with a value
as `At 'key.path': ...`; `dirigo check-config` exits 78 (EX_CONFIG) with them and no traceback.

tests/unit/test_config.py feeds arbitrary YAML and data; here the seed is the real
conf.example.yaml, changed the way an edit goes wrong: a value replaced at a real key path, a
key removed or misspelt, the file's bytes mutated."""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from agent.config import ConfigError, Settings, load_config
from tests.fuzz.support import budget, corpus, mutated

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "conf.example.yaml"
SEED: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
EXIT_CONFIG = 78


def key_paths(data: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every key path in `data`, list indexes included."""
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += key_paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += key_paths(value, (*prefix, index))
    return found


PATHS = key_paths(SEED)
values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=True),
        st.text(max_size=20),
        st.sampled_from(["90s", "8 MiB", "101%", "-1", "0", "", "~", "yes", "0x10", "1e400"]),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
edits = st.lists(
    st.tuples(st.sampled_from(PATHS), st.sampled_from(("set", "delete", "rename")), values),
    min_size=1,
    max_size=4,
)


def edited(changes: list[tuple[tuple[str | int, ...], str, Any]]) -> dict[str, Any]:
    """The example's data with each change made where its key path still exists."""
    data = copy.deepcopy(SEED)
    for path, kind, value in changes:
        parent: Any = data
        for key in path[:-1]:
            try:
                parent = parent[key]
            except (KeyError, IndexError, TypeError):
                break
        else:
            last = path[-1]
            if isinstance(parent, dict) and last in parent:
                if kind == "set":
                    parent[last] = value
                elif kind == "delete":
                    del parent[last]
                else:
                    parent[f"{last}x"] = parent.pop(last)
            elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
                parent[last] = value
    return data


def load(text: bytes) -> Settings | ConfigError:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        path.write_bytes(text)
        try:
            return load_config(path)
        except ConfigError as exc:
            assert exc.problems
            assert all("\n" not in problem for problem in exc.problems), exc.problems
            return exc


@budget(300)
@given(edits)
def test_any_edit_of_the_example_is_settings_or_problems_each_naming_its_key(
    changes: list[tuple[tuple[str | int, ...], str, Any]],
) -> None:
    outcome = load(yaml.safe_dump(edited(changes)).encode())
    if isinstance(outcome, ConfigError):
        for problem in outcome.problems:
            assert problem.startswith("At '") or problem.startswith("the file"), problem


@budget(200)
@given(mutated(EXAMPLE.read_bytes(), most=4))
def test_any_mutation_of_the_example_file_is_settings_or_a_config_error(text: bytes) -> None:
    load(text)


@pytest.mark.parametrize("path", corpus("config"), ids=lambda p: p.name)
def test_check_config_names_each_problem_of_each_corpus_file_and_exits_78(path: Path) -> None:
    """Each corpus file's first line is `# expect: TEXT`, a part of the problem it must give."""
    expected = path.read_text(errors="replace").splitlines()[0].removeprefix("# expect: ")
    result = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr, result.stderr
