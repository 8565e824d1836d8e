"""The packer: bundles open with standard tools, hold what was received, and refuse damage."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import generate_frames

from agent.instance import inspect
from agent.pack import MANIFEST, Compression, PackError, PartInfo, pack, sent_hashes
from agent.spool import Spool
from agent.store.uploads import PartFile
from agent.transcode import HTJ2K_LOSSLESS, JPEG_LS_LOSSLESS
from tests.support import bundles, datasets

INFO = PartInfo(site="hospital-a", study_uid="1.2.3.4", part=2)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "data", high_water=100.0)
    spool.prepare()
    return spool


def spooled(spool: Spool, sources: list[Path]) -> list[PartFile]:
    """Copy `sources` into the spool as the receiver would, and describe them as the store does."""
    files = []
    for source in sources:
        incoming = spool.incoming / source.name
        shutil.copyfile(source, incoming)
        relative = spool.adopt(incoming)
        header = inspect(spool.path(relative))
        files.append(
            PartFile(
                header.sop_instance_uid,
                header.sop_class_uid,
                header.transfer_syntax,
                relative,
                header.size,
                header.sha256,
            )
        )
    return files


@pytest.mark.parametrize("method", ["zstd", "none"])
def test_bundle_holds_every_file_byte_for_byte_then_the_manifest_last(
    spool: Spool, method: str
) -> None:
    sources = datasets.distinct_instances(datasets.real_files())[:6]
    files = spooled(spool, sources)
    bundle = pack(spool, INFO, files, Compression(method=method, level=3, threads=1))
    path = spool.path(bundle.path)
    assert bundle.size == path.stat().st_size
    assert bundle.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bundle.instances == len(files)
    assert path.read_bytes().startswith(bundles.ZSTD_MAGIC) == (method == "zstd")
    found = bundles.members(path.read_bytes())
    assert found[-1][0] == MANIFEST
    manifest = json.loads(found[-1][1])
    assert manifest["manifest_version"] == 2
    assert (manifest["site"], manifest["study_uid"], manifest["part"]) == (
        "hospital-a",
        "1.2.3.4",
        2,
    )
    assert manifest["format"] == bundle.format
    for (name, data), entry, part_file in zip(
        found[:-1], manifest["instances"], files, strict=True
    ):
        assert entry["file"] == name
        assert entry["sop_instance_uid"] == part_file.sop_instance_uid
        assert entry["sha256"] == part_file.sha256
        assert data == spool.path(part_file.path).read_bytes()
    assert not list(spool.bundles.glob("*.partial"))


def test_a_damaged_spool_file_stops_the_pack_and_leaves_no_bundle(spool: Spool) -> None:
    files = spooled(spool, datasets.uncompressed_files()[:3])
    damaged = spool.path(files[1].path)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size, different pixels
    damaged.write_bytes(bytes(data))
    with pytest.raises(PackError, match="changed since it was received"):
        pack(spool, INFO, files, Compression())
    assert list(spool.bundles.iterdir()) == []


def test_a_missing_spool_file_is_named(spool: Spool) -> None:
    files = spooled(spool, datasets.uncompressed_files()[:2])
    spool.path(files[0].path).unlink()
    with pytest.raises(PackError, match=f"{files[0].sop_instance_uid}: spool file .* is missing"):
        pack(spool, INFO, files, Compression())
    assert list(spool.bundles.iterdir()) == []


def test_unreferenced_and_partial_bundles_are_swept(spool: Spool) -> None:
    files = spooled(spool, datasets.uncompressed_files()[:1])
    kept = pack(spool, INFO, files, Compression())
    orphan = pack(spool, INFO, files, Compression())
    (spool.bundles / "cut-off.tar.zst.partial").write_bytes(b"half")
    assert spool.sweep_bundles([kept.path]) == 2
    assert [p.name for p in spool.bundles.iterdir()] == [Path(kept.path).name]
    assert not spool.path(orphan.path).exists()


def decoded_frames(part10: bytes) -> list[Any]:
    """Decode an encapsulated JPEG-LS or HTJ2K file's frames with imagecodecs."""
    ds = dcmread(io.BytesIO(part10))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    if ds.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS:
        dtype = np.int16 if ds.PixelRepresentation else np.uint16
        return [imagecodecs.jpegls_decode(f).view(dtype) for f in frames]
    return [imagecodecs.htj2k_decode(f) for f in frames]


@pytest.mark.parametrize(
    ("method", "syntax"), [("jpeg-ls", JPEG_LS_LOSSLESS), ("htj2k", HTJ2K_LOSSLESS)]
)
def test_transcoded_bundles_hold_bit_exact_pixels_and_name_the_original(
    spool: Spool, tmp_path: Path, method: str, syntax: str
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=4, rows=64, cols=64, seed=21)
    files = spooled(spool, series)
    compression = Compression(method="zstd", threads=1, transcode=method)
    bundle = pack(spool, INFO, files, compression)
    data = spool.path(bundle.path).read_bytes()
    found, manifest = bundles.instances(data), bundles.manifest(data)
    for (_, data), entry, source in zip(found, manifest["instances"], series, strict=True):
        assert entry["transfer_syntax"] == syntax
        assert entry["original"]["sha256"] == datasets.dataset_sha256(source)
        assert entry["size"] == len(data)
        original = dcmread(source)
        (frame,) = decoded_frames(data)
        assert np.array_equal(frame, original.pixel_array)
        rewritten = dcmread(io.BytesIO(data))
        assert rewritten.SOPInstanceUID == original.SOPInstanceUID
        assert rewritten.PatientName == original.PatientName
    assert sorted(p.name for p in spool.bundles.iterdir()) == [Path(bundle.path).name]


