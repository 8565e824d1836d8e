"""The .deb as a hospital's admin meets it, on this machine, as root: scripts/package builds it,
dpkg installs it with the network cut off, the service runs and takes a study from DCMTK's
storescu while the cloud is unreachable (the study's part stays queued), an upgrade to a rebuilt
package with a higher version and one more migration keeps every queued row and leaves a backup,
a downgrade across that schema change is refused, remove keeps /var/lib/dirigo and purge deletes
it. lintian finds no error in the package.

Where systemd is PID 1 the service runs through systemctl; elsewhere the test plays systemd's
part: it runs the installed unit's ExecStart as its User=, and stops it where systemd would (the
package's prerm), before dpkg replaces the files. Whatever happens, the machine is left as it
was: the package purged, the dirigo user removed if the test made it."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.store import MIGRATIONS
from tests.support import dcmtk
from tests.support.datasets import ct_series
from tests.support.net import LOOPBACK, free_port, wait_until
from tests.support.process import stop_process

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "dirigo-agent"
CONFIG = Path("/etc/dirigo/config.yaml")
STATE = Path("/var/lib/dirigo")
UPGRADE_SUFFIX = "+upgrade.test"
SYSTEMD = Path("/run/systemd/system").is_dir()
# Two package builds (a venv each, from pip's cache), lintian, and the whole lifecycle.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _missing_tools() -> str | None:
    if os.geteuid() != 0:
        return "installing a package needs root"
    for tool in ("dpkg", "dpkg-deb", "/usr/bin/python3", "setpriv", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (this test needs a Debian system)"
    return None


@dataclass(frozen=True)
class Packages:
    first: Path
    upgrade: Path
    version: str
    schema: int


def _copy_tree(into: Path) -> Path:
    """The checkout's files as they are now (tracked and new, not ignored), into `into`."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = REPO / name
        if source.is_file():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return into


def _package_env() -> dict[str, str]:
    """The environment scripts/package runs in: the copied tree has no .venv, so the script
    would drive pip with the system's python3, which has none on a Debian where setup made
    the project's .venv; it gets the virtualenv running the tests instead, as if activated."""
    env = dict(os.environ)
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _build(tree: Path, out: Path) -> Path:
    result = subprocess.run(
        ["bash", "scripts/package", "--out", str(out)],
        cwd=tree,
        env=_package_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (deb,) = out.glob("*.deb")
    return deb


def _bump(tree: Path) -> None:
    """A later release: a higher version and one harmless migration more."""
    pyproject = tree / "pyproject.toml"
    version = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M)
    assert version is not None
    new = version.group(1) + UPGRADE_SUFFIX
    pyproject.write_text(pyproject.read_text().replace(version.group(0), f'version = "{new}"'))
    init = tree / "agent/__init__.py"
    init.write_text(init.read_text().replace(f'"{version.group(1)}"', f'"{new}"'))
    schema = tree / "agent/store/schema.py"
    text = schema.read_text()
    marker = "\nSCHEMA_MIGRATIONS_TABLE = "
    assert marker in text
    added = (
        "\nMIGRATIONS = (*MIGRATIONS, Migration("
        f"{MIGRATIONS[-1].version + 1}, 'test: the upgrade marker',"
        " ('CREATE TABLE upgrade_marker (id INTEGER PRIMARY KEY)',)))\n"
    )
    schema.write_text(text.replace(marker, added + marker, 1))


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    """The package of this checkout and its upgrade, built once per session."""
    if missing := _missing_tools():
        pytest.skip(missing)
    base = tmp_path_factory.mktemp("deb")
    first = _build(_copy_tree(base / "first"), base / "out-first")
    later = _copy_tree(base / "later")
    _bump(later)
    upgrade = _build(later, base / "out-upgrade")
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version is not None
    return Packages(first, upgrade, version.group(1), MIGRATIONS[-1].version)


