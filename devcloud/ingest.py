"""The development cloud's archive side: finished tus uploads → checked → Orthanc.

    python devcloud/ingest.py --store DIR --orthanc URL --state DIR [--interval 0.5] [--once]

Stands in for what the state's cloud does with a bundle once it has arrived. It polls the tus
server's file store (`devcloud/tus`, @tus/file-store: each upload is a data file named by its
id beside a `<id>.json` sidecar holding its declared size and its metadata, already decoded
from the base64 of `Upload-Metadata`; the sidecar's offset stays 0, the data file's length is
the offset). For each upload whose data file holds every declared byte, and that it has not
settled yet, it:

1. checks the upload metadata (`format`, `sha256`, `instances`, `study_uid`, `part`) and the
   bundle's sha256 against it;
2. reads the bundle once, streaming (a tar, inside one zstd frame for `dicom-tar+zstd`),
   checking each instance as it comes against what its tar member's PAX extended header
   records say (`DIRIGO.sha256` of its dataset, the bytes after its File Meta group;
   `DIRIGO.sop_instance_uid` and `DIRIGO.transfer_syntax` as in its File Meta; for a transcoded
   file the original's `DIRIGO.original.*`), then `manifest.json`, the last member, which must
   list exactly those instances with those facts. A bundle of the first layout (manifest
   version 1: `manifest.json` first, no PAX records) is checked against its manifest instead;
3. reads it again and POSTs each instance's Part-10 bytes to Orthanc's `/instances`.

Everything is checked before anything is stored, so a bundle that fails a check leaves nothing
in the archive. (An instance the archive itself refuses rejects its bundle as well, but only
after the instances before it were stored.) Memory holds one instance at a time, never a bundle.

What it settled is recorded in `STATE/ingest.db` (SQLite, table `uploads`: one row per upload,
`outcome` 'ingested' or 'rejected'), so a restart neither stores nor POSTs a settled upload
again (one cut off half-way is sent again whole: Orthanc keeps one copy of an instance). A
rejected upload gets a note `STATE/rejected/<id>.json` with the reason. An archive that does
not answer (connection refused, a timeout, a 5xx) is not the bundle's fault: the upload is
tried again at the next poll, once the archive answers again. An archive that refuses an
instance (a 4xx) rejects the bundle.

Logs one line per bundle ingested or rejected, to stderr. Exit code: 0, or with `--once` 1
when an upload is left for a later try; 2 for bad usage; 1 if another ingest holds STATE.
Standard library, zstandard and requests only: it is not part of the agent.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import sqlite3
import struct
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, cast

import requests
import zstandard

logger = logging.getLogger("ingest")

FORMATS = {"dicom-tar+zstd": True, "dicom-tar": False}  # format → zstd-compressed
MANIFEST = "manifest.json"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PAX_PREFIX = "DIRIGO."
FIRST_LAYOUT, PAX_LAYOUT = 1, 2  # manifest versions: manifest first; PAX records, manifest last
_MAX_MANIFEST = 64 * 1024 * 1024
_MAX_INSTANCE = 4 * 1024 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_READ_BLOCK = 1024 * 1024


class Rejected(Exception):
    """The bundle is wrong and always will be: record it, never try it again."""


class ArchiveUnavailable(Exception):
    """The archive did not answer or failed on its side: try again later."""


class Interrupted(Exception):
    """A stop was asked for in the middle of a bundle: it is tried again on the next start."""


@dataclass(frozen=True)
class Upload:
    """A finished upload in the tus file store."""

    id: str
    size: int
    data_path: Path
    metadata: dict[str, str]

    def describe(self) -> str:
        study = self.metadata.get("study_uid", "?")
        return f"upload {self.id} (study {study} part {self.metadata.get('part', '?')})"


@dataclass(frozen=True)
class Entry:
    """One instance as the manifest lists it (or, in the PAX layout, as its member's PAX
    records describe it): `original` is the transcoded file's original (transfer syntax, size,
    sha256), as text."""

    file: str
    sop_instance_uid: str
    transfer_syntax: str
    size: int
    sha256: str
    original: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class Member:
    """One tar member of a bundle: its name, its bytes, and its `DIRIGO.` PAX records (by key
    without that prefix)."""

    name: str
    data: bytes
    facts: dict[str, str]


# --- the tus file store ------------------------------------------------------------------


def finished_uploads(store: Path) -> Iterator[Upload]:
    """Yield every upload in `store` whose data file holds all its declared bytes, oldest first.

    A sidecar being written (not JSON yet), without a size (length deferred) or without its
    data file is passed over: it is looked at again next time.
    """
    found: list[tuple[str, Upload]] = []
    for sidecar in store.glob("*.json"):
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            offset = (store / sidecar.stem).stat().st_size
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("id") != sidecar.stem:
            continue
        size = info.get("size")
        if not isinstance(size, int) or offset != size:
            continue
        metadata = {
            str(k): "" if v is None else str(v) for k, v in (info.get("metadata") or {}).items()
        }
        upload = Upload(sidecar.stem, size, store / sidecar.stem, metadata)
        found.append((str(info.get("creation_date", "")), upload))
    found.sort(key=lambda item: (item[0], item[1].id))
    yield from (upload for _, upload in found)


# --- checking a bundle -------------------------------------------------------------------


def check_metadata(upload: Upload) -> tuple[bool, str, int]:
    """Return (zstd-compressed, sha256, instance count) from the upload's metadata.

    Raise Rejected if a key is missing or not what Dirigo sends.
    """
    meta = upload.metadata
    missing = [k for k in ("format", "sha256", "instances", "study_uid", "part") if not meta.get(k)]
    if missing:
        raise Rejected(f"upload metadata lacks {', '.join(missing)}")
    if meta["format"] not in FORMATS:
        raise Rejected(f"unknown bundle format {meta['format']!r} (expected one of {FORMATS})")
    if not _SHA256.fullmatch(meta["sha256"]):
        raise Rejected(f"upload metadata sha256 {meta['sha256']!r} is not a sha256")
    if not meta["instances"].isdigit():
        raise Rejected(f"upload metadata instances {meta['instances']!r} is not a count")
    return FORMATS[meta["format"]], meta["sha256"], int(meta["instances"])


def file_sha256(path: Path) -> str:
    """Return the sha256 (hex) of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def bundle_members(path: Path, compressed: bool) -> Iterator[Iterator[Member]]:
    """Yield an iterator over a bundle's tar members, streaming.

    Raise Rejected if the bundle is not a tar (in a zstd frame when `compressed`), is
    truncated, or holds anything but regular files.
    """
    with path.open("rb") as raw:
        if compressed and raw.read(4) != ZSTD_MAGIC:
            raise Rejected("format is dicom-tar+zstd but the bundle is not a zstd frame")
        raw.seek(0)
        with contextlib.ExitStack() as stack:
            source: IO[bytes] = raw
            if compressed:
                reader = zstandard.ZstdDecompressor().stream_reader(raw)
                source = cast(IO[bytes], stack.enter_context(reader))
            try:
                tar = stack.enter_context(tarfile.open(fileobj=source, mode="r|"))
                yield _members(tar)
            except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
                raise Rejected(f"the bundle is not a readable tar: {exc}") from None


