"""DICOM over TLS against real peers: DCMTK's storescu and echoscu with `+tls` calling
`dirigo run`'s TLS port, a pynetdicom C-MOVE and C-GET requester over TLS (DCMTK 3.6.7's movescu
and getscu have no TLS), a TLS-only DCMTK storescp as a C-MOVE destination and as the target of
`dirigo echo` and `dirigo retrieve`, and the refusals: a plain association on the TLS port, an
untrusted or missing client certificate, a peer marked `tls` on the plain port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.conftest import OrthancFactory, StoreSCP, StoreSCPFactory
from tests.support import datasets, dcmtk
from tests.support.agent import Agent
from tests.support.net import LOOPBACK, free_port, wait_until
from tests.support.orthanc import Orthanc
from tests.support.pki import Identity, Pki

SUCCESS, PENDING = 0x0000, 0xFF00


class Certificates:
    """The site's CA with the identities the tests use, and a stranger's CA."""

    def __init__(self, directory: Path) -> None:
        self.pki = Pki(directory / "site", "site-ca")
        self.ca = self.pki.ca_file
        self.dirigo = self.pki.issue("dirigo")
        self.pacs = self.pki.issue("pacs")
        self.destination = self.pki.issue("destination")
        self.stranger = Pki(directory / "stranger", "stranger-ca").issue("stranger")

    def tls(self, identity: Identity) -> list[str]:
        """DCMTK options: TLS as `identity`, trusting the site's CA."""
        return identity.dcmtk_args(self.ca)


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path / "pki")


class TlsAgent(Agent):
    """An agent with its TLS port (`tls_port`) and a plain PROBE peer to start by."""

    def __init__(
        self,
        data_dir: Path,
        certs: Certificates,
        *peers: dict[str, Any],
        require_client_cert: bool = True,
        cloud: dict[str, Any] | None = None,
    ) -> None:
        self.tls_port = free_port()
        tls = {
            "port": self.tls_port,
            "cert": str(certs.dirigo.cert),
            "key": str(certs.dirigo.key),
            "ca": str(certs.ca),
            "require_client_cert": require_client_cert,
        }
        super().__init__(
            data_dir,
            peers=({"ae_title": "PROBE", "host": LOOPBACK}, *peers),
            probe_ae="PROBE",
            extra={"dicom": {"tls": tls}, "cloud": {"timeout": "5s", **(cloud or {})}},
        )


PACS_TLS = {"ae_title": "PACS", "host": LOOPBACK, "tls": True}
MODALITY = {"ae_title": "MODALITY", "host": LOOPBACK}


def spooled(agent: Agent) -> dict[str, tuple[str, str]]:
    """Return {SOP Instance UID: (spool path, sha256)} for every current instance row."""
    rows = agent.rows("SELECT sop_instance_uid, path, sha256 FROM instances WHERE superseded = 0")
    return {uid: (path, sha) for uid, path, sha in rows}


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_spooled_intact(agent: Agent, files: Sequence[Path]) -> None:
    rows = spooled(agent)
    for path in files:
        spool_path, sha = rows[sop_uid(path)]
        assert sha == datasets.dataset_sha256(path), path.name
        assert datasets.dataset_sha256(agent.data_dir / spool_path) == sha, path.name


def logged(agent: Agent, *lines: str) -> str:
    """Return the agent's log once it holds every one of `lines` (a refusal is logged on the
    agent's side after the peer has seen it); fail after 10 s."""

    def holds() -> str | None:
        log = agent.log_tail(100_000)
        return log if all(line in log for line in lines) else None

    try:
        found = wait_until(holds, 10, what="the agent's log lines")
    except TimeoutError:
        missing = [line for line in lines if line not in agent.log_tail(100_000)]
        raise AssertionError(f"not logged: {missing}\n{agent.log_tail()}") from None
    return str(found)


