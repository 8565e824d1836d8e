"""The receiver's acceptance of one arrival, driven directly (no association): statuses,
quarantine, duplicates and what stays on disk when something fails."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import dcmwrite

from agent.dicom import Status
from agent.receive import Arrival, Receiver, Reply
from agent.spool import Spool
from agent.store import Store
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
