"""The development cloud's archive side: bundles made as Dirigo makes them, uploaded to the
official tus server, end up in a real Orthanc archive (devcloud/ingest.py) exactly once, and
only when they are intact.

Bundles are packed by `agent.pack.pack` from spooled files; they are uploaded with plain tus
requests (one creation POST, one PATCH) and the metadata Dirigo's uploader sends.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urljoin

import imagecodecs
import numpy as np
import pytest
import requests
import zstandard
from pydicom import dcmread
from pydicom.encaps import generate_frames

from agent.instance import dataset_offset, inspect
from agent.pack import MANIFEST, Compression, PartInfo, pack
from agent.spool import Spool
from agent.store.uploads import PartFile
from agent.transcode import HTJ2K_LOSSLESS
from tests.support import bundles, datasets
from tests.support.devcloud import DevCloud
from tests.support.net import wait_until
from tests.support.orthanc import OrthancMissing
from tests.support.process import vm_hwm_bytes
from tests.support.tus import TusServerMissing

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
TIMEOUT = 30.0
SITE = "hospital-a"


def _start(directory: Path) -> DevCloud:
    try:
        return DevCloud(directory).start()
    except (OrthancMissing, TusServerMissing) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCloud]:
    """One dev cloud for the tests that only add studies to it."""
    started = _start(tmp_path_factory.mktemp("devcloud"))
    yield started
    started.stop()


@pytest.fixture
def own_cloud(tmp_path: Path) -> Iterator[DevCloud]:
    """A dev cloud for a test that stops or breaks a part of it."""
    started = _start(tmp_path / "devcloud")
    yield started
    started.stop()


Packer = Callable[..., tuple[Path, dict[str, str]]]


@pytest.fixture
def packed(tmp_path: Path) -> Packer:
    """Return `packed(sources, compression=Compression(threads=1)) -> (bundle path, metadata)`:
    the files spooled and packed as one study part by `agent.pack`, with the tus metadata
    Dirigo's uploader sends for it."""
    spool = Spool(tmp_path / "data", high_water=100.0)
    spool.prepare()

    def pack_part(
        sources: Sequence[Path], compression: Compression | None = None
    ) -> tuple[Path, dict[str, str]]:
        compression = compression or Compression(threads=1)
        files, study_uid = spooled(spool, sources)
        info = PartInfo(site=SITE, study_uid=study_uid, part=1)
        bundle = pack(spool, info, files, compression)
        metadata = {
            "filename": f"{SITE}-{study_uid}-part1{compression.suffix}",
            "site": SITE,
            "study_uid": study_uid,
            "part": "1",
            "sha256": bundle.sha256,
            "instances": str(bundle.instances),
            "format": bundle.format,
        }
        return spool.path(bundle.path), metadata

    return pack_part


def spooled(spool: Spool, sources: Sequence[Path]) -> tuple[list[PartFile], str]:
    """Copy `sources` (one study) into the spool as the receiver would; return them as the
    store describes them, and their study's UID."""
    files, studies = [], set()
    for source in sources:
        incoming = spool.incoming / source.name
        shutil.copyfile(source, incoming)
        relative = spool.adopt(incoming)
        header = inspect(spool.path(relative))
        studies.add(header.study_uid)
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
    (study_uid,) = studies
    return files, study_uid


def tus_upload(cloud: DevCloud, bundle: Path, metadata: Mapping[str, str]) -> str:
    """Upload `bundle` with one creation POST and one PATCH; return the upload's id."""
    size = bundle.stat().st_size
    location = tus_create(cloud, size, metadata)
    with bundle.open("rb") as body:
        assert tus_patch(location, 0, body) == size
    return location.rsplit("/", 1)[-1]


def tus_create(cloud: DevCloud, size: int, metadata: Mapping[str, str]) -> str:
    """Create an upload of `size` bytes with `metadata`; return its URL."""
    encoded = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in metadata.items())
    headers = {**TUS, "Upload-Length": str(size), "Upload-Metadata": encoded}
    created = requests.post(cloud.upload_url, headers=headers, timeout=TIMEOUT)
    assert created.status_code == 201, created.text
    return urljoin(cloud.upload_url, created.headers["Location"])


def tus_patch(location: str, offset: int, body: bytes | IO[bytes]) -> int:
    """Send `body` at `offset` in one PATCH; return the server's new offset."""
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS}
    patched = requests.patch(location, headers=headers, data=body, timeout=TIMEOUT)
    assert patched.status_code == 204, patched.text
    return int(patched.headers["Upload-Offset"])


