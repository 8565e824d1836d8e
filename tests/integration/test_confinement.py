"""The hardened unit (systemd/dirigo.service): its exposure as `systemd-analyze security` rates
it, and the agent at work under the unit's own kernel-enforced restrictions.

There is no systemd as PID 1 where these tests run, so tests/support/confine.py applies what it
can of the unit the way systemd 252 does: the seccomp filters (`SystemCallFilter=@system-service`
with `~@privileged`, `SystemCallArchitectures=native`, `MemoryDenyWriteExecute=`, with the
kernel's `PR_SET_MDWE` too, `RestrictAddressFamilies=`, `RestrictNamespaces=`,
`RestrictRealtime=`), `NoNewPrivileges=`, `UMask=`, and a /proc as `ProtectProc=invisible` and
`ProcSubset=pid` mount it. What needs systemd's own mount and user set-up (`ProtectSystem=`,
`PrivateTmp=`, `PrivateDevices=`, `User=`, capabilities) is not exercised here; `systemd-analyze
verify` checks that the unit says it correctly (below, and on the unit the package installs in
tests/integration/test_deb.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.conftest import OrthancFactory, StoreSCPFactory
from tests.integration.test_systemd import NotifySocket
from tests.support import bundles, confine, datasets, dcmtk
from tests.support.agent import Agent
from tests.support.net import LOOPBACK, wait_until
from tests.support.tus import TusServer

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd/dirigo.service"
DROP_IN = REPO / "systemd/dirigo.service.d/data-dir.conf.example"
EXPOSURE_LIMIT = 2.0
MEASURED_WITH = 252
"""The systemd release whose figure README.md and the unit's comment state."""
LAUNCHER = (sys.executable, str(Path(confine.__file__)), str(UNIT), "--")


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd); run scripts/setup")
    return found