@pytest.mark.parametrize(("method", "transcode"), [("zstd", "jpeg-ls"), ("none", "none")])
def test_sent_hashes_are_each_instance_as_packed_whether_transcoded_or_not(
    spool: Spool, tmp_path: Path, method: str, transcode: str
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=22)
    files = spooled(spool, series)
    bundle = pack(spool, INFO, files, Compression(method=method, threads=1, transcode=transcode))
    packed = {
        str(dcmread(io.BytesIO(data)).SOPInstanceUID): datasets.dataset_digest(data)
        for _, data in bundles.instances(spool.path(bundle.path).read_bytes())
    }
    assert sent_hashes(spool.path(bundle.path), bundle.format) == packed
    received = {f.sop_instance_uid: f.sha256 for f in files}
    assert (packed == received) is (transcode == "none")


def test_sent_hashes_of_a_file_that_is_no_bundle_is_a_pack_error(spool: Spool) -> None:
    path = spool.bundles / "junk.tar.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd not a frame")
    with pytest.raises(PackError, match="cannot read its manifest"):
        sent_hashes(path, "dicom-tar+zstd")


def test_what_cannot_be_transcoded_exactly_goes_as_it_came_with_the_reason(spool: Spool) -> None:
    colour = [
        p
        for p in datasets.uncompressed_files()
        if dcmread(p, stop_before_pixels=True).get("SamplesPerPixel") == 3
    ]
    files = spooled(spool, colour[:1])
    bundle = pack(spool, INFO, files, Compression(threads=1, transcode="jpeg-ls"))
    data = spool.path(bundle.path).read_bytes()
    (entry,) = bundles.manifest(data)["instances"]
    assert "grayscale" in entry["not_transcoded"]
    assert entry["sha256"] == files[0].sha256
    assert bundles.instances(data)[0][1] == spool.path(files[0].path).read_bytes()


@pytest.mark.parametrize("transcode", ["none", "htj2k"])
def test_each_instance_member_carries_its_facts_in_pax_records_matching_the_manifest(
    spool: Spool, tmp_path: Path, transcode: str
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=5, rows=64, cols=64, seed=23)
    files = spooled(spool, series)
    bundle = pack(spool, INFO, files, Compression(threads=2, transcode=transcode))
    data = spool.path(bundle.path).read_bytes()
    members = bundles.members(data)
    found = bundles.facts(data)
    # The instances in the order given, the manifest last and without PAX records of ours.
    assert [name for name, _ in found] == [f"instances/{i:06d}.dcm" for i in range(1, 6)] + [
        MANIFEST
    ]
    assert not any(key.startswith("DIRIGO.") for key in found[-1][1])
    manifest = bundles.manifest(data)
    for (name, records), (_, body), entry, part_file in zip(
        found, members, manifest["instances"], files, strict=False
    ):
        ours = {k: v for k, v in records.items() if k.startswith("DIRIGO.")}
        expected = {
            "DIRIGO.sha256": datasets.dataset_digest(body),
            "DIRIGO.sop_instance_uid": part_file.sop_instance_uid,
            "DIRIGO.sop_class_uid": part_file.sop_class_uid,
            "DIRIGO.transfer_syntax": str(dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID),
        }
        if transcode != "none":
            expected.update(
                {
                    "DIRIGO.original.transfer_syntax": part_file.transfer_syntax,
                    "DIRIGO.original.size": str(part_file.size),
                    "DIRIGO.original.sha256": part_file.sha256,
                }
            )
        assert ours == expected, name
        assert (entry["file"], entry["sha256"], entry["transfer_syntax"]) == (
            name,
            ours["DIRIGO.sha256"],
            ours["DIRIGO.transfer_syntax"],
        )
    assert expected["DIRIGO.transfer_syntax"] == (
        HTJ2K_LOSSLESS if transcode == "htj2k" else files[-1].transfer_syntax
    )
    assert sorted(p.name for p in spool.bundles.iterdir()) == [Path(bundle.path).name]


def test_a_pack_stopped_while_transcoding_leaves_no_temporary_behind(
    spool: Spool, tmp_path: Path
) -> None:
    files = spooled(spool, datasets.ct_series(tmp_path / "ct", slices=8, rows=64, cols=64, seed=24))
    calls = 0

    def lease_lost_after_a_while() -> None:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise TimeoutError("lease lost")

    with pytest.raises(TimeoutError):
        pack(
            spool,
            INFO,
            files,
            Compression(threads=2, transcode="jpeg-ls"),
            lease_lost_after_a_while,
        )
    assert list(spool.bundles.iterdir()) == []


def test_packing_overlaps_transcoding_so_few_reencoded_files_wait_on_disk(
    spool: Spool, tmp_path: Path
) -> None:
    """Each re-encoded file goes into the tar as soon as it is done and is then deleted: at any
    time only those in flight (twice the workers) and the one being copied exist, never the
    whole study's."""
    files = spooled(
        spool, datasets.ct_series(tmp_path / "ct", slices=10, rows=64, cols=64, seed=25)
    )
    waiting: list[int] = []

    def count_reencoded() -> None:
        waiting.append(sum(1 for p in spool.bundles.iterdir() if p.name.endswith(".dcm.partial")))

    bundle = pack(spool, INFO, files, Compression(threads=1, transcode="jpeg-ls"), count_reencoded)
    assert len(bundles.instances(spool.path(bundle.path).read_bytes())) == 10
    assert 0 < max(waiting) <= 3
