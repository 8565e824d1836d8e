"""Where the tus server says an upload lives: the client follows a `Location` only to the
configured endpoint's scheme, host and port, since every later request carries the bearer token
and the bundle, and a Location is whatever the answering server (or anything on the path) wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cloud import CloudError, CloudHttp, TusClient, build_session
from agent.config import CloudSettings
from tests.support.httpfaults import HttpFaults
from tests.support.tus import TusServer

TusFactory = Callable[..., TusServer]


def client_with_token(tmp_path: Path, endpoint: str) -> TusClient:
    token = tmp_path / "token"
    token.write_text("s3cr3t-token-for-tests\n")
    settings = CloudSettings(upload_url=endpoint, token_file=token)
    return TusClient(CloudHttp(build_session(settings), timeout=10), endpoint)


@pytest.mark.parametrize("where", ["another port", "https on the same port", "another host"])
def test_a_location_outside_the_upload_url_is_a_permanent_error_and_nothing_goes_there(
    tmp_path: Path, tus_server: TusFactory, where: str
) -> None:
    tus = tus_server()
    with HttpFaults("127.0.0.1", tus.port) as front, HttpFaults("127.0.0.1", tus.port) as foreign:
        elsewhere = {
            "another port": foreign.url_for("/files/stolen"),
            "https on the same port": front.url_for("/files/stolen").replace("http:", "https:"),
            "another host": f"http://localhost:{front.port}/files/stolen",
        }[where]
        front.fail_next(201, method="POST", headers={"Location": elsewhere})
        client = client_with_token(tmp_path, front.url_for("/files/"))
        with pytest.raises(CloudError) as caught:
            client.create(100, {"filename": "bundle.bin"})
        assert not caught.value.retryable
        assert "outside" in str(caught.value) and "nothing sent there" in str(caught.value)
        assert foreign.count() == 0
        assert front.counts() == {"OPTIONS": 1, "POST": 1}


def test_a_relative_location_is_taken_against_the_upload_url(
    tmp_path: Path, tus_server: TusFactory
) -> None:
    tus = tus_server()
    with HttpFaults("127.0.0.1", tus.port) as front:
        client = client_with_token(tmp_path, front.url_for("/files/"))
        url = client.create(3, {"filename": "bundle.bin"})
        assert url.startswith(front.url_for("/files/"))
        assert client.offset(url) == (0, 3)
