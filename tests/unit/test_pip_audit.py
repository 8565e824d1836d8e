"""scripts/audit_deps.py's verdict on pip-audit's JSON report, the report made by pip-audit's own
JSON formatter (so a change of its shape fails here, not silently in CI): a known vulnerability
fails the audit unless requirements/audit-ignore.txt excuses it with a reason; a lookup that
answered for some packages and not others fails; one that answered for none (no network, a
mirror without the data) says NOT AUDITED, and fails only where the audit is required."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.version import Version
from pip_audit._format.json import JsonFormat
from pip_audit._service.interface import (
    ResolvedDependency,
    SkippedDependency,
    VulnerabilityResult,
)

REPO = Path(__file__).resolve().parents[2]


def load_audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "pip_audit_script", REPO / "scripts/audit_deps.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pip_audit_script"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


audit = load_audit()


def report(*deps: ResolvedDependency | SkippedDependency, vulnerable: bool = False) -> Any:
    """pip-audit's JSON report of `deps`; the first resolved one has a vulnerability if asked."""
    vuln = VulnerabilityResult(
        id="PYSEC-2099-1",
        description="a crafted header crashes it",
        fix_versions=[Version("2.99")],
        aliases={"CVE-2099-0001"},
    )
    result: dict[Any, list[VulnerabilityResult]] = {}
    for dep in deps:
        first = vulnerable and isinstance(dep, ResolvedDependency) and not result
        result[dep] = [vuln] if first else []
    return json.loads(JsonFormat(output_desc=False, output_aliases=True).format(result, []))


REQUESTS = ResolvedDependency("requests", Version("2.34.2"))
PYDICOM = ResolvedDependency("pydicom", Version("3.0.2"))


def test_a_clean_report_passes() -> None:
    verdict = audit.judge(report(REQUESTS, PYDICOM), {}, required=True)
    assert verdict.ok
    assert verdict.lines == ["2 packages audited: no known vulnerability"]


def test_a_known_vulnerability_fails_and_names_package_id_and_fix() -> None:
    verdict = audit.judge(report(REQUESTS, PYDICOM, vulnerable=True), {}, required=False)
    assert not verdict.ok
    assert verdict.lines == ["VULNERABLE requests 2.34.2: PYSEC-2099-1 (fixed in 2.99)"]


@pytest.mark.parametrize("listed", ["PYSEC-2099-1", "CVE-2099-0001"])
def test_an_ignore_entry_with_a_reason_excuses_it_by_id_or_alias(listed: str) -> None:
    ignores, problems = audit.read_ignores(f"# comment\n\n{listed}  only in the CLI we never run\n")
    assert problems == []
    verdict = audit.judge(report(REQUESTS, vulnerable=True), ignores, required=True)
    assert verdict.ok
    assert verdict.lines[0].startswith("ignored requests 2.34.2: PYSEC-2099-1")
    assert verdict.lines[0].endswith(": only in the CLI we never run")


def test_an_ignore_entry_without_a_reason_is_a_problem() -> None:
    _, problems = audit.read_ignores("PYSEC-2099-1\nGHSA-xxxx-yyyy-zzzz   \n")
    assert problems == [
        "audit-ignore.txt line 1: PYSEC-2099-1 has no reason",
        "audit-ignore.txt line 2: GHSA-xxxx-yyyy-zzzz has no reason",
    ]


def test_an_ignore_entry_that_no_longer_applies_is_reported() -> None:
    verdict = audit.judge(report(REQUESTS), {"PYSEC-2000-9": "old"}, required=True)
    assert verdict.ok
    assert "audit-ignore.txt: PYSEC-2000-9 no longer applies; remove it" in verdict.lines


def test_a_partial_lookup_fails() -> None:
    skipped = SkippedDependency("pydicom", "Dependency not found on PyPI and could not be audited")
    verdict = audit.judge(report(REQUESTS, skipped), {}, required=False)
    assert not verdict.ok
    assert verdict.lines == ["not audited: Dependency not found on PyPI and could not be audited"]


@pytest.mark.parametrize("required", [False, True])
def test_no_lookup_at_all_is_not_audited_and_fails_only_when_required(required: bool) -> None:
    skipped = [SkippedDependency(n, f"Dependency not found on PyPI: {n}") for n in ("a", "b")]
    verdict = audit.judge(report(*skipped), {}, required=required)
    assert verdict.ok is not required
    (line,) = verdict.lines
    assert line.startswith("NOT AUDITED: PyPI's vulnerability data answered for none of the 2")


def test_the_ignore_file_in_the_repository_gives_a_reason_for_every_entry() -> None:
    _, problems = audit.read_ignores((REPO / "requirements/audit-ignore.txt").read_text())
    assert problems == []


def test_pip_audit_trusts_the_systems_certificates_unless_a_bundle_is_chosen(
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    env = audit.audit_environment({"PATH": "/usr/bin"}, bundle)
    assert env == {"PATH": "/usr/bin", "REQUESTS_CA_BUNDLE": str(bundle)}
    chosen = {"REQUESTS_CA_BUNDLE": "/srv/ca.pem"}
    assert audit.audit_environment(chosen, bundle) == chosen
    assert audit.audit_environment({}, tmp_path / "absent.crt") == {}
