"""Compressed retrieve against a real Orthanc archive: instances it holds uncompressed are fetched
by WADO-RS as JPEG-LS lossless; a destination taking only uncompressed syntaxes gets the very
same pixels, one taking JPEG-LS gets JPEG-LS, and a syntax the archive refuses is asked once.

Orthanc's listing does not say how it holds an instance, so the first instance of each series is
fetched alone as held, to tell; the others follow as JPEG-LS, the series in one request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid as uids

from agent.serve import codecs
from tests.conftest import OrthancFactory, StoreSCPFactory
from tests.integration.test_serve import load, received, serve_agent, uid, wado_requests
from tests.support import datasets, dcmtk
from tests.support.faultproxy import FaultProxy
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
    # per series: its first instance alone, as held (to tell how the series is held), then
    # the rest in one request for the series
    assert len(refusals) == 1, "HTJ2K refused for the first series' request, not asked again"
    assert after_first == 1 + len(refusals) + 1
    assert after_second - after_first == 2, "HTJ2K not asked again"
    assert log.count("the archive refused") == 1
    got = received(destination.out_dir)
    syntaxes = [datasets.transfer_syntax(p) for p in got.values()]
    assert syntaxes.count(uids.JPEGLSLossless) == len(got) - 2, "all but each series' first"
    assert same_pixels(got, first + second)


def cached_syntaxes(data_dir: Path) -> list[str]:
    return [
        str(pydicom.filereader.read_file_meta_info(p).TransferSyntaxUID)
        for p in (data_dir / "cache").glob("??/*.dcm")
    ]


def test_auto_fetches_compressed_over_a_slow_link_and_as_held_over_a_fast_one(
    tmp_path: Path, tmp_data_dir: Path, orthanc: OrthancFactory, storescp: StoreSCPFactory
) -> None:
    archive = orthanc(aet="ARCHIVE")
    series = datasets.ct_series(tmp_path / "ct", slices=12, rows=512, cols=512, seed=74)
    load(archive, series)
    study = f"StudyInstanceUID={uid(series[0])}"
    destination = storescp(ae="ANY")
    with FaultProxy(LOOPBACK, archive.http_port) as link:
        link.throttle(4_000_000)  # 32 Mbit/s, shared by the fetches in flight
        url = link.url_for("/dicom-web")
        with serve_agent(tmp_data_dir / "slow", url, destination) as agent:
            slow = dcmtk.movescu(agent.port, [study], "ANY")
            log = agent.log_tail()
    with serve_agent(tmp_data_dir / "fast", archive.dicomweb_url, destination) as agent:
        fast = dcmtk.movescu(agent.port, [study], "ANY")
        log += agent.log_tail()

    assert dcmtk.final_status(slow) == SUCCESS, slow.stdout[-3000:] + log
    assert dcmtk.final_status(fast) == SUCCESS, fast.stdout[-3000:] + log
    over_slow = cached_syntaxes(tmp_data_dir / "slow")
    assert len(over_slow) == len(series)
    assert over_slow.count(uids.JPEGLSLossless) >= len(series) // 2, over_slow
    over_fast = cached_syntaxes(tmp_data_dir / "fast")
    # loopback gives one fetch of a 0.5 MB slice far more than 100 Mbit/s, even on a busy
    # machine; the bound leaves room for a few slow fetches there, never for most
    assert over_fast.count(uids.ExplicitVRLittleEndian) > len(series) // 2, over_fast
    assert same_pixels(received(destination.out_dir), series)
