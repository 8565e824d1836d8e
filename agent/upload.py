"""The upload worker: claim a stable study part, pack it, send it with resumable tus chunks,
confirm it in the archive, and only then let its spool files go.

Policy lives here (what to send, when to resume, what to distrust); `cloud` speaks HTTP and
classifies failures; `store` keeps every offset durably. One job per study part goes through:

    pack (unless a bundle is recorded and intact)
    → create the tus upload (unless one is recorded), or HEAD it and validate its offset
    → PATCH chunk by chunk, committing what is about to be sent and what the server confirmed
    → sent → (with cloud.dicomweb_url) the archive holds its content (`agent.confirm`)
    → confirmed

A crash anywhere resumes from the server's offset. An offset the server reports that we never
sent (beyond what we put on the wire, or past the bundle's end) is not trusted: that upload is
terminated and the bundle goes up again under a new URL.

With `upload.protocol: stow-rs` there is no bundle and no tus: the instances not yet
acknowledged go up as received, in STOW-RS batches (`agent.stow`), each acknowledgement
committed with the renewed lease, so a crash resumes with the instances still missing. An
instance the archive refuses for good fails the part, its reason in the job's last error.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from agent import stow
from agent.cloud import CloudError, CloudHttp, OffsetConflict, TusClient, UploadGone
from agent.codecchoice import CodecChooser
from agent.config import Settings
from agent.confirm import check_held
from agent.dicomweb import DicomWeb
from agent.dimse import describe
from agent.lease import LeaseKeeper
from agent.liveness import Liveness
from agent.metrics import Metrics
from agent.pack import Compression, PackError, PartInfo, pack, sent_hashes
from agent.retry import Backoff
from agent.spool import Spool, SpoolFileError
from agent.store import (
    UPLOAD,
    AuditEntry,
    AuditEvent,
    Job,
    LeaseLost,
    Store,
    StoreError,
    StudyState,
)
from agent.store.audit import Record
from agent.store.uploads import Bundle, PartFile, Purgeable, UploadRecord

logger = logging.getLogger(__name__)

PROBE_BYTES = 1024 * 1024
"""What a probe of the link sends (`_probe_link`): at 20 Mbit/s, about 0.4 s."""
LEASE_SECONDS = 120.0
"""A claimed part's lease, renewed by every write for it and by a `LeaseKeeper` in between; a
worker silent this long is presumed dead."""


class Interrupted(Exception):
    """The agent is stopping; the job goes back to the queue as it is."""


class NotOurOffset(CloudError):
    """The server reports an offset we never sent: its copy cannot be trusted."""


class Uploader:
    """Processes upload jobs, one per call to `run_once`; safe to call from several threads."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        spool: Spool,
        client: TusClient,
        http: CloudHttp,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        lease_seconds: float = LEASE_SECONDS,
        progress: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.progress = progress
        """Called from a worker's thread between the blocks and chunks of a job (liveness)."""
        self.store = store
        self.spool = spool
        self.client = client
        self.http = http
        self.stop = stop or threading.Event()
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.backoff = Backoff(settings.upload.retry_first, settings.upload.retry_max)
        upload = settings.upload
        self.compression = Compression(
            upload.compression,
            upload.compression_level,
            upload.compression_threads,
            upload.transcode,
        )
        self.chooser: CodecChooser | None = None
        """With `upload.transcode: auto`, what chooses each part's codec."""
        if upload.transcode == "auto":
            self.chooser = CodecChooser(upload.compression)
        self._probing = threading.Lock()
        self.audit: Record | None = None
        """Told of each part sent and confirmed (the audit trail)."""

    # -- one job --------------------------------------------------------------------------

    def run_once(self, owner: str) -> bool:
        """Claim the next due part and take it as far as it goes; False if none was due."""
        job = self.store.jobs.claim(UPLOAD, owner, self.lease_seconds, self.clock())
        if job is None:
            return False
        try:
            with LeaseKeeper(self.store.jobs, job.lease, self.clock, self.progress) as keeper:
                self._process(job, keeper)
            self.store.jobs.complete(job.lease, self.clock())
        except LeaseLost:
            logger.warning(
                "study %s part %d: job %d is no longer ours (cancelled?); stopped",
                job.study_uid,
                job.part,
                job.id,
            )
        except Interrupted:
            self.store.jobs.release(job.lease, self.clock())
            logger.info("study %s part %d: upload paused for shutdown", job.study_uid, job.part)
        except CloudError as exc:
            self._failed(job, str(exc), exc.retryable, exc.retry_after)
        except PackError as exc:
            # A spool file is gone or changed on disk: no retry can fix that; an operator must.
            self._failed(job, f"cannot pack: {exc}", retryable=False)
        except SpoolFileError as exc:
            self._failed(job, f"cannot send: {exc}", retryable=False)
        except OSError as exc:
            self._failed(job, f"local I/O failed: {exc}", retryable=True)
        except StoreError as exc:
            logger.error("study %s part %d: %s", job.study_uid, job.part, exc)
        except Exception as exc:
            # A fault nobody foresaw (a bug, a library's surprise): the job records it and backs
            # off like any retryable failure, instead of killing the worker and leaving the job
            # claimed, to be requeued and hit the same fault once every lease period.
            logger.exception("study %s part %d: unexpected error", job.study_uid, job.part)
            self._failed(job, f"unexpected error: {exc!r}", retryable=True)
        return True

    def _failed(self, job: Job, error: str, retryable: bool, hint: float | None = None) -> None:
        now = self.clock()
        next_at = now + self.backoff.delay(job.attempts, hint=hint) if retryable else None
        when = f"retry in {next_at - now:.0f}s" if next_at is not None else "not retrying"
        if next_at is not None and self.metrics is not None:
            self.metrics.upload_retry()
        logger.warning("study %s part %d: %s (%s)", job.study_uid, job.part, error, when)
        try:
            self.store.jobs.fail(job.lease, error, next_at, now)
        except StoreError as exc:
            logger.error("study %s part %d: %s", job.study_uid, job.part, exc)

    def _process(self, job: Job, keeper: LeaseKeeper) -> None:
        record = self.store.uploads.get(job.study_id)
        if record.state not in (StudyState.SENT, StudyState.CONFIRMED):
            started = time.monotonic()
            self.store.uploads.begin_attempt(job.study_id, job.lease, self.clock())
            files = self.store.uploads.part_files(job.study_id)
            size = sum(file.size for file in files)
            if files and self.settings.upload.protocol == "stow-rs":
                self._stow(job, len(files), keeper)
            elif files:
                bundle = self._bundle(job, record, files, keeper)
                self._send(job, bundle, keeper)
                size = bundle.size
            self.store.uploads.mark_sent(job.study_id, job.lease, self.clock())
            logger.info("study %s part %d: sent", job.study_uid, job.part)
            self._audit(AuditEvent.PART_SENT, job, files, self._upload_host())
            if self.metrics is not None:
                self.metrics.part_uploaded(size, time.monotonic() - started)
        if self.settings.cloud.dicomweb_url and record.state != StudyState.CONFIRMED:
            self._confirm(job)

    # -- pack -----------------------------------------------------------------------------

    def _bundle(
        self, job: Job, record: UploadRecord, files: list[PartFile], keeper: LeaseKeeper
    ) -> Bundle:
        """Return the part's recorded bundle if its file is intact, else pack a new one
        (stopping as soon as the lease is lost)."""
        if record.bundle is not None:
            size = _size(self.spool.path(record.bundle.path))
            if size == record.bundle.size:
                return record.bundle
            reason = f"bundle {record.bundle.path} is {size} bytes, not {record.bundle.size}"
            self.store.uploads.forget_bundle(job.study_id, reason, job.lease, self.clock())
            if record.url is not None:
                self._terminate(record.url)
        info = PartInfo(self.settings.site, job.study_uid, job.part)
        total = sum(f.size for f in files)
        compression, why = self._compression(job, total)
        started = time.monotonic()
        try:
            bundle = pack(self.spool, info, files, compression, keeper.check)
        except PackError:
            # A sender may have re-sent a lost instance while this pack ran; the receiver then
            # pointed its row at the new copy (and had no failed job to revive): once more.
            recorded = self.store.uploads.part_files(job.study_id)
            if recorded == files:
                raise
            files = recorded
            total = sum(f.size for f in files)
            started = time.monotonic()
            bundle = pack(self.spool, info, files, compression, keeper.check)
        if self.chooser is not None:
            seconds = time.monotonic() - started
            self.chooser.packed(compression.transcode, total, bundle.size, seconds)
        self.store.uploads.record_bundle(job.study_id, bundle, job.lease, self.clock(), why)
        if self.metrics is not None:
            self.metrics.codec_chosen(compression.transcode)
        logger.info(
            "study %s part %d: packed %d instance(s), %d → %d bytes in %.1fs",
            job.study_uid,
            job.part,
            len(files),
            total,
            bundle.size,
            time.monotonic() - started,
        )
        return bundle

    def _compression(self, job: Job, size: int) -> tuple[Compression, str | None]:
        """Return how to pack a part of `size` bytes, and with `auto` why its codec was chosen
        (measuring the link first if its measure is stale)."""
        if self.chooser is None:
            return self.compression, None
        if self.chooser.needs_probe(size):
            with self._probing:  # one probe at a time; a worker that waited finds it fresh
                if self.chooser.needs_probe(size):
                    self._probe_link()
        choice = self.chooser.choose(size)
        logger.info("study %s part %d: %s", job.study_uid, job.part, choice.reason)
        c = self.compression
        return Compression(c.method, c.level, c.threads, choice.codec), choice.reason

    def _probe_link(self) -> None:
        """Measure the link's goodput with a probe upload: PROBE_BYTES sent into an upload
        twice as long, which therefore never completes (no ingest takes it for a bundle), then
        terminated. A failure leaves the link unmeasured and is only logged: the part's own
        upload will meet it and say so."""
        assert self.chooser is not None
        metadata = {"filename": "dirigo-link-probe", "site": self.settings.site, "probe": "1"}
        try:
            url = self.client.create(2 * PROBE_BYTES, metadata)
            try:
                started = time.monotonic()
                self.client.patch(url, 0, io.BytesIO(os.urandom(PROBE_BYTES)), PROBE_BYTES)
                self.chooser.sent(PROBE_BYTES, time.monotonic() - started)
            finally:
                self._terminate(url)
        except CloudError as exc:
            logger.warning("could not measure the link with a probe upload: %s", exc)

    # -- send -----------------------------------------------------------------------------

    def _send(self, job: Job, bundle: Bundle, keeper: LeaseKeeper) -> None:
        url, offset = self._resume(job, bundle)
        chunk_size = self.settings.upload.chunk_size
        committed_to = 0  # how far `sent_to` is already committed
        with self.spool.path(bundle.path).open("rb") as f:
            while offset < bundle.size:
                if self.stop.is_set():
                    raise Interrupted
                keeper.check()
                length = min(chunk_size, bundle.size - offset)
                if committed_to < offset + length:
                    end = offset + length
                    self.store.uploads.record_sending(job.study_id, end, job.lease, self.clock())
                try:
                    started = time.monotonic()
                    new_offset = self.client.patch(url, offset, f, length)
                    if self.chooser is not None:
                        self.chooser.sent(length, time.monotonic() - started)
                except OffsetConflict as exc:
                    new_offset = self._server_offset(job, url, bundle)
                    if new_offset == offset:
                        # A 409 for the offset the server itself reports: asking again at once
                        # would spin, unseen; fail the attempt so the backoff and status apply.
                        raise CloudError(
                            f"{exc}, yet it reports offset {offset} itself",
                            retryable=True,
                            status=exc.status,
                        ) from None
                else:
                    if not offset < new_offset <= offset + length:
                        self._distrust(job, url, f"answered a PATCH at {offset} with {new_offset}")
                offset = new_offset
                # One commit per chunk: the offset the server confirmed, the end of the next
                # chunk (committed before that chunk goes out), and the renewed lease.
                committed_to = min(offset + chunk_size, bundle.size)
                self.store.uploads.advance(
                    job.study_id, offset, committed_to, job.lease, self.clock()
                )

    def _resume(self, job: Job, bundle: Bundle) -> tuple[str, int]:
        """Return the upload URL and the offset to continue from, creating the upload if none
        is recorded or the recorded one is gone or untrustworthy."""
        record = self.store.uploads.get(job.study_id)
        if record.url is not None:
            try:
                offset = self._server_offset(job, record.url, bundle)
                logger.info(
                    "study %s part %d: resuming at %d of %d bytes",
                    job.study_uid,
                    job.part,
                    offset,
                    bundle.size,
                )
                return record.url, offset
            except UploadGone:
                if record.confirmed_offset == bundle.size:
                    # It confirmed every byte before we could mark the part sent, and has
                    # cleaned up the finished upload since: sending it again would have the
                    # cloud ingest the bundle twice.
                    logger.info(
                        "study %s part %d: the server confirmed all %d bytes before it let the"
                        " finished upload go; not sending it again",
                        job.study_uid,
                        job.part,
                        bundle.size,
                    )
                    return record.url, bundle.size
                logger.warning(
                    "study %s part %d: the server no longer has the upload; starting anew",
                    job.study_uid,
                    job.part,
                )
            except NotOurOffset as exc:
                logger.warning("study %s part %d: %s; starting anew", job.study_uid, job.part, exc)
        metadata = {
            "filename": f"{self.settings.site}-{job.study_uid}-part{job.part}"
            + self.compression.suffix,
            "site": self.settings.site,
            "study_uid": job.study_uid,
            "part": str(job.part),
            "sha256": bundle.sha256,
            "instances": str(bundle.instances),
            "format": bundle.format,
        }
        url = self.client.create(bundle.size, metadata)
        self.store.uploads.record_url(job.study_id, url, job.lease, self.clock())
        return url, 0

    def _server_offset(self, job: Job, url: str, bundle: Bundle) -> int:
        """HEAD the upload and return its offset if it is one we can have sent."""
        offset, length = self.client.offset(url)
        sent_to = self.store.uploads.get(job.study_id).sent_to
        if length is not None and length != bundle.size:
            self._distrust(job, url, f"holds an upload of {length} bytes, not {bundle.size}")
        if offset > min(sent_to, bundle.size):
            self._distrust(job, url, f"reports offset {offset}, but we sent only {sent_to} bytes")
        self.store.uploads.record_offset(job.study_id, offset, job.lease, self.clock())
        return offset

    def _distrust(self, job: Job, url: str, what: str) -> None:
        """Give up an upload whose server state is not ours: terminate it, forget its URL."""
        self._terminate(url)
        self.store.uploads.record_url(job.study_id, None, job.lease, self.clock())
        raise NotOurOffset(f"the server {what}", retryable=True)

    def _terminate(self, url: str) -> None:
        try:
            self.client.terminate(url)
        except CloudError as exc:
            logger.warning("could not terminate an abandoned upload: %s", exc)

    # -- or STOW-RS ------------------------------------------------------------------------

    def _stow(self, job: Job, total: int, keeper: LeaseKeeper) -> None:
        """Send the part's instances the archive has not acknowledged yet, batch by batch."""
        pending = self.store.uploads.stow_pending(job.study_id)
        if len(pending) < total:
            logger.info(
                "study %s part %d: resuming with %d of %d instance(s) not yet stored",
                job.study_uid,
                job.part,
                len(pending),
                total,
            )
        dicomweb_url = self.settings.cloud.dicomweb_url
        assert dicomweb_url is not None  # the configuration requires it for stow-rs
        for batch in stow.batches(pending, self.settings.upload.stow_batch):
            if self.stop.is_set():
                raise Interrupted
            keeper.check()
            files = [stow.check_file(self.spool.path(f.path), f) for f in batch]
            answer = stow.store_instances(self.http, dicomweb_url, files)
            stored, error = answer.verdict({f.sop_instance_uid for f in batch})
            self.store.uploads.record_stored(job.study_id, stored, job.lease, self.clock())
            for uid, warning in answer.warnings.items():
                logger.warning("instance %s stored with warning %s", uid, describe(warning))
            if error is not None:
                raise error
            logger.info(
                "study %s part %d: %d instance(s), %d bytes stored over STOW-RS",
                job.study_uid,
                job.part,
                len(batch),
                sum(f.size for f in batch),
            )

    # -- confirm --------------------------------------------------------------------------

    def _confirm(self, job: Job) -> None:
        """Mark the part confirmed once the archive holds its content (`agent.confirm`)."""
        dicomweb_url = self.settings.cloud.dicomweb_url
        assert dicomweb_url is not None
        archive = DicomWeb(self.http, dicomweb_url.rstrip("/"))
        check_held(
            archive,
            job.study_uid,
            self._sent_hashes(job),
            self.store.uploads.replaced(job.study_id),
            self.settings.serve.page_size,
            self.spool.bundles,
        )
        self.store.uploads.mark_confirmed(job.study_id, job.lease, self.clock())
        logger.info("study %s part %d: confirmed by the archive", job.study_uid, job.part)
        files = self.store.uploads.part_files(job.study_id)
        self._audit(AuditEvent.PART_CONFIRMED, job, files, urlsplit(dicomweb_url).hostname)

    def _upload_host(self) -> str | None:
        cloud = self.settings.cloud
        url = cloud.dicomweb_url if self.settings.upload.protocol == "stow-rs" else cloud.upload_url
        return urlsplit(url or "").hostname

    def _audit(self, event: AuditEvent, job: Job, files: list[PartFile], host: str | None) -> None:
        """Record that the part of `job` (its `files`) went to, or is held by, the cloud."""
        if self.audit is None:
            return
        classes = Counter(file.sop_class_uid for file in files)
        self.audit(
            AuditEntry(
                self.clock(),
                event,
                calling_ae=self.settings.dicom.ae_title,
                address=host,
                study_uid=job.study_uid,
                detail={
                    "part": job.part,
                    "instances": len(files),
                    "bytes": sum(file.size for file in files),
                    "sop_classes": dict(classes),
                },
            )
        )

    def _sent_hashes(self, job: Job) -> dict[str, str]:
        """Return the sha256 of each instance's dataset as the part sent it: as its bundle's
        manifest records it (transcoded, maybe), else as received (STOW-RS sends it so)."""
        sent = {f.sop_instance_uid: f.sha256 for f in self.store.uploads.part_files(job.study_id)}
        bundle = self.store.uploads.get(job.study_id).bundle
        if bundle is not None and self.settings.upload.protocol == "tus":
            try:
                sent.update(sent_hashes(self.spool.path(bundle.path), bundle.format))
            except (PackError, OSError) as exc:
                logger.warning(
                    "study %s part %d: %s; comparing with the instances as received",
                    job.study_uid,
                    job.part,
                    exc,
                )
        return sent


