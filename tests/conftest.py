"""Fixtures shared by every test: real peers, DICOM data and temporary directories.

Nothing is skipped when a peer is missing: the test fails and says to run
scripts/setup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from pynetdicom import _config

from tests.support import datasets, dcmtk
from tests.support.devcloud import HeartbeatReceiver
from tests.support.net import free_port
from tests.support.orthanc import Modalities, Orthanc, OrthancMissing
from tests.support.process import stop_process
from tests.support.tus import TusServer, TusServerMissing

OrthancFactory = Callable[..., Orthanc]

# Hypothesis fails an example that takes over 200 ms by default: a deadline measures the machine's
# load (CI shares two cores with Orthanc and the tus server), not the code under test.
settings.register_profile("dirigo", deadline=None)
settings.load_profile("dirigo")


@dataclass(frozen=True)
class StoreSCP:
    """A running DCMTK storescp: where it listens and where it writes."""

    port: int
    ae: str
    out_dir: Path


StoreSCPFactory = Callable[..., StoreSCP]


@pytest.fixture(autouse=True)
def whole_received_data_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test with pynetdicom keeping each received data set in memory, its own
    default. Building the agent's AE in this process (unit tests do) makes every acceptor in
    the process stream data sets to files instead, and a test's own storage SCP then finds
    none in `event.request.DataSet` (its digests become those of empty data sets)."""
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    """Return an empty directory to use as a Dirigo `data_dir`."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return data_dir


@pytest.fixture
def orthanc() -> Iterator[OrthancFactory]:
    """Return a factory that starts Orthanc servers; all are stopped after the test.

    `orthanc(aet="ORTHANC", modalities={"dirigo": ["DIRIGO", "127.0.0.1", port]},
    dicomweb=True, extra_config={...}) -> Orthanc`, already answering.
    """
    started: list[Orthanc] = []

    def start(aet: str = "ORTHANC", modalities: Modalities | None = None, **kwargs: Any) -> Orthanc:
        try:
            server = Orthanc(aet, modalities, **kwargs)
        except OrthancMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.terminate()  # all at once: each takes seconds to shut down
    for server in started:
        server.stop()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCPFactory]:
    """Return a factory that starts DCMTK storescp peers; all are stopped after the test.

    `storescp(ae="STORESCP", extra_args=("+xa",), echo_args=()) -> StoreSCP`, already
    answering C-ECHO (sent with `echo_args`), writing into a fresh directory under tmp_path.
    """
    procs = []

    def start(
        ae: str = "STORESCP",
        extra_args: tuple[str, ...] = ("+xa",),
        echo_args: tuple[str, ...] = (),
    ) -> StoreSCP:
        port = free_port()
        out_dir = tmp_path / f"storescp-{ae}-{port}"
        try:
            procs.append(dcmtk.start_storescp(out_dir, port, ae, extra_args, echo_args=echo_args))
        except dcmtk.ToolMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        return StoreSCP(port, ae, out_dir)

    yield start
    for proc in procs:
        stop_process(proc)


@pytest.fixture(scope="session")
def ct_series_500(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Return the 500-slice synthetic CT (≈263 MB), cached in pytest's cache directory."""
    cache = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`
    out_dir = cache.mkdir("ct_series_500") if cache else tmp_path_factory.mktemp("ct")
    return datasets.ct_series(out_dir, slices=500)


@pytest.fixture(scope="session")
def real_dicom_files() -> list[Path]:
    """Return pydicom-data's sound Part-10 storage instances (see datasets.real_files)."""
    return datasets.real_files()


TusServerFactory = Callable[..., TusServer]


@pytest.fixture
def tus_server(tmp_path: Path) -> Iterator[TusServerFactory]:
    """Return a factory that starts official tus servers; all are stopped after the test.

    `tus_server(directory=None) -> TusServer`, already answering, on a free
    loopback port, keeping its uploads in `directory` (by default a fresh one
    under tmp_path).
    """
    started: list[TusServer] = []

    def start(directory: Path | None = None, **kwargs: Any) -> TusServer:
        if directory is None:
            directory = tmp_path / f"tus-{len(started)}"
        try:
            server = TusServer(directory, **kwargs)
        except TusServerMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def heartbeat_receiver(tmp_path: Path) -> Iterator[HeartbeatReceiver]:
    """Return the development cloud's heartbeat receiver, alone, already listening."""
    receiver = HeartbeatReceiver(tmp_path / "heartbeat.log")
    receiver.start()
    yield receiver
    receiver.stop()
