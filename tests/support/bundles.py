"""Reading Dirigo's bundles back, as the cloud's side would: a tar, zstd-compressed or not.

Both layouts: the current one (instances first, each with its `DIRIGO.` PAX records, then
`manifest.json`) and the first one (`manifest.json` first, no PAX records).
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import zstandard

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MANIFEST = "manifest.json"


def members(data: bytes) -> list[tuple[str, bytes]]:
    """Return (name, bytes) of a bundle's tar members, in order, zstd-compressed or not."""
    return [(name, body) for name, body, _ in _read(data)]


def manifest(data: bytes) -> dict[str, Any]:
    """Return a bundle's manifest, wherever it is in the tar."""
    found = [body for name, body, _ in _read(data) if name == MANIFEST]
    assert len(found) == 1, f"{len(found)} {MANIFEST} members"
    parsed: dict[str, Any] = json.loads(found[0])
    return parsed


def instances(data: bytes) -> list[tuple[str, bytes]]:
    """Return (name, bytes) of a bundle's instance members, in order (the manifest left out)."""
    return [(name, body) for name, body, _ in _read(data) if name != MANIFEST]


def facts(data: bytes) -> list[tuple[str, dict[str, str]]]:
    """Return (name, PAX records) of each tar member, in order: the records as `tarfile` reads
    them, Dirigo's keys `DIRIGO.`-prefixed."""
    return [(name, records) for name, _, records in _read(data)]


def first_layout(data: bytes) -> list[tuple[str, bytes]]:
    """Return (name, bytes) of the members a bundle of the first layout holding the same
    instances has: `manifest.json` first (manifest version 1), then the instances, without PAX
    records. (Write them out as a tar to make such a bundle.)"""
    document = manifest(data)
    document["manifest_version"] = 1
    return [(MANIFEST, json.dumps(document, indent=1).encode()), *instances(data)]


def _read(data: bytes) -> list[tuple[str, bytes, dict[str, str]]]:
    if data.startswith(ZSTD_MAGIC):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        found = []
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            assert extracted is not None, member.name
            found.append((member.name, extracted.read(), dict(member.pax_headers)))
        return found
