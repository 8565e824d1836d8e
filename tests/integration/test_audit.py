"""The audit trail with real peers: DCMTK storescu, findscu, movescu and echoscu against
`dirigo run`, Orthanc as the cloud archive, storescp as the move destination, and a real
rsyslog (TCP, and TLS with its gtls driver) as the audit record repository. Each DICOM audit
message rsyslog receives must parse as PS3.15 A.5 says, and `dirigo audit` must list the same
events."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import trustme
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from tests.conftest import OrthancFactory, StoreSCPFactory
from tests.support import datasets, dcmtk
from tests.support.agent import Agent
from tests.support.net import LOOPBACK, free_port, wait_until
from tests.support.orthanc import Orthanc
from tests.support.rsyslog import Record, Rsyslog, RsyslogMissing, Tls
from tests.unit.test_audit import check_structure, code

SUCCESS = 0x0000
BOM = "\ufeff"


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Any]:
    """Return a factory of started rsyslogs (TCP, or TLS given `tls`); all stop after the test."""
    started: list[Rsyslog] = []

    def start(tls: Tls | None = None, port: int | None = None, name: str = "rsyslog") -> Rsyslog:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        try:
            server = Rsyslog(directory, tls, port)
        except RsyslogMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def uid(path: Path, keyword: str = "StudyInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


def load(archive: Orthanc, paths: list[Path]) -> None:
    for path in paths:
        response = archive.session.post(
            f"{archive.http_url}/instances", data=path.read_bytes(), timeout=60
        )
        response.raise_for_status()


def agent_for(data_dir: Path, archive: Orthanc, audit: dict[str, Any], dest_port: int) -> Agent:
    peers = (
        {"ae_title": "PACS", "host": LOOPBACK},
        {"ae_title": "DEST", "host": LOOPBACK, "port": dest_port},
    )
    cloud = {"dicomweb_url": archive.dicomweb_url, "timeout": "5s"}
    return Agent(data_dir, peers=peers, extra={"cloud": cloud, "audit": audit})


def messages(records: list[Record]) -> list[ET.Element]:
    """Parse each record's message as XML (after the UTF-8 BOM RFC 5424 puts before it)."""
    parsed = []
    for record in records:
        assert record.msgid == "IHE+RFC-3881" and record.app_name == "dirigo", record
        assert record.pri // 8 == 10  # authpriv
        assert record.msg.startswith(BOM), record.msg[:40]
        parsed.append(ET.fromstring(record.msg[len(BOM) :]))
    return parsed


def event_of(message: ET.Element) -> tuple[str, str, str]:
    """(EventID code, EventActionCode, first EventTypeCode or '')"""
    event = message[0]
    types = event.findall("EventTypeCode")
    return (
        code(event.find("EventID"))[0],
        event.get("EventActionCode", ""),
        (code(types[0])[0] if types else ""),
    )


def studies_of(message: ET.Element) -> set[str]:
    return {
        o.get("ParticipantObjectID", "")
        for o in message.iter("ParticipantObjectIdentification")
        if code(o.find("ParticipantObjectIDTypeCode"))[0] == "110180"
    }


def audit_rows(agent: Agent, *args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        agent.command("audit", "--json", *args), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)["audit"]
    return rows


