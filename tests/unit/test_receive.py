"""The receiver's acceptance of one arrival, driven directly (no association): statuses,
quarantine, duplicates and what stays on disk when something fails."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import dcmwrite

from agent.cloud import CloudHttp, TusClient
from agent.config import SpoolSettings, parse_config
from agent.dicom import Status
from agent.pack import Compression, PackError, PartInfo, pack
from agent.receive import Arrival, Receiver, Reply
from agent.spool import Spool
from agent.store import UPLOAD, JobState, NewInstance, Outcome, RecordResult, Store, StoreError
from agent.store.uploads import Bundle
from agent.upload import Uploader
from tests.unit.test_instance import make_dataset

NOW = 1_700_000_000.0
SOP_UID = "1.2.826.0.1.3680043.10.7.1"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "data", high_water=100.0)
    spool.prepare()
    return spool


@pytest.fixture
def store(spool: Spool) -> Iterator[Store]:
    opened = Store.open(spool.data_dir / "dirigo.db")
    yield opened
    opened.close()


@pytest.fixture
def receiver(spool: Spool, store: Store) -> Iterator[Receiver]:
    receiver = Receiver(spool, store, clock=lambda: NOW, concurrency=2)
    yield receiver
    receiver.close()


def part10(sop_uid: str = SOP_UID, **changes: object) -> bytes:
    """Return a small valid Part-10 instance with fixed UIDs (so re-sends are identical)."""
    ds = make_dataset(
        SOPInstanceUID=sop_uid,
        StudyInstanceUID="1.2.826.0.1.3680043.10.7.2",
        SeriesInstanceUID="1.2.826.0.1.3680043.10.7.3",
        **changes,
    )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def arrive(receiver: Receiver, data: bytes, calling_ae: str = "PACS") -> Reply:
    """Put `data` into incoming/ as a finished receive would, and accept it."""
    path = receiver.spool.incoming / f"arrival-{len(list(receiver.spool.incoming.iterdir()))}"
    path.write_bytes(data)
    return receiver.accept(Arrival(path, calling_ae, "127.0.0.1", None))


def quarantined(spool: Spool) -> list[Path]:
    return sorted(spool.quarantine_dir.glob("*.dcm"))


# -- item: truncated File Meta ----------------------------------------------------------------


def test_a_file_meta_cut_inside_a_long_vr_header_is_malformed_and_quarantined(
    receiver: Receiver, spool: Spool, store: Store
) -> None:
    data = part10()
    # (0002,0001) File Meta Information Version is OB, a long VR: its 4-byte length follows
    # the 8 bytes of tag, VR and reserved bytes. Cut inside that length.
    version = data.index(b"\x02\x00\x01\x00OB")
    reply = arrive(receiver, data[: version + 10])
    assert reply.status == Status.MALFORMED_DATASET
    assert reply.quarantined
    assert "truncated" in reply.comment
    assert len(quarantined(spool)) == 1
    assert store.status().instances["quarantined"] == 1
    assert list(spool.incoming.iterdir()) == []


def test_every_cut_of_a_file_is_stored_or_quarantined_never_an_internal_error(
    receiver: Receiver, spool: Spool
) -> None:
    data = part10()
    cuts = list(range(0, 400)) + list(range(400, len(data), 7))
    for cut in cuts:
        reply = arrive(receiver, data[:cut])
        assert reply.status != Status.PROCESSING_FAILURE, cut
        assert reply.quarantined or reply.status == Status.SUCCESS, cut
    assert list(spool.incoming.iterdir()) == []


# -- item: a re-send repairs a lost copy ------------------------------------------------------


def spool_path(store: Store, sop_uid: str = SOP_UID) -> str:
    known = store.find_instance(sop_uid)
    assert known is not None
    return known.path


def test_a_re_send_of_an_intact_instance_is_a_duplicate(
    receiver: Receiver, spool: Spool, store: Store
) -> None:
    assert arrive(receiver, part10()).outcome is Outcome.STORED
    first = spool_path(store)
    assert arrive(receiver, part10()).outcome is Outcome.DUPLICATE
    assert spool_path(store) == first
    assert [p.relative_to(spool.data_dir) for p in spool.data_dir.glob("spool/*/*")] == [
        Path(first)
    ]


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_a_re_send_whose_recorded_copy_is_lost_repairs_it(
    receiver: Receiver, spool: Spool, store: Store, damage: str
) -> None:
    assert arrive(receiver, part10()).status == Status.SUCCESS
    lost = spool_path(store)
    if damage == "missing":
        spool.path(lost).unlink()
    else:
        spool.path(lost).write_bytes(spool.path(lost).read_bytes()[:-100])
    reply = arrive(receiver, part10())
    assert reply.status == Status.SUCCESS and reply.outcome is Outcome.REPAIRED
    repaired = spool_path(store)
    assert repaired != lost and not spool.path(lost).exists()
    assert spool.path(repaired).read_bytes() == part10()
    assert store.status().instances["received"] == 1


def test_a_re_send_revives_a_part_that_failed_to_pack_on_a_lost_copy(
    receiver: Receiver, spool: Spool, store: Store
) -> None:
    assert arrive(receiver, part10()).status == Status.SUCCESS
    spool.path(spool_path(store)).unlink()
    assert store.mark_stable(NOW + 60, stable_after=60) != []
    job = store.jobs.claim(UPLOAD, "worker", 120, NOW + 60)
    assert job is not None
    info = PartInfo("site", job.study_uid, job.part)
    with pytest.raises(PackError) as packing:
        pack(spool, info, store.uploads.part_files(job.study_id), Compression())
    # As the upload worker does: a lost spool file is a permanent failure.
    store.jobs.fail(job.lease, f"cannot pack: {packing.value}", None, NOW + 61)
    assert store.jobs.claim(UPLOAD, "worker", 120, NOW + 3600) is None

    assert arrive(receiver, part10()).outcome is Outcome.REPAIRED
    (record,) = store.jobs.in_states([JobState.READY])
    assert (record.id, record.next_attempt_at) == (job.id, NOW)
    again = store.jobs.claim(UPLOAD, "worker", 120, NOW + 1)
    assert again is not None and again.id == job.id
    bundle = pack(spool, info, store.uploads.part_files(job.study_id), Compression())
    assert bundle.instances == 1


def test_a_re_send_of_an_instance_the_cloud_confirmed_is_a_duplicate_even_without_its_copy(
    receiver: Receiver, spool: Spool, store: Store
) -> None:
    assert arrive(receiver, part10()).status == Status.SUCCESS
    assert store.mark_stable(NOW + 60, stable_after=60) != []
    job = store.jobs.claim(UPLOAD, "worker", 120, NOW + 60)
    assert job is not None
    store.uploads.mark_sent(job.study_id, job.lease, NOW + 61)
    store.uploads.mark_confirmed(job.study_id, job.lease, NOW + 62)
    spool.path(spool_path(store)).unlink()  # as retention would
    assert arrive(receiver, part10()).outcome is Outcome.DUPLICATE
    assert list(spool.data_dir.glob("spool/*/*")) == []


# -- item: an uncertain commit keeps its file -------------------------------------------------


class LostCommit(Store):
    """A store whose commit of a new instance reaches the disk but is reported failed, as when
    the COMMIT's own I/O fails after its WAL frames were written (or, with `committed` false,
    fails before)."""

    committed = True

    def record_instance(
        self, new: NewInstance, now: float, damaged: str | None = None
    ) -> RecordResult:
        if self.committed:
            super().record_instance(new, now, damaged)
        raise StoreError("disk I/O error")


@pytest.mark.parametrize("committed", [True, False])
def test_a_failed_commit_keeps_the_file_until_the_rows_say_whether_it_is_needed(
    spool: Spool, committed: bool
) -> None:
    store = LostCommit.open(spool.data_dir / "dirigo.db")
    store.committed = committed
    receiver = Receiver(spool, store, clock=lambda: NOW, concurrency=1)
    try:
        reply = arrive(receiver, part10())
        assert reply.status == Status.OUT_OF_RESOURCES
        (kept,) = spool.data_dir.glob("spool/*/*")
        assert kept.read_bytes() == part10()
        assert receiver.reconcile() == (0 if committed else 1)
        assert kept.exists() == committed
        if committed:
            assert spool.path(spool_path(store)) == kept
    finally:
        receiver.close()
        store.close()


def test_the_start_up_sweep_removes_a_file_whose_commit_did_not_happen(spool: Spool) -> None:
    store = LostCommit.open(spool.data_dir / "dirigo.db")
    store.committed = False
    receiver = Receiver(spool, store, clock=lambda: NOW, concurrency=1)
    try:
        assert arrive(receiver, part10()).status == Status.OUT_OF_RESOURCES
        assert len(list(spool.data_dir.glob("spool/*/*"))) == 1
        # The process dies before any reconcile; the next start sweeps.
        assert spool.sweep(store.spool_paths()) == 1
        assert list(spool.data_dir.glob("spool/*/*")) == []
    finally:
        receiver.close()
        store.close()


# -- item: a bounded quarantine ---------------------------------------------------------------


def malformed(sop_uid: str = SOP_UID) -> bytes:
    return part10(sop_uid)[:-50]


def quarantine_rows(store: Store) -> list[tuple[object, ...]]:
    with store.read() as db:
        return db.execute(
            "SELECT calling_ae, repeats, path FROM quarantine ORDER BY calling_ae, repeats DESC"
        ).fetchall()


def test_a_sender_retrying_the_same_bad_input_leaves_one_copy_and_a_count(
    receiver: Receiver, spool: Spool, store: Store
) -> None:
    for _ in range(5):
        reply = arrive(receiver, malformed())
        assert reply.status == Status.MALFORMED_DATASET and reply.quarantined
    arrive(receiver, malformed(), calling_ae="OTHER")
    arrive(receiver, malformed("1.2.826.0.1.3680043.10.7.9"))
    rows = quarantine_rows(store)
    assert [(ae, repeats) for ae, repeats, _ in rows] == [("OTHER", 0), ("PACS", 4), ("PACS", 0)]
    kept = sorted(spool.data_dir / str(path) for _, _, path in rows)
    assert quarantined(spool) == kept
    assert sorted(spool.quarantine_dir.glob("*.json")) == [p.with_suffix(".json") for p in kept]
    assert store.status().instances["quarantined"] == 3


def test_quarantined_input_goes_after_quarantine_keep(
    spool: Spool, store: Store, receiver: Receiver
) -> None:
    arrive(receiver, malformed())
    assert receiver.trim_quarantine(NOW + 29 * 86400) == 0
    assert len(quarantined(spool)) == 1
    assert receiver.trim_quarantine(NOW + 31 * 86400) == 1
    assert quarantined(spool) == [] and list(spool.quarantine_dir.iterdir()) == []
    assert store.status().instances["quarantined"] == 0


def test_the_quarantine_keeps_within_quarantine_max_the_newest_first(
    spool: Spool, store: Store
) -> None:
    size = len(malformed())
    clock = iter(NOW + step for step in range(100))
    limits = SpoolSettings(quarantine_max=2 * size + 10)
    receiver = Receiver(spool, store, clock=lambda: next(clock), concurrency=1, limits=limits)
    try:
        for index in range(5):
            arrive(receiver, malformed(f"1.2.826.0.1.3680043.10.8.{index}"))
        with store.read() as db:
            kept = {sha for (sha,) in db.execute("SELECT sha256 FROM quarantine")}
        newest = [malformed(f"1.2.826.0.1.3680043.10.8.{index}") for index in (3, 4)]
        assert kept == {hashlib.sha256(data).hexdigest() for data in newest}
        assert sorted(p.read_bytes() for p in quarantined(spool)) == sorted(newest)
    finally:
        receiver.close()


def test_the_start_up_sweep_removes_quarantined_files_no_row_records(
    receiver: Receiver, spool: Spool, store: Store
) -> None:
    arrive(receiver, malformed())
    kept = sorted(spool.quarantine_dir.iterdir())
    # A run that died between moving a copy in and recording it, and a stray note.
    (spool.quarantine_dir / "20260101T000000-0123456789ab.dcm").write_bytes(malformed())
    (spool.quarantine_dir / "20260101T000000-0123456789ab.json").write_text("{}\n")
    (spool.quarantine_dir / "20260101T000001-ba9876543210.json").write_text("{}\n")
    assert spool.sweep_quarantine(store.quarantine_paths()) == 1
    assert sorted(spool.quarantine_dir.iterdir()) == kept
    assert len(kept) == 2  # the recorded copy and its note


def test_the_start_up_check_names_instances_whose_needed_copy_is_lost(
    receiver: Receiver, spool: Spool, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    uids = [f"1.2.826.0.1.3680043.10.9.{index}" for index in range(3)]
    for uid in uids:
        assert arrive(receiver, part10(uid)).status == Status.SUCCESS
    spool.path(spool_path(store, uids[1])).unlink()
    assert spool.lost(store.needed_copies()) == [uids[1]]
    assert f"1 acknowledged instance(s) have lost their spool copy ({uids[1]})" in caplog.text
    # Once the cloud holds the part, a copy gone (retention) is no loss.
    assert store.mark_stable(NOW + 60, stable_after=60) != []
    job = store.jobs.claim(UPLOAD, "worker", 120, NOW + 60)
    assert job is not None
    store.uploads.mark_sent(job.study_id, job.lease, NOW + 61)
    store.uploads.mark_confirmed(job.study_id, job.lease, NOW + 62)
    assert spool.lost(store.needed_copies()) == []


def test_a_repair_that_lands_while_the_part_is_packed_is_packed_at_once(
    receiver: Receiver, spool: Spool, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert arrive(receiver, part10()).status == Status.SUCCESS
    spool.path(spool_path(store)).unlink()
    assert store.mark_stable(NOW + 60, stable_after=60) != []
    settings = parse_config(
        {
            "site": "t",
            "data_dir": str(spool.data_dir),
            "cloud": {"upload_url": "http://127.0.0.1:9/files/"},  # closed: sending fails
            "upload": {"retry_first": "1h", "retry_max": "2h"},
        }
    )
    http = CloudHttp.open(settings.cloud)
    uploader = Uploader(settings, store, spool, TusClient(http, settings.cloud.upload_url), http)
    packs = []

    def pack_while_the_sender_resends(*args: Any) -> Bundle:
        packs.append(args[2])
        if len(packs) == 1:
            # The re-send is answered (and repairs the row) while the packer is under way
            # with the files it read before: it meets the lost one.
            assert arrive(receiver, part10()).outcome is Outcome.REPAIRED
        return pack(*args)

    monkeypatch.setattr("agent.upload.pack", pack_while_the_sender_resends)
    assert uploader.run_once("worker")
    (job,) = store.jobs.in_states([JobState.FAILED])
    assert job.last_error is not None and "cannot pack" not in job.last_error
    assert job.next_attempt_at is not None  # the cloud's failure: retried by itself
    assert len(packs) == 2 and packs[0] != packs[1]
    assert store.uploads.get(job_study_id(store)).bundle is not None


def job_study_id(store: Store) -> int:
    with store.read() as db:
        (study_id,) = db.execute("SELECT study_id FROM jobs").fetchone()
    return int(study_id)


def test_every_reply_is_observed_with_the_size_of_its_file(receiver: Receiver) -> None:
    seen: list[tuple[Status, int]] = []
    receiver.observe = lambda reply, size: seen.append((reply.status, size))
    good = part10()
    arrive(receiver, good)
    arrive(receiver, b"not DICOM at all")
    assert seen[0] == (Status.SUCCESS, len(good))
    assert seen[1][0] != Status.SUCCESS and seen[1][1] == len(b"not DICOM at all")
