"""C-MOVE of large instances: the agent's memory does not grow by an instance, whether it goes as
the archive holds it or Deflated and inflated for a destination that takes only uncompressed
syntaxes (Orthanc as the archive, DCMTK's storescp as the destination)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.conftest import OrthancFactory, StoreSCP, StoreSCPFactory
from tests.integration.test_serve import load, received, serve_agent, uid
from tests.support import datasets, dcmtk
from tests.support.agent import Agent

SUCCESS = 0x0000
SIDE = 4096
INSTANCE = SIDE * SIDE * 2
"""Bytes of pixel data in one test instance (32 MiB)."""


def peak_memory(agent: Agent) -> int:
    """Return the agent's peak resident memory so far (VmHWM), in bytes."""
    status = Path(f"/proc/{agent.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def big_slice(directory: Path, seed: int) -> Path:
    (path,) = datasets.ct_series(directory, slices=1, rows=SIDE, cols=SIDE, seed=seed)
    return path


def move_and_measure(
    tmp_data_dir: Path, archive_url: str, destination: StoreSCP, study: str
) -> tuple[int, int]:
    """C-MOVE a study to `destination`; return how much the agent's peak memory grew, and how
    many sub-operations completed."""
    with serve_agent(tmp_data_dir, archive_url, destination) as agent:
        dcmtk.echoscu(agent.port)
        before = peak_memory(agent)
        result = dcmtk.movescu(agent.port, [f"StudyInstanceUID={study}"], "DEST", timeout=120)
        grown = peak_memory(agent) - before
        log = agent.log_tail()
    status = dcmtk.final_status(result)
    assert status == SUCCESS, result.stdout[-2000:] + log
    return grown, dcmtk.sub_operations(result)["Completed"]


def test_a_move_of_a_large_instance_never_holds_it_in_memory(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    source = big_slice(tmp_path / "ct", seed=501)
    load(archive, [source])
    destination = storescp(ae="DEST")
    grown, completed = move_and_measure(
        tmp_data_dir, archive.dicomweb_url, destination, uid(source)
    )
    assert completed == 1
    (got,) = received(destination.out_dir).values()
    assert datasets.dataset_sha256(got) == datasets.dataset_sha256(source)
    assert grown < INSTANCE, f"peak memory grew by {grown} bytes for a {INSTANCE}-byte instance"


def test_a_deflated_instance_is_inflated_into_a_file_not_into_memory(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    plain = pydicom.dcmread(big_slice(tmp_path / "ct", seed=502))
    plain.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    plain.save_as(deflated, enforce_file_format=True)
    load(archive, [deflated])
    destination = storescp(ae="DEST", extra_args=())  # uncompressed only: no Deflated
    grown, completed = move_and_measure(
        tmp_data_dir, archive.dicomweb_url, destination, str(plain.StudyInstanceUID)
    )
    assert completed == 1
    (got,) = received(destination.out_dir).values()
    delivered = pydicom.dcmread(got)
    assert delivered.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian
    assert np.array_equal(delivered.pixel_array, plain.pixel_array)
    assert grown < INSTANCE, f"peak memory grew by {grown} bytes for a {INSTANCE}-byte instance"
    assert not list((tmp_data_dir / "cache" / "tmp").glob("*.partial")), "the inflated copy is gone"


def test_an_implicit_vr_instance_goes_from_its_file_to_a_destination_preferring_explicit(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    plain = pydicom.dcmread(big_slice(tmp_path / "ct", seed=503))
    plain.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = tmp_path / "implicit.dcm"
    plain.save_as(implicit, enforce_file_format=True)
    load(archive, [implicit])
    destination = storescp(ae="DEST", extra_args=())  # prefers explicit VR, takes implicit
    grown, completed = move_and_measure(
        tmp_data_dir, archive.dicomweb_url, destination, str(plain.StudyInstanceUID)
    )
    assert completed == 1
    (got,) = received(destination.out_dir).values()
    assert datasets.dataset_sha256(got) == datasets.dataset_sha256(implicit)
    assert grown < INSTANCE, f"peak memory grew by {grown} bytes for a {INSTANCE}-byte instance"


def jpeg_ls_frames(directory: Path, frames: int, side: int, seed: int) -> tuple[Path, np.ndarray]:
    """Write a multi-frame CT-like instance held as JPEG-LS lossless; return it and its
    frames."""
    import imagecodecs
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    (first,) = datasets.ct_series(directory / "one", slices=1, rows=side, cols=side, seed=seed)
    ds = pydicom.dcmread(first)
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(side), np.arange(side)).astype(np.uint16)
    pixels = np.stack(
        [ramp + rng.integers(0, 64, (side, side), dtype=np.uint16) for _ in range(frames)]
    )
    ds.PixelData = encapsulate([imagecodecs.jpegls_encode(frame) for frame in pixels])
    ds["PixelData"].VR = "OB"
    ds.NumberOfFrames = frames
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    path = directory / "multiframe.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pixels


def test_a_compressed_multiframe_instance_is_decompressed_a_frame_at_a_time(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    frames, side = 64, 1024  # 128 MiB of pixels, 2 MiB a frame
    source, pixels = jpeg_ls_frames(tmp_path, frames, side, seed=504)
    archive = orthanc(aet="ARCHIVE")
    load(archive, [source])
    destination = storescp(ae="DEST", extra_args=())  # uncompressed only
    grown, completed = move_and_measure(
        tmp_data_dir, archive.dicomweb_url, destination, uid(source)
    )
    assert completed == 1
    (got,) = received(destination.out_dir).values()
    delivered = pydicom.dcmread(got)
    assert not delivered.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(delivered.pixel_array, pixels)
    whole = pixels.nbytes
    assert grown < whole // 4, f"peak memory grew by {grown} bytes for {whole} bytes of pixels"
    assert not list((tmp_data_dir / "cache" / "tmp").glob("*.partial")), (
        "the rewritten copy is gone"
    )


def test_an_explicit_vr_instance_is_rewritten_from_its_file_for_an_implicit_only_destination(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    source = big_slice(tmp_path / "ct", seed=505)  # Explicit VR Little Endian
    load(archive, [source])
    destination = storescp(ae="DEST", extra_args=("+xi",))  # Implicit VR Little Endian only
    grown, completed = move_and_measure(
        tmp_data_dir, archive.dicomweb_url, destination, uid(source)
    )
    assert completed == 1
    (got,) = received(destination.out_dir).values()
    delivered, original = pydicom.dcmread(got), pydicom.dcmread(source)
    assert delivered.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert delivered.PixelData == original.PixelData
    assert grown < INSTANCE, f"peak memory grew by {grown} bytes for a {INSTANCE}-byte instance"