def archived(cloud: DevCloud, study_uid: str) -> dict[str, bytes]:
    """Return the Part-10 files the archive holds in a study, by SOP Instance UID."""
    found = cloud.archive.post(
        "/tools/find",
        {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
    )
    return {
        item["MainDicomTags"]["SOPInstanceUID"]: cloud.archive.session.get(
            f"{cloud.orthanc_url}/instances/{item['ID']}/file", timeout=TIMEOUT
        ).content
        for item in found
    }


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_archived_as_sent(cloud: DevCloud, study_uid: str, sources: Sequence[Path]) -> None:
    """The archive holds each source's dataset byte for byte, found by QIDO-RS too."""
    expected = {sop_uid(p): datasets.dataset_sha256(p) for p in sources}
    assert cloud.wait_for_study(study_uid, len(sources)) == set(expected)
    stored = archived(cloud, study_uid)
    assert {uid: datasets.dataset_digest(data) for uid, data in stored.items()} == expected


# --- what arrives intact is archived -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "seed"), [("zstd", 101), ("none", 102)], ids=["dicom-tar+zstd", "dicom-tar"]
)
def test_a_ct_study_uploaded_as_dirigo_sends_it_is_archived_byte_for_byte(
    cloud: DevCloud, packed: Packer, tmp_path: Path, method: str, seed: int
) -> None:
    sources = datasets.ct_series(tmp_path / "ct", slices=12, rows=128, cols=128, seed=seed)
    bundle, metadata = packed(sources, Compression(method=method, threads=1))

    upload = tus_upload(cloud, bundle, metadata)

    assert_archived_as_sent(cloud, metadata["study_uid"], sources)
    record = cloud.wait_until_settled(upload)
    assert (record["outcome"], record["instances"], record["new"]) == ("ingested", 12, 12)
    assert record["study_uid"] == metadata["study_uid"]
    assert f"ingested upload {upload} " in cloud.ingest_log()


def test_real_images_in_many_transfer_syntaxes_are_archived_byte_for_byte(
    cloud: DevCloud, packed: Packer
) -> None:
    by_study: dict[str, list[Path]] = {}
    for path in datasets.distinct_instances(datasets.real_files()):
        study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        by_study.setdefault(study, []).append(path)
    uploads = {}
    for study_uid, sources in by_study.items():
        bundle, metadata = packed(sources)
        uploads[study_uid] = tus_upload(cloud, bundle, metadata)

    for study_uid, sources in by_study.items():
        assert_archived_as_sent(cloud, study_uid, sources)
        assert cloud.wait_until_settled(uploads[study_uid])["outcome"] == "ingested"
    syntaxes = {datasets.transfer_syntax(p) for sources in by_study.values() for p in sources}
    assert len(syntaxes) >= 6, syntaxes


def test_an_htj2k_transcoded_bundle_is_archived_as_packed_with_the_original_pixels(
    cloud: DevCloud, packed: Packer, tmp_path: Path
) -> None:
    sources = datasets.ct_series(tmp_path / "ct", slices=6, rows=128, cols=128, seed=103)
    bundle, metadata = packed(sources, Compression(threads=1, transcode="htj2k"))
    manifest = bundles.manifest(bundle.read_bytes())
    packed_digests = {e["sop_instance_uid"]: e["sha256"] for e in manifest["instances"]}

    tus_upload(cloud, bundle, metadata)

    study_uid = metadata["study_uid"]
    assert cloud.wait_for_study(study_uid, len(sources)) == {sop_uid(p) for p in sources}
    stored = archived(cloud, study_uid)
    assert {uid: datasets.dataset_digest(data) for uid, data in stored.items()} == packed_digests
    for source in sources:
        original = dcmread(source)
        ds = dcmread(io.BytesIO(stored[str(original.SOPInstanceUID)]))
        assert ds.file_meta.TransferSyntaxUID == HTJ2K_LOSSLESS
        (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
        assert np.array_equal(imagecodecs.htj2k_decode(frame), original.pixel_array)


# --- what does not is rejected, with a note, and nothing of it is stored ---------------------


def test_a_bundle_whose_sha256_differs_from_its_metadata_is_rejected_and_nothing_stored(
    cloud: DevCloud, packed: Packer, tmp_path: Path
) -> None:
    sources = datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=104)
    bundle, metadata = packed(sources)
    wrong = hashlib.sha256(b"another bundle").hexdigest()

    upload = tus_upload(cloud, bundle, {**metadata, "sha256": wrong})

    record = cloud.wait_until_settled(upload)
    assert (record["outcome"], record["posts"]) == ("rejected", 0)
    note = cloud.rejection_note(upload)
    assert note is not None
    assert note["reason"] == (
        f"bundle sha256 {metadata['sha256']}, the upload metadata says {wrong}"
    )
    assert note["metadata"]["study_uid"] == metadata["study_uid"]
    assert f"rejected upload {upload} " in cloud.ingest_log()
    assert archived(cloud, metadata["study_uid"]) == {}
    assert cloud.study_instances(metadata["study_uid"]) == set()


