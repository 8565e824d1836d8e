"""A plain install serves a PACS that takes only uncompressed data: Dirigo installed by
`pip install` with no extra, in a fresh virtualenv, retrieves JPEG 2000, JPEG lossless, JPEG-LS
and RLE studies from a real Orthanc archive to a DCMTK storescp (C-MOVE) and getscu (C-GET) that
offer only uncompressed syntaxes, with the pixels GDCM's `gdcmconv --raw` decodes from the
archive's originals: a decoder that is not Dirigo's, nor pydicom's.

The codecs were once an extra: a plain install answered these retrievals with "missing
dependencies" and 0xB000 / 0xA702. The virtualenv is made once for the module (its install
takes 17-35 s on a 2-core machine, wheels from pip's cache)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid as uids
from pydicom.pixels import pixel_array

from tests.conftest import OrthancFactory, StoreSCPFactory
from tests.integration.test_serve import load, received, serve_agent, uid
from tests.integration.test_serve_fetchsyntax import cached_syntaxes
from tests.support import datasets, dcmtk

ROOT = Path(__file__).resolve().parents[2]
SUCCESS = 0x0000
LOSSLESS = {
    uids.JPEG2000Lossless: ["693_J2KR.dcm", "US1_J2KR.dcm", "MR2_J2KR.dcm"],
    uids.JPEGLosslessSV1: ["JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG-LL.dcm"],
    uids.JPEGLSLossless: ["emri_small_jpeg_ls_lossless.dcm"],
    uids.RLELossless: ["OBXXXX1A_rle.dcm", "emri_small_RLE.dcm"],
}
"""pydicom-data's files, by their lossless syntax: signed CT, YBR_RCT colour, 12 of 16 bits,
8-bit, palette colour, multi-frame."""
RENAMED = {"emri_small_RLE.dcm"}
"""The same SOP instance as the JPEG-LS file, in another syntax: the archive would keep one of
the two, so this one gets UIDs of its own (its pixel data untouched)."""
UNCOMPRESSED = {uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian}


@pytest.fixture(scope="module")
def plain_dirigo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Return the `dirigo` of a fresh virtualenv where the checkout was installed plainly."""
    work = tmp_path_factory.mktemp("plain-install")
    # the sources the package is built from, copied: the checkout stays clean
    source = work / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "agent", source / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    venv = work / "venv"
    # no PYTHONPATH: it would put the test run's checkout before what the venv holds
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=120)
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*install, str(source)], check=True, env=env, cwd=work, timeout=600)
    print(f"fresh venv with a plain install: {time.monotonic() - started:.1f} s")
    where = subprocess.run(
        [python, "-c", "import agent; print(agent.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=work,
    ).stdout
    assert where.startswith(str(venv)), f"the venv imports the agent from {where}"
    yield venv / "bin" / "dirigo"


def originals(work: Path) -> dict[str, Path]:
    """Return the files the archive will hold, by SOP Instance UID, each in a lossless syntax."""
    found: dict[str, Path] = {}
    for syntax, names in LOSSLESS.items():
        for name in names:
            path = datasets.pydicom_data_dir() / name
            assert datasets.transfer_syntax(path) == syntax, name
            # never lossy-compressed before, either: the pixels are the very ones acquired
            assert pydicom.dcmread(path).get("LossyImageCompression") != "01", name
            if name in RENAMED:
                ds = pydicom.dcmread(path)
                for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                    setattr(ds, keyword, pydicom.uid.generate_uid())
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                path = work / name
                ds.save_as(path, enforce_file_format=True)
            found[uid(path, "SOPInstanceUID")] = path
    return found


def gdcm_pixels(path: Path, work: Path) -> tuple[np.ndarray, str]:
    """Return `path`'s pixels and photometric interpretation as GDCM decodes them."""
    out = work / f"{path.name}.gdcm-raw"
    subprocess.run(["gdcmconv", "--raw", str(path), str(out)], check=True, timeout=120)
    return uncompressed_pixels(out)


def uncompressed_pixels(path: Path) -> tuple[np.ndarray, str]:
    """The pixels of an uncompressed file, read as stored (no codec, no colour conversion)."""
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID in UNCOMPRESSED, f"{path.name} is compressed"
    return pixel_array(ds, raw=True), str(ds.PhotometricInterpretation)


@pytest.mark.parametrize("operation", ["C-MOVE", "C-GET"])
def test_a_plain_install_decompresses_every_lossless_syntax_for_an_uncompressed_only_pacs(
    operation: str,
    plain_dirigo: Path,
    tmp_path: Path,
    tmp_data_dir: Path,
    orthanc: OrthancFactory,
    storescp: StoreSCPFactory,
) -> None:
    files = originals(tmp_path)
    archive = orthanc(aet="ARCHIVE")
    load(archive, list(files.values()))
    studies = sorted({uid(p) for p in files.values()})
    plain = storescp(ae="PLAIN", extra_args=())  # storescp's default: uncompressed only
    got_dir = tmp_path / "got"
    agent = serve_agent(tmp_data_dir, archive.dicomweb_url, plain)
    agent.program = (str(plain_dirigo),)
    agent.env = {k: v for k, v in agent.env.items() if k != "PYTHONPATH"}
    with agent:
        results = [
            dcmtk.movescu(agent.port, [f"StudyInstanceUID={study}"], "PLAIN")
            if operation == "C-MOVE"
            else dcmtk.getscu(agent.port, [f"StudyInstanceUID={study}"], got_dir)
            for study in studies
        ]
        log = agent.log_tail()
    cached = set(cached_syntaxes(tmp_data_dir))

    for result in results:
        assert dcmtk.final_status(result) == SUCCESS, result.stdout[-3000:] + log
    assert cached == set(LOSSLESS), "Dirigo fetched the originals, compressed, and decoded them"
    got = received(plain.out_dir if operation == "C-MOVE" else got_dir)
    assert set(got) == set(files)
    for sop_instance, original in files.items():
        pixels, photometric = uncompressed_pixels(got[sop_instance])
        expected, expected_photometric = gdcm_pixels(original, tmp_path)
        assert photometric == expected_photometric, original.name
        assert pixels.dtype == expected.dtype and pixels.shape == expected.shape, original.name
        assert np.array_equal(pixels, expected), f"{original.name}: pixels differ from GDCM's"
