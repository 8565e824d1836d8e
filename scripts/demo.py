"""The quick-start demo: studies travel from hospital A's PACS through the state cloud to hospital
B's PACS, every server real, on loopback.

Hospital A's PACS (an Orthanc) holds a generated CT series and real images in several transfer
syntaxes, and pushes them to Dirigo A by C-STORE through its REST API, study by study, as a
PACS's routing rules or an administrator's "send to" do. Dirigo A acknowledges each instance once
it is durable, waits until each study is complete, packs it into a zstd bundle and uploads it with
resumable tus chunks to the development cloud, whose ingest checks every bundle and stores its
instances in the state archive (an Orthanc with DICOMweb). Dirigo A marks a study confirmed once
the archive holds all its instances.

Hospital B's PACS (a second Orthanc) knows Dirigo B as one more DICOM node. As a radiologist's
click would, it asks Dirigo B for a study (C-FIND, which Dirigo B answers from the archive by
QIDO-RS) and retrieves it (C-MOVE: Dirigo B fetches each instance by WADO-RS and sends it to B's
PACS by C-STORE). The demo then checks that B's PACS holds exactly what A's PACS holds.

Run it through `scripts/demo`, which installs what it needs first.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from agent.health import render  # noqa: E402
from tests.support.agent import Agent  # noqa: E402
from tests.support.datasets import (  # noqa: E402
    UNCOMPRESSED,
    ct_series,
    dataset_digest,
    distinct_instances,
    real_files,
    transfer_syntax,
)
from tests.support.devcloud import DevCloud  # noqa: E402
from tests.support.net import LOOPBACK, PeerExited, wait_until  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402

PACS_A, PACS_B = "HOSPITAL_A", "HOSPITAL_B"
DIRIGO_A, DIRIGO_B = "DIRIGO_A", "DIRIGO_B"
RETRIEVED_REAL = ("MR2_J2KR.dcm", "color3d_jpeg_baseline.dcm")
"""Files whose studies hospital B retrieves besides the CT: an MR study with one JPEG 2000
instance among uncompressed ones, and a lossy JPEG multi-frame ultrasound."""
UPLOAD_TIMEOUT = 600.0
"""Seconds for every study to be uploaded and confirmed by the archive."""


class DemoFailed(Exception):
    """A check failed: what was received somewhere is not what was sent."""


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    print(f"==> {title}", flush=True)
    started = time.monotonic()
    yield
    print(f"    done in {time.monotonic() - started:.1f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--slices", type=int, default=200, help="CT slices to generate (512x512)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    # Ctrl-C and SIGTERM alike end the run through the same tear-down; even when started with
    # SIGINT ignored (`scripts/demo &`), since the servers it starts still stop on Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="dirigo-demo-"))
    print(
        "Dirigo demo: hospital A's PACS -> Dirigo A -> the cloud (tus, archive) -> Dirigo B ->"
        f" hospital B's PACS, all on loopback; working in {work}",
        flush=True,
    )
    exchange: Exchange | None = None
    outcome = "interrupted"
    try:
        with step(f"generating a {args.slices}-slice CT series and picking real images"):
            files = pick_files(work, args.slices)
        exchange = Exchange(work)
        exchange.start()
        run_demo(exchange, files)
        outcome = "ok"
    except KeyboardInterrupt:
        print("\nINTERRUPTED", flush=True)
    except (DemoFailed, TimeoutError, PeerExited) as exc:
        outcome = "failed"
        print(f"FAILED: {exc}", flush=True)
    except Exception as exc:
        outcome = "failed"
        print(f"FAILED with an error: {exc!r}", flush=True)
        raise
    finally:
        if exchange is not None:
            exchange.stop()
        if outcome == "ok" and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            logs = f"The logs are in {exchange.logs}; " if exchange is not None else ""
            print(f"{logs}everything else stays in {work}", flush=True)
    return {"ok": 0, "failed": 1}.get(outcome, 130)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def pick_files(work: Path, slices: int) -> list[Path]:
    """Return the generated CT series' files followed by one real file per SOP instance."""
    # explicit_VR-UN.dcm encodes its UIDs with VR UN; DCMTK-based senders (Orthanc among them)
    # then announce a mangled SOP Instance UID, which Dirigo rightly refuses (the receive tests
    # cover that). The demo shows the normal path, so it leaves that file out. pydicom-data
    # holds some instances in several encodings (one SOP Instance UID each); a PACS keeps one
    # copy of an instance, so load one file per instance, uncompressed first.
    real = [p for p in real_files() if p.name != "explicit_VR-UN.dcm"]
    real = distinct_instances(sorted(real, key=lambda p: transfer_syntax(p) not in UNCOMPRESSED))
    return ct_series(work / "ct", slices=slices) + real


