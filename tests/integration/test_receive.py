"""The receiver against real senders (DCMTK storescu, dcmsend, echoscu and a pynetdicom SCU)
talking to `dirigo run` as a subprocess on a free loopback port."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.conftest import StoreSCPFactory
from tests.support import dcmtk
from tests.support.agent import Agent
from tests.support.datasets import dataset_sha256, distinct_instances, real_files
from tests.support.net import wait_until


@pytest.fixture
def agent(tmp_data_dir: Path) -> Iterator[Agent]:
    with Agent(tmp_data_dir) as running:
        yield running


def spooled(agent: Agent) -> dict[str, tuple[str, str]]:
    """Return {SOP Instance UID: (spool path, sha256)} for every current instance row."""
    rows = agent.rows("SELECT sop_instance_uid, path, sha256 FROM instances WHERE superseded = 0")
    return {uid: (path, sha) for uid, path, sha in rows}


def send_raw(port: int, paths: Sequence[Path], calling_ae: str = "PACS") -> list[int]:
    """C-STORE each file's bytes exactly as they are (no parsing on our side); return statuses.

    pynetdicom's chunked send streams the dataset from the file and takes the SOP Instance UID
    it announces from the file meta: the one way to put malformed datasets on the wire.
    """
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title=calling_ae)
        # One context per syntax: a raw (unparsed) send must go in the file's own syntax.
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            ae.add_requested_context(CTImageStorage, syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title="DIRIGO")
        assert assoc.is_established, "association refused"
        try:
            statuses = []
            for path in paths:
                response = assoc.send_c_store(path)
                statuses.append(int(response.Status) if response else -1)
            assert assoc.is_established, "association did not survive bad input"
        finally:
            assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def ct_file(path: Path, sop_uid: str = "1.2.826.0.1.3680043.10.1.1", **changes: object) -> Path:
    """Write a small valid CT instance (one of the generated series, re-identified)."""
    from tests.support.datasets import ct_series

    source = ct_series(path.parent / "ct-source", slices=1, rows=64, cols=64)[0]
    ds = dcmread(source)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_echo_from_a_configured_peer_succeeds(agent: Agent) -> None:
    assert dcmtk.echoscu(agent.port).returncode == 0


def test_an_unknown_calling_ae_is_rejected_at_association(agent: Agent) -> None:
    result = dcmtk.echoscu(agent.port, calling_ae="INTRUDER")
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    assert "'INTRUDER' is not a configured peer" in agent.log_tail()


def test_a_known_ae_title_from_another_address_is_rejected(tmp_data_dir: Path) -> None:
    peers = ({"ae_title": "PACS", "host": "127.0.0.2"},)
    with Agent(tmp_data_dir, peers=({"ae_title": "PROBE"}, *peers), probe_ae="PROBE") as agent:
        result = dcmtk.echoscu(agent.port, calling_ae="PACS")
        assert result.returncode != 0
        assert "connected from 127.0.0.1, not its host" in agent.log_tail()


def test_unknown_peers_are_accepted_when_configured(tmp_data_dir: Path) -> None:
    extra = {"dicom": {"accept_unknown_peers": True}}
    with Agent(tmp_data_dir, extra=extra) as agent:
        assert dcmtk.echoscu(agent.port, calling_ae="ANYONE").returncode == 0


def test_real_images_in_every_transfer_syntax_are_stored_byte_identical(
    agent: Agent, storescp: StoreSCPFactory
) -> None:
    # dcmsend re-encodes some files on the way out, so the oracle is what DCMTK's storescp in
    # bit-preserving mode (+B) writes when it receives the very same sends.
    files = distinct_instances(real_files())
    reference = storescp(extra_args=("+xa", "+B"))
    assert dcmtk.dcmsend(files, reference.port, called_ae=reference.ae).returncode == 0
    sent = {dataset_uid(p): dataset_sha256(p) for p in reference.out_dir.iterdir()}
    dcmtk.dcmsend(files, agent.port)
    stored = spooled(agent)
    # A real-world wart: explicit_VR-UN.dcm encodes its UIDs with VR UN, and DCMTK 3.6.7 then
    # announces the raw bytes ('31') as the SOP Instance UID of its C-STORE request. Dirigo must
    # refuse such a request as a mismatch; every other file must arrive byte for byte.
    notes = [json.loads(n.read_text()) for n in (agent.data_dir / "quarantine").glob("*.json")]
    assert all("differs from the one announced" in note["reason"] for note in notes)
    assert len(notes) <= 1
    assert len(stored) + len(notes) == len(files)
    for uid, (spool_path, sha) in stored.items():
        assert sha == sent[uid], uid
        assert dataset_sha256(agent.data_dir / spool_path) == sha, uid


def test_a_500_slice_ct_series_arrives_whole(agent: Agent, ct_series_500: list[Path]) -> None:
    result = dcmtk.storescu(ct_series_500, agent.port)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(dcmtk.acknowledged(result)) == 500
    stored = spooled(agent)
    assert len(stored) == 500
    for path in ct_series_500[::50]:
        assert stored[dataset_uid(path)][1] == dataset_sha256(path)
    status = agent.status()
    assert status["studies"]["open"] == 1
    assert status["instances"]["received"] == 500


def corrupt_variants(folder: Path) -> dict[str, tuple[Path, int]]:
    """Write one file per kind of bad input; return {name: (path, expected status)}."""
    folder.mkdir()
    good = ct_file(folder / "good.dcm").read_bytes()
    (group_length,) = struct.unpack("<I", good[140:144])
    offset = 144 + group_length
    nested = (
        struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ) * 400
    absurd = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, 0xFFFFFFF0) + b"xx"
    variants = {
        "truncated": (good[: len(good) - 1000], 0xC210),
        "absurd-length": (good[:offset] + absurd + good[offset:], 0xC210),
        "nested-400-deep": (good[:offset] + nested + good[offset:], 0xC210),
        "garbage": (good[:offset] + bytes(range(256)) * 40, 0xC210),
    }
    files = {}
    for name, (data, status) in variants.items():
        (folder / f"{name}.dcm").write_bytes(data)
        files[name] = (folder / f"{name}.dcm", status)
    # The request announces the File Meta's UID; make it differ from the dataset's. (pydicom's
    # save_as would "correct" the meta, so edit the bytes.)
    mismatch = ct_file(folder / "mismatch.dcm", "1.2.826.0.1.3680043.10.1.2").read_bytes()
    meta = mismatch[:offset].replace(b"1.2.826.0.1.3680043.10.1.2", b"1.2.826.0.1.3680043.10.1.3")
    (folder / "mismatch.dcm").write_bytes(meta + mismatch[offset:])
    files["uid-mismatch"] = (folder / "mismatch.dcm", 0xC212)
    no_study = dcmread(folder / "good.dcm")
    del no_study.StudyInstanceUID
    no_study.SOPInstanceUID = no_study.file_meta.MediaStorageSOPInstanceUID = (
        "1.2.826.0.1.3680043.10.1.4"
    )
    no_study.save_as(folder / "no-study.dcm", enforce_file_format=True)
    files["missing-study-uid"] = (folder / "no-study.dcm", 0xC211)
    return files


def test_bad_input_gets_a_named_failure_is_quarantined_and_harms_nothing_else(
    agent: Agent, tmp_path: Path
) -> None:
    variants = corrupt_variants(tmp_path / "bad")
    good = ct_file(tmp_path / "after.dcm", "1.2.826.0.1.3680043.10.1.9")
    names = list(variants)
    statuses = send_raw(agent.port, [variants[n][0] for n in names] + [good])
    expected = [variants[n][1] for n in names] + [0x0000]
    assert dict(zip([*names, "good"], statuses, strict=True)) == dict(
        zip([*names, "good"], expected, strict=True)
    )
    notes = sorted((agent.data_dir / "quarantine").glob("*.json"))
    assert len(notes) == len(variants)
    for note in notes:
        reason = json.loads(note.read_text())
        assert reason["calling_ae"] == "PACS" and reason["reason"]
        assert note.with_suffix(".dcm").stat().st_size > 0
    status = agent.status()
    assert status["instances"]["quarantined"] == len(variants)
    assert status["instances"]["received"] == 1
    assert status["last_error"] is not None
    assert dcmtk.echoscu(agent.port).returncode == 0


def test_the_same_instance_twice_is_stored_once(agent: Agent, tmp_path: Path) -> None:
    path = ct_file(tmp_path / "a.dcm")
    assert send_raw(agent.port, [path, path]) == [0, 0]
    assert len(spooled(agent)) == 1
    assert len(list((agent.data_dir / "spool").rglob("*.dcm"))) == 1


def test_new_content_for_a_known_instance_replaces_it_and_is_recorded(
    agent: Agent, tmp_path: Path
) -> None:
    first = ct_file(tmp_path / "a.dcm")
    second = ct_file(tmp_path / "b.dcm", SeriesDescription="corrected")
    assert send_raw(agent.port, [first, second]) == [0, 0]
    stored = spooled(agent)
    assert [sha for _, sha in stored.values()] == [dataset_sha256(second)]
    assert agent.rows("SELECT replaced_count FROM instances") == [(1,)]
    assert len(list((agent.data_dir / "spool").rglob("*.dcm"))) == 1
    assert agent.rows("SELECT count(*) FROM events WHERE kind LIKE '%replace%'") == [(1,)]


def test_a_disk_above_high_water_refuses_with_out_of_resources(
    tmp_data_dir: Path, tmp_path: Path
) -> None:
    with Agent(tmp_data_dir, high_water="1%") as agent:
        statuses = send_raw(agent.port, [ct_file(tmp_path / "a.dcm")])
        assert statuses == [0xA700]
        assert agent.status()["disk"]["accepting"] is False
        assert spooled(agent) == {}
        assert list((agent.data_dir / "incoming").iterdir()) == []


def test_late_instances_after_a_study_went_stable_open_a_new_part(
    tmp_data_dir: Path, tmp_path: Path
) -> None:
    first = ct_file(tmp_path / "a.dcm", "1.2.826.0.1.3680043.10.2.1")
    late = ct_file(tmp_path / "b.dcm", "1.2.826.0.1.3680043.10.2.2")
    with Agent(tmp_data_dir, stable_after="1s") as agent:
        assert send_raw(agent.port, [first]) == [0]
        # Once stable, the part's upload job starts (against a cloud that is not there).
        wait_until(lambda: agent.status()["studies"]["open"] == 0, 15, what="study stable")
        assert send_raw(agent.port, [late, first]) == [0, 0]
        parts = agent.rows(
            "SELECT s.part, s.state, count(i.id) FROM studies s JOIN instances i"
            " ON i.study_id = s.id GROUP BY s.id ORDER BY s.part"
        )
        assert [(part, count) for part, _, count in parts] == [(1, 1), (2, 1)]
        assert parts[0][1] in ("stable", "uploading")
        assert parts[1][1] == "open"
        jobs = agent.rows("SELECT s.part FROM jobs j JOIN studies s ON s.id = j.study_id")
        assert jobs == [(1,)]


def test_sigterm_lets_the_association_in_flight_finish(
    agent: Agent, ct_series_500: list[Path]
) -> None:
    import subprocess

    files = ct_series_500[:200]
    sender = subprocess.Popen(
        [
            dcmtk.tool("storescu"),
            "-v",
            "-aet",
            "PACS",
            "-aec",
            "DIRIGO",
            "127.0.0.1",
            str(agent.port),
            *map(str, files),
        ],
        env=dcmtk.dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: agent.rows("SELECT count(*) FROM instances")[0][0] > 5, 30, what="first")
    assert agent.proc is not None
    agent.proc.terminate()
    output, _ = sender.communicate(timeout=120)
    assert sender.returncode == 0, output[-2000:]
    assert agent.proc.wait(timeout=60) == 0
    assert output.count("Received Store Response (Success)") == 200
    assert agent.rows("SELECT count(*) FROM instances") == [(200,)]
    assert dcmtk.echoscu(agent.port).returncode != 0


def test_an_ipv6_listener_serves_both_families_and_pins_hosts_over_ipv6(
    tmp_data_dir: Path,
) -> None:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    peers = ({"ae_title": "PACS", "host": "127.0.0.1"}, {"ae_title": "PACS6", "host": "::1"})
    with Agent(tmp_data_dir, peers=peers, extra={"dicom": {"bind": "::"}}) as agent:
        outcomes = {}
        for calling in ("PACS6", "PACS"):
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("::1", agent.port, ae_title="DIRIGO")
            outcomes[calling] = assoc.is_established
            if assoc.is_established:
                assoc.release()
        assert outcomes == {"PACS6": True, "PACS": False}
        assert "'PACS' connected from ::1, not its host" in agent.log_tail()


def test_a_re_send_repairs_an_instance_whose_spool_copy_was_lost(
    tmp_data_dir: Path, tmp_path: Path
) -> None:
    path = ct_file(tmp_path / "a.dcm")
    retry = {"retry_first": "1h", "retry_max": "2h"}  # the cloud is a closed port
    with Agent(tmp_data_dir, stable_after="2s", extra={"upload": retry}) as agent:
        assert send_raw(agent.port, [path]) == [0]
        ((lost, _),) = spooled(agent).values()
        (agent.data_dir / lost).unlink()  # a disk fault, before the part is packed

        def last_error() -> str:
            rows = agent.rows("SELECT coalesce(last_error, '') FROM jobs WHERE state = 'failed'")
            return str(rows[0][0]) if rows else ""

        wait_until(lambda: "cannot pack" in last_error(), 30, what="the part failing to pack")
        # The PACS sends the instance again (it still has it): Success, and the copy is kept.
        assert send_raw(agent.port, [path]) == [0]
        ((repaired, sha),) = spooled(agent).values()
        assert repaired != lost and sha == dataset_sha256(path)
        assert dataset_sha256(agent.data_dir / repaired) == sha
        # The part is packed now, and waits only for the cloud.
        wait_until(
            lambda: agent.rows("SELECT state FROM instances") == [("packed",)],
            30,
            what="the repaired part packed",
        )
        assert "cannot pack" not in last_error()
        assert agent.rows("SELECT count(*) FROM events WHERE kind = 'repaired'") == [(1,)]


def test_a_sender_retrying_a_malformed_instance_leaves_one_quarantined_copy(
    agent: Agent, tmp_path: Path
) -> None:
    truncated, status = corrupt_variants(tmp_path / "bad")["truncated"]
    assert send_raw(agent.port, [truncated] * 3) == [status] * 3
    assert send_raw(agent.port, [truncated]) == [status]  # a new association: the same
    assert len(list((agent.data_dir / "quarantine").glob("*.dcm"))) == 1
    assert agent.rows("SELECT calling_ae, repeats FROM quarantine") == [("PACS", 3)]
    assert agent.status()["instances"]["quarantined"] == 1


def test_a_start_names_acknowledged_instances_whose_spool_copy_is_gone(
    agent: Agent, tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.10.3.1"
    assert send_raw(agent.port, [ct_file(tmp_path / "a.dcm", uid)]) == [0]
    assert agent.stop() == 0
    ((lost, _),) = spooled(agent).values()
    (agent.data_dir / lost).unlink()
    agent.start()
    assert f"1 acknowledged instance(s) have lost their spool copy ({uid})" in agent.log_tail()
