"""Retrieve over a real slow link: an Orthanc archive behind a shaped port of a network namespace
(a token bucket each way, tests/support/netns.py), with Dirigo, the PACSes and DCMTK's movescu
and getscu in the namespace too, all on its loopback. With `serve.fetch_syntax: auto` Dirigo
measures the link on its first fetch, finds it slow and fetches the rest as JPEG-LS lossless: a
PACS that takes JPEG-LS receives JPEG-LS, one that takes only uncompressed syntaxes receives the
very pixels the archive holds, fewer bytes than the study's cross the link, and `dirigo status`
and `/status` say what was chosen and by what rate."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from pydicom import uid as uids

from agent.serve.fetchsyntax import FAST_FETCH
from tests.integration.test_serve import load, received, serve_agent, uid
from tests.integration.test_serve_fetchsyntax import same_pixels
from tests.support import datasets, dcmtk
from tests.support.agent import Agent
from tests.support.net import free_port
from tests.support.netns import ShapedNamespace, available
from tests.support.orthanc import Orthanc
from tests.support.process import stop_process

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

SUCCESS = 0x0000
LINK_MBIT = 20
UNCOMPRESSED = {uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian}


@dataclass(frozen=True)
class Pacs:
    ae: str
    port: int
    out_dir: Path


@dataclass(frozen=True)
class Site:
    """Everything inside the namespace: the archive behind the link, Dirigo and a PACS that
    takes every syntax (ANY); `series` is the study the archive holds."""

    link: ShapedNamespace
    archive: Orthanc
    agent: Agent
    health: str
    pacs: Pacs
    series: list[Path]


@pytest.fixture
def site(tmp_path: Path, tmp_data_dir: Path) -> Iterator[Site]:
    series = datasets.ct_series(tmp_path / "ct", slices=10, rows=512, cols=512, seed=81)
    with (
        ShapedNamespace() as link,
        link.inside(),
        contextlib.ExitStack() as stack,
    ):
        pacs = Pacs("ANY", free_port(), tmp_path / "any")
        stack.callback(stop_process, dcmtk.start_storescp(pacs.out_dir, pacs.port, pacs.ae))
        archive = stack.enter_context(Orthanc(aet="ARCHIVE"))
        load(archive, series)  # over the fast loopback; the link is shaped from here on
        link.shape(archive.http_port, LINK_MBIT)
        agent = serve_agent(tmp_data_dir, archive.dicomweb_url, (pacs.ae, pacs.port))
        stack.enter_context(agent)
        yield Site(link, archive, agent, health_url(agent), pacs, series)


def health_url(agent: Agent) -> str:
    """Return the base URL of the agent's health server, from its config file."""
    listen = yaml.safe_load(agent.config_path.read_text())["health"]["listen"]
    return f"http://{listen}"


def test_a_slow_link_is_crossed_as_jpeg_ls_and_each_pacs_gets_the_archive_s_pixels(
    site: Site, tmp_path: Path
) -> None:
    study = f"StudyInstanceUID={uid(site.series[0])}"
    raw = sum(p.stat().st_size for p in site.series)
    before = sum(site.link.counters().values())
    moved = dcmtk.movescu(site.agent.port, [study], site.pacs.ae)
    crossed = sum(site.link.counters().values()) - before
    got = dcmtk.getscu(site.agent.port, [study], tmp_path / "get")  # uncompressed only
    log = site.agent.log_tail()
    cli = site.agent.status()["retrieve"]["fetch_syntax"]
    served = requests.get(f"{site.health}/status", timeout=30).json()["retrieve"]

    assert dcmtk.final_status(moved) == SUCCESS, moved.stdout[-3000:] + log
    assert dcmtk.final_status(got) == SUCCESS, got.stdout[-3000:] + log
    assert crossed < raw / 2, (crossed, raw)
    moved_in = received(site.pacs.out_dir)
    syntaxes = sorted(datasets.transfer_syntax(p) for p in moved_in.values())
    assert syntaxes.count(uids.JPEGLSLossless) == len(site.series) - 1, "all but the measure"
    assert same_pixels(moved_in, site.series)
    got_in = received(tmp_path / "get")
    assert {datasets.transfer_syntax(p) for p in got_in.values()} <= UNCOMPRESSED
    assert same_pixels(got_in, site.series)
    assert cli["asks"] == uids.JPEGLSLossless and cli["setting"] == "auto", cli
    assert 0 < cli["link_rate_bytes_per_s"] < FAST_FETCH and "below 100 Mbit/s" in cli["why"]
    assert cli["refused"] == []
    assert served == {"fetch_syntax": cli}
    text = subprocess.run(
        site.agent.command("status"), capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert f"retrieve   fetching as {uids.JPEGLSLossless.name}: the link measured" in text