def _changed_dataset(members: list[tuple[str, bytes]]) -> None:
    name, data = members[2]
    members[2] = (name, data[:-1] + bytes([data[-1] ^ 0xFF]))  # the last pixel byte


def _missing_instance(members: list[tuple[str, bytes]]) -> None:
    del members[-1]


def _unlisted_member(members: list[tuple[str, bytes]]) -> None:
    members.append(("instances/000099.dcm", members[1][1]))


def _swapped_instances(members: list[tuple[str, bytes]]) -> None:
    members[1], members[2] = (members[1][0], members[2][1]), (members[2][0], members[1][1])


@pytest.mark.parametrize(
    ("damage", "reason", "seed"),
    [
        (_changed_dataset, "instances/000002.dcm: dataset sha256 ", 121),
        (_missing_instance, "the manifest lists 3 instances, the bundle holds 2", 122),
        (_unlisted_member, "member 'instances/000099.dcm' is not in the manifest", 123),
        (_swapped_instances, "instances/000001.dcm: SOP Instance UID ", 124),
    ],
    ids=["changed-dataset", "missing-instance", "unlisted-member", "swapped-instances"],
)
def test_a_first_layout_bundle_whose_instances_do_not_match_its_manifest_is_rejected_whole(
    cloud: DevCloud,
    packed: Packer,
    tmp_path: Path,
    damage: Callable[[list[tuple[str, bytes]]], None],
    reason: str,
    seed: int,
) -> None:
    sources = datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=seed)
    good, metadata = packed(sources)
    members = bundles.first_layout(good.read_bytes())
    damage(members)
    bad = rebundle(tmp_path / "bad.tar.zst", members)

    upload = tus_upload(cloud, bad, {**metadata, "sha256": sha256_of(bad)})

    record = cloud.wait_until_settled(upload)
    assert (record["outcome"], record["posts"]) == ("rejected", 0)
    note = cloud.rejection_note(upload)
    assert note is not None and note["reason"].startswith(reason), note
    assert archived(cloud, metadata["study_uid"]) == {}


def test_an_instance_the_archive_refuses_rejects_the_bundle_with_the_archive_s_answer(
    cloud: DevCloud, packed: Packer, tmp_path: Path
) -> None:
    sources = datasets.ct_series(tmp_path / "ct", slices=2, rows=64, cols=64, seed=105)
    good, metadata = packed(sources)
    members = bundles.first_layout(good.read_bytes())
    manifest = json.loads(members[0][1])
    # The File Meta group the ingest checks, then nothing Orthanc can parse as a dataset.
    name, data = members[1]
    garbage = data[: dataset_offset(io.BytesIO(data), len(data))] + b"\xff" * 64
    manifest["instances"][0].update(size=len(garbage), sha256=datasets.dataset_digest(garbage))
    members[0] = (MANIFEST, json.dumps(manifest).encode())
    members[1] = (name, garbage)
    bad = rebundle(tmp_path / "refused.tar.zst", members)

    upload = tus_upload(cloud, bad, {**metadata, "sha256": sha256_of(bad)})

    record = cloud.wait_until_settled(upload)
    assert (record["outcome"], record["posts"]) == ("rejected", 1)
    note = cloud.rejection_note(upload)
    assert note is not None
    assert note["reason"].startswith("instances/000001.dcm: the archive refused it: 400"), note
    assert archived(cloud, metadata["study_uid"]) == {}


