"""The TLS contexts of `dicom.tls`: the BCP 195 profile, and each unusable file named by its key
when the agent starts."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
import trustme

from agent.config import ConfigError, Peer
from agent.config.models import TlsSettings
from agent.tls import CIPHERS, DicomTls
from tests.support.pki import Identity, Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def own(pki: Pki) -> Identity:
    return pki.issue("dirigo")


def settings(cert: Path, key: Path | None, ca: Path | None, require: bool = True) -> TlsSettings:
    return TlsSettings(port=2762, cert=cert, key=key, ca=ca, require_client_cert=require)


def problems(tls: TlsSettings) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        DicomTls.load(tls)
    return caught.value.problems


def test_the_contexts_follow_the_bcp_195_profile(pki: Pki, own: Identity) -> None:
    tls = DicomTls.load(settings(own.cert, own.key, pki.ca_file))
    for context in (tls.server, tls.client):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 and tls12 <= set(CIPHERS.split(":"))
        assert all(name.startswith("ECDHE-") and "GCM" in name for name in tls12)
        assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION
    assert tls.server.verify_mode == ssl.CERT_REQUIRED
    assert tls.server.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert tls.client.verify_mode == ssl.CERT_REQUIRED and tls.client.check_hostname


def test_without_require_client_cert_clients_are_not_asked_for_one(pki: Pki, own: Identity) -> None:
    tls = DicomTls.load(settings(own.cert, own.key, None, require=False))
    assert tls.server.verify_mode == ssl.CERT_NONE


def test_a_key_inside_the_certificate_file_is_used(pki: Pki, own: Identity) -> None:
    both = own.cert.parent / "both.pem"
    both.write_bytes(own.key.read_bytes() + own.cert.read_bytes())
    DicomTls.load(settings(both, None, pki.ca_file))


def test_tls_arguments_only_for_a_peer_marked_tls(pki: Pki, own: Identity) -> None:
    tls = DicomTls.load(settings(own.cert, own.key, pki.ca_file))
    marked = Peer(ae_title="PACS", host="pacs.example", port=2762, tls=True)
    assert tls.args_for(marked) == (tls.client, "pacs.example")
    assert tls.args_for(Peer(ae_title="CT", host="ct.example", port=104)) is None


def test_every_missing_file_is_named_at_once(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    assert problems(settings(missing / "c.pem", missing / "k.pem", tmp_path)) == [
        f"At 'dicom.tls.cert': cannot read {missing / 'c.pem'}: No such file or directory",
        f"At 'dicom.tls.key': cannot read {missing / 'k.pem'}: No such file or directory",
        f"At 'dicom.tls.ca': cannot read {tmp_path}: Is a directory",
    ]


def test_a_file_without_a_certificate_is_named(pki: Pki, own: Identity) -> None:
    (found,) = problems(settings(own.key, own.key, pki.ca_file))
    assert found == f"At 'dicom.tls.cert': {own.key} holds no PEM certificate"
    (found,) = problems(settings(own.cert, own.key, own.key))
    assert found.startswith(f"At 'dicom.tls.ca': {own.key} holds no usable PEM CA certificate")


def test_a_key_of_another_certificate_is_named(pki: Pki, own: Identity) -> None:
    other = pki.issue("other")
    (found,) = problems(settings(own.cert, other.key, pki.ca_file))
    assert found == (
        f"At 'dicom.tls.key': {other.key}: the private key does not belong to the certificate"
        f" in {own.cert}"
    )
    (found,) = problems(settings(own.cert, None, pki.ca_file))
    assert found.startswith(f"At 'dicom.tls.cert': {own.cert}: no usable PEM private key")


def openssl(*args: str | Path) -> None:
    """Run the openssl command-line tool (Debian's `openssl`, which ca-certificates needs)."""
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def test_an_encrypted_key_is_refused_without_a_prompt(pki: Pki, own: Identity) -> None:
    encrypted = own.key.parent / "encrypted.key"
    openssl("pkey", "-in", own.key, "-aes256", "-passout", "pass:secret", "-out", encrypted)
    (found,) = problems(settings(own.cert, encrypted, pki.ca_file))
    assert found.startswith(f"At 'dicom.tls.key': {encrypted}: the private key is encrypted")


def test_a_key_shorter_than_the_profile_allows_is_refused(tmp_path: Path, pki: Pki) -> None:
    cert, key = tmp_path / "weak.pem", tmp_path / "weak.key"
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:1024",
        "-nodes",
        "-subj",
        "/CN=weak",
        "-days",
        "1",
        "-keyout",
        key,
        "-out",
        cert,
    )
    (found,) = problems(settings(cert, key, pki.ca_file))
    assert found == (
        f"At 'dicom.tls.cert': {cert}: the certificate's key is too short for the BCP 195"
        " profile (at least 2048 bits for RSA, 256 for ECDSA)"
    )


def test_an_ecdsa_certificate_serves_too(tmp_path: Path) -> None:
    ca = trustme.CA()  # ECDSA P-256, trustme's default
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    DicomTls.load(settings(cert, key, ca_file))
