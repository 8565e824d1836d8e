"""The fence around pynetdicom's private internals: an upgrade that moves one fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pynetdicom
from pynetdicom import AE
from pynetdicom.association import Association

import agent
from agent import pynetdicom_internals as internals
from agent.dicom import DUL_POLL_INTERVAL, tune

INTERNALS = re.compile(
    r"(?<!\w)_config\b|\b(?:dul|dimse|assoc|association|message)\._\w+|\bmsg_queue\b"
)
"""How a use of pynetdicom's internals reads: its _config module, an underscored attribute of
an association or its parts, the DIMSE message queue."""


def test_every_internal_the_agent_uses_is_where_the_fence_expects_it() -> None:
    gone = internals.missing()
    assert not gone, (
        f"pynetdicom {pynetdicom.__version__} moved internals that agent/pynetdicom_internals.py"
        f" uses: {', '.join(gone)}"
    )


def test_tuning_an_association_sets_the_reactor_delay_and_the_response_guard() -> None:
    assoc = Association(AE(), "requestor")  # never started: no thread, no socket
    serve = assoc._serve_request
    tune(assoc)
    assert assoc.dul._run_loop_delay == DUL_POLL_INTERVAL
    assert assoc._serve_request == serve
    tune(assoc, sends_stores=True)
    assert assoc._serve_request != serve


def test_no_other_module_of_the_agent_touches_pynetdicom_internals() -> None:
    root = Path(agent.__file__).parent
    fence = root / "pynetdicom_internals.py"
    touching = [
        f"{path.relative_to(root)}: {found.group()}"
        for path in sorted(root.rglob("*.py"))
        if path != fence
        for found in INTERNALS.finditer(path.read_text())
    ]
    assert not touching
