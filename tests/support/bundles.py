"""Reading Dirigo's bundles back, as the cloud's side would: a tar, zstd-compressed or not."""

from __future__ import annotations

import io
import tarfile

import zstandard

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def members(data: bytes) -> list[tuple[str, bytes]]:
    """Return (name, bytes) of a bundle's tar members, in order, zstd-compressed or not."""
    if data.startswith(ZSTD_MAGIC):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        found = []
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            assert extracted is not None, member.name
            found.append((member.name, extracted.read()))
        return found