# --- the servers ------------------------------------------------------------------------------


class Exchange:
    """Every server of the demo: the dev cloud, both hospitals' PACSes and Dirigos.

    Constructing it chooses every port and writes the Dirigo configurations; each server logs
    into `logs`, which outlives them.
    """

    def __init__(self, work: Path) -> None:
        self.logs = work / "logs"
        self.logs.mkdir()
        self.cloud = DevCloud(work / "cloud")
        self.cloud.archive.log_path = self.logs / "archive-orthanc.log"
        self.pacs_a = self._pacs(PACS_A)
        self.pacs_b = self._pacs(PACS_B)
        self.dirigo_a = self._dirigo(work, "hospital-a", DIRIGO_A, {"ae_title": PACS_A})
        # B's PACS is a move destination as well as a caller: Dirigo B needs its port.
        pacs_b = {"ae_title": PACS_B, "port": self.pacs_b.dicom_port}
        self.dirigo_b = self._dirigo(work, "hospital-b", DIRIGO_B, pacs_b)

    def _pacs(self, aet: str) -> Orthanc:
        # Each instance goes as stored, never transcoded: the demo checks it arrives byte for
        # byte. Orthanc 1.12 otherwise, meeting a JPEG 2000 instance after uncompressed ones of
        # its SOP class on one association, tries to decompress it rather than negotiate its
        # syntax, and cannot (docs/platforms.md); Orthanc 1.10 negotiates either way.
        pacs = Orthanc(aet, dicomweb=False, extra_config={"TranscodeDicomProtocol": False})
        pacs.log_path = self.logs / f"{aet.lower()}-orthanc.log"
        return pacs

    def _dirigo(self, work: Path, site: str, aet: str, peer: dict[str, Any]) -> Agent:
        data_dir = work / site.replace("hospital", "dirigo")
        data_dir.mkdir()
        agent = Agent(
            data_dir,
            ae_title=aet,
            peers=({**peer, "host": LOOPBACK},),
            probe_ae=peer["ae_title"],
            stable_after="3s",
            extra={
                "cloud": {
                    "upload_url": self.cloud.upload_url,
                    "dicomweb_url": self.cloud.dicomweb_url,
                },
                # The archive lists a bundle's instances a moment after its upload ends (the
                # ingest stores them); check again soon rather than after the default 10 s.
                "upload": {"retry_first": "1s", "retry_max": "5s"},
            },
        )
        config = yaml.safe_load(agent.config_path.read_text())
        config["site"] = site
        agent.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        agent.log.close()
        agent.log = (self.logs / f"{aet.lower()}.log").open("w+b")
        return agent

    def start(self) -> None:
        with step("starting the cloud: tus upload endpoint, archive (Orthanc + DICOMweb), ingest"):
            self.cloud.start()
        for agent, pacs in ((self.dirigo_a, self.pacs_a), (self.dirigo_b, self.pacs_b)):
            with step(f"starting {agent.ae_title} (dirigo run --config {agent.config_path})"):
                agent.start()
            with step(f"starting {pacs.aet}'s PACS (Orthanc) with {agent.ae_title} as a modality"):
                pacs.start()
                pacs.put_modality(agent.ae_title, agent.ae_title, LOOPBACK, agent.port)

    def check_running(self) -> None:
        """Raise PeerExited if a server the upload path needs has stopped."""
        for name, running in (
            (DIRIGO_A, self.dirigo_a.proc is not None and self.dirigo_a.proc.poll() is None),
            ("the tus server", self.cloud.tus.running),
            ("the archive", self.cloud.archive.running),
            ("the ingest", self.cloud.ingest_running),
        ):
            if not running:
                raise PeerExited(f"{name} stopped unexpectedly")

    def stop(self) -> None:
        """Stop every server that runs, Orthanc's slow stops side by side; keep the logs."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave orphans
        with step("stopping every server"):
            self._stop()
        for agent in (self.dirigo_a, self.dirigo_b):
            agent.log.close()

    def _stop(self) -> None:
        agents = [a for a in (self.dirigo_a, self.dirigo_b) if a.proc is not None]
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.terminate()
        self.pacs_a.terminate()
        self.pacs_b.terminate()
        stops: list[Callable[[], object]] = [a.stop for a in agents]
        stops += [self.cloud.stop, self.pacs_a.stop, self.pacs_b.stop]
        for stop in stops:
            try:
                stop()
            except Exception as exc:  # the others must stop still; say what went wrong
                print(f"    trouble stopping a server: {exc!r}", flush=True)


# --- the demo ---------------------------------------------------------------------------------


def run_demo(exchange: Exchange, files: list[Path]) -> None:
    """Send every file from A's PACS to the cloud, retrieve the chosen studies into B's PACS and
    check them. Raise DemoFailed or TimeoutError if something does not arrive as sent."""
    pacs_a, pacs_b = exchange.pacs_a, exchange.pacs_b
    studies = load(pacs_a, files)
    wanted = dict(study(p) for p in files[:1] + [p for p in files if p.name in RETRIEVED_REAL])
    total = sum(path.stat().st_size for path in files)

    started = time.monotonic()
    with step(f"hospital A's PACS sends every study to {DIRIGO_A} by C-STORE, study by study"):
        # One store job per study, as a PACS's routing rules send.
        for orthanc_id in studies:
            body = {"Resources": [orthanc_id], "Synchronous": True}
            pacs_a.post(f"/modalities/{DIRIGO_A}/store", body)
        print(f"    {total / 1e6 / (time.monotonic() - started):.0f} MB/s, each instance durable")
    with step(f"waiting until {DIRIGO_A} has uploaded every study and the archive confirmed it"):
        wait_confirmed(exchange, len(studies))
    checking = time.monotonic()
    with step(f"{DIRIGO_A}'s status (dirigo status --json)"):
        show_status(exchange.dirigo_a, len(studies))
    with step("checking the archive lists every instance of hospital A's PACS (QIDO-RS)"):
        check_archive(exchange.cloud, pacs_a)
    checks = time.monotonic() - checking
    for uid, what in wanted.items():
        with step(f"hospital B's PACS finds the {what} at {DIRIGO_B} and retrieves it ({uid})"):
            retrieve(pacs_b, uid)
    arrived = time.monotonic()

    with step("checking hospital B's PACS holds exactly what hospital A's PACS holds"):
        received = dict(
            exchange.dirigo_a.rows(
                "SELECT sop_instance_uid, sha256 FROM instances WHERE superseded = 0"
            )
        )
        verdicts = [compare_study(pacs_a, pacs_b, received, uid) for uid in wanted]
    count = sum(v.instances for v in verdicts)
    size = sum(v.bytes for v in verdicts)
    identical = sum(v.identical for v in verdicts)
    copies = (
        "every dataset byte for byte A's copy"
        if identical == count
        else f"{identical} of {count} datasets byte for byte A's copy, the others as A's PACS"
        " re-encoded them to send, every element equal"
    )
    print(
        f"OK: {len(wanted)} studies ({count} instances, {size / 1e6:.0f} MB) went from hospital"
        f" A's PACS to hospital B's PACS in {arrived - started:.1f} s end to end"
        f" ({arrived - started - checks:.1f} s without the checks along the way)"
    )
    print(
        f"    C-STORE to {DIRIGO_A}, tus upload, ingest, confirmation by QIDO-RS, C-FIND and"
        f" C-MOVE through {DIRIGO_B}.\n    Every instance arrived byte for byte as {DIRIGO_A}"
        f" received it (dataset sha256), its pixel data as A's PACS holds it;\n    {copies}."
    )


def load(pacs: Orthanc, files: list[Path]) -> list[str]:
    """Store the files in the PACS over its REST API; return Orthanc's ids of its studies."""
    with step(f"loading {len(files)} instances into hospital A's PACS"):
        for path in files:
            response = pacs.session.post(f"{pacs.http_url}/instances", data=path.read_bytes())
            response.raise_for_status()
        studies: list[str] = pacs.get("/studies")
        total = sum(path.stat().st_size for path in files)
        count = pacs.instance_count()
        print(f"    {len(studies)} studies, {count} instances, {total / 1e6:.0f} MB")
    return studies


