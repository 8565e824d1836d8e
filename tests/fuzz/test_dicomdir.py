"""A DICOMDIR dropped into a watch folder (a CD's index) is untrusted input: whatever its bytes,
the watch imports what it can and moves everything out of the folder, a DICOMDIR it cannot read
goes to `rejected/` with `unreadable DICOMDIR: ...` beside it and the files are then imported
one by one; nothing stops the watch."""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given

from agent.config import WatchDir
from agent.importer import Importer
from agent.watch import REASON_SUFFIX
from tests.fuzz.support import budget, corpus, mutated
from tests.unit.test_watch import SETTLE, _importer, cd_file_set, watch


@functools.cache
def file_set() -> dict[str, bytes]:
    """A CD's file set: two instances and the DICOMDIR listing them, {relative path: bytes}.
    (tests/fuzz/corpus/dicomdir/seed-two-instances.DICOMDIR is this DICOMDIR.)"""
    with tempfile.TemporaryDirectory() as directory:
        cd_file_set(2).write(directory)
        root = Path(directory)
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def importer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Importer]:
    """One gateway for the module (a fresh spool and store per example would cost a second)."""
    yield from _importer(tmp_path_factory.mktemp("data"), high_water=100.0)


@contextlib.contextmanager
def taken(importer: Importer, dicomdir: bytes) -> Iterator[WatchDir]:
    """Drop the file set with `dicomdir` as its DICOMDIR into a fresh watch folder, let the watch
    take it, check that nothing is left behind, every file went to done/ or rejected/ and every
    refusal says why; yield the folder."""
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        folder = WatchDir(path=base / "inbox", done=base / "done", rejected=base / "rejected")
        delivery = folder.path / "CD"
        for name, data in {**file_set(), "DICOMDIR": dicomdir}.items():
            (delivery / name).parent.mkdir(parents=True, exist_ok=True)
            (delivery / name).write_bytes(data)
        watcher = watch(folder, importer)
        watcher.scan(0.0)
        watcher.scan(SETTLE)
        assert [p for p in folder.path.rglob("*") if p.is_file()] == [], "files left behind"
        for path in folder.rejected.rglob("*"):
            if path.is_file() and not path.name.endswith(REASON_SUFFIX):
                assert path.with_name(path.name + REASON_SUFFIX).read_text().strip(), path
        yield folder


@budget(60)
@given(mutated(file_set()["DICOMDIR"], start=132))
def test_any_dicomdir_leaves_nothing_behind_and_names_each_refusal(
    importer: Importer, dicomdir: bytes
) -> None:
    with taken(importer, dicomdir):
        pass


@pytest.mark.parametrize("path", corpus("dicomdir"), ids=lambda p: p.stem)
def test_each_dicomdir_in_the_corpus_gets_its_documented_answer(
    importer: Importer, path: Path
) -> None:
    """The seed is read and both instances imported; each DICOMDIR that broke a parser is
    rejected as unreadable, and the instances it should have listed are imported on their own."""
    with taken(importer, path.read_bytes()) as folder:
        assert len(list(folder.done.glob("CD/PT*/*/*/*"))) == 2  # imported, listed or not
        if path.name.startswith("seed"):
            assert (folder.done / "CD" / "DICOMDIR").exists()
        else:
            reason = folder.rejected / "CD" / f"DICOMDIR{REASON_SUFFIX}"
            assert reason.read_text().startswith("unreadable DICOMDIR: ")
