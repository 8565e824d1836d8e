"""`dirigo doctor` against a real tus server, Orthanc (DICOMweb and DICOM) and a TLS front with
a certificate about to expire; and against each fault an operator meets."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from agent.spool import Spool
from agent.store import MIGRATIONS, Store
from tests.conftest import OrthancFactory, TusServerFactory
from tests.support.net import LOOPBACK, free_port
from tests.support.tlsfront import TlsFront

Verdicts = dict[str, tuple[str, str]]


def doctor(config: dict[str, Any], tmp_path: Path) -> tuple[int, Verdicts, str]:
    """Run `dirigo doctor` on `config`; return its exit code, {check: (verdict, message)} and
    its plain-text output (a second run)."""
    path = tmp_path / "doctor.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "agent", "doctor", "--config", str(path)]
    found = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert "Traceback" not in found.stderr, found.stderr
    checks = json.loads(found.stdout)["checks"]
    assert all(c["hint"] for c in checks if c["verdict"] != "OK"), checks
    verdicts = {c["check"]: (c["verdict"], c["message"]) for c in checks}
    text = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert text.returncode == found.returncode
    return found.returncode, verdicts, text.stdout


def site(tmp_path: Path, *, database: bool = True, **cloud: object) -> dict[str, Any]:
    """A data_dir as `dirigo run` leaves it (with its database unless told), and a config."""
    data_dir = tmp_path / "data"
    Spool(data_dir, 90.0).prepare()
    if database:
        Store.open(data_dir / "dirigo.db").close()
    return {
        "site": "doctor-test",
        "data_dir": str(data_dir),
        "dicom": {"ae_title": "DIRIGO", "bind": LOOPBACK, "port": free_port(), "peers": []},
        "spool": {"high_water": "99%"},
        "cloud": cloud,
    }


def token_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_doctor_on_a_healthy_site_finds_every_check_ok_and_exits_0(
    tmp_path: Path, tus_server: TusServerFactory, orthanc: OrthancFactory
) -> None:
    tus = tus_server()
    archive = orthanc("ARCHIVE")
    config = site(
        tmp_path,
        upload_url=tus.url,
        dicomweb_url=archive.dicomweb_url,
        token_file=token_file(tmp_path, "site-token\n"),
    )
    config["dicom"]["peers"] = [
        {"ae_title": "ARCHIVE", "host": LOOPBACK, "port": archive.dicom_port}
    ]
    code, verdicts, text = doctor(config, tmp_path)
    assert code == 0, text
    for check in ("data_dir", "disk", "database", "cloud dns", "cloud tcp", "token", "clock"):
        assert verdicts[check][0] == "OK", (check, verdicts[check])
    schema = max(m.version for m in MIGRATIONS)
    assert verdicts["database"][1] == f"quick_check ok, schema {schema}"
    assert verdicts["tus"] == ("OK", verdicts["tus"][1])
    assert (
        verdicts["tus"][1].startswith("tus 1.0.0; extensions ") and "creation" in verdicts["tus"][1]
    )
    assert verdicts["qido"][0] == "OK"
    assert verdicts["peer ARCHIVE"][0] == "OK" and "Success" in verdicts["peer ARCHIVE"][1]
    # Plain HTTP is allowed, and said: both as a config warning and at the TLS check.
    assert verdicts["cloud tls"][0] == "WARN" and verdicts["config"][0] == "WARN"
    assert "OK    peer ARCHIVE: C-ECHO to" in text
    assert "WARN  cloud tls:" in text and "      hint: use https:// URLs" in text


def test_doctor_names_a_cloud_down_an_unreachable_peer_and_a_missing_database(
    tmp_path: Path,
) -> None:
    down = f"http://{LOOPBACK}:{free_port()}"
    config = site(tmp_path, database=False, upload_url=f"{down}/files/", dicomweb_url=f"{down}/dw")
    config["dicom"]["peers"] = [{"ae_title": "PACS", "host": LOOPBACK, "port": free_port()}]
    (tmp_path / "data").chmod(0o755)
    code, verdicts, text = doctor(config, tmp_path)
    assert code == 1
    assert verdicts["cloud dns"][0] == "OK"
    assert verdicts["cloud tcp"][0] == "FAIL" and "refused" in verdicts["cloud tcp"][1]
    assert verdicts["tus"][0] == "FAIL" and verdicts["qido"][0] == "FAIL"
    assert verdicts["clock"][0] == "WARN"
    assert verdicts["peer PACS"][0] == "FAIL" and "could not be reached" in verdicts["peer PACS"][1]
    assert verdicts["database"][0] == "FAIL" and "no database" in verdicts["database"][1]
    assert verdicts["data_dir"] == (
        "WARN",
        f"{tmp_path / 'data'} is mode 0755: other users may see patient data",
    )
    assert "ERROR" not in text  # pynetdicom's own lines stay out of the report


def test_doctor_fails_an_empty_token_file_and_says_why(
    tmp_path: Path, tus_server: TusServerFactory
) -> None:
    tus = tus_server()
    config = site(tmp_path, upload_url=tus.url, token_file=token_file(tmp_path, "  \n"))
    code, verdicts, _ = doctor(config, tmp_path)
    assert code == 1
    assert verdicts["token"][0] == "FAIL" and verdicts["token"][1].endswith("is empty")
    assert verdicts["cloud tcp"][0] == "OK"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def doctor_behind_tls(
    tmp_path: Path, tus_port: int, signer: trustme.CA, not_after: datetime, ca_file: Path
) -> tuple[int, Verdicts, int]:
    """Run the doctor on a cloud behind a TLS front whose certificate `signer` issued, valid
    until `not_after`, trusting `ca_file`; return the exit code, verdicts and the front's port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    signer.issue_cert("127.0.0.1", not_after=not_after).configure_cert(context)
    with TlsFront(context, tus_port) as front:
        config = site(tmp_path, upload_url=front.url_for("/files/"), ca_file=str(ca_file))
        code, verdicts, _ = doctor(config, tmp_path)
    return code, verdicts, front.port


def test_doctor_warns_of_a_cloud_certificate_expiring_within_30_days(
    tmp_path: Path, tus_server: TusServerFactory, ca: trustme.CA
) -> None:
    tus = tus_server()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    soon = datetime.now(UTC) + timedelta(days=10, hours=1)
    code, verdicts, port = doctor_behind_tls(tmp_path, tus.port, ca, soon, ca_file)
    assert code == 0
    assert verdicts["cloud tls"] == (
        "WARN",
        f"127.0.0.1:{port}: the certificate expires on {soon:%Y-%m-%d}, in 10 day(s)",
    )
    assert verdicts["tus"][0] == "OK" and verdicts["config"][0] == "OK"
    later = datetime.now(UTC) + timedelta(days=400)
    code, verdicts, port = doctor_behind_tls(tmp_path, tus.port, ca, later, ca_file)
    assert code == 0
    assert verdicts["cloud tls"] == (
        "OK",
        f"127.0.0.1:{port}: certificate valid until {later:%Y-%m-%d}",
    )
    # A certificate the configured CA did not sign fails the handshake, and the check.
    code, verdicts, _ = doctor_behind_tls(tmp_path, tus.port, trustme.CA(), later, ca_file)
    assert code == 1
    assert verdicts["cloud tls"][0] == "FAIL" and verdicts["tus"][0] == "FAIL"
