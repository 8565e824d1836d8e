"""DICOM over TLS: the TLS contexts of the DICOM BCP 195 RFC 8996 TLS Profile (PS3.15 Annex
B.9), built once at start from `dicom.tls`, every unusable file reported as a configuration error
that names its key.

The profile: TLS 1.2 or newer, never a fallback to an older version; for TLS 1.2 only the cipher
suites RFC 9325 (BCP 195) recommends, ECDHE key exchange with AES-GCM
(TLS_ECDHE_{RSA,ECDSA}_WITH_AES_{128_GCM_SHA256,256_GCM_SHA384}); for TLS 1.3 OpenSSL's
suites (AES-GCM and ChaCha20-Poly1305, all within the profile); certificate keys of at least
2048 bits (RSA) or 256 bits (ECDSA), which OpenSSL's security level 2 enforces on our own
certificate and on the peer's; no TLS compression and no renegotiation. As a server we choose
the suite by our own order, strongest first, as BCP 195 advises.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from agent.config import ConfigError, Peer
from agent.config.models import TlsSettings

CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "@SECLEVEL=2",
    )
)
"""The TLS 1.2 cipher suites of the BCP 195 RFC 8996 TLS Profile, in OpenSSL's names, strongest
first; `@SECLEVEL=2` refuses keys shorter than the profile allows."""
KEY = "dicom.tls"


class _EncryptedKey(Exception):
    """The private key asks for a passphrase; the agent runs unattended and has none."""


class DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do their handshake later, on the connection's own thread.

    pynetdicom wraps each accepted connection in its one acceptor thread, and by default the
    handshake runs right there: one client that connects and stays silent would hold every other
    connection back. The Gate (agent.dicom) does the handshake on the connection's thread, under
    the same timeout as the wait for its association request.
    """

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect and not server_side,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


@dataclass(frozen=True)
class DicomTls:
    """The TLS contexts of one agent: `server` for its TLS port, `client` for the associations
    it opens to peers marked `tls` (checking their certificate against `ca` and their name
    against the peer's `host`, and showing our certificate as the client's)."""

    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def load(cls, settings: TlsSettings) -> DicomTls:
        """Return the contexts of `settings`. Raise ConfigError naming each key whose file is
        missing, unreadable or not what it should be, all at once."""
        problems = _unreadable(settings)
        if problems:
            raise ConfigError(problems)
        server = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        server.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        for context in (server, client):
            _profile(context)
            problems = _load_identity(context, settings)
            if settings.ca is not None:
                problems += _load_ca(context, settings.ca)
            if problems:  # the server's context, and the client's would say the same
                raise ConfigError(problems)
        server.verify_mode = ssl.CERT_REQUIRED if settings.require_client_cert else ssl.CERT_NONE
        return cls(server, client)

    def args_for(self, peer: Peer) -> tuple[ssl.SSLContext, str] | None:
        """Return pynetdicom's `tls_args` for an association to `peer`: None unless it is
        marked `tls`."""
        if not peer.tls:
            return None
        assert peer.host is not None  # only peers with a host are associated with
        return self.client, peer.host


def load(settings: TlsSettings | None) -> DicomTls | None:
    """Return the contexts of `dicom.tls`, or None when it is not set. Raise ConfigError as
    `DicomTls.load` does."""
    return None if settings is None else DicomTls.load(settings)


def _profile(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _unreadable(settings: TlsSettings) -> list[str]:
    problems = []
    for name in ("cert", "key", "ca"):
        path: Path | None = getattr(settings, name)
        if path is None:
            continue
        try:
            with path.open("rb") as file:
                file.read(1)
        except OSError as exc:
            problems.append(f"At '{KEY}.{name}': cannot read {path}: {exc.strerror or exc}")
    return problems


def _load_identity(context: ssl.SSLContext, settings: TlsSettings) -> list[str]:
    """Load our certificate and its key; return what is wrong with them, each at its key."""
    cert, key = settings.cert, settings.key
    key_at = f"At '{KEY}.key': {key}" if key is not None else f"At '{KEY}.cert': {cert}"
    if not _holds_certificate(cert):
        return [f"At '{KEY}.cert': {cert} holds no PEM certificate"]
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _EncryptedKey:
        return [
            f"{key_at}: the private key is encrypted; the agent starts unattended, so give it"
            " an unencrypted key readable by the agent's user alone"
        ]
    except ssl.SSLError as exc:
        reason = exc.reason or ""
        if reason == "KEY_VALUES_MISMATCH":
            return [f"{key_at}: the private key does not belong to the certificate in {cert}"]
        if "TOO_SMALL" in reason:
            return [
                f"At '{KEY}.cert': {cert}: the certificate's key is too short for the BCP 195"
                " profile (at least 2048 bits for RSA, 256 for ECDSA)"
            ]
        return [f"{key_at}: no usable PEM private key ({_describe(exc)})"]
    return []


def _load_ca(context: ssl.SSLContext, ca: Path) -> list[str]:
    try:
        context.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        return [f"At '{KEY}.ca': {ca} holds no usable PEM CA certificate ({_describe(exc)})"]
    if not context.get_ca_certs():
        return [f"At '{KEY}.ca': {ca} holds no CA certificate"]
    return []


def _holds_certificate(path: Path) -> bool:
    """Return True if the file holds at least one PEM certificate, as OpenSSL parses it (a
    throwaway context loads it as trust anchors), so that a bad certificate is told apart
    from a bad key."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        return False
    return True


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, and a daemon would hang there.
    raise _EncryptedKey


def _describe(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).replace("_", " ").lower()


def describe_handshake_failure(exc: Exception) -> str:
    """Return why a TLS handshake failed, as a short phrase for the log and the audit trail."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return _describe(exc)
    if isinstance(exc, TimeoutError):
        return "no handshake in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
