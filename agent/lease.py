"""Keep a claimed job's lease for as long as its worker is busy with it.

A worker renews its lease with every write it makes for the job (`agent.store.jobs.hold`), but
some steps write nothing for minutes: packing a large study, one PATCH of a large chunk over a
slow link, one STOW-RS batch, paging through the archive to confirm a part. Without renewal the
lease would expire in the middle of such a step, the agent would requeue the job, and a second
worker would take up a part the first is still sending.

`LeaseKeeper` renews the lease on a thread of its own, every quarter of the lease, while the
job's `with` block runs. When a renewal finds the lease gone (an operator cancelled the job, or it
expired and was requeued while this process could not reach its database), the worker's next
`check` raises LeaseLost: it stops there, and writes nothing more for the job. Every network call
of a worker has a timeout, so a worker never holds a lease for a step that cannot end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from agent.store import Jobs, Lease, LeaseLost, StoreError

logger = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 4
"""Renew this many times per lease period: three renewals can fail (a busy database) before a
lease expires."""


class LeaseKeeper:
    """Renews `lease` every `lease.seconds / RENEWALS_PER_LEASE` until the block ends; `check`
    raises LeaseLost once a renewal found the lease gone."""

    def __init__(
        self,
        jobs: Jobs,
        lease: Lease,
        clock: Callable[[], float] = time.time,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self._jobs = jobs
        self._progress = progress
        self._lease = lease
        self._clock = clock
        self._done = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()

    def check(self) -> None:
        """Report the worker's progress (its steps call this between blocks and chunks), then
        raise LeaseLost if the job is no longer ours."""
        if self._progress is not None:
            self._progress()
        if self._lost.is_set():
            raise LeaseLost(f"job {self._lease.job_id} is not held by {self._lease.owner}")

    def _run(self) -> None:
        every = self._lease.seconds / RENEWALS_PER_LEASE
        while not self._done.wait(every):
            try:
                held = self._jobs.renew(self._lease, self._clock())
            except StoreError as exc:
                logger.warning(
                    "job %d: lease not renewed, trying again: %s", self._lease.job_id, exc
                )
                continue
            if not held:
                logger.warning("job %d: lease lost; its worker stops", self._lease.job_id)
                self._lost.set()
                return
