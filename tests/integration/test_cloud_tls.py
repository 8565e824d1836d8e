"""The cloud client over HTTPS: a private CA, mutual TLS and a bearer token, against the real tus
server behind a TLS front, for requests' requests and the client's own PATCH connections alike;
and every way the cloud settings' files can be wrong."""

from __future__ import annotations

import random
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from agent.cloud import CloudConfigError, CloudError, CloudHttp, TusClient, build_session
from agent.config import CloudSettings
from tests.support.net import wait_until
from tests.support.tlsfront import TlsFront
from tests.support.tus import TusServer

TusFactory = Callable[..., TusServer]
TOKEN = "s3cr3t-token-for-tests"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    """Write the CA bundle, a client certificate and key, and a token file."""
    client = ca.issue_cert("hospital-a.dirigo.example")
    paths = {
        "ca_file": tmp_path / "ca.pem",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
        "token_file": tmp_path / "token",
    }
    ca.cert_pem.write_to_path(str(paths["ca_file"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    paths["token_file"].write_text(TOKEN + "\n")
    return paths


def server_context(ca: trustme.CA, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if require_client_cert:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture
def tus(tus_server: TusFactory) -> Iterator[TusServer]:
    yield tus_server()


def client_for(front: TlsFront, **settings: object) -> TusClient:
    cloud = CloudSettings.model_validate({"upload_url": front.url_for("/files/"), **settings})
    return TusClient(CloudHttp(build_session(cloud), timeout=10), cloud.upload_url)


def send_file(client: TusClient, path: Path, chunk: int) -> str:
    """Create an upload of `path` and PATCH it in ranges of `chunk` bytes; return its URL."""
    size = path.stat().st_size
    url = client.create(size, {"filename": path.name})
    with path.open("rb") as f:
        for offset in range(0, size, chunk):
            length = min(chunk, size - offset)
            assert client.patch(url, offset, f, length) == offset + length
    return url


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A file of 3 MiB and a few bytes: several of the 1 MiB blocks a PATCH goes in over TLS."""
    path = tmp_path / "bundle.bin"
    path.write_bytes(random.Random(3).randbytes(3 * 1024 * 1024 + 99))
    return path


def test_uploads_over_https_trusting_a_private_ca_and_sending_the_token(
    ca: trustme.CA, files: dict[str, Path], tus: TusServer, bundle: Path
) -> None:
    with TlsFront(server_context(ca, require_client_cert=False), tus.port) as front:
        client = client_for(front, ca_file=files["ca_file"], token_file=files["token_file"])
        url = send_file(client, bundle, 2 * 1024 * 1024)
        size = bundle.stat().st_size
        assert client.offset(url) == (size, size)
        client.close()
        # Every PATCH carried the token too: they do not go through requests.
        assert front.received.count(b"PATCH ") == 2
        assert front.received.count(f"Authorization: Bearer {TOKEN}".encode()) == 5
    assert tus.uploads()[0].data() == bundle.read_bytes()


def test_an_untrusted_server_certificate_is_a_clear_retryable_error(
    ca: trustme.CA, tus: TusServer
) -> None:
    with TlsFront(server_context(ca, require_client_cert=False), tus.port) as front:
        client = client_for(front)  # the system's trust store does not know the test CA
        with pytest.raises(CloudError, match="TLS failed") as caught:
            client.capabilities()
    assert caught.value.retryable


def test_mutual_tls_needs_the_client_certificate(
    ca: trustme.CA, files: dict[str, Path], tus: TusServer, bundle: Path
) -> None:
    with TlsFront(server_context(ca, require_client_cert=True), tus.port) as front:
        with_cert = client_for(
            front,
            ca_file=files["ca_file"],
            client_cert=files["client_cert"],
            client_key=files["client_key"],
        )
        assert "creation" in with_cert.capabilities().extensions
        url = send_file(with_cert, bundle, 1024 * 1024)
        with_cert.close()
        without = client_for(front, ca_file=files["ca_file"])
        with pytest.raises(CloudError):
            without.capabilities()
        # Under TLS 1.3 the client learns of the refusal from the server's alert, which the
        # front's thread sends before it counts the failure: wait for the count, bounded.
        wait_until(lambda: front.handshake_failures >= 1, 5, what="the front to count the refusal")
    assert [u.data() for u in tus.uploads()] == [bundle.read_bytes()]
    assert url.endswith(tus.uploads()[0].id)


def test_a_patch_trusts_only_the_configured_ca(
    ca: trustme.CA, files: dict[str, Path], tus: TusServer, bundle: Path
) -> None:
    with TlsFront(server_context(ca, require_client_cert=False), tus.port) as front:
        trusting = client_for(front, ca_file=files["ca_file"])
        url = trusting.create(10, {"filename": "x"})
        trusting.close()
        other = trustme.CA()
        other_ca = files["ca_file"].with_name("other-ca.pem")
        other.cert_pem.write_to_path(str(other_ca))
        distrusting = client_for(front, ca_file=other_ca)
        distrusting._capabilities = trusting.capabilities()  # no OPTIONS: the PATCH itself
        with bundle.open("rb") as f, pytest.raises(CloudError, match="TLS failed") as caught:
            distrusting.patch(url, 0, f, 10)
        assert caught.value.retryable
    assert tus.uploads()[0].offset == 0


@pytest.mark.parametrize("name", ["ca_file", "client_cert", "token_file"])
def test_a_missing_file_in_the_cloud_settings_stops_the_start(tmp_path: Path, name: str) -> None:
    settings: dict[str, object] = {"upload_url": "https://x.example/files/"}
    settings[name] = tmp_path / "absent.pem"
    with pytest.raises(CloudConfigError, match=f"cloud.{name} .*absent.pem"):
        build_session(CloudSettings.model_validate(settings))


@pytest.mark.parametrize("content", ["", "  \n", "two words\n"])
def test_a_token_file_must_hold_one_token(tmp_path: Path, content: str) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    settings = {"upload_url": "https://x.example/files/", "token_file": token}
    with pytest.raises(CloudConfigError, match="not one token"):
        build_session(CloudSettings.model_validate(settings))