def test_a_send_a_query_a_move_a_get_and_refusals_reach_rsyslog_as_dicom_audit_messages(
    tmp_path: Path,
    tmp_data_dir: Path,
    orthanc: OrthancFactory,
    storescp: StoreSCPFactory,
    rsyslog: Any,
) -> None:
    collector = rsyslog()
    archive = orthanc(aet="ARCHIVE")
    prior = datasets.ct_series(tmp_path / "prior", slices=4, rows=32, cols=32, seed=71)
    load(archive, prior)
    sent = datasets.ct_series(tmp_path / "sent", slices=3, rows=32, cols=32, seed=72)
    destination = storescp(ae="DEST")
    agent = agent_for(
        tmp_data_dir, archive, {"syslog": f"tcp://{LOOPBACK}:{collector.port}"}, destination.port
    )
    with agent:
        stored = dcmtk.storescu(sent, agent.port, calling_ae="PACS")
        found = dcmtk.findscu(
            agent.port, [f"StudyInstanceUID={uid(prior[0])}"], out_dir=tmp_path / "found"
        )
        moved = dcmtk.movescu(agent.port, [f"StudyInstanceUID={uid(prior[0])}"], "DEST")
        got = dcmtk.getscu(agent.port, [f"StudyInstanceUID={uid(prior[0])}"], tmp_path / "got")
        refused = dcmtk.echoscu(agent.port, calling_ae="INTRUDER")
        worklist = AE(ae_title="PACS")
        worklist.add_requested_context(ModalityWorklistInformationFind)
        # accepted with every context refused: pynetdicom, as requestor, then aborts
        nothing = worklist.associate(LOOPBACK, agent.port, ae_title="DIRIGO")
        assert not nothing.is_established and not nothing.is_rejected
        log = agent.log_tail()
    assert stored.returncode == 0, stored.stdout[-2000:] + log
    assert dcmtk.final_status(found) == SUCCESS, found.stdout[-2000:]
    assert dcmtk.final_status(moved) == SUCCESS, moved.stdout[-2000:]
    assert dcmtk.final_status(got) == SUCCESS, got.stdout[-2000:]
    assert refused.returncode != 0

    # every row but the accepted associations has its message (start, store, query, move,
    # refusal, stop); the agent flushed its queue at stop, rsyslog may still be writing
    rows = audit_rows(agent)
    expected = [r for r in rows if not (r["event"] == "association" and r["outcome"] == "success")]
    wait_until(
        lambda: len(collector.records()) >= len(expected),
        30,
        what=f"{len(expected)} records at rsyslog: {collector.output()}",
    )
    received = messages(collector.records())
    assert len(received) == len(expected)
    for message in received:
        check_structure(message)
    events = [event_of(m) for m in received]
    assert events[0] == ("110100", "E", "110120") and events[-1] == ("110100", "E", "110121")
    by_event = {event: m for event, m in zip(events, received, strict=True)}
    stored_message = by_event[("110104", "C", "")]
    assert studies_of(stored_message) == {uid(sent[0])}
    (sop_class,) = stored_message.iter("SOPClass")
    assert sop_class.get("NumberOfInstances") == "3"
    assert ("110112", "E", "") in by_event
    retrieves = [m for e, m in zip(events, received, strict=True) if e == ("110104", "R", "")]
    assert [studies_of(m) for m in retrieves] == [{uid(prior[0])}] * 2
    destinations = [
        {p.get("UserID"): p.get("UserIsRequestor") for p in m.iter("ActiveParticipant")}
        for m in retrieves
    ]
    # C-MOVE: to DEST for PACS, the requester; C-GET: back to PACS itself
    assert destinations == [
        {"DIRIGO": "false", "DEST": "false", "PACS": "true"},
        {"DIRIGO": "false", "PACS": "true"},
    ]
    alerts = [m[0] for e, m in zip(events, received, strict=True) if e == ("110113", "E", "110126")]
    assert {a.get("EventOutcomeIndicator") for a in alerts} == {"4"}
    descriptions = sorted(a.findtext("EventOutcomeDescription") or "" for a in alerts)
    assert len(descriptions) == 2 and "INTRUDER" in descriptions[0], descriptions
    assert descriptions[1] == "no presentation context was accepted"
    for message in received:  # no patient data anywhere in the trail
        text = ET.tostring(message, encoding="unicode")
        for path in (*sent, *prior):
            header = pydicom.dcmread(path, stop_before_pixels=True)
            assert str(header.PatientID) not in text and str(header.PatientName) not in text

    # `dirigo audit` lists the same events, by study and by peer
    names = [r["event"] for r in rows]
    assert names[0] == "application-start" and names[-1] == "application-stop"
    assert {"association", "study-received", "query", "retrieve"} <= set(names)
    refusals = [r for r in rows if r["event"] == "association" and r["outcome"] == "failure"]
    assert [r["calling_ae"] for r in refusals] == ["INTRUDER", "PACS"]
    assert "not a configured peer" in refusals[0]["reason"]
    assert [r["event"] for r in audit_rows(agent, "--study", uid(sent[0]))] == ["study-received"]
    by_prior = audit_rows(agent, "--study", uid(prior[0]))
    assert [r["event"] for r in by_prior] == ["query", "retrieve", "retrieve"]
    assert [r["detail"]["operation"] for r in by_prior[1:]] == ["C-MOVE", "C-GET"]
    assert [r["detail"]["destination"] for r in by_prior[1:]] == ["DEST", "PACS"]
    assert [r["detail"]["instances"] for r in by_prior[1:]] == [4, 4]
    assert {r["event"] for r in audit_rows(agent, "--peer", "DEST")} == {"retrieve"}
    table = subprocess.run(
        agent.command("audit", "--since", "1h"), capture_output=True, text=True, timeout=60
    )
    assert table.returncode == 0 and "PACS -> DIRIGO" in table.stdout, table.stderr


