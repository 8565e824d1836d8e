"""DICOM instances are untrusted input wherever they come from: a C-STORE into the receiver (a
dataset, its File Meta made by the agent from the association), a file given to `dirigo send` or
dropped into a watch folder (File Meta and dataset both as the file has them).

Seeds are real files (pydicom-data, module `data_store`, in many transfer syntaxes and SOP
classes) and the corpus (tests/fuzz/corpus/dicom), mutated byte by byte. Whatever the bytes,
each input gets one of the answers README.md documents, and nothing else happens: Success, or
0xC210 (malformed), 0xC211 (a required UID missing or invalid), 0xC212 (SOP Instance UID
differs from the request's) with a quarantined copy; from disk `stored`/`duplicate`/`replaced`,
`quarantined` with its reason, or `skipped` for a file that was never DICOM. Never 0x0110 (an
internal error), never a failure of the gateway itself, and the agent keeps answering.

The corpus files' names give their answer: `ok-`, `c210-`, `c211-`, `c212-`, `skip-`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from agent import instance
from agent.importer import ACCEPTED, Importer, Result
from agent.instance import InvalidInstance
from tests.fuzz.support import budget, corpus, mutated
from tests.support import datasets
from tests.support.agent import Agent
from tests.unit.test_watch import _importer

STATUS_OF = {"ok": 0x0000, "c210": 0xC210, "c211": 0xC211, "c212": 0xC212}
DOCUMENTED = frozenset(STATUS_OF.values())
RESULT_OF = {"ok": Result.STORED, "skip": Result.SKIPPED}


def expected(path: Path) -> str:
    return path.name.split("-", 1)[0]


@functools.cache
def seeds() -> tuple[tuple[str, bytes, int], ...]:
    """(name, bytes, where the dataset starts) of each seed: the real files of pydicom-data up
    to 64 KiB, broken ones included, and the corpus's DICOM files."""
    paths = [p for p in datasets.real_files() + datasets.broken_files() if p.stat().st_size < 65536]
    paths += [p for p in corpus("dicom") if expected(p) != "skip"]
    found = []
    for path in paths:
        data = path.read_bytes()
        try:
            with path.open("rb") as f:
                start = instance.dataset_offset(f, len(data))
        except InvalidInstance:
            start = 132  # no sound File Meta: mutate everything after the prefix
        found.append((path.name, data, start))
    return tuple(found)


@st.composite
def mutated_seed(draw: st.DrawFn, whole: bool) -> tuple[str, bytes]:
    """A seed mutated in its dataset only (`whole` False: what a C-STORE can carry, the File Meta
    being the agent's) or anywhere past the preamble (`whole` True: a file on disk)."""
    name, data, start = draw(st.sampled_from(seeds()))
    return name, draw(mutated(data, start=128 if whole else start))


def written(folder: Path, seed: tuple[str, bytes]) -> Path:
    """Write a mutated seed into `folder` under its seed's name; return its path."""
    name, data = seed
    (folder / name).write_bytes(data)
    return folder / name


# --- from disk: the importer behind `dirigo send` and the watch folders ----------------------


@pytest.fixture(scope="module")
def importer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Importer]:
    yield from _importer(tmp_path_factory.mktemp("data"), high_water=100.0)


def check_import(importer: Importer, path: Path) -> Result:
    imported = importer.import_file(path)
    assert imported.result is not Result.FAILED, imported.reason  # the gateway never fails
    if imported.result in (Result.QUARANTINED, Result.SKIPPED):
        assert imported.reason
    return imported.result


@budget(200)
@given(mutated_seed(whole=True))
def test_any_file_imports_or_gets_a_named_refusal(
    importer: Importer, tmp_path: Path, seed: tuple[str, bytes]
) -> None:
    path = written(tmp_path, seed)
    result = check_import(importer, path)
    try:
        instance.inspect(path)
    except InvalidInstance:
        assert result in (Result.QUARANTINED, Result.SKIPPED)
    else:
        assert result in (Result.STORED, Result.DUPLICATE, Result.REPLACED)
    # what transcoding and retrieval read of a spooled file
    with path.open("rb") as f, contextlib.suppress(InvalidInstance, ValueError):
        instance.layout(f, path.stat().st_size, {0x7FE00010, 0x00080018})


@pytest.mark.parametrize("path", corpus("dicom"), ids=lambda p: p.name)
def test_each_corpus_file_imports_with_its_documented_result(
    importer: Importer, path: Path
) -> None:
    result = check_import(importer, path)
    kind = expected(path)
    if kind == "ok":  # replaced: a mutated copy with its UID may have come first
        assert result in ACCEPTED
    else:
        assert result is RESULT_OF.get(kind, Result.QUARANTINED)


def test_dirigo_send_of_the_corpus_names_every_refusal_and_exits_1(agent: Agent) -> None:
    """`dirigo send` beside the running agent, as an operator imports a CD."""
    files = corpus("dicom")
    result = subprocess.run(
        agent.command("send", str(files[0].parent)), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    counts = {name: int(n) for n, name in re.findall(r"(\d+) (\w+)", summary.split(":", 1)[1])}
    kinds = [expected(p) for p in files]
    assert summary.startswith(f"{len(files)} file(s): ")
    assert counts["stored"] + counts["duplicate"] + counts["replaced"] == kinds.count("ok"), summary
    assert counts["skipped"] == kinds.count("skip"), summary
    assert counts["quarantined"] == len(files) - kinds.count("ok") - kinds.count("skip")
    assert counts["failed"] == 0, summary
    assert "not a DICOM Part-10 file" in summary and "nested too deep" in summary


# --- from the network: C-STORE into the running agent ----------------------------------------


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with Agent(tmp_path_factory.mktemp("agent") / "data") as running:
        yield running


def c_store(port: int, path: Path) -> int:
    """C-STORE the file's dataset bytes exactly as they are, in the file's own transfer syntax
    and SOP class (pynetdicom streams them from the file, parsing nothing but the File Meta);
    return the status, or -1 if the agent did not accept the presentation context."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DIRIGO")
        assert assoc.is_established, "association refused"
        try:
            if not assoc.accepted_contexts:
                return -1
            response = assoc.send_c_store(path)
            assert assoc.is_established, "the association did not survive the input"
            return int(response.Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


@budget(60)
@given(mutated_seed(whole=False))
def test_any_dataset_by_c_store_gets_a_documented_status(
    agent: Agent, tmp_path: Path, seed: tuple[str, bytes]
) -> None:
    path = written(tmp_path, seed)
    try:
        read_file_meta_info(path)
    except Exception:  # a broken seed's File Meta: nothing pynetdicom would send
        return
    status = c_store(agent.port, path)
    assert status in DOCUMENTED | {-1}, f"0x{status:04X}\n{agent.log_tail()}"


@pytest.mark.parametrize(
    "path", [p for p in corpus("dicom") if expected(p) != "skip"], ids=lambda p: p.name
)
def test_each_corpus_dataset_by_c_store_gets_its_documented_status(
    agent: Agent, path: Path
) -> None:
    assert c_store(agent.port, path) == STATUS_OF[expected(path)], agent.log_tail()


def test_after_all_that_the_agent_still_answers_and_logged_no_internal_error(
    agent: Agent,
) -> None:
    assert agent.proc is not None and agent.proc.poll() is None
    log = agent.log_tail(1_000_000)
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]
    notes = list((agent.data_dir / "quarantine").glob("*.json"))
    assert notes, "nothing was quarantined"
