"""The runtime dependencies in pyproject.toml are the ones the package imports: a dependency
nothing imports is installed at every hospital for nothing, and one imported but not declared
breaks a clean install."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PINNED_BY_A_DEPENDENCY = {"pydantic-core"}
"""Imported directly, installed by a declared dependency that pins its exact version (pydantic's
error types live in pydantic-core): declaring it too would only be a second pin to keep."""


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = (re.match(r"[A-Za-z0-9._-]+", spec) for spec in project["dependencies"])
    return {_normal(match.group(0)) for match in names if match}


def _imported_modules() -> set[str]:
    modules: set[str] = set()
    for path in (ROOT / "agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"agent"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_distributions() -> set[str]:
    owners = packages_distributions()
    return {_normal(dist) for module in _imported_modules() for dist in owners.get(module, [])}


def test_every_runtime_dependency_is_imported_by_the_package() -> None:
    unused = _declared() - _imported_distributions()
    assert not unused, f"pyproject.toml lists {sorted(unused)} but agent/ never imports them"


def test_every_import_is_declared() -> None:
    """Declared as a runtime dependency: an optional extra (the dev tools) is missing from a
    plain install."""
    owners = packages_distributions()
    undeclared = {
        module
        for module in _imported_modules()
        if not {_normal(dist) for dist in owners.get(module, [])}
        & (_declared() | PINNED_BY_A_DEPENDENCY)
    }
    assert not undeclared, (
        f"agent/ imports {sorted(undeclared)}, not declared in pyproject.toml's dependencies"
    )