def study(path: Path) -> tuple[str, str]:
    """Return the file's Study Instance UID and a few words for its study."""
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), f"{ds.Modality} study"


def wait_confirmed(exchange: Exchange, parts: int) -> None:
    """Wait until Dirigo A has committed `parts` study parts as confirmed by the archive (what
    its status counts, read straight from its database: `dirigo status` takes seconds)."""
    agent = exchange.dirigo_a

    def confirmed() -> bool:
        exchange.check_running()
        (count,) = agent.rows("SELECT count(*) FROM studies WHERE state = 'confirmed'")[0]
        return bool(count == parts)

    try:
        wait_until(confirmed, UPLOAD_TIMEOUT, 0.1, f"{parts} study parts confirmed")
    except TimeoutError as exc:
        status = agent.status()
        ingest = exchange.cloud.ingest_log()[-2000:]
        raise TimeoutError(
            f"{exc}; {DIRIGO_A}'s studies: {status['studies']}, failed jobs:"
            f" {status['failed'][:3]}; the ingest's log ends:\n{ingest}"
        ) from None
    settled = exchange.cloud.settled().values()
    rejected = [u for u in settled if u["outcome"] != "ingested"]
    if rejected:
        raise DemoFailed(f"the ingest rejected {len(rejected)} bundle(s): {rejected[:3]}")
    print(f"    the cloud's ingest checked and archived {len(settled)} bundles")


