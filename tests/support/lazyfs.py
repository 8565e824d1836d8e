"""LazyFS: a FUSE file system that loses every write not fsynced, on command (power loss).

LazyFS (INESC TEC, MIT licence; source in tests/tools/lazyfs-src.tar.gz, built by scripts/setup
into .cache/lazyfs) keeps every write in a page cache of its own and passes it to a backing
directory only on fsync/fdatasync. Its fault command `lazyfs::clear-cache` drops that cache: the
backing directory then holds exactly what was synced, as a disk does after the power went.

What it models: file data and sizes. A file written or extended without fsync comes back empty
or cut to its last synced size. What it does not model: creations, renames, unlinks and mkdirs
go straight to the backing directory and always survive, and a directory fsync is a no-op; a
missing directory fsync is not caught here.

`LazyFS` mounts it on `mount_dir` over `root_dir`, in the foreground as a child process. A
faithful power loss is: SIGKILL every process that writes under the mount (`kill_tree`), then
`clear_cache()`, then `remount()`, then start the service again on the same mount.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO

import psutil

from tests.support.net import PeerExited, wait_until
from tests.support.process import stop_process, stopped_on_failure, tail

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / ".cache" / "lazyfs" / "lazyfs" / "build" / "lazyfs"
SETUP_HINT = "run scripts/setup to build LazyFS into .cache/lazyfs"
FUSE_DEVICE = Path("/dev/fuse")
_CLEARED = b"finished::clear-cache"


class LazyFSMissing(RuntimeError):
    """LazyFS is not built, or fusermount3 is not installed."""


def fuse_unavailable() -> str | None:
    """Return why this machine cannot mount a FUSE file system at all, or None if it can.

    Only a missing or unopenable /dev/fuse counts (a container started without the device): a
    missing LazyFS build or fusermount3 is a setup fault, reported by `LazyFS` as a failure.
    """
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR)
    except OSError as exc:
        return f"FUSE is not available here ({FUSE_DEVICE}: {exc.strerror})"
    os.close(fd)
    return None


def _config(faults: Path, done: Path, cache_size: str) -> str:
    # No eviction: the cache must hold every byte written between two power losses, or the
    # overflow would reach the backing directory unsynced and survive.
    return f"""\
