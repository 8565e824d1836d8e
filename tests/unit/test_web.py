"""The health server's routing and bearer token, answered without a socket."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from agent.config import HealthSettings
from agent.web import HealthServer, Route, text

ROUTES = {
    "/healthz": Route(lambda: text(200, "live"), private=False),
    "/status": Route(lambda: text(200, "status"), private=True),
}


def server(tmp_path: Path, listen: str, token: str | None = None) -> HealthServer:
    token_file = None
    if token is not None:
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
    return HealthServer(HealthSettings(listen=listen, token_file=token_file), ROUTES)


def test_beyond_loopback_private_routes_need_the_bearer_token(tmp_path: Path) -> None:
    web = server(tmp_path, "0.0.0.0:8080", token="s3cret")
    assert web.respond("GET", "/status", None).status == 401
    assert web.respond("GET", "/status", "Bearer wrong").status == 401
    assert web.respond("GET", "/status", "Basic s3cret").status == 401
    assert web.respond("GET", "/status", "Bearer s3cret").body == b"status\n"
    assert web.respond("GET", "/healthz", None).body == b"live\n"


def test_a_browser_may_give_the_token_as_its_basic_password(tmp_path: Path) -> None:
    web = server(tmp_path, "0.0.0.0:8080", token="s3cret")

    def basic(credentials: str) -> str:
        return "Basic " + base64.b64encode(credentials.encode()).decode()

    assert web.respond("GET", "/status", basic("ops:s3cret")).status == 200
    assert web.respond("GET", "/status", basic(":s3cret")).status == 200
    assert web.respond("GET", "/status", basic("ops:wrong")).status == 401
    assert web.respond("GET", "/status", basic("s3cret")).status == 401
    assert web.respond("GET", "/status", "Basic !!not-base64!!").status == 401
    assert web.respond("GET", "/status", "Digest s3cret").status == 401


def test_a_refusal_challenges_for_bearer_and_basic(tmp_path: Path) -> None:
    web = server(tmp_path, "0.0.0.0:8080", token="s3cret")
    answered: list[tuple[str, list[tuple[str, str]]]] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/status"}
    web._app(environ, lambda status, headers: answered.append((status, headers)))
    status, headers = answered[0]
    assert status.startswith("401")
    challenges = [value.split()[0] for name, value in headers if name == "WWW-Authenticate"]
    assert challenges == ["Bearer", "Basic"]


def test_on_loopback_no_token_is_asked(tmp_path: Path) -> None:
    web = server(tmp_path, "127.0.0.1:8080", token="s3cret")
    assert web.respond("GET", "/status", None).status == 200


def test_unknown_paths_and_other_methods_are_refused(tmp_path: Path) -> None:
    web = server(tmp_path, "127.0.0.1:8080")
    assert web.respond("GET", "/nothing", None).status == 404
    assert web.respond("DELETE", "/status", None).status == 405
    assert web.respond("HEAD", "/status", None).status == 200


def test_a_failing_route_answers_500_and_the_server_goes_on(tmp_path: Path) -> None:
    def broken() -> None:
        raise RuntimeError("boom")

    web = HealthServer(
        HealthSettings(listen="127.0.0.1:8080"),
        {"/broken": Route(broken, private=False), **ROUTES},  # type: ignore[arg-type]
    )
    assert web.respond("GET", "/broken", None).status == 500
    assert web.respond("GET", "/healthz", None).status == 200


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is empty"):
        server(tmp_path, "0.0.0.0:8080", token="  ")
