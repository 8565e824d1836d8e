"""Which Node.js runs the development cloud's tus server: the project's own, which set-up
installs from the npm registry where the system's is older than the server needs (Debian 12),
before the system's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support import tus


def test_the_projects_own_node_comes_before_the_systems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DIRIGO_NODE", raising=False)
    own = tmp_path / "node"
    monkeypatch.setattr(tus, "PROJECT_NODE", own)
    assert tus.node_binary() == shutil.which("node")  # none installed: the system's

    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    assert tus.node_binary() == str(own)

    monkeypatch.setenv("DIRIGO_NODE", "/opt/node/bin/node")
    assert tus.node_binary() == "/opt/node/bin/node"


def test_setup_installs_the_projects_node_where_the_tests_look_for_it() -> None:
    setup = (Path(__file__).resolve().parents[2] / "scripts" / "setup").read_text()
    where = tus.PROJECT_NODE.relative_to(Path(__file__).resolve().parents[2])
    assert f'PROJECT_NODE="$PROJECT_NODE_DIR/{where.relative_to("devcloud/node")}"' in setup
    assert "PROJECT_NODE_DIR=devcloud/node" in setup
    assert os.sep.join(where.parts[:2]) == "devcloud/node"
