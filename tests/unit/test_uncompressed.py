"""Rewriting an instance uncompressed, file to file: the file is the one pydicom writes after its
own in-memory `decompress` (or re-encoding), byte for byte, for every real file that path takes;
what it does not take is said, never written wrong."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from agent.serve import codecs
from agent.serve.syntax import LOSSLESS
from agent.serve.uncompressed import TARGETS, Unstreamable, target_syntax, write_uncompressed
from tests.support import datasets


def rewritable() -> list[Path]:
    """pydicom-data's real files held uncompressed or losslessly compressed."""
    found = []
    for path in datasets.real_files():
        try:
            syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        except Exception:  # not DICOM, or no file meta: not this path's to take
            continue
        if not syntax.is_compressed or syntax in LOSSLESS:
            found.append(path)
    return found


def as_pydicom_writes(path: Path, syntax: str) -> bytes:
    """Return the file pydicom writes for the instance at `path` in `syntax`, decompressed in
    memory first if compressed (group lengths, offset tables and trailing padding dropped)."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        codecs.register()
        ds.decompress(as_rgb=False, generate_instance_uid=False)
    tags = ds.keys()  # a Dataset iterates over its elements, not its tags
    for tag in [t for t in tags if t.element == 0 or t in (0x7FE00001, 0x7FE00002)]:
        del ds[tag]
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    implicit = syntax == ImplicitVRLittleEndian
    pydicom.dcmwrite(out, ds, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("syntax", TARGETS)
def test_each_file_is_written_as_pydicom_would_or_refused_with_a_reason(syntax: str) -> None:
    written = refused = 0
    for path in rewritable():
        out = io.BytesIO()
        try:
            write_uncompressed(path, syntax, out)
        except Unstreamable as exc:
            assert str(exc)
            refused += 1
            continue
        assert out.getvalue() == as_pydicom_writes(path, syntax), path.name
        written += 1
    assert written >= 30, "the files pydicom-data has in every lossless syntax"
    assert refused < written


def test_the_compressed_ones_are_decoded_frame_by_frame_among_them() -> None:
    names = {path.name for path in rewritable()}
    assert {"emri_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm"} <= names
    for name in ("emri_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm"):
        (path,) = [p for p in rewritable() if p.name == name]
        out = io.BytesIO()
        write_uncompressed(path, ExplicitVRLittleEndian, out)
        got = pydicom.dcmread(io.BytesIO(out.getvalue()))
        assert got.NumberOfFrames == 10 and not got.file_meta.TransferSyntaxUID.is_compressed


def test_what_this_path_does_not_rewrite_is_refused(tmp_path: Path) -> None:
    big = Path(get_testdata_file("MR_small_bigendian.dcm"))  # type: ignore[arg-type]
    with pytest.raises(Unstreamable, match="Big Endian"):
        write_uncompressed(big, ExplicitVRLittleEndian, io.BytesIO())
    (slice_,) = datasets.ct_series(tmp_path / "ct", slices=1, rows=64, cols=64, seed=7)
    with pytest.raises(ValueError, match="not a syntax"):
        write_uncompressed(slice_, ExplicitVRBigEndian, io.BytesIO())


def test_the_target_is_explicit_vr_if_accepted_else_implicit() -> None:
    both = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
    assert target_syntax(both) == ExplicitVRLittleEndian
    assert target_syntax(frozenset({ImplicitVRLittleEndian})) == ImplicitVRLittleEndian
    assert target_syntax(frozenset({ExplicitVRBigEndian})) is None
