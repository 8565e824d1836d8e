"""The test harness itself against the real peers: DCMTK, Orthanc, the data generators."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import OrthancFactory, StoreSCPFactory
from tests.support import datasets, dcmtk


def _sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_storescu_to_storescp_delivers_every_file_unchanged(
    storescp: StoreSCPFactory, ct_series_500: list[Path]
) -> None:
    peer = storescp(ae="STORESCP")
    sent = ct_series_500[:20]

    result = dcmtk.storescu(sent, peer.port, called_ae=peer.ae)

    assert result.returncode == 0, result.stderr
    assert dcmtk.acknowledged(result) == sent
    received = {_sop_instance_uid(p): datasets.dataset_sha256(p) for p in peer.out_dir.iterdir()}
    assert received == {_sop_instance_uid(p): datasets.dataset_sha256(p) for p in sent}


def test_storescu_sends_every_uncompressed_real_file(storescp: StoreSCPFactory) -> None:
    peer = storescp()
    files = datasets.distinct_instances(datasets.uncompressed_files())

    result = dcmtk.storescu(files, peer.port, called_ae=peer.ae)

    assert result.returncode == 0, result.stdout + result.stderr
    assert dcmtk.acknowledged(result) == files
    assert {_sop_instance_uid(p) for p in peer.out_dir.iterdir()} == {
        _sop_instance_uid(p) for p in files
    }


def test_dcmsend_sends_compressed_files_in_their_own_syntax(storescp: StoreSCPFactory) -> None:
    peer = storescp()
    compressed = [p for p in datasets.real_files() if datasets.transfer_syntax(p).is_compressed]
    files = datasets.distinct_instances(compressed)[:5]

    result = dcmtk.dcmsend(files, peer.port, called_ae=peer.ae)

    assert result.returncode == 0, result.stdout + result.stderr
    stored = sorted(peer.out_dir.iterdir())
    assert len(stored) == len(files)
    assert {datasets.transfer_syntax(p) for p in stored} == {
        datasets.transfer_syntax(p) for p in files
    }


def test_echoscu_fails_when_nobody_listens() -> None:
    from tests.support.net import free_port

    assert dcmtk.echoscu(free_port()).returncode != 0


def test_storescu_to_orthanc_is_listed_by_its_rest_api_and_dicomweb(
    orthanc: OrthancFactory, ct_series_500: list[Path]
) -> None:
    server = orthanc(aet="ARCHIVE")
    sent = ct_series_500[:3]

    assert dcmtk.echoscu(server.dicom_port, called_ae="ARCHIVE").returncode == 0
    result = dcmtk.storescu(sent, server.dicom_port, called_ae="ARCHIVE")

    assert result.returncode == 0, result.stderr
    assert server.sop_instance_uids() == {_sop_instance_uid(p) for p in sent}
    studies = server.session.get(f"{server.dicomweb_url}/studies", timeout=30)
    assert studies.ok, server.log_tail()
    assert len(studies.json()) == 1


def test_orthanc_knows_configured_and_added_modalities(orthanc: OrthancFactory) -> None:
    server = orthanc(modalities={"dirigo": ["DIRIGO", "127.0.0.1", 11112]})

    server.put_modality("pacs", "PACS", "127.0.0.1", 11113)

    assert sorted(server.get("/modalities")) == ["dirigo", "pacs"]


def test_orthanc_stop_removes_its_directory(orthanc: OrthancFactory) -> None:
    server = orthanc()

    server.stop()

    assert not server.work_dir.exists()


def test_ct_series_writes_500_valid_slices_of_one_series(ct_series_500: list[Path]) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_series_500]

    assert len(headers) == 500
    assert len({h.StudyInstanceUID for h in headers}) == 1
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert len({h.SOPInstanceUID for h in headers}) == 500
    assert [h.InstanceNumber for h in headers] == list(range(1, 501))
    assert {h.file_meta.TransferSyntaxUID for h in headers} == {ExplicitVRLittleEndian}
    middle = pydicom.dcmread(ct_series_500[250]).pixel_array
    assert middle.shape == (512, 512)
    assert middle.dtype.kind == "i"
    assert middle.min() < -900 < 0 < middle.max()


def test_ct_series_is_reused_when_complete_and_deterministic(tmp_path: Path) -> None:
    first = datasets.ct_series(tmp_path / "a", slices=3, rows=64, cols=64, seed=7)
    mtimes = [p.stat().st_mtime_ns for p in first]

    again = datasets.ct_series(tmp_path / "a", slices=3, rows=64, cols=64, seed=7)
    elsewhere = datasets.ct_series(tmp_path / "b", slices=3, rows=64, cols=64, seed=7)

    assert [p.stat().st_mtime_ns for p in again] == mtimes
    assert [p.read_bytes() for p in elsewhere] == [p.read_bytes() for p in first]


def test_ct_series_rewrites_for_other_parameters(tmp_path: Path) -> None:
    datasets.ct_series(tmp_path, slices=4, rows=32, cols=32, seed=1)

    files = datasets.ct_series(tmp_path, slices=2, rows=32, cols=32, seed=2)

    assert sorted(tmp_path.glob("CT*.dcm")) == files
    assert pydicom.dcmread(files[0]).PatientID == "SYN000002"


def test_large_instance_of_50_mb_is_valid_and_reads_back(tmp_path: Path) -> None:
    path = datasets.large_instance(tmp_path / "large.dcm", 50_000_000)

    ds = pydicom.dcmread(path)

    assert 49_000_000 < path.stat().st_size <= 50_000_000
    assert ds.pixel_array.shape == (int(ds.NumberOfFrames), 512, 512)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_dataset_sha256_ignores_file_meta_changes(
    tmp_path: Path, ct_series_500: list[Path]
) -> None:
    original = ct_series_500[0]
    ds = pydicom.dcmread(original)
    ds.file_meta.ImplementationVersionName = "OTHER_WRITER"
    ds.file_meta.SourceApplicationEntityTitle = "DIRIGO"
    rewritten = tmp_path / "rewritten.dcm"
    ds.save_as(rewritten, enforce_file_format=True)
    ds.PatientID = "CHANGED"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)

    assert rewritten.read_bytes() != original.read_bytes()
    assert datasets.dataset_sha256(rewritten) == datasets.dataset_sha256(original)
    assert datasets.dataset_sha256(changed) != datasets.dataset_sha256(original)


def test_real_files_exclude_the_broken_ones() -> None:
    good = {p.name for p in datasets.real_files()}
    broken = {p.name for p in datasets.broken_files()}

    assert broken >= {"OT-PAL-8-face.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"}
    assert not good & broken
    assert {"693_UNCI.dcm", "MR2_UNCR.dcm", "RG1_UNCI.dcm", "US1_J2KR.dcm"} <= good
    assert set(datasets.uncompressed_files()) <= set(datasets.real_files())