def peak_rss_mib(pid: int) -> float:
    """Return the peak resident memory (VmHWM) of a running process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# --- receiving over TLS ---------------------------------------------------------------------


def test_dcmtk_echoes_and_stores_over_tls_while_the_plain_port_serves_others(
    tmp_path: Path, tmp_data_dir: Path, certs: Certificates
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=5, rows=128, cols=128, seed=61)
    plain = datasets.ct_series(tmp_path / "plain", slices=2, rows=64, cols=64, seed=62)
    big = datasets.large_instance(tmp_path / "big.dcm", 160 * 2**20, seed=63)
    with TlsAgent(tmp_data_dir, certs, PACS_TLS, MODALITY) as agent:
        echo = dcmtk.echoscu(agent.tls_port, extra_args=certs.tls(certs.pacs))
        stored = dcmtk.storescu(
            [*series, big], agent.tls_port, extra_args=certs.tls(certs.pacs), timeout=300
        )
        # the DCMTK profile Debian's storescu calls plain BCP 195 takes TLS 1.2 and 1.3 alike
        bcp195 = dcmtk.echoscu(agent.tls_port, extra_args=[*certs.tls(certs.pacs), "+px"])
        beside = dcmtk.storescu(plain, agent.port, calling_ae="MODALITY")
        peak = peak_rss_mib(agent.pid)
        log = agent.log_tail()

    assert echo.returncode == 0, echo.stdout + echo.stderr + log
    assert stored.returncode == 0, stored.stdout[-3000:] + stored.stderr + log
    assert dcmtk.acknowledged(stored) == [*series, big]
    assert bcp195.returncode == 0, bcp195.stdout + bcp195.stderr
    assert beside.returncode == 0 and dcmtk.acknowledged(beside) == plain
    assert_spooled_intact(agent, [*series, big, *plain])
    # the 160 MiB instance was streamed to its file, not held: the agent's peak stays far below
    assert peak < 160, f"peak RSS {peak:.0f} MiB receiving a 160 MiB instance over TLS"


def test_a_plain_association_to_the_tls_port_fails_and_a_silent_client_holds_none_back(
    tmp_data_dir: Path, certs: Certificates
) -> None:
    with TlsAgent(tmp_data_dir, certs, PACS_TLS, MODALITY) as agent:
        result = dcmtk.echoscu(agent.tls_port, calling_ae="MODALITY")
        # a client that connects and never starts its handshake: the acceptor goes on
        with socket.create_connection((LOOPBACK, agent.tls_port)):
            started = time.monotonic()
            meanwhile = dcmtk.echoscu(agent.tls_port, extra_args=certs.tls(certs.pacs))
            took = time.monotonic() - started
        log = logged(
            agent,
            "rejected association from 127.0.0.1 (TLS port): TLS handshake failed: wrong version"
            " number",
        )

    assert result.returncode != 0
    assert "Unknown PDU type" not in log  # nothing of the refused connection was read as DICOM
    assert meanwhile.returncode == 0 and took < 5, meanwhile.stdout + meanwhile.stderr


def test_a_peer_marked_tls_is_rejected_on_the_plain_port_with_the_reason(
    tmp_data_dir: Path, certs: Certificates
) -> None:
    with TlsAgent(tmp_data_dir, certs, PACS_TLS, MODALITY) as agent:
        result = dcmtk.echoscu(agent.port, calling_ae="PACS")
        logged(
            agent,
            "rejected association from 127.0.0.1 (plain port, calling AE title 'PACS'): calling"
            " AE title 'PACS' is marked tls in dicom.peers and called the plain port",
        )
        refusals = agent.rows(
            "SELECT calling_ae, address, reason, json_extract(detail, '$.tls') FROM audit"
            " WHERE event = 'association' AND outcome = 'failure'"
        )

    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    assert refusals == [
        (
            "PACS",
            "127.0.0.1",
            "calling AE title 'PACS' is marked tls in dicom.peers and called the plain port;"
            " it must use the TLS port",
            0,
        )
    ]


def test_an_untrusted_or_missing_client_certificate_is_refused(
    tmp_path: Path, tmp_data_dir: Path, certs: Certificates
) -> None:
    files = datasets.ct_series(tmp_path / "ct", slices=1, rows=64, cols=64, seed=64)
    with TlsAgent(tmp_data_dir, certs, PACS_TLS) as agent:
        stranger = dcmtk.storescu(files, agent.tls_port, extra_args=certs.tls(certs.stranger))
        anonymous = dcmtk.echoscu(agent.tls_port, extra_args=["+tla", "+cf", str(certs.ca)])
        logged(
            agent,
            "TLS handshake failed: certificate not accepted: unable to get local issuer",
            "TLS handshake failed: peer did not return a certificate",
        )
        query = (
            "SELECT calling_ae, reason, json_extract(detail, '$.tls') FROM audit"
            " WHERE event = 'association' AND outcome = 'failure' ORDER BY id"
        )
        # the log line comes first, the audit row a moment later
        wait_until(lambda: len(agent.rows(query)) >= 2, 10, what="both refusals audited")
        refusals = agent.rows(query)

    # the audit trail keeps each refusal at the handshake, before any AE title was sent
    assert [(calling, tls) for calling, _, tls in refusals] == [(None, 1), (None, 1)]
    assert refusals[0][1].startswith("TLS handshake failed: certificate not accepted")
    assert refusals[1][1] == "TLS handshake failed: peer did not return a certificate"

    assert stranger.returncode != 0 and dcmtk.acknowledged(stranger) == []
    assert anonymous.returncode != 0
    assert spooled(agent) == {}


def test_without_require_client_cert_a_client_without_a_certificate_is_admitted(
    tmp_data_dir: Path, certs: Certificates
) -> None:
    with TlsAgent(tmp_data_dir, certs, PACS_TLS, require_client_cert=False) as agent:
        anonymous = dcmtk.echoscu(agent.tls_port, extra_args=["+tla", "+cf", str(certs.ca)])

    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr


def test_an_unreadable_certificate_file_stops_the_agent_at_start_naming_the_key(
    tmp_data_dir: Path, certs: Certificates
) -> None:
    agent = TlsAgent(tmp_data_dir, certs)
    certs.dirigo.cert.unlink()
    run = subprocess.run(agent.command("run"), capture_output=True, text=True, timeout=60)
    check = subprocess.run(
        agent.command("check-config"), capture_output=True, text=True, timeout=60
    )

    assert run.returncode == 78, run.stderr
    assert f"At 'dicom.tls.cert': cannot read {certs.dirigo.cert}" in run.stderr
    # the file may be checked where the certificates are not installed: a warning there
    assert check.returncode == 0, check.stderr
    assert f"warning: At 'dicom.tls.cert': cannot read {certs.dirigo.cert}" in check.stderr


def test_sighup_takes_a_renewed_certificate_and_keeps_the_current_one_if_unusable(
    tmp_path: Path, tmp_data_dir: Path, certs: Certificates
) -> None:
    renewing = Pki(tmp_path / "pki" / "renewed", "renewed-ca")
    renewed = renewing.issue("dirigo-renewed")
    # the PACS trusts only the CA that issued the renewed certificate
    trusts_renewed = certs.pacs.dcmtk_args(renewing.ca_file)
    with TlsAgent(tmp_data_dir, certs, PACS_TLS) as agent:
        before = dcmtk.echoscu(agent.tls_port, extra_args=trusts_renewed)
        shutil.copyfile(renewed.cert, certs.dirigo.cert)
        shutil.copyfile(renewed.key, certs.dirigo.key)
        os.kill(agent.pid, signal.SIGHUP)
        logged(agent, "dicom.tls certificates reloaded")
        after = dcmtk.echoscu(agent.tls_port, extra_args=trusts_renewed)
        certs.dirigo.cert.write_text("not a certificate")
        os.kill(agent.pid, signal.SIGHUP)
        logged(
            agent,
            "dicom.tls certificates not reloaded, the current ones stay: At 'dicom.tls.cert':",
        )
        still = dcmtk.echoscu(agent.tls_port, extra_args=trusts_renewed)
        assert agent.proc is not None and agent.proc.poll() is None

    assert before.returncode != 0
    assert after.returncode == 0, after.stdout + after.stderr
    assert still.returncode == 0, still.stdout + still.stderr


# --- retrieving to a TLS-only destination ------------------------------------------------------


@pytest.fixture
def tls_destination(storescp: StoreSCPFactory, certs: Certificates) -> StoreSCP:
    """A DCMTK storescp, DEST, that speaks TLS only and requires a client certificate of the
    site."""
    tls = tuple(certs.tls(certs.destination))
    return storescp(ae="DEST", extra_args=("+xa", *tls), echo_args=tuple(certs.tls(certs.pacs)))


@pytest.fixture
def archive(orthanc: OrthancFactory) -> Orthanc:
    """The cloud's archive (Orthanc with DICOMweb), empty."""
    return orthanc(aet="ARCHIVE")