def test_a_bundle_of_the_first_layout_manifest_first_is_still_archived_byte_for_byte(
    cloud: DevCloud, packed: Packer, tmp_path: Path
) -> None:
    sources = datasets.ct_series(tmp_path / "ct", slices=4, rows=64, cols=64, seed=108)
    good, metadata = packed(sources, Compression(threads=1, transcode="jpeg-ls"))
    old = rebundle(tmp_path / "old.tar.zst", bundles.first_layout(good.read_bytes()))

    upload = tus_upload(cloud, old, {**metadata, "sha256": sha256_of(old)})

    assert cloud.wait_until_settled(upload)["outcome"] == "ingested"
    packed_digests = {
        e["sop_instance_uid"]: e["sha256"] for e in bundles.manifest(good.read_bytes())["instances"]
    }
    stored = archived(cloud, metadata["study_uid"])
    assert {uid: datasets.dataset_digest(data) for uid, data in stored.items()} == packed_digests


Members = list[tuple[str, bytes]]
Facts = dict[str, dict[str, str]]


def _member_changed(members: Members, facts: Facts) -> None:
    name, data = members[1]
    members[1] = (name, data[:-1] + bytes([data[-1] ^ 0xFF]))  # the last pixel byte


def _pax_record_missing(members: Members, facts: Facts) -> None:
    del facts[members[0][0]]["DIRIGO.sha256"]


def _manifest_disagrees(members: Members, facts: Facts) -> None:
    document = json.loads(members[-1][1])
    document["instances"][2]["sop_instance_uid"] += ".9"
    members[-1] = (MANIFEST, json.dumps(document).encode())


def _manifest_not_last(members: Members, facts: Facts) -> None:
    members.append(members[0])


def _manifest_missing(members: Members, facts: Facts) -> None:
    del members[-1]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_member_changed, "instances/000002.dcm: dataset sha256 "),
        (
            _pax_record_missing,
            "member 'instances/000001.dcm' lacks the PAX record(s) DIRIGO.sha256",
        ),
        (_manifest_disagrees, "manifest.json and the members' PAX records differ at instance 3"),
        (_manifest_not_last, "member 'instances/000001.dcm' follows manifest.json"),
        (_manifest_missing, "the bundle ends without manifest.json"),
    ],
    ids=["member-changed", "pax-record-missing", "manifest-disagrees", "not-last", "no-manifest"],
)
def test_a_bundle_whose_members_do_not_match_their_pax_records_is_rejected_whole(
    cloud: DevCloud,
    packed: Packer,
    tmp_path: Path,
    damage: Callable[[Members, Facts], None],
    reason: str,
) -> None:
    sources = datasets.ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, seed=125)
    good, metadata = packed(sources)
    data = good.read_bytes()
    members = bundles.members(data)
    facts = {name: records for name, records in bundles.facts(data)}
    damage(members, facts)
    bad = rebundle(tmp_path / "bad.tar.zst", members, facts)

    upload = tus_upload(cloud, bad, {**metadata, "sha256": sha256_of(bad)})

    record = cloud.wait_until_settled(upload)
    assert (record["outcome"], record["posts"]) == ("rejected", 0)
    note = cloud.rejection_note(upload)
    assert note is not None and note["reason"].startswith(reason), note
    if damage is _member_changed:
        assert note["reason"].endswith(
            f"its PAX record says {facts[members[1][0]]['DIRIGO.sha256']}"
        )
    assert archived(cloud, metadata["study_uid"]) == {}


