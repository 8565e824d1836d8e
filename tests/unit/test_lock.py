"""The lock files say what pyproject.toml asks for: every dependency (the dev extra's too in the
dev lock) pinned to a release its specifier allows,
with hashes, so `pip install --require-hashes` installs the set that was locked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)(?: ; (.*?))? \\$")


def pins(lock: str) -> list[tuple[str, Version, Marker | None, str]]:
    """Each pinned release in `lock`: name, version, marker and its hash lines."""
    text = (ROOT / "requirements" / lock).read_text()
    found = []
    for block in re.split(r"\n(?=\S)", text):
        first, _, rest = block.partition("\n")
        if match := PIN.match(first):
            name, version, marker = match.groups()
            found.append(
                (canonicalize_name(name), Version(version), marker and Marker(marker), rest)
            )
    return found


def requirements(*extras: str) -> list[Requirement]:
    wanted = [*PROJECT["dependencies"]]
    for extra in extras:
        wanted += PROJECT["optional-dependencies"][extra]
    return [Requirement(r) for r in wanted]


@pytest.mark.parametrize(("lock", "extras"), [("runtime.txt", ()), ("dev.txt", ("dev",))])
def test_every_dependency_is_pinned_to_an_allowed_release_with_hashes(
    lock: str, extras: tuple[str, ...]
) -> None:
    locked = pins(lock)
    assert locked, f"no pins in requirements/{lock}"
    for name, _, _, hashes in locked:
        assert "--hash=sha256:" in hashes, f"{name} in requirements/{lock} has no hash"
    for requirement in requirements(*extras):
        releases = [v for n, v, _, _ in locked if n == canonicalize_name(requirement.name)]
        assert releases, f"{requirement.name} is not in requirements/{lock}: run scripts/lock"
        for version in releases:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"requirements/{lock} pins {requirement.name}=={version}, outside"
                f" {requirement.specifier}: run scripts/lock"
            )


def test_the_dev_lock_runs_the_versions_the_runtime_lock_ships() -> None:
    runtime = {(name, version, str(marker)) for name, version, marker, _ in pins("runtime.txt")}
    dev = {(name, version, str(marker)) for name, version, marker, _ in pins("dev.txt")}
    assert runtime <= dev, sorted(runtime - dev)