def purge(settings: Settings, store: Store, spool: Spool, now: float) -> int:
    """Delete the spool files of parts done with (confirmed, or sent when no DICOMweb is
    configured) longer than `spool.keep_sent_for` ago, and, while the disk is above its
    high-water mark, of the oldest confirmed parts whatever their age. Return how many parts.

    A part merely sent (no DICOMweb to confirm it) goes early only with
    `spool.purge_unconfirmed`: the cloud took every byte, but nothing proved that the archive
    holds its instances, and the PACS may have deleted its own copy already."""
    state = StudyState.CONFIRMED if settings.cloud.dicomweb_url else StudyState.SENT
    done_before = now - settings.spool.keep_sent_for
    purged = 0
    while due := store.uploads.purgeable(done_before, state, limit=20):
        purged += _remove(store, spool, due, now)
    if state == StudyState.SENT and not settings.spool.purge_unconfirmed:
        return purged
    while spool.above_high_water() and (due := store.uploads.purgeable(None, state, limit=1)):
        purged += _remove(store, spool, due, now)
    return purged


def _remove(store: Store, spool: Spool, parts: list[Purgeable], now: float) -> int:
    for part in parts:
        for path in part.paths:
            spool.remove(path)
        store.uploads.record_purged(part.study_id, now)
        logger.info("study %s part %d: spool files removed", part.study_uid, part.part)
    return len(parts)


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