def _members(tar: tarfile.TarFile) -> Iterator[Member]:
    for member in tar:
        if not member.isfile():
            raise Rejected(f"member {member.name!r} is not a regular file")
        limit = _MAX_MANIFEST if member.name == MANIFEST else _MAX_INSTANCE
        if member.size > limit:
            raise Rejected(f"member {member.name!r} is {member.size} bytes, more than {limit}")
        extracted = tar.extractfile(member)
        assert extracted is not None  # a regular file always has content
        data = extracted.read()
        if len(data) != member.size:
            raise Rejected(f"member {member.name!r} is truncated")
        facts = {
            key[len(PAX_PREFIX) :]: value
            for key, value in member.pax_headers.items()
            if key.startswith(PAX_PREFIX)
        }
        yield Member(member.name, data, facts)


def parse_manifest(data: bytes, upload: Upload, count: int, version: int) -> list[Entry]:
    """Return the manifest's instance entries, checked against the upload's metadata.

    Raise Rejected if it is not the JSON Dirigo writes for the layout `version` (where the
    manifest was found says which), names another study, part or format, or lists another
    number of instances than the metadata.
    """
    try:
        document = json.loads(data)
        if not isinstance(document, dict):
            raise ValueError("not an object")
        if document.get("manifest_version") != version:
            found = document.get("manifest_version")
            raise ValueError(f"manifest_version {found!r} is not {version} (where it is placed)")
        entries = [_entry(item) for item in document["instances"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise Rejected(f"{MANIFEST} is not a valid manifest: {exc!r}") from None
    meta = upload.metadata
    for key in ("study_uid", "part", "format"):
        if str(document.get(key)) != meta[key]:
            raise Rejected(f"{MANIFEST} says {key} {document.get(key)!r}, the upload {meta[key]!r}")
    if len(entries) != count:
        raise Rejected(f"{MANIFEST} lists {len(entries)} instances, the upload metadata {count}")
    for attribute in ("file", "sop_instance_uid"):
        values = [getattr(e, attribute) for e in entries]
        if len(set(values)) != len(values):
            raise Rejected(f"{MANIFEST} lists a {attribute} twice")
    return entries


def _entry(item: Any) -> Entry:
    original = item.get("original")
    entry = Entry(
        file=item["file"],
        sop_instance_uid=item["sop_instance_uid"],
        transfer_syntax=item["transfer_syntax"],
        size=item["size"],
        sha256=item["sha256"],
        original=None if original is None else _original(original),
    )
    strings = (entry.file, entry.sop_instance_uid, entry.transfer_syntax, entry.sha256)
    if not all(isinstance(s, str) for s in strings) or not isinstance(entry.size, int):
        raise ValueError(f"an instance entry has values of the wrong type: {item!r}")
    if not _SHA256.fullmatch(entry.sha256):
        raise ValueError(f"{entry.file}: sha256 {entry.sha256!r} is not a sha256")
    return entry


def _original(item: Any) -> tuple[str, str, str]:
    values = (item["transfer_syntax"], item["size"], item["sha256"])
    if not isinstance(values[1], int) or not all(isinstance(v, str) for v in values[::2]):
        raise ValueError(f"an original has values of the wrong type: {item!r}")
    return values[0], str(values[1]), values[2]


def pax_entry(member: Member) -> Entry:
    """Return the instance a member of the PAX layout says it is, in its PAX records.

    Raise Rejected if a record is missing or malformed.
    """
    facts = member.facts
    missing = [k for k in ("sha256", "sop_instance_uid", "transfer_syntax") if k not in facts]
    if missing:
        records = ", ".join(PAX_PREFIX + k for k in missing)
        raise Rejected(f"member {member.name!r} lacks the PAX record(s) {records}")
    if not _SHA256.fullmatch(facts["sha256"]):
        raise Rejected(f"{member.name}: PAX sha256 {facts['sha256']!r} is not a sha256")
    original = None
    if any(k.startswith("original.") for k in facts):
        keys = ("original.transfer_syntax", "original.size", "original.sha256")
        if not all(k in facts for k in keys) or not facts["original.size"].isdigit():
            raise Rejected(f"{member.name}: its PAX records of the original are incomplete")
        original = (facts[keys[0]], facts[keys[1]], facts[keys[2]])
    return Entry(
        member.name,
        facts["sop_instance_uid"],
        facts["transfer_syntax"],
        len(member.data),
        facts["sha256"],
        original,
    )


def check_instance(entry: Entry, name: str, data: bytes, source: str = "the manifest") -> None:
    """Raise Rejected unless member `name` holding `data` is the instance `entry` describes:
    its name, size, File Meta SOP Instance UID and transfer syntax, and its dataset's sha256.
    `source` names where `entry` comes from, for the reason."""
    if name != entry.file:
        raise Rejected(f"member {name!r} is where the manifest expects {entry.file!r}")
    if len(data) != entry.size:
        raise Rejected(f"{name}: {len(data)} bytes, {source} says {entry.size}")
    try:
        offset, meta = file_meta(data)
    except ValueError as exc:
        raise Rejected(f"{name}: {exc}") from None
    sop_instance_uid = meta.get(0x0003, "")
    if sop_instance_uid != entry.sop_instance_uid:
        raise Rejected(
            f"{name}: SOP Instance UID {sop_instance_uid!r}, {source} says"
            f" {entry.sop_instance_uid!r}"
        )
    if meta.get(0x0010, "") != entry.transfer_syntax:
        raise Rejected(
            f"{name}: transfer syntax {meta.get(0x0010)!r}, {source} says {entry.transfer_syntax!r}"
        )
    digest = hashlib.sha256(memoryview(data)[offset:]).hexdigest()
    if digest != entry.sha256:
        raise Rejected(f"{name}: dataset sha256 {digest}, {source} says {entry.sha256}")


def file_meta(data: bytes) -> tuple[int, dict[int, str]]:
    """Return where a Part-10 file's dataset starts (after its File Meta group, group 0002,
    always Explicit VR Little Endian, walked element by element) and the meta's UI values by
    element number. Raise ValueError if `data` is not Part-10."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("no DICM prefix: not a DICOM Part-10 file")
    values: dict[int, str] = {}
    offset = 132
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            break
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > len(data):
                break
            (length,) = struct.unpack_from("<I", data, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            start = offset + 8
        if start + length > len(data):
            raise ValueError(f"File Meta element (0002,{element:04X}) runs past the end")
        if vr == b"UI":
            values[element] = data[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset = start + length
    return offset, values


def verify(upload: Upload) -> list[Entry]:
    """Check the whole bundle of a finished upload, of either layout, and return its manifest's
    entries.

    Raise Rejected with the reason if anything does not match.
    """
    compressed, sha256, count = check_metadata(upload)
    actual = file_sha256(upload.data_path)
    if actual != sha256:
        raise Rejected(f"bundle sha256 {actual}, the upload metadata says {sha256}")
    with bundle_members(upload.data_path, compressed) as members:
        first = next(members, None)
        if first is None:
            raise Rejected("the bundle holds no member")
        if first.name == MANIFEST:
            return _verify_listed(parse_manifest(first.data, upload, count, FIRST_LAYOUT), members)
        return _verify_streamed(itertools.chain([first], members), upload, count)


def _verify_listed(entries: list[Entry], members: Iterator[Member]) -> list[Entry]:
    """Check the instances of a bundle of the first layout against its manifest, read first."""
    seen = 0
    for index, member in enumerate(members):
        if index >= len(entries):
            raise Rejected(f"member {member.name!r} is not in the manifest")
        check_instance(entries[index], member.name, member.data)
        seen += 1
    if seen != len(entries):
        raise Rejected(f"the manifest lists {len(entries)} instances, the bundle holds {seen}")
    return entries


def _verify_streamed(members: Iterator[Member], upload: Upload, count: int) -> list[Entry]:
    """Check each instance of a bundle of the PAX layout against its own PAX records as it
    comes, then the manifest, the last member, against them all."""
    seen: list[Entry] = []
    for member in members:
        if member.name == MANIFEST:
            entries = parse_manifest(member.data, upload, count, PAX_LAYOUT)
            after = next(members, None)
            if after is not None:
                raise Rejected(f"member {after.name!r} follows {MANIFEST}, which must be last")
            for number, (listed, found) in enumerate(itertools.zip_longest(entries, seen), 1):
                if listed != found:
                    raise Rejected(
                        f"{MANIFEST} and the members' PAX records differ at instance {number}"
                    )
            return entries
        if len(seen) == count:
            raise Rejected(f"member {member.name!r} is one more than the {count} instances")
        entry = pax_entry(member)
        check_instance(entry, member.name, member.data, "its PAX record")
        seen.append(entry)
    raise Rejected(f"the bundle ends without {MANIFEST} (its last member)")


# --- the archive -------------------------------------------------------------------------


class Archive:
    """Orthanc's REST API: store a Part-10 instance, ask whether it answers."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Accept-Encoding"] = "identity"

    def answers(self) -> bool:
        """Return True if `GET /system` answers 200 within a few seconds."""
        try:
            return self.session.get(f"{self.url}/system", timeout=5).ok
        except requests.RequestException:
            return False

    def store(self, name: str, data: bytes) -> bool:
        """POST one instance; return True if it is new, False if Orthanc already had it.

        Raise ArchiveUnavailable if Orthanc does not answer or fails (5xx), Rejected if it
        refuses the instance (4xx, or an answer other than stored).
        """
        try:
            response = self.session.post(
                f"{self.url}/instances",
                data=data,
                headers={"Content-Type": "application/dicom"},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise ArchiveUnavailable(f"POST {self.url}/instances failed: {exc}") from None
        if response.status_code >= 500:
            raise ArchiveUnavailable(f"POST {self.url}/instances: {_answer(response)}")
        if response.status_code != 200:
            raise Rejected(f"{name}: the archive refused it: {_answer(response)}")
        try:
            status = response.json().get("Status")
        except (ValueError, AttributeError):
            status = None
        if status not in ("Success", "AlreadyStored"):
            raise Rejected(f"{name}: the archive answered {_answer(response)}")
        return bool(status == "Success")


def _answer(response: requests.Response) -> str:
    try:
        body = response.json()
        detail = body.get("Details") or body.get("Message") or body
    except (ValueError, AttributeError):
        detail = response.text[:200]
    return f"{response.status_code} {response.reason}: {detail}"


# --- what was settled --------------------------------------------------------------------


class State:
    """The ingest's own record in its state directory: `ingest.db` and `rejected/` notes.

    Holds `ingest.lock` for as long as it is open, so two ingests never share a state.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rejected_dir = directory / "rejected"
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        self._lock = (directory / "ingest.lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"another ingest is using {directory}") from None
        self.db = sqlite3.connect(directory / "ingest.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS uploads ("
            " id TEXT PRIMARY KEY,"
            " outcome TEXT NOT NULL CHECK (outcome IN ('ingested', 'rejected')),"
            " study_uid TEXT, part TEXT,"
            " instances INTEGER NOT NULL,"  # stored; for a rejected upload, 0
            " new INTEGER NOT NULL,"  # of which Orthanc did not have before
            " posts INTEGER NOT NULL,"  # POST /instances requests made, over every attempt
            " seconds REAL NOT NULL,"  # the last attempt's, checking included
            " reason TEXT,"
            " settled_at TEXT NOT NULL)"
        )

    def settled(self) -> set[str]:
        """Return the ids of the uploads ingested or rejected."""
        return {row[0] for row in self.db.execute("SELECT id FROM uploads")}

    def ingested(
        self, upload: Upload, instances: int, new: int, posts: int, seconds: float
    ) -> None:
        self._record(upload, "ingested", instances, new, posts, seconds, None)

    def rejected(self, upload: Upload, reason: str, posts: int, seconds: float) -> None:
        """Write the upload's note in `rejected/` (atomically), then record it."""
        note = {
            "upload": upload.id,
            "reason": reason,
            "size": upload.size,
            "metadata": upload.metadata,
            "data_file": str(upload.data_path),
            "rejected_at": _now(),
        }
        fd, temporary = tempfile.mkstemp(dir=self.rejected_dir, prefix=".note-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(note, f, indent=1)
            f.write("\n")
        os.replace(temporary, self.rejected_dir / f"{upload.id}.json")
        self._record(upload, "rejected", 0, 0, posts, seconds, reason)

    def _record(
        self,
        upload: Upload,
        outcome: str,
        instances: int,
        new: int,
        posts: int,
        seconds: float,
        reason: str | None,
    ) -> None:
        self.db.execute(
            "INSERT INTO uploads (id, outcome, study_uid, part, instances, new, posts, seconds,"
            " reason, settled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                upload.id,
                outcome,
                upload.metadata.get("study_uid"),
                upload.metadata.get("part"),
                instances,
                new,
                posts,
                seconds,
                reason,
                _now(),
            ),
        )

    def close(self) -> None:
        self.db.close()
        self._lock.close()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- the loop ----------------------------------------------------------------------------


class Ingest:
    """Polls the store and settles each finished upload: ingested, rejected, or tried again."""

    def __init__(self, store: Path, archive: Archive, state: State) -> None:
        self.store = store
        self.archive = archive
        self.state = state
        self.stopping = False
        self.posts = 0  # POST /instances requests since start
        self._verified: dict[str, list[Entry]] = {}  # checked, waiting for the archive
        self._posts_for: dict[str, int] = {}
        self._archive_down = False
        self._last_error: dict[str, str] = {}

    def poll(self) -> int:
        """Settle what can be settled now; return how many finished uploads are left unsettled."""
        settled = self.state.settled()
        pending = [u for u in finished_uploads(self.store) if u.id not in settled]
        if pending and self._archive_down:
            if not self.archive.answers():
                return len(pending)
            logger.info("the archive at %s answers again", self.archive.url)
            self._archive_down = False
        left = 0
        for upload in pending:
            # Once the archive is found down, the rest wait for it too.
            if self.stopping or self._archive_down or not self._settle(upload):
                left += 1
        return left

    def _settle(self, upload: Upload) -> bool:
        """Ingest or reject one upload; return False if it is left for a later poll."""
        started = time.monotonic()
        try:
            entries = self._verified.get(upload.id) or verify(upload)
            self._verified[upload.id] = entries
            new = self._store(upload, entries)
        except Rejected as exc:
            seconds = time.monotonic() - started
            self.state.rejected(upload, str(exc), self._posts_for.pop(upload.id, 0), seconds)
            self._forget(upload)
            logger.warning("rejected %s: %s", upload.describe(), exc)
            return True
        except ArchiveUnavailable as exc:
            self._archive_down = True
            self._report_once(upload, f"{upload.describe()}: {exc}; trying again")
            return False
        except Interrupted:
            return False
        except OSError as exc:  # the store's files: unreadable now, maybe not later
            self._report_once(upload, f"{upload.describe()}: {exc}; trying again")
            return False
        seconds = time.monotonic() - started
        posts = self._posts_for.pop(upload.id, 0)
        self.state.ingested(upload, len(entries), new, posts, seconds)
        self._forget(upload)
        logger.info(
            "ingested %s: %d instances (%d new), %.1f MB in %.2f s",
            upload.describe(),
            len(entries),
            new,
            upload.size / 1e6,
            seconds,
        )
        return True

    def _store(self, upload: Upload, entries: list[Entry]) -> int:
        """POST every instance of a verified bundle; return how many were new to Orthanc."""
        compressed = FORMATS[upload.metadata["format"]]
        new = stored = 0
        with bundle_members(upload.data_path, compressed) as members:
            instances = (m for m in members if m.name != MANIFEST)  # checked already
            for entry, member in zip(entries, instances, strict=False):
                if self.stopping:
                    raise Interrupted
                check_instance(entry, member.name, member.data)  # it could have changed since
                self.posts += 1
                self._posts_for[upload.id] = self._posts_for.get(upload.id, 0) + 1
                new += self.archive.store(member.name, member.data)
                stored += 1
        if stored != len(entries):
            raise Rejected(f"the bundle changed while it was read: {stored} of {len(entries)}")
        return new

    def _forget(self, upload: Upload) -> None:
        self._verified.pop(upload.id, None)
        self._last_error.pop(upload.id, None)

    def _report_once(self, upload: Upload, message: str) -> None:
        if self._last_error.get(upload.id) != message:
            self._last_error[upload.id] = message
            logger.warning("%s", message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Ingest finished tus uploads (Dirigo bundles) into an Orthanc archive."
    )
    parser.add_argument("--store", type=Path, required=True, help="the tus file store directory")
    parser.add_argument("--orthanc", required=True, help="Orthanc's REST root, http://host:port")
    parser.add_argument("--state", type=Path, required=True, help="this ingest's own directory")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s ingest: %(message)s",
        stream=sys.stderr,
    )
    try:
        state = State(args.state)
    except (RuntimeError, OSError, sqlite3.Error) as exc:
        logger.error("cannot open the state in %s: %s", args.state, exc)
        return 1
    ingest = Ingest(args.store, Archive(args.orthanc), state)

    def stop(signum: int, frame: FrameType | None) -> None:
        ingest.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info(
        "watching %s every %.1f s, archive %s, state %s (%d upload(s) settled before)",
        args.store,
        args.interval,
        ingest.archive.url,
        args.state,
        len(state.settled()),
    )
    try:
        left = ingest.poll()
        while not args.once and not ingest.stopping:
            time.sleep(args.interval)
            left = ingest.poll()
    finally:
        state.close()
        logger.info("stopped after %d POST(s) to the archive", ingest.posts)
    return 1 if args.once and left else 0


if __name__ == "__main__":
    sys.exit(main())