def destination_peer(destination: StoreSCP) -> dict[str, Any]:
    return {"ae_title": destination.ae, "host": LOOPBACK, "port": destination.port, "tls": True}


def load(archive: Orthanc, paths: Sequence[Path]) -> None:
    for path in paths:
        response = archive.session.post(
            f"{archive.http_url}/instances", data=path.read_bytes(), timeout=60
        )
        response.raise_for_status()


def received(out_dir: Path) -> dict[str, str]:
    """Return {SOP Instance UID: dataset sha256} of the files a receiver wrote."""
    return {sop_uid(p): datasets.dataset_sha256(p) for p in out_dir.iterdir() if p.is_file()}


def sent(paths: Sequence[Path]) -> dict[str, str]:
    return {sop_uid(p): datasets.dataset_sha256(p) for p in paths}


class TlsRequester:
    """A pynetdicom Query/Retrieve SCU calling over TLS as PACS (DCMTK 3.6.7's movescu and
    getscu have no TLS options), keeping each instance a C-GET brings as the bytes received."""

    def __init__(self, certs: Certificates, port: int) -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=str(certs.ca))
        self.context.load_cert_chain(certs.pacs.cert, certs.pacs.key)

    def _associate(self, ae: AE, **kwargs: Any) -> Association:
        assoc = ae.associate(
            LOOPBACK, self.port, ae_title="DIRIGO", tls_args=(self.context, LOOPBACK), **kwargs
        )
        assert assoc.is_established, "association over TLS refused"
        return assoc

    def move(self, study_uid: str, destination: str) -> list[int]:
        """Send a C-MOVE of a study; return the status of each response."""
        ae = AE(ae_title="PACS")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = self._associate(ae)
        try:
            responses = assoc.send_c_move(
                study_query(study_uid), destination, StudyRootQueryRetrieveInformationModelMove
            )
            return [int(status.Status) for status, _ in responses if status]
        finally:
            assoc.release()

    def get(self, study_uid: str, out_dir: Path, storage: Sequence[str]) -> list[int]:
        """Send a C-GET of a study, offering to store `storage` SOP classes uncompressed;
        write each instance received into `out_dir`; return the status of each response."""
        out_dir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title="PACS")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in storage:  # as stored first: each arrives as the archive holds it
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

        def on_store(event: evt.Event) -> int:
            uid = event.request.AffectedSOPInstanceUID
            (out_dir / f"{uid}.dcm").write_bytes(event.encoded_dataset())
            return SUCCESS

        roles = [build_role(sop_class, scp_role=True) for sop_class in storage]
        assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            responses = assoc.send_c_get(
                study_query(study_uid), StudyRootQueryRetrieveInformationModelGet
            )
            return [int(status.Status) for status, _ in responses if status]
        finally:
            assoc.release()


