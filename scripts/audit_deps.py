"""Check the locked runtime set (requirements/runtime.txt, what the .deb ships) for known
vulnerabilities with pip-audit; exit 1 if any is found that requirements/audit-ignore.txt does
not excuse with a reason.

    python scripts/audit_deps.py            # scripts/test runs this

pip-audit reads the pins and hashes as they are (nothing installed) and asks PyPI's vulnerability
data about each. Exit codes: 0 audited and clean (or, see below, not reachable); 1 a known
vulnerability, an ignore entry without a reason, or a partial audit (some packages looked up,
others not); 2 pip-audit itself failed.

Where PyPI's per-release JSON cannot be reached at all (a mirror without it, no network), every
package comes back "not found": the audit says NOT AUDITED on one line and exits 0, so that an
offline build still runs its tests; with DIRIGO_AUDIT_REQUIRED=1 (a CI with network) that
exits 1 instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "runtime.txt"
IGNORES = ROOT / "requirements" / "audit-ignore.txt"
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
"""Debian's bundle of the certificates the system trusts (update-ca-certificates writes it)."""


@dataclass
class Verdict:
    """What an audit found: lines to print, and whether it passes."""

    ok: bool = True
    lines: list[str] = field(default_factory=list)

    def fail(self, line: str) -> None:
        self.ok = False
        self.lines.append(line)


def read_ignores(text: str) -> tuple[dict[str, str], list[str]]:
    """Return {vulnerability id: reason} from the ignore file's text, and a problem for each
    entry that gives no reason."""
    ignores: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        vuln, _, reason = line.partition(" ")
        if not reason.strip():
            problems.append(f"audit-ignore.txt line {number}: {vuln} has no reason")
        ignores[vuln] = reason.strip()
    return ignores, problems


def judge(report: dict[str, Any], ignores: dict[str, str], required: bool) -> Verdict:
    """Return the verdict on pip-audit's JSON report, given the excused vulnerabilities."""
    verdict = Verdict()
    dependencies = report.get("dependencies", [])
    skipped = [d for d in dependencies if d.get("skip_reason")]
    audited = [d for d in dependencies if not d.get("skip_reason")]
    seen: set[str] = set()
    for dep in audited:
        for vuln in dep.get("vulns", []):
            ids = {vuln["id"], *vuln.get("aliases", [])}
            seen |= ids
            excused = next((i for i in sorted(ids) if i in ignores), None)
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fixed release yet"
            where = f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})"
            if excused is None:
                verdict.fail(f"VULNERABLE {where}")
            else:
                verdict.lines.append(f"ignored {where}: {ignores[excused]}")
    for stale in sorted(set(ignores) - seen):
        if audited:
            verdict.lines.append(f"audit-ignore.txt: {stale} no longer applies; remove it")
    if skipped and not audited:
        line = (
            f"NOT AUDITED: PyPI's vulnerability data answered for none of the {len(skipped)}"
            f" packages ({skipped[0]['skip_reason']})"
        )
        if required:
            verdict.fail(line + "; DIRIGO_AUDIT_REQUIRED=1")
        else:
            verdict.lines.append(line)
    elif skipped:
        for dep in skipped:
            verdict.fail(f"not audited: {dep['skip_reason']}")
    if verdict.ok and audited:
        verdict.lines.append(f"{len(audited)} packages audited: no known vulnerability")
    return verdict


def audit_environment(
    environ: Mapping[str, str], bundle: Path = SYSTEM_CA_BUNDLE
) -> dict[str, str]:
    """Return pip-audit's environment: `environ`, with the system's certificate bundle for its
    HTTPS unless one is chosen already.

    pip-audit asks PyPI through requests, which trusts certifi's bundle, not the system's: behind
    a TLS-inspecting proxy whose CA the system trusts (pip itself does, through the system's
    store), every lookup would fail certificate verification.
    """
    env = dict(environ)
    if "REQUESTS_CA_BUNDLE" not in env and bundle.is_file():
        env["REQUESTS_CA_BUNDLE"] = str(bundle)
    return env


def main() -> int:
    ignores, problems = read_ignores(IGNORES.read_text() if IGNORES.exists() else "")
    command = [
        sys.executable,
        "-m",
        "pip_audit",
        "--disable-pip",  # the lock pins and hashes every package: nothing to resolve
        "--require-hashes",
        "--requirement",
        str(LOCK),
        "--format",
        "json",
        "--aliases",  # so that an ignore entry may name the CVE
        "on",
        "--progress-spinner",
        "off",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, env=audit_environment(os.environ)
    )
    try:
        report = json.loads(result.stdout)
    except ValueError:
        print(f"audit: pip-audit failed (exit {result.returncode}):", file=sys.stderr)
        print(result.stderr.strip()[-2000:], file=sys.stderr)
        return 2
    verdict = judge(report, ignores, os.environ.get("DIRIGO_AUDIT_REQUIRED") == "1")
    for problem in problems:
        verdict.fail(problem)
    for line in verdict.lines:
        print(f"audit: {line}")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