class UploadWorkers:
    """`count` threads running `Uploader.run_once`; the daemon revives any that died."""

    IDLE_WAIT = 1.0
    """Seconds an idle worker waits before looking for due work again."""

    TROUBLE = Backoff(first=1.0, cap=60.0)
    """How long a worker waits after `run_once` itself failed (the database refused the claim,
    say), by the number of failures in a row."""

    def __init__(
        self, uploader: Uploader, count: int, liveness: Liveness | None = None, deadline: float = 0
    ) -> None:
        self.uploader = uploader
        self.count = count
        self.liveness = liveness
        self.deadline = deadline
        """Seconds a worker may go without progress before `liveness` reports it."""
        self._threads: dict[str, threading.Thread] = {}
        self._wake = threading.Event()

    def start(self) -> None:
        for index in range(1, self.count + 1):
            self._spawn(f"upload-{index}")

    def revive(self) -> int:
        """Restart every worker thread that died (an unexpected error); return how many."""
        dead = [name for name, thread in self._threads.items() if not thread.is_alive()]
        if self.uploader.stop.is_set():
            return 0
        for name in dead:
            logger.error("upload worker %s died; restarting it", name)
            self._spawn(name)
        return len(dead)

    def wake(self) -> None:
        """New work is due (a part just became stable): idle workers look now, not in a second."""
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Ask every worker to stop after its current chunk; wait up to `timeout` seconds."""
        self.uploader.stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads.values():
            thread.join(max(deadline - time.monotonic(), 0))
            if thread.is_alive():
                logger.warning("upload worker %s still busy at shutdown", thread.name)

    def _spawn(self, name: str) -> None:
        thread = threading.Thread(target=self._loop, args=(name,), name=name, daemon=True)
        self._threads[name] = thread
        if self.liveness is not None:
            self.liveness.watch(name, self.deadline, thread)
        thread.start()

    def _loop(self, name: str) -> None:
        owner = f"{os.uname().nodename}:{os.getpid()}:{name}"
        stop = self.uploader.stop
        failures = 0
        while not stop.is_set():
            if self.liveness is not None:
                self.liveness.beat(name)
            try:
                busy = self.uploader.run_once(owner)
            except Exception:
                failures += 1
                wait = self.TROUBLE.delay(failures)
                logger.exception("upload worker %s failed; trying again in %.0fs", name, wait)
                stop.wait(wait)
                continue
            failures = 0
            if not busy:
                self._wake.wait(self.IDLE_WAIT)
                self._wake.clear()