def study_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_a_move_to_a_tls_only_destination_arrives_intact(
    tmp_path: Path,
    tmp_data_dir: Path,
    certs: Certificates,
    archive: Orthanc,
    tls_destination: StoreSCP,
) -> None:
    destination = tls_destination
    series = datasets.ct_series(tmp_path / "ct", slices=12, rows=256, cols=256, seed=65)
    big = datasets.large_instance(tmp_path / "big" / "big.dcm", 24 * 2**20, seed=66)
    load(archive, [*series, big])
    peers = (PACS_TLS, MODALITY, destination_peer(destination))
    cloud = {"dicomweb_url": archive.dicomweb_url}
    with TlsAgent(tmp_data_dir, certs, *peers, cloud=cloud) as agent:
        # a plain requester (DCMTK) on the plain port, then one over TLS on the TLS port
        moved = dcmtk.movescu(
            agent.port, [f"StudyInstanceUID={study_of(series[0])}"], "DEST", calling_ae="MODALITY"
        )
        moved_big = TlsRequester(certs, agent.tls_port).move(study_of(big), "DEST")
        log = agent.log_tail()

    assert dcmtk.final_status(moved) == SUCCESS, moved.stdout[-3000:] + log
    assert dcmtk.sub_operations(moved)["Completed"] == len(series)
    assert moved_big[-1] == SUCCESS, log
    assert received(destination.out_dir) == sent([*series, big])
    assert "to DEST over TLS" in log