def exposure(unit_dir: Path) -> float:
    """Return the overall exposure level `systemd-analyze security` gives dirigo.service in
    `unit_dir` (with any drop-ins beside it), read from the unit files alone."""
    result = subprocess.run(
        [analyze(), "security", "--offline=yes", "--no-pager", str(unit_dir / "dirigo.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for dirigo\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr
    return float(found.group(1))


def staged_unit(tmp_path: Path, *, drop_in: bool) -> Path:
    """Copy the unit (ExecStart pointing at a binary that exists here, as `systemd-analyze`
    wants) and, if asked, the data_dir drop-in example as an active drop-in."""
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    text = UNIT.read_text()
    assert "ExecStart=/opt/dirigo/venv/bin/dirigo " in text
    (unit_dir / "dirigo.service").write_text(
        text.replace("/opt/dirigo/venv/bin/dirigo", "/bin/true")
    )
    if drop_in:
        (unit_dir / "dirigo.service.d").mkdir()
        shutil.copy(DROP_IN, unit_dir / "dirigo.service.d/data-dir.conf")
    return unit_dir


@pytest.mark.parametrize("drop_in", [False, True], ids=["unit", "with-data-dir-drop-in"])
def test_the_units_exposure_is_at_most_2(tmp_path: Path, drop_in: bool) -> None:
    unit_dir = staged_unit(tmp_path, drop_in=drop_in)
    level = exposure(unit_dir)
    assert level <= EXPOSURE_LIMIT
    version = subprocess.run([analyze(), "--version"], capture_output=True, text=True).stdout
    if version.startswith(f"systemd {MEASURED_WITH} "):  # another release weighs otherwise
        readme = " ".join((REPO / "README.md").read_text().split())  # however it is wrapped
        assert f"(systemd {MEASURED_WITH}, Debian 12) rates it at exposure level {level}" in readme
        assert f"rates this unit {level} (systemd {MEASURED_WITH})" in UNIT.read_text()
    verified = subprocess.run(
        [analyze(), "verify", "--man=no", str(unit_dir / "dirigo.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr


def test_the_drop_in_example_opens_the_data_dir_for_writing() -> None:
    settings = confine.service_settings(DROP_IN)
    assert settings["ReadWritePaths"] == ["/srv/dirigo"]
    assert "dirigo.service.d/data-dir.conf.example" in (REPO / "README.md").read_text()


def confined(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAUNCHER, *command], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_the_restrictions_are_really_in_force() -> None:
    """Without these, a test passing under the launcher would show nothing."""
    privileged = confined(sys.executable, "-c", "import os; os.setuid(0)")
    assert privileged.returncode == -31  # SIGSYS: setuid is among @privileged
    probe = confined(
        sys.executable,
        "-c",
        "import os, socket\n"
        "print(oct(os.umask(0)), os.path.exists('/proc/meminfo'))\n"
        "try:\n"
        "    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n",
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["0o77", "False", "97"]  # EAFNOSUPPORT


def test_the_codecs_encode_and_decode_with_no_writable_executable_memory(tmp_path: Path) -> None:
    """JPEG-LS and HTJ2K encoding in the agent's forkserver workers, decoding JPEG-LS, JPEG 2000
    and HTJ2K through the agent's decoder, and multi-threaded zstd, all under the unit's
    filters (MemoryDenyWriteExecute among them): every image comes back identical."""
    sources = datasets.ct_series(tmp_path / "ct", slices=2, rows=64, cols=64, seed=13)
    data = datasets.pydicom_data_dir()
    pairs = [
        f"{data / compressed}:{data / reference}"
        for compressed, reference in (
            ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
            ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
            ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
            ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
        )
    ]
    work = tmp_path / "work"
    work.mkdir()
    result = confined(
        sys.executable,
        "-m",
        "tests.support.codec_workout",
        str(work),
        *map(str, sources),
        "--",
        *pairs,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["write_exec_refused"] is True
    assert report["seccomp"] == "2"  # filter mode
    assert len(report["transcoded"]) == 4
    for name, entry in report["transcoded"].items():
        assert entry == {
            "outcome": "Transcoded",
            "syntax": "1.2.840.10008.1.2.4.80"
            if name.startswith("jpeg-ls")
            else "1.2.840.10008.1.2.4.201",
            "identical": True,
        }, name
    assert report["decompressed"] == {Path(p.split(":")[0]).name: True for p in pairs}
    assert report["zstd"] is True


def uploaded(tus: TusServer) -> int:
    """Return how many instances the complete uploads on `tus` hold."""
    return sum(len(bundles.manifest(u.data())["instances"]) for u in tus.uploads() if u.complete)


def test_the_confined_agent_receives_transcodes_uploads_imports_serves_and_feeds_the_watchdog(
    tmp_path: Path,
    tmp_data_dir: Path,
    tus_server: Callable[..., TusServer],
    orthanc: OrthancFactory,
    storescp: StoreSCPFactory,
) -> None:
    """`dirigo run` under the unit's restrictions, through every path that parses, encodes,
    decodes or talks: C-STORE in, HTJ2K transcoding in forkserver workers, tus upload, a watch
    folder over inotify, C-MOVE of JPEG-LS and JPEG 2000 from a DICOMweb archive decompressed
    for a destination taking only uncompressed data, and sd_notify with the watchdog."""
    tus = tus_server()
    archive = orthanc(aet="ARCHIVE")
    data = datasets.pydicom_data_dir()
    jpeg_ls, jpeg_2000 = data / "emri_small_jpeg_ls_lossless.dcm", data / "MR2_J2KR.dcm"
    for path in (jpeg_ls, jpeg_2000):
        archive.session.post(
            f"{archive.http_url}/instances", data=path.read_bytes(), timeout=60
        ).raise_for_status()
    destination = storescp(ae="PLAIN", extra_args=())  # uncompressed syntaxes only
    inbox, done, rejected = (tmp_path / name for name in ("inbox", "done", "rejected"))
    for folder in (inbox, done, rejected):
        folder.mkdir()
    series = datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=17)
    notify = NotifySocket()
    agent = Agent(
        tmp_data_dir,
        stable_after="1s",
        peers=(
            {"ae_title": "PACS", "host": LOOPBACK},
            {"ae_title": "PLAIN", "host": LOOPBACK, "port": destination.port},
        ),
        extra={
            "cloud": {
                "upload_url": tus.url,
                "dicomweb_url": archive.dicomweb_url,
                "timeout": "10s",
            },
            "upload": {"transcode": "htj2k", "retry_first": "1s", "retry_max": "2s"},
            "serve": {"fetch_syntax": "as-stored"},
            "watch": {
                "dirs": [{"path": str(inbox), "done": str(done), "rejected": str(rejected)}],
                "settle": "1s",
            },
        },
        env={"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "1000000"},
        launcher=LAUNCHER,
    )
    try:
        with agent:
            stored = dcmtk.storescu(series[:2], agent.port)
            assert len(dcmtk.acknowledged(stored)) == 2, stored.stdout[-2000:]
            shutil.copy(series[2], inbox / "dropped.dcm")
            wait_until(lambda: (done / "dropped.dcm").exists(), 60, what="the watch folder import")
            wait_until(lambda: uploaded(tus) == 3, 120, what="3 instances uploaded")
            for source in (jpeg_ls, jpeg_2000):
                study = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
                moved = dcmtk.movescu(agent.port, (f"StudyInstanceUID={study}",), "PLAIN")
                assert dcmtk.final_status(moved) == 0x0000, moved.stdout[-2000:] + agent.log_tail()
            assert "READY=1" in notify.poll()
            wait_until(lambda: notify.poll().count("WATCHDOG=1") >= 2, 30, what="watchdog pings")
            assert agent.proc is not None and agent.proc.poll() is None
            assert agent.stop() == 0
            log = agent.log_tail(200_000)
    finally:
        notify.close()

    assert "Traceback" not in log and "crashed" not in log, log[-4000:]
    syntaxes = {
        entry["transfer_syntax"]
        for upload in tus.uploads()
        for entry in bundles.manifest(upload.data())["instances"]
    }
    assert syntaxes == {"1.2.840.10008.1.2.4.201"}  # HTJ2K lossless
    delivered = {
        pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in destination.out_dir.iterdir()
    }
    for source, reference in (
        (jpeg_ls, data / "emri_small.dcm"),
        (jpeg_2000, data / "MR2_UNCR.dcm"),
    ):
        ds = delivered[pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID]
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(reference).pixel_array)
    assert os.stat(tmp_data_dir / "dirigo.db").st_mode & 0o077 == 0  # UMask=0077
