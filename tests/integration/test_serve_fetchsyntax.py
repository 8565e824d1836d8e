"""Compressed retrieve against a real Orthanc archive: instances it holds uncompressed are fetched
by WADO-RS as JPEG-LS lossless; a destination taking only uncompressed syntaxes gets the very
same pixels, one taking JPEG-LS gets JPEG-LS, and a syntax the archive refuses is asked once.

Orthanc's listing does not say how it holds an instance, so the first instance of each series is
fetched as held, to tell; the others follow as JPEG-LS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid as uids

from agent.serve import codecs
from tests.conftest import OrthancFactory, StoreSCPFactory
from tests.integration.test_serve import load, received, serve_agent, uid, wado_requests
from tests.support import datasets, dcmtk
from tests.support.httpfaults import HttpFaults
from tests.support.net import LOOPBACK

SUCCESS = 0x0000


def pixels(path: Path) -> np.ndarray:
    codecs.register()
    return pydicom.dcmread(path).pixel_array


def same_pixels(got: dict[str, Path], series: list[Path]) -> bool:
    originals = {uid(p, "SOPInstanceUID"): p for p in series}
    return set(got) == set(originals) and all(
        np.array_equal(pixels(got[k]), pixels(p)) for k, p in originals.items()
    )


def test_uncompressed_instances_are_fetched_as_jpeg_ls_and_delivered_with_the_same_pixels(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=6, rows=64, cols=64, seed=71)
    load(archive, series)
    study = f"StudyInstanceUID={uid(series[0])}"
    plain, any_syntax = storescp(ae="PLAIN", extra_args=()), storescp(ae="ANY")
    with serve_agent(
        tmp_data_dir, archive.dicomweb_url, plain, any_syntax, fetch_syntax="jpeg-ls"
    ) as agent:
        to_plain = dcmtk.movescu(agent.port, [study], "PLAIN")
        to_any = dcmtk.movescu(agent.port, [study], "ANY")
        log = agent.log_tail()
    cached = [
        str(pydicom.filereader.read_file_meta_info(p).TransferSyntaxUID)
        for p in (tmp_data_dir / "cache").glob("??/*.dcm")
    ]

    assert dcmtk.final_status(to_plain) == SUCCESS, to_plain.stdout[-3000:] + log
    assert dcmtk.final_status(to_any) == SUCCESS, to_any.stdout[-3000:] + log
    assert sorted(cached) == sorted(
        [uids.ExplicitVRLittleEndian] + [uids.JPEGLSLossless] * (len(series) - 1)
    ), "the series' first as held, to tell; the others compressed"
    got_plain = received(plain.out_dir)
    assert {datasets.transfer_syntax(p) for p in got_plain.values()} <= {
        uids.ExplicitVRLittleEndian,
        uids.ImplicitVRLittleEndian,
    }
    assert same_pixels(got_plain, series)
    got_any = received(any_syntax.out_dir)
    assert sorted(datasets.transfer_syntax(p) for p in got_any.values()) == sorted(cached)
    assert same_pixels(got_any, series)


def test_a_syntax_the_archive_refuses_is_remembered_and_the_next_one_asked(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    first = datasets.ct_series(tmp_path / "a", slices=6, rows=32, cols=32, seed=72)
    second = datasets.ct_series(tmp_path / "b", slices=6, rows=32, cols=32, seed=73)
    load(archive, first + second)
    destination = storescp(ae="ANY")
    with HttpFaults(LOOPBACK, archive.http_port) as faults:
        url = faults.url_for("/dicom-web")
        with serve_agent(tmp_data_dir, url, destination, fetch_syntax="htj2k") as agent:
            one = dcmtk.movescu(agent.port, [f"StudyInstanceUID={uid(first[0])}"], "ANY")
            after_first = wado_requests(faults)
            refusals = [e for e in faults.exchanges("GET") if e.status == 400]
            two = dcmtk.movescu(agent.port, [f"StudyInstanceUID={uid(second[0])}"], "ANY")
            log = agent.log_tail()
        after_second = wado_requests(faults)

    assert dcmtk.final_status(one) == SUCCESS, one.stdout[-3000:] + log
    assert dcmtk.final_status(two) == SUCCESS, two.stdout[-3000:] + log
    assert refusals, "Orthanc refuses HTJ2K with 400"
    assert after_first == len(first) + len(refusals)
    assert after_second - after_first == len(second), "HTJ2K not asked again"
    assert log.count("the archive refused") == 1
    got = received(destination.out_dir)
    syntaxes = [datasets.transfer_syntax(p) for p in got.values()]
    assert syntaxes.count(uids.JPEGLSLossless) == len(got) - 2, "all but each series' first"
    assert same_pixels(got, first + second)
