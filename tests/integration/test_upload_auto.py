"""`upload.transcode: auto` against a real link: the tus server and `dirigo run` inside a network
namespace whose tus port is shaped to 20 Mbit/s, then made fast again; the codec chosen for the
next part follows the link."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from agent.codecchoice import FRESH
from tests.support import bundles, datasets, dcmtk
from tests.support.agent import Agent
from tests.support.net import LOOPBACK, wait_until
from tests.support.netns import ShapedNamespace, available
from tests.support.tus import StoredUpload, TusServer

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

SLICES = 40
"""A 21 MB CT part: over PROBED_SIZE, so a stale measure of the link is probed again."""


def _send_part(agent: Agent, tus: TusServer, series: list[Path], count: int) -> StoredUpload:
    """Send `series` (one study) and return its upload once complete and the part sent."""
    result = dcmtk.storescu(series, agent.port)
    assert len(dcmtk.acknowledged(result)) == len(series)
    wait_until(lambda: agent.status()["studies"]["sent"] == count, 120, what="the part sent")
    ours = [u for u in tus.uploads() if u.complete and u.metadata.get("study_uid")]
    (upload,) = [u for u in ours if u.metadata["study_uid"] == _study_uid(series)]
    return upload


def _study_uid(series: list[Path]) -> str:
    from pydicom import dcmread

    return str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)


def _last_choice(agent: Agent) -> dict[str, Any]:
    transcode = agent.status()["transcode"]
    assert transcode["setting"] == "auto"
    choice: dict[str, Any] = transcode["last_choice"]
    return choice


def test_auto_compresses_behind_a_slow_link_and_not_once_the_link_is_fast(
    tmp_path: Path, tmp_data_dir: Path
) -> None:
    slow_series = datasets.ct_series(tmp_path / "ct-a", slices=SLICES, seed=11)
    fast_series = datasets.ct_series(tmp_path / "ct-b", slices=SLICES, seed=12)
    with ShapedNamespace() as link, link.inside():
        with TusServer(tmp_path / "uploads") as tus:
            link.shape(tus.port, mbit=20)
            agent = Agent(
                tmp_data_dir,
                peers=({"ae_title": "PACS", "host": LOOPBACK},),
                stable_after="1s",
                extra={"cloud": {"upload_url": tus.url}, "upload": {"chunk_size": "1MiB"}},
            )
            with agent:
                slow = _send_part(agent, tus, slow_series, 1)
                behind_slow = _last_choice(agent)
                link.unshape()
                # the shaped PATCHes stop describing the link after FRESH seconds; the next
                # part of more than PROBED_SIZE then probes it again
                time.sleep(FRESH + 1)
                fast = _send_part(agent, tus, fast_series, 2)
                behind_fast = _last_choice(agent)
                log = agent.log_tail(200_000)
                text = subprocess.run(
                    agent.command("status"), capture_output=True, text=True, check=True, timeout=60
                ).stdout
                listen = yaml.safe_load(agent.config_path.read_text())["health"]["listen"]
                served = requests.get(f"http://{listen}/status", timeout=30).json()
        probes = [u for u in tus.uploads() if u.metadata.get("probe")]

    slow_codec = bundles.manifest(slow.data())["transcode"]
    fast_codec = bundles.manifest(fast.data())["transcode"]
    assert slow_codec in ("jpeg-ls", "htj2k"), behind_slow
    assert fast_codec == "none", behind_fast
    assert behind_slow["reason"].startswith(f"part 1: {slow_codec}: est. "), behind_slow
    assert behind_fast["reason"].startswith("part 1: none: est. "), behind_fast
    assert behind_fast["study_uid"] == _study_uid(fast_series)
    # the reasons carry the rates measured: about 20 Mbit/s, then far more
    slow_rate = float(behind_slow["reason"].rsplit(" at ", 1)[1].split()[0])
    fast_rate = float(behind_fast["reason"].rsplit(" at ", 1)[1].split()[0])
    assert 10 < slow_rate < 25 and fast_rate > 100, (behind_slow, behind_fast)
    assert probes == [], "probe uploads are terminated, never left behind"
    assert log.count("est. ") >= 2
    assert served["transcode"] == {"setting": "auto", "last_choice": behind_fast}
    (line,) = [line for line in text.splitlines() if line.startswith("transcode  ")]
    assert line == f"transcode  auto, last {behind_fast['study_uid']} {behind_fast['reason']}"
