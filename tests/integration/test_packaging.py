"""The install script and the systemd unit, staged into a temporary root (no user, no systemctl)."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def install(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "packaging" / "install.sh"), "--root", str(root)],
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(root)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    result = install(root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_the_install_lays_out_venv_config_data_dir_and_unit(staged: Path) -> None:
    dirigo = staged / "opt/dirigo/venv/bin/dirigo"
    version = subprocess.run([dirigo, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("dirigo ")
    config = staged / "etc/dirigo/config.yaml"
    assert config.read_text() == (REPO / "conf.example.yaml").read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert stat.S_IMODE((staged / "var/lib/dirigo").stat().st_mode) == 0o700
    unit = staged / "etc/systemd/system/dirigo.service"
    assert unit.read_text() == (REPO / "systemd/dirigo.service").read_text()
    checked = subprocess.run(
        [dirigo, "check-config", "--config", config], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


def test_reinstalling_keeps_the_operators_config(staged: Path) -> None:
    config = staged / "etc/dirigo/config.yaml"
    config.write_text(config.read_text().replace("hospital-a", "hospital-z"))
    result = install(staged)
    assert result.returncode == 0, result.stderr
    assert "keeping the existing config.yaml" in result.stdout
    assert "hospital-z" in config.read_text()


def test_the_unit_passes_systemd_verification(staged: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd); run scripts/setup")
    # Verify the unit as installed, with ExecStart pointing at the staged binary.
    unit = (REPO / "systemd/dirigo.service").read_text()
    staged_unit = tmp_path / "dirigo.service"
    staged_unit.write_text(unit.replace("/opt/dirigo", str(staged / "opt/dirigo")))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(staged_unit)], capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