def test_lintian_finds_no_error_in_the_package(packages: Packages) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian is missing (scripts/setup installs it)")
    result = subprocess.run(
        ["lintian", "--fail-on", "error", str(packages.first)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert result.returncode == 0 and not errors, result.stdout + result.stderr


def dpkg(*args: str, offline: bool = True) -> subprocess.CompletedProcess[str]:
    """dpkg as the admin runs it; `offline` cuts the network off (a namespace of its own)."""
    command = ["dpkg", "--force-confold", *args]
    if offline:
        command = ["unshare", "--net", "--", *command]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def installed_version() -> str | None:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status} ${Version}", PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.startswith("install ok installed"):
        return None
    return result.stdout.split()[-1]


def as_dirigo(*args: str) -> subprocess.CompletedProcess[str]:
    """A `dirigo` command as the agent's user, as an operator would run it."""
    return subprocess.run(
        [*_as_user("dirigo"), "/usr/bin/dirigo", *args, "--config", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        check=False,
    )


def _as_user(user: str) -> list[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]


def status() -> dict[str, Any]:
    result = as_dirigo("status", "--json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def unit_file() -> Path:
    listed = subprocess.run(
        ["dpkg", "-L", PACKAGE], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    (unit,) = [Path(p) for p in listed if p.endswith("/systemd/system/dirigo.service")]
    return unit


class Service:
    """The installed service: through systemd where it is PID 1, else its unit's ExecStart
    as its User=, started and stopped where systemd would."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, dicom_port: int) -> None:
        if SYSTEMD:
            subprocess.run(["systemctl", "enable", "--now", "dirigo.service"], check=True)
        else:
            user, command = _exec_start(unit_file())
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    [*_as_user(user), *command],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                    cwd="/",
                )
        wait_until(lambda: self._answers(dicom_port), 60, what="the service answering C-ECHO")

    def _answers(self, port: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the service exited: {self.log.read_text()[-3000:]}")
        return dcmtk.echoscu(port, calling_ae="PACS").returncode == 0

    def stop_as_systemd_would(self) -> None:
        """Before dpkg replaces the files: under systemd the package's prerm stops it."""
        if self.proc is not None:
            assert stop_process(self.proc, timeout=45) == 0, self.log.read_text()[-3000:]
            self.proc = None

    def kill(self) -> None:
        if SYSTEMD:
            subprocess.run(["systemctl", "disable", "--now", "dirigo.service"], check=False)
        elif self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


def _exec_start(unit: Path) -> tuple[str, list[str]]:
    """The unit's User= and ExecStart= command line (without systemd's prefix characters)."""
    user, command = "root", None
    for line in unit.read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key == "User":
            user = value.strip()
        elif key == "ExecStart":
            command = shlex.split(value.strip().lstrip("-@:+!"))
    assert command, f"no ExecStart in {unit}"
    return user, command


@contextlib.contextmanager
def machine_restored() -> Iterator[None]:
    """Leave the machine as it was, whatever the test did: purge the package, delete its
    directories, and remove the dirigo user and group if the test brought them."""
    if installed_version() is not None or STATE.exists() or Path("/opt/dirigo").exists():
        pytest.skip(f"{PACKAGE} or its directories are already here; the test leaves them be")
    had_user = _exists(pwd.getpwnam, "dirigo")
    had_group = _exists(grp.getgrnam, "dirigo")
    try:
        yield
    finally:
        dpkg("--purge", PACKAGE, offline=False)
        for path in (STATE, Path("/etc/dirigo"), Path("/opt/dirigo")):
            shutil.rmtree(path, ignore_errors=True)
        if not had_user and _exists(pwd.getpwnam, "dirigo"):
            subprocess.run(["userdel", "dirigo"], check=False, capture_output=True)
        if not had_group and _exists(grp.getgrnam, "dirigo"):
            subprocess.run(["groupdel", "dirigo"], check=False, capture_output=True)


def _exists(lookup: Any, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def configure(dicom_port: int) -> None:
    """The admin's edit of the conffile: loopback ports, a cloud that is not there, and none of
    the example's files (TLS certificates, CAs, tokens) that this machine does not have."""
    config = yaml.safe_load(CONFIG.read_text())
    config.update(
        {
            "site": "deb-test",
            "dicom": {
                **config.get("dicom", {}),
                "bind": LOOPBACK,
                "port": dicom_port,
                "peers": [{"ae_title": "PACS", "host": LOOPBACK}],
            },
            "study": {"stable_after": "1s"},
            "cloud": {"upload_url": f"http://{LOOPBACK}:{free_port()}/files/"},
            "health": {"listen": f"{LOOPBACK}:{free_port()}"},
            "watch": {"dirs": []},
            "audit": {},  # the example's syslog server and its CA file are not here
        }
    )
    for section in ("dicom",):
        config[section].pop("tls", None)
    CONFIG.write_text(yaml.safe_dump(config))


def queued() -> tuple[int, int]:
    """Instances held for the cloud (any state but sent), and upload jobs not done."""
    document = status()
    held = sum(n for state, n in document["instances"].items() if state not in ("sent",))
    waiting = sum(n for state, n in document["jobs"].items() if state != "done")
    return held, waiting


def test_install_run_upgrade_remove_purge(packages: Packages, tmp_path: Path) -> None:
    service = Service(tmp_path / "service.log")
    with machine_restored():
        try:
            _install_run_upgrade_remove_purge(packages, service, tmp_path)
        finally:
            service.kill()


def _install_run_upgrade_remove_purge(packages: Packages, service: Service, tmp_path: Path) -> None:
    # Install, with no network at all: nothing is fetched from an index.
    installed = dpkg("--install", str(packages.first))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert installed_version() == packages.version
    _check_layout()

    # Run it and send a study; the cloud is unreachable, so its part stays queued.
    dicom_port = free_port()
    configure(dicom_port)
    service.start(dicom_port)
    files = ct_series(tmp_path / "ct", slices=3, rows=64, cols=64)
    assert dcmtk.storescu(files, dicom_port).returncode == 0
    before = wait_until(
        lambda: (q := queued()) == (3, 1) and q, 60, what="3 instances and 1 job waiting"
    )
    uids_before = _instance_uids()
    service.stop_as_systemd_would()

    # Upgrade, offline: a backup named with the old version, the migration, data kept.
    upgraded = dpkg("--install", str(packages.upgrade))
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert installed_version() == packages.version + UPGRADE_SUFFIX
    backups = list((STATE / "backups").glob(f"dirigo-{packages.version}-*.db"))
    assert len(backups) == 1, list((STATE / "backups").iterdir())
    assert _schema_of(backups[0]) == packages.schema
    assert as_dirigo("migrate", "--schema-version").stdout.strip() == str(packages.schema + 1)
    assert "deb-test" in CONFIG.read_text()  # the admin's configuration is kept
    service.start(dicom_port)
    assert queued() == before
    assert _instance_uids() == uids_before
    assert as_dirigo("--version").stdout.strip() == f"dirigo {packages.version}{UPGRADE_SUFFIX}"

    # A downgrade across the schema change is refused, and the newer package stays.
    downgraded = dpkg("--install", str(packages.first))
    assert downgraded.returncode != 0
    assert (
        f"the database has schema version {packages.schema + 1}, and dirigo-agent"
        f" {packages.version} runs schema {packages.schema} at most" in downgraded.stderr
    ), downgraded.stderr
    assert installed_version() == packages.version + UPGRADE_SUFFIX
    service.stop_as_systemd_would()

    # Remove keeps the data and the configuration; purge deletes them.
    removed = dpkg("--remove", PACKAGE)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not Path("/opt/dirigo").exists() and not Path("/usr/bin/dirigo").exists()
    assert (STATE / "dirigo.db").is_file() and backups[0].is_file()
    assert CONFIG.is_file()
    purged = dpkg("--purge", PACKAGE)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not STATE.exists() and not CONFIG.parent.exists()


def _check_layout() -> None:
    dirigo = Path("/opt/dirigo/venv/bin/dirigo")
    assert dirigo.read_text().splitlines()[0] == "#!/opt/dirigo/venv/bin/python"
    assert Path("/usr/bin/dirigo").resolve() == dirigo.resolve()
    assert CONFIG.read_text() == (REPO / "conf.example.yaml").read_text()
    config = CONFIG.stat()
    assert stat.S_IMODE(config.st_mode) == 0o640 and config.st_uid == 0
    assert grp.getgrgid(config.st_gid).gr_name == "dirigo"
    conffiles = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Conffiles}", PACKAGE], capture_output=True, text=True
    ).stdout
    assert str(CONFIG) in conffiles
    state = STATE.stat()
    assert pwd.getpwuid(state.st_uid).pw_name == "dirigo"
    assert stat.S_IMODE(state.st_mode) == 0o700
    assert unit_file().read_text() == (REPO / "systemd/dirigo.service").read_text()
    if analyze := shutil.which("systemd-analyze"):
        # The unit as installed, its ExecStart the package's own binary.
        verified = subprocess.run(
            [analyze, "verify", "--man=no", str(unit_file())], capture_output=True, text=True
        )
        assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    # The codecs (dependencies of the package) are there, in the venv built with Debian's own
    # python3.
    probe = subprocess.run(
        [
            "/opt/dirigo/venv/bin/python",
            "-c",
            "import imagecodecs, numpy, sys; print(sys.base_prefix)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "/usr", probe.stderr


def _instance_uids() -> list[str]:
    """The SOP Instance UIDs the database holds, read from a fresh backup (as the agent's user,
    so no file of root's lands in data_dir)."""
    with tempfile.TemporaryDirectory() as scratch:
        os.chown(scratch, pwd.getpwnam("dirigo").pw_uid, -1)
        copy = Path(scratch) / "copy.db"
        made = as_dirigo("backup", "--to", str(copy))
        assert made.returncode == 0, made.stderr
        with contextlib.closing(sqlite3.connect(f"file:{copy}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT sop_instance_uid FROM instances ORDER BY 1").fetchall()
    return [uid for (uid,) in rows]


def _schema_of(database: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        (version,) = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(version)