def rebundle(
    path: Path,
    members: Sequence[tuple[str, bytes]],
    facts: Mapping[str, dict[str, str]] | None = None,
) -> Path:
    """Write `members` as Dirigo's packer does (a PAX tar in one zstd frame), each with the PAX
    records `facts` holds for its name (none if it holds none); return `path`."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(data), 0o644
            entry.pax_headers = dict((facts or {}).get(name, {}))
            tar.addfile(entry, io.BytesIO(data))
    path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(raw.getvalue()))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- faults: each study is stored once, and stored in the end ------------------------------


def test_a_restarted_ingest_neither_stores_nor_posts_anything_twice(
    own_cloud: DevCloud, packed: Packer, tmp_path: Path
) -> None:
    first = datasets.ct_series(tmp_path / "ct1", slices=5, rows=64, cols=64, seed=106)
    second = datasets.ct_series(tmp_path / "ct2", slices=4, rows=64, cols=64, seed=107)
    bundle, metadata = packed(first)
    first_upload = tus_upload(own_cloud, bundle, metadata)
    record = own_cloud.wait_until_settled(first_upload)
    assert own_cloud.stop_ingest() == 0

    own_cloud.start_ingest()
    bundle, metadata = packed(second)
    second_upload = tus_upload(own_cloud, bundle, metadata)
    own_cloud.wait_until_settled(second_upload)
    beside = run_ingest_once(own_cloud)
    assert own_cloud.stop_ingest() == 0
    once = run_ingest_once(own_cloud)

    log = own_cloud.ingest_log()
    assert "(1 upload(s) settled before)" in log
    assert log.count("ingested upload") == 1
    assert f"ingested upload {second_upload} " in log
    assert "stopped after 4 POST(s) to the archive" in log
    assert own_cloud.archive.instance_count() == 9
    assert own_cloud.settled()[first_upload] == record
    assert_archived_as_sent(own_cloud, metadata["study_uid"], second)
    # A second ingest on the same state refuses to run; one run after the last stores nothing.
    assert beside.returncode == 1
    assert "another ingest is using" in beside.stderr
    assert once.returncode == 0, once.stderr
    assert "(2 upload(s) settled before)" in once.stderr
    assert "stopped after 0 POST(s) to the archive" in once.stderr
    assert own_cloud.archive.instance_count() == 9


def run_ingest_once(cloud: DevCloud) -> subprocess.CompletedProcess[str]:
    command = cloud.ingest_command("--once")
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)


def test_a_partial_upload_is_left_alone_until_its_last_byte_arrives(
    cloud: DevCloud, packed: Packer, tmp_path: Path
) -> None:
    sources = datasets.ct_series(tmp_path / "ct", slices=4, rows=64, cols=64, seed=111)
    bundle, metadata = packed(sources)
    data = bundle.read_bytes()
    location = tus_create(cloud, len(data), metadata)
    assert tus_patch(location, 0, data[: len(data) // 2]) == len(data) // 2
    # Another upload settled later shows the ingest has looked at the store since.
    other = datasets.ct_series(tmp_path / "other", slices=1, rows=64, cols=64, seed=112)
    other_bundle, other_metadata = packed(other)
    cloud.wait_until_settled(tus_upload(cloud, other_bundle, other_metadata))

    assert location.rsplit("/", 1)[-1] not in cloud.settled()
    assert archived(cloud, metadata["study_uid"]) == {}

    assert tus_patch(location, len(data) // 2, data[len(data) // 2 :]) == len(data)
    assert_archived_as_sent(cloud, metadata["study_uid"], sources)


def test_ingesting_a_large_bundle_holds_one_instance_in_memory_not_the_bundle(
    own_cloud: DevCloud, packed: Packer, tmp_path: Path
) -> None:
    sources = datasets.ct_series(tmp_path / "ct", slices=100, rows=512, cols=512, seed=113)
    bundle, metadata = packed(sources)
    before = vm_hwm_bytes(own_cloud.ingest_pid)

    tus_upload(own_cloud, bundle, metadata)

    own_cloud.wait_for_study(metadata["study_uid"], len(sources))
    grown = vm_hwm_bytes(own_cloud.ingest_pid) - before
    largest = max(p.stat().st_size for p in sources)
    assert sum(p.stat().st_size for p in sources) > 50 * largest
    assert grown < 8 * largest + 8 * 1024 * 1024, (grown, largest)


def test_an_archive_down_during_ingest_is_retried_and_the_study_stored_once_it_is_back(
    own_cloud: DevCloud, packed: Packer, tmp_path: Path
) -> None:
    sources = datasets.ct_series(tmp_path / "ct", slices=5, rows=64, cols=64, seed=109)
    bundle, metadata = packed(sources)
    own_cloud.archive.kill()

    upload = tus_upload(own_cloud, bundle, metadata)
    wait_for_log(own_cloud, f"upload {upload} (study {metadata['study_uid']} part 1): POST")
    assert upload not in own_cloud.settled()
    own_cloud.archive.start()

    assert_archived_as_sent(own_cloud, metadata["study_uid"], sources)
    record = own_cloud.wait_until_settled(upload)
    assert (record["outcome"], record["instances"], record["new"]) == ("ingested", 5, 5)
    assert record["posts"] == 6  # the one that found the archive down, then each instance
    assert own_cloud.archive.instance_count() == 5
    log = own_cloud.ingest_log()
    assert "answers again" in log
    assert log.count("ingested upload") == 1


def wait_for_log(cloud: DevCloud, text: str, timeout: float = TIMEOUT) -> object:
    return wait_until(lambda: text in cloud.ingest_log(), timeout, 0.05, f"{text!r} logged")
