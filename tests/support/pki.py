"""Certificates for DICOM TLS tests, made with trustme: a CA and the identities it issues,
written as PEM files the way an administrator installs them (private keys readable by their
owner alone, as the agent insists)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.support.net import LOOPBACK


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key, each in a PEM file."""

    cert: Path
    key: Path

    def dcmtk_args(self, ca: Path) -> list[str]:
        """Return the DCMTK options that use this identity over TLS and trust `ca`'s
        certificates (`+tls KEY CERT +cf CA`)."""
        return ["+tls", str(self.key), str(self.cert), "+cf", str(ca)]


class Pki:
    """A certificate authority whose files live in `directory`. RSA keys, as most hospital
    CAs still issue, so that TLS 1.2 with DCMTK's default profile (ECDHE-RSA) works too."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._ca = trustme.CA(key_type=trustme.KeyType.RSA, organization_name=name)
        self.ca_file = directory / f"{name}.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str, *identities: str) -> Identity:
        """Issue a certificate for `identities` (host names or IP addresses; the loopback
        address by default) and write it and its key as `name`.pem and `name`.key."""
        leaf = self._ca.issue_cert(
            *(identities or (LOOPBACK,)), common_name=name, key_type=trustme.KeyType.RSA
        )
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(str(cert), append=cert.exists())
        key.touch()
        key.chmod(0o600)
        leaf.private_key_pem.write_to_path(str(key))
        return Identity(cert, key)