def test_over_tls_a_send_and_dirigo_retrieve_reach_rsyslog(
    tmp_path: Path,
    tmp_data_dir: Path,
    orthanc: OrthancFactory,
    storescp: StoreSCPFactory,
    rsyslog: Any,
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    tls = Tls(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(str(tls.cert))
    cert.private_key_pem.write_to_path(str(tls.key))
    ca.cert_pem.write_to_path(str(tls.ca))
    collector = rsyslog(tls)
    archive = orthanc(aet="ARCHIVE")
    prior = datasets.ct_series(tmp_path / "prior", slices=2, rows=32, cols=32, seed=73)
    load(archive, prior)
    sent = datasets.ct_series(tmp_path / "sent", slices=2, rows=32, cols=32, seed=74)
    imported = datasets.ct_series(tmp_path / "cd", slices=3, rows=32, cols=32, seed=76)
    destination = storescp(ae="DEST")
    audit = {"syslog": f"tcp+tls://localhost:{collector.port}", "ca": str(tls.ca)}
    agent = agent_for(tmp_data_dir, archive, audit, destination.port)
    with agent:
        stored = dcmtk.storescu(sent, agent.port, calling_ae="PACS")
        send = subprocess.run(
            agent.command("send", *map(str, imported)), capture_output=True, text=True, timeout=120
        )
        assert send.returncode == 0, send.stderr
        retrieved = subprocess.run(
            agent.command("retrieve", "--study", uid(prior[0]), "--to", "DEST"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert stored.returncode == 0, stored.stdout[-2000:]
    assert retrieved.returncode == 0, retrieved.stderr

    rows = audit_rows(agent)
    expected = [r for r in rows if not (r["event"] == "association" and r["outcome"] == "success")]
    wait_until(lambda: len(collector.records()) >= len(expected), 30, what="records over TLS")
    received = messages(collector.records())
    for message in received:
        check_structure(message)
    transfers = {
        tuple(sorted(studies_of(m))): event_of(m)[1] for m in received if event_of(m)[0] == "110104"
    }
    assert transfers == {(uid(sent[0]),): "C", (uid(imported[0]),): "C", (uid(prior[0]),): "R"}
    from_cd = next(r for r in rows if r["study_uid"] == uid(imported[0]))
    assert (from_cd["event"], from_cd["calling_ae"], from_cd["detail"]["instances"]) == (
        "study-received",
        "IMPORT",
        3,
    )
    retrieve = next(r for r in rows if r["event"] == "retrieve")
    assert retrieve["detail"]["operation"] == "dirigo retrieve"
    assert retrieve["detail"]["instances"] == 2 and retrieve["outcome"] == "success"


def test_with_the_collector_down_dicom_goes_on_and_the_trail_reaches_it_once_it_is_up(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, rsyslog: Any
) -> None:
    port = free_port()  # nothing listens there yet
    archive = orthanc(aet="ARCHIVE")
    sent = datasets.ct_series(tmp_path / "sent", slices=2, rows=32, cols=32, seed=75)
    agent = agent_for(tmp_data_dir, archive, {"syslog": f"tcp://{LOOPBACK}:{port}"}, free_port())
    health = yaml.safe_load(agent.config_path.read_text())["health"]["listen"]

    def audit_status() -> dict[str, Any]:
        document = requests.get(f"http://{health}/status", timeout=10).json()
        return dict(document["audit"])

    with agent:
        stored = dcmtk.storescu(sent, agent.port, calling_ae="PACS")
        assert stored.returncode == 0, stored.stdout[-2000:]
        rows = audit_rows(agent)
        assert {"application-start", "association", "study-received"} <= {r["event"] for r in rows}
        waiting = wait_until(
            lambda: (status := audit_status())["failing"] and status["queued"] >= 1 and status,
            30,
            what="/status showing the collector unreachable",
        )
        assert isinstance(waiting, dict) and waiting["sent"] == 0 and waiting["dropped"] == 0
        metrics = requests.get(f"http://{health}/metrics", timeout=10).text
        assert "dirigo_audit_syslog_up 0.0" in metrics
        collector = rsyslog(port=port)
        wait_until(
            lambda: len(collector.records()) >= 2,
            60,
            what="the queued messages after the collector came up",
        )
        log = agent.log_tail()
    assert "audit: cannot send to" in log and "sending to" in log
    events = [event_of(m)[0] for m in messages(collector.records())]
    assert events[:2] == ["110100", "110104"]
