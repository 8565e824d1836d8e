"""The heartbeat's ping convention (Healthchecks): success to the URL, failure to URL/fail."""

from __future__ import annotations

import pytest

from agent.heartbeat import fail_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://hc.example/ping/abc", "https://hc.example/ping/abc/fail"),
        ("https://hc.example/ping/abc/", "https://hc.example/ping/abc/fail"),
        ("https://hc.example/abc?rid=7", "https://hc.example/abc/fail?rid=7"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/fail"),
    ],
)
def test_the_failure_url_appends_fail_to_the_path(url: str, expected: str) -> None:
    assert fail_url(url) == expected