def test_a_get_over_tls_brings_the_instances_intact(
    tmp_path: Path, tmp_data_dir: Path, certs: Certificates, archive: Orthanc
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=8, rows=256, cols=256, seed=67)
    jpeg_ls = datasets.pydicom_data_dir() / "emri_small_jpeg_ls_lossless.dcm"
    load(archive, [*series, jpeg_ls])
    cloud = {"dicomweb_url": archive.dicomweb_url}
    storage = [CTImageStorage, pydicom.dcmread(jpeg_ls, stop_before_pixels=True).SOPClassUID]
    with TlsAgent(tmp_data_dir, certs, PACS_TLS, cloud=cloud) as agent:
        requester = TlsRequester(certs, agent.tls_port)
        got = requester.get(study_of(series[0]), tmp_path / "got", storage)
        decompressed = requester.get(study_of(jpeg_ls), tmp_path / "plain", storage)
        log = agent.log_tail()

    assert got[-1] == SUCCESS and got.count(PENDING) == len(series), log
    assert received(tmp_path / "got") == sent(series)
    assert decompressed[-1] == SUCCESS, log
    (path,) = (tmp_path / "plain").iterdir()
    assert not datasets.transfer_syntax(path).is_compressed
    # the same image, uncompressed, decoded by pydicom alone
    reference = pydicom.dcmread(datasets.pydicom_data_dir() / "emri_small.dcm").pixel_array
    assert (pydicom.dcmread(path).pixel_array == reference).all()


def test_dirigo_echo_retrieve_and_doctor_reach_a_tls_peer(
    tmp_path: Path,
    tmp_data_dir: Path,
    certs: Certificates,
    archive: Orthanc,
    tls_destination: StoreSCP,
    storescp: StoreSCPFactory,
) -> None:
    destination = tls_destination
    series = datasets.ct_series(tmp_path / "ct", slices=4, rows=64, cols=64, seed=68)
    load(archive, series)
    plain = storescp(ae="PLAIN")  # a peer wrongly marked tls: it cannot speak TLS
    wrong = {"ae_title": "PLAIN", "host": LOOPBACK, "port": plain.port, "tls": True}
    # a TLS peer whose certificate the site's CA did not issue
    stranger_tls = (*certs.stranger.dcmtk_args(certs.ca), "-ic")
    stranger = storescp(ae="STRANGER", extra_args=stranger_tls, echo_args=stranger_tls)
    untrusted = {"ae_title": "STRANGER", "host": LOOPBACK, "port": stranger.port, "tls": True}
    peers = (destination_peer(destination), wrong, untrusted)
    agent = TlsAgent(tmp_data_dir, certs, *peers, cloud={"dicomweb_url": archive.dicomweb_url})

    def dirigo(*args: str) -> subprocess.CompletedProcess[str]:
        command = agent.command(*args)
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    echo = dirigo("echo", "DEST")
    refused = dirigo("echo", "PLAIN")
    distrusted = dirigo("echo", "STRANGER")
    study = str(pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    retrieve = dirigo("retrieve", "--study", study, "--to", "DEST")
    doctor = dirigo("doctor").stdout

    assert echo.returncode == 0, echo.stderr
    assert f"C-ECHO to DEST at {LOOPBACK}:{destination.port} over TLS: Success" in echo.stdout
    assert refused.returncode == 1
    assert f"PLAIN at {LOOPBACK}:{plain.port} over TLS could not be reached" in refused.stderr
    assert distrusted.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in distrusted.stderr
    assert "Traceback" not in distrusted.stderr  # the line before the traceback says it all
    assert retrieve.returncode == 0, retrieve.stderr
    assert "4 of 4 instances sent to DEST" in retrieve.stdout
    assert received(destination.out_dir) == sent(series)
    assert "OK    dicom tls: the certificates load; TLS port" in doctor
    assert f"OK    peer DEST: C-ECHO to {LOOPBACK}:{destination.port} over TLS: Success" in doctor
    assert "FAIL  peer PLAIN:" in doctor
