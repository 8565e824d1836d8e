"""docs/operations.md quotes the agent's own messages so that an operator can search the journal
for them: each fragment below is quoted in the runbook and written by the code. When a message
changes, this fails until the runbook says what the agent now says."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = " ".join((ROOT / "docs" / "operations.md").read_text(encoding="utf-8").split())
CODE = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "agent").rglob("*.py"))

FRAGMENTS = [
    "rejected association from ",
    "is marked tls in dicom.peers and called the",
    "it must use the TLS port",
    "TLS handshake failed: ",
    "certificate not accepted: ",
    "calling AE title ",
    " is not a configured peer",
    "not its host",
    "association slots are in use",
    "services in dicom.peers",
    " Dirigo does not offer",
    "no association request within",
    "listening as",
    "disk above high-water mark",
    "disk full while storing",
    "could not store",
    "could not record",
    "unexpected error storing",
    "quarantined %s from %s (%s): %s",
    "the archive lists ",
    " instances so far",
    "never: needs `dirigo queue retry",
    "create an upload",
    "ask the server's capabilities",
    "send a chunk",
    "exceeds the server's Tus-Max-Size",
    "connection failed (",
    "timed out (",
    "TLS failed with ",
    "does not speak tus ",
    "the tus server does not offer the creation extension",
    "cannot pack: ",
    "cannot send: ",
    "cloud unreachable (",
    "studies are kept and sent once it answers",
    "at or above high water (",
    "quarantined file(s): older than ",
    "is not a peer with host and port",
    " not sent: ",
    "cannot list the instances",
    "Query/Retrieve needs cloud.dicomweb_url",
    "the archive holds it lossy (",
    "this clock is ",
    "configuration error in ",
    "this Dirigo needs ",
    "newer than this Dirigo knows",
    "cannot listen on ",
    "another dirigo agent is running with data_dir",
    "a peer host in dicom.peers does not resolve",
    "(run with --debug for details)",
    "unacknowledged file(s) left by an interrupted run",
    "instance rows written to ",
    " is up to date",
    "migrated from schema version ",
    "audit: cannot send to ",
    "audit: sending to ",
    "audit: the syslog queue is full (",
]


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_the_runbook_quotes_what_the_code_writes(fragment: str) -> None:
    assert fragment in CODE, f"the code no longer writes {fragment!r}"
    head = fragment.split("%s")[0].strip()
    assert head in RUNBOOK, f"docs/operations.md does not quote {head!r}"