def show_status(agent: Agent, parts: int) -> None:
    """Print the agent's status; raise DemoFailed unless it counts `parts` parts confirmed."""
    status = agent.status()
    print("\n".join(f"    {line}" for line in render(status).splitlines()))
    if status["studies"]["confirmed"] != parts or status["failed"]:
        raise DemoFailed(f"{agent.ae_title} does not show {parts} study parts confirmed")


def check_archive(cloud: DevCloud, pacs: Orthanc) -> None:
    """Raise DemoFailed unless QIDO-RS lists, study by study, each instance the PACS holds."""
    for study in pacs.get("/studies", expand=""):
        uid = study["MainDicomTags"]["StudyInstanceUID"]
        held = {i["MainDicomTags"]["SOPInstanceUID"] for i in instances(pacs, study["ID"])}
        listed = cloud.study_instances(uid)
        if listed != held:
            raise DemoFailed(
                f"study {uid}: the archive lists {len(listed & held)} of the PACS's"
                f" {len(held)} instances, and {len(listed - held)} others"
            )


def retrieve(pacs: Orthanc, uid: str) -> None:
    """Have the PACS query its Dirigo for the study (C-FIND) and move it to itself (C-MOVE)."""
    query = pacs.post(
        f"/modalities/{DIRIGO_B}/query", {"Level": "Study", "Query": {"StudyInstanceUID": uid}}
    )
    answers = pacs.get(f"/queries/{query['ID']}/answers", expand="")
    found = [a["0020,000d"]["Value"] for a in answers]
    if found != [uid]:
        raise DemoFailed(f"C-FIND for study {uid} at {DIRIGO_B} answered {found}")
    started = time.monotonic()
    pacs.post(
        f"/queries/{query['ID']}/answers/0/retrieve", {"TargetAet": pacs.aet, "Synchronous": True}
    )
    study = lookup(pacs, uid)
    if study is None:
        raise DemoFailed(f"after the C-MOVE, hospital B's PACS does not hold study {uid}")
    got = pacs.get(f"/studies/{study}/statistics")
    seconds = time.monotonic() - started
    print(
        f"    C-FIND: 1 match; C-MOVE: {got['CountInstances']} instances,"
        f" {int(got['DiskSize']) / 1e6:.0f} MB in {seconds:.1f} s"
    )