[faults]
fifo_path = "{faults}"
fifo_path_completed = "{done}"
[cache]
apply_eviction = false
[cache.simple]
custom_size = "{cache_size}"
blocks_per_page = 1
[filesystem]
log_all_operations = false
logfile = ""
"""


class LazyFS:
    """LazyFS mounted on `work_dir/mnt` over `work_dir/root`, its cache `cache_size` (a LazyFS
    size such as "256mb": more than everything written between two power losses).

    Use as a context manager, or call `mount()` and `unmount()`. Raise LazyFSMissing when it is
    not built (see SETUP_HINT).
    """

    def __init__(self, work_dir: Path, cache_size: str = "256mb", timeout: float = 30.0) -> None:
        if not os.access(BINARY, os.X_OK):
            raise LazyFSMissing(f"LazyFS not built at {BINARY} ({SETUP_HINT})")
        fusermount = shutil.which("fusermount3")
        if fusermount is None:
            raise LazyFSMissing(f"fusermount3 not found ({SETUP_HINT})")
        self._fusermount_path = fusermount
        self.work_dir = work_dir
        self.root_dir = work_dir / "root"
        self.mount_dir = work_dir / "mnt"
        self.timeout = timeout
        self._faults = work_dir / "faults.fifo"
        self._done = work_dir / "done.fifo"
        self._config = work_dir / "lazyfs.toml"
        self._cache_size = cache_size
        self._proc: subprocess.Popen[bytes] | None = None
        self._done_fd: int | None = None
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in unmount)

    def mount(self) -> LazyFS:
        """Mount it; return once the mount is in place. Raise PeerExited or TimeoutError (with
        LazyFS's log) if it is not."""
        for directory in (self.root_dir, self.mount_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for fifo in (self._faults, self._done):
            if not fifo.exists():
                os.mkfifo(fifo, 0o600)
        self._config.write_text(_config(self._faults, self._done, self._cache_size))
        # LazyFS opens the notifier FIFO for writing at start-up, which blocks until a reader
        # holds it: the read end is ours, non-blocking, for `clear_cache` to poll.
        self._done_fd = os.open(self._done, os.O_RDONLY | os.O_NONBLOCK)
        self._log.write(b"--- mount ---\n")
        self._log.flush()
        self._proc = subprocess.Popen(
            [
                str(BINARY),
                str(self.mount_dir),
                "--config-path",
                self._config.name,
                "-o",
                "modules=subdir",
                "-o",
                f"subdir={self.root_dir}",
                "-f",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # LazyFS refuses a config path with "-o" anywhere in it (pytest's tmp_path has it):
            # the path is given relative to its own directory.
            cwd=self._config.parent,
        )
        with stopped_on_failure("LazyFS", self._stop, self.log_tail):
            wait_until(self._mounted, self.timeout, what=f"LazyFS mounted on {self.mount_dir}")
        return self

    def _mounted(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise PeerExited(f"LazyFS exited with {self._proc.returncode}:\n{self.log_tail()}")
        return os.path.ismount(self.mount_dir)

    def clear_cache(self) -> None:
        """Drop every write not fsynced (the power goes); return once LazyFS says it is done.

        Kill every process writing under the mount first: a survivor would write on after it.
        """
        assert self._done_fd is not None
        with open(self._faults, "wb") as fifo:  # LazyFS holds it open: this never blocks
            fifo.write(b"lazyfs::clear-cache\n")
        answer = bytearray()

        def cleared() -> bool:
            assert self._done_fd is not None
            with contextlib.suppress(BlockingIOError):
                answer.extend(os.read(self._done_fd, 4096))
            return _CLEARED in answer

        wait_until(cleared, self.timeout, 0.01, what="LazyFS clearing its cache")

    def remount(self) -> None:
        """Unmount and mount again over the same backing directory: the machine boots."""
        self.unmount(keep_log=True)
        self.mount()

    def unmount(self, keep_log: bool = False) -> None:
        """Unmount (waiting a bounded time for processes that just died to let go) and stop
        LazyFS; safe to call when not mounted. A mount still busy then is detached lazily, so
        that none outlives the test, and TimeoutError raised."""
        try:
            if os.path.ismount(self.mount_dir):
                wait_until(self._unmounted, self.timeout, 0.2, f"unmounting {self.mount_dir}")
        except TimeoutError:
            self._fusermount("-u", "-z")
            raise
        finally:
            self._stop()
            if not keep_log:
                self._log.close()

    def _unmounted(self) -> bool:
        return self._fusermount("-u") or not os.path.ismount(self.mount_dir)

    def _fusermount(self, *options: str) -> bool:
        done = subprocess.run(
            [self._fusermount_path, *options, str(self.mount_dir)], capture_output=True, check=False
        )
        return done.returncode == 0

    def _stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=self.timeout)
            self._proc = None
        if self._done_fd is not None:
            os.close(self._done_fd)
            self._done_fd = None

    def log_tail(self, limit: int = 4000) -> str:
        return tail(self._log, limit)

    def __enter__(self) -> LazyFS:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def kill_tree(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL `proc` and every process it started, all at once (a power loss stops every
    process, not one by one), and wait until each is gone; return how many were killed."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.kill()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait(timeout=10)
    # Children now belong to init, which may be slow to reap them: a zombie writes nothing.
    wait_until(lambda: not any(map(_alive, children)), 10, what="every child process killed")
    return 1 + len(children)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def writers_under(directory: Path) -> list[str]:
    """Return 'pid name' of every process with a file or working directory under `directory`."""
    inside = str(directory.resolve()) + os.sep
    found = []
    for process in psutil.process_iter(["pid", "name"]):
        with contextlib.suppress(psutil.Error):
            paths = [f.path for f in process.open_files()]
            paths.append(process.cwd())
            if any(p.startswith(inside) for p in paths):
                found.append(f"{process.info['pid']} {process.info['name']}")
    return found
