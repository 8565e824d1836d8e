"""The quick-start demo: a hospital PACS sends studies through Dirigo to the cloud, every server
real, on loopback.

Hospital A's PACS is a real Orthanc. It holds a generated CT series and real images in several
transfer syntaxes, and pushes them to Dirigo by C-STORE through its REST API, as a PACS
administrator's "send to" does. Dirigo acknowledges each instance only once it is durable, waits
until each study is complete, packs it into a zstd bundle and uploads it with resumable tus
chunks to the official tus server standing in for the state cloud. The demo then checks that
what the cloud received is exactly what the PACS holds, instance by instance.

Run it through `scripts/demo`, which installs what it needs first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from tests.support import bundles  # noqa: E402
from tests.support.agent import Agent  # noqa: E402
from tests.support.datasets import (  # noqa: E402
    UNCOMPRESSED,
    ct_series,
    dataset_sha256,
    distinct_instances,
    real_files,
    transfer_syntax,
)
from tests.support.net import LOOPBACK, wait_until  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.tus import TusServer  # noqa: E402


@contextmanager
def step(title: str) -> Iterator[None]:
    print(f"==> {title}", flush=True)
    started = time.monotonic()
    yield
    print(f"    done in {time.monotonic() - started:.1f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--slices", type=int, default=200, help="CT slices to generate (512x512)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dirigo-demo-"))
    print(f"Dirigo demo: hospital A's PACS (Orthanc) -> Dirigo -> cloud (tus), working in {work}")

    with step(f"generating a {args.slices}-slice CT series and picking real images"):
        # explicit_VR-UN.dcm encodes its UIDs with VR UN; DCMTK-based senders (Orthanc among
        # them) then announce a mangled SOP Instance UID, which Dirigo rightly refuses (the
        # receive tests cover that). The demo shows the normal path, so it leaves that file out.
        # pydicom-data holds some instances in several encodings (one SOP Instance UID each); a
        # PACS keeps one copy of an instance, so load one file per instance, uncompressed first.
        real = [p for p in real_files() if p.name != "explicit_VR-UN.dcm"]
        real = distinct_instances(
            sorted(real, key=lambda p: transfer_syntax(p) not in UNCOMPRESSED)
        )
        files = ct_series(work / "ct", slices=args.slices) + real

    with step("starting the state cloud's upload endpoint (the official tus server)"):
        cloud = TusServer(work / "cloud-uploads").start()
    data_dir = work / "dirigo-data"
    data_dir.mkdir()
    pacs_peer = {"ae_title": "HOSPITAL_A", "host": LOOPBACK}
    agent = Agent(
        data_dir,
        peers=(pacs_peer,),
        probe_ae="HOSPITAL_A",
        stable_after="3s",
        extra={"cloud": {"upload_url": cloud.url}},
    )
    try:
        with step(f"starting Dirigo (dirigo run --config {agent.config_path})"):
            agent.start()
        modalities = {"dirigo": ["DIRIGO", LOOPBACK, agent.port]}
        with step("starting hospital A's PACS (Orthanc)"):
            pacs = Orthanc("HOSPITAL_A", modalities, dicomweb=False).start()
        try:
            return run_demo(agent, pacs, cloud, files)
        finally:
            pacs.stop()
    finally:
        agent.stop()
        cloud.stop()
        print(f"Dirigo's spool and database stay in {data_dir}")
        print(f"The cloud's uploads stay in {cloud.directory}")


def run_demo(agent: Agent, pacs: Orthanc, cloud: TusServer, files: list[Path]) -> int:
    with step(f"loading {len(files)} instances into the PACS"):
        for path in files:
            response = pacs.session.post(f"{pacs.http_url}/instances", data=path.read_bytes())
            response.raise_for_status()
        studies = pacs.get("/studies")
        total = sum(path.stat().st_size for path in files)
        print(
            f"    {len(studies)} studies, {pacs.instance_count()} instances, {total / 1e6:.0f} MB"
        )

    with step("the PACS sends every study to Dirigo by C-STORE"):
        started = time.monotonic()
        pacs.post("/modalities/dirigo/store", {"Resources": studies, "Synchronous": True})
        elapsed = time.monotonic() - started
        print(f"    {total / 1e6 / elapsed:.0f} MB/s, every instance durable before its Success")

    with step("waiting for Dirigo to pack and upload every study (complete after 3 s quiet)"):
        wait_until(
            lambda: agent.status()["studies"]["sent"] == len(studies),
            300,
            what="every study uploaded",
        )
    print(render_status(agent))

    with step("checking Dirigo holds exactly what the PACS holds"):
        mismatches = compare(agent, pacs)
    if mismatches:
        print(f"FAILED: {len(mismatches)} instance(s) differ or are missing: {mismatches[:5]}")
        return 1
    with step("checking the cloud received exactly what the PACS holds"):
        uploaded, problems = unpack_cloud(cloud)
        problems += compare_cloud(uploaded, pacs)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in the cloud: {problems[:5]}")
        return 1
    sent = sum(u.size or 0 for u in cloud.uploads())
    print(
        f"OK: the cloud holds {len(uploaded)} instances in {len(cloud.uploads())} bundles"
        f" ({sent / 1e6:.0f} MB for {sum(p.stat().st_size for p in files) / 1e6:.0f} MB"
        " received), each bundle matching its sha256, every element and pixel equal to the"
        " PACS's copy."
    )
    print("Next (not built yet): the cloud as a DICOM node for hospital B (C-FIND, C-MOVE).")
    return 0


def unpack_cloud(cloud: TusServer) -> tuple[dict[str, bytes], list[str]]:
    """Return every instance in the cloud's finished bundles by SOP Instance UID, and problems
    (a bundle whose bytes do not match the sha256 in its upload metadata, a duplicate)."""
    found: dict[str, bytes] = {}
    problems = []
    for upload in cloud.uploads():
        data = upload.data()
        if not upload.complete or hashlib.sha256(data).hexdigest() != upload.metadata["sha256"]:
            problems.append(f"bundle {upload.id} is incomplete or does not match its sha256")
            continue
        members = dict(bundles.members(data))
        for entry in json.loads(members.pop("manifest.json"))["instances"]:
            uid = entry["sop_instance_uid"]
            if uid in found:
                problems.append(f"{uid} uploaded twice")
            found[uid] = members[entry["file"]]
    return found, problems


def compare_cloud(uploaded: dict[str, bytes], pacs: Orthanc) -> list[str]:
    """Return the SOP Instance UIDs the cloud lacks or holds with other values than the PACS."""
    found = pacs.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    bad = []
    for item in found:
        uid = item["MainDicomTags"]["SOPInstanceUID"]
        if uid not in uploaded:
            bad.append(f"{uid} missing")
            continue
        original = pacs.session.get(f"{pacs.http_url}/instances/{item['ID']}/file").content
        if values(dcmread(BytesIO(original))) != values(dcmread(BytesIO(uploaded[uid]))):
            bad.append(f"{uid} differs")
    return bad


def compare(agent: Agent, pacs: Orthanc) -> list[str]:
    """Return the SOP Instance UIDs that Dirigo lacks or holds with other content than the PACS.

    A DICOM sender may re-encode a dataset on the wire (explicit/implicit VR, group lengths),
    so "the same" means: every element's value equal, pixel data bit for bit. Dirigo's own
    record of what it received is checked too: its file still hashes to the recorded sha256.
    """
    rows = agent.rows("SELECT sop_instance_uid, path, sha256 FROM instances WHERE superseded = 0")
    stored = {uid: (path, sha) for uid, path, sha in rows}
    found = pacs.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    bad = []
    for item in found:
        uid = item["MainDicomTags"]["SOPInstanceUID"]
        entry = stored.get(uid)
        if entry is None or dataset_sha256(agent.data_dir / entry[0]) != entry[1]:
            bad.append(uid)
            continue
        original = pacs.session.get(f"{pacs.http_url}/instances/{item['ID']}/file").content
        if values(dcmread(BytesIO(original))) != values(dcmread(agent.data_dir / entry[0])):
            bad.append(uid)
    return bad


def values(ds: Dataset) -> dict[int, object]:
    """Return every element's value by tag, leaving out what a sender may drop or rewrite when
    it re-encodes: group lengths and Data Set Trailing Padding (which has no DICOM meaning)."""
    return {int(e.tag): e.value for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC}


def render_status(agent: Agent) -> str:
    import subprocess

    out = subprocess.run(agent.command("status"), capture_output=True, text=True, check=True)
    return "\n".join(f"    {line}" for line in out.stdout.splitlines())


if __name__ == "__main__":
    sys.exit(main())