# --- the checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One study compared: its instances, their size in A's PACS, and how many of them B's PACS
    holds byte for byte as A's PACS does (the others as A's PACS sent them)."""

    instances: int
    bytes: int
    identical: int


def compare_study(pacs_a: Orthanc, pacs_b: Orthanc, received: dict[str, str], uid: str) -> Verdict:
    """Compare the study in both PACSes instance by instance; raise DemoFailed at a difference.

    `received` is Dirigo A's record of what A's PACS sent it: each dataset's sha256 by SOP
    Instance UID. Each PACS writes a File Meta group of its own (source AE, implementation), so
    datasets are compared after it. Per instance B's PACS must hold exactly the dataset Dirigo
    A received, byte for byte, and the pixel data exactly as A's PACS holds it. A's PACS
    re-encodes some datasets as it sends them (DCMTK gives sequences of undefined length
    explicit lengths): those must equal A's copy element by element; the rest byte for byte.
    """
    in_a, in_b = study_files(pacs_a, uid), study_files(pacs_b, uid)
    if set(in_a) != set(in_b):
        raise DemoFailed(
            f"study {uid}: B's PACS lacks {len(set(in_a) - set(in_b))} of A's"
            f" {len(in_a)} instances and holds {len(set(in_b) - set(in_a))} others"
        )
    size = identical = 0
    for sop, a_id in in_a.items():
        a_bytes = pacs_a.session.get(f"{pacs_a.http_url}/instances/{a_id}/file").content
        b_bytes = pacs_b.session.get(f"{pacs_b.http_url}/instances/{in_b[sop]}/file").content
        size += len(a_bytes)
        if pixel_sha256(a_bytes) != pixel_sha256(b_bytes):
            raise DemoFailed(f"instance {sop}: the pixel data differ")
        if dataset_digest(b_bytes) != received.get(sop):
            raise DemoFailed(f"instance {sop}: the dataset differs from what {DIRIGO_A} received")
        if dataset_digest(a_bytes) == dataset_digest(b_bytes):
            identical += 1
        elif values(dcmread(BytesIO(a_bytes))) != values(dcmread(BytesIO(b_bytes))):
            raise DemoFailed(f"instance {sop}: some elements differ from A's PACS's copy")
    print(
        f"    study {uid}: {len(in_a)} instance(s), pixel data identical, datasets identical to"
        f" what {DIRIGO_A} received; {identical} byte for byte as in A's PACS"
        + ("" if identical == len(in_a) else f", {len(in_a) - identical} element for element")
    )
    return Verdict(len(in_a), size, identical)


def study_files(pacs: Orthanc, uid: str) -> dict[str, str]:
    """Return the PACS's instances of a study: Orthanc's id by SOP Instance UID."""
    study = lookup(pacs, uid)
    if study is None:
        return {}
    return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in instances(pacs, study)}


def lookup(pacs: Orthanc, uid: str) -> str | None:
    """Return Orthanc's id of the study with this Study Instance UID, or None."""
    response = pacs.session.post(f"{pacs.http_url}/tools/lookup", data=uid, timeout=30)
    response.raise_for_status()
    found = [r["ID"] for r in response.json() if r["Type"] == "Study"]
    return found[0] if found else None


def instances(pacs: Orthanc, study_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = pacs.get(f"/studies/{study_id}/instances")
    return found


def pixel_sha256(part10: bytes) -> str:
    """Return the sha256 of the Pixel Data element's value as encoded (frames or fragments)."""
    pixels = dcmread(BytesIO(part10)).get("PixelData", b"")
    return hashlib.sha256(pixels).hexdigest()


def values(ds: Dataset) -> dict[int, object]:
    """Return every element's value by tag, leaving out what a sender may drop or rewrite when
    it re-encodes: group lengths and Data Set Trailing Padding (which has no DICOM meaning)."""
    return {int(e.tag): e.value for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC}


if __name__ == "__main__":
    sys.exit(main())
