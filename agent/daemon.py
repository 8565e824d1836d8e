"""The supervisor: starts the DICOM server and the periodic work, stops them gracefully.

Signal handlers only set a flag; the main loop notices it, stops accepting associations, lets those
in flight finish (bounded by a grace period), and closes the store (huey's consumer does the same).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.util
import os
import signal
import ssl
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType

from agent.audit import Associations, Auditor
from agent.auditmessage import Identity
from agent.cloud import CloudHttp, Throttle, TusClient
from agent.config import ConfigError, Settings
from agent.config.rules import listen_address
from agent.dicom import Gate, PeerPolicy, build_ae, is_tls
from agent.dicomweb import DicomWeb
from agent.dimse import Status
from agent.endpoints import Endpoints
from agent.heartbeat import Heartbeat
from agent.importer import Importer
from agent.liveness import Liveness
from agent.metrics import Metrics
from agent.probe import CloudProbe
from agent.pynetdicom_internals import partial_dataset_file
from agent.receive import Arrival, Receiver, Reply
from agent.serve.cache import InstanceCache
from agent.serve.fetchsyntax import Choice
from agent.serve.handlers import QueryRetrieve
from agent.serve.retrieve import Retriever
from agent.spool import AGENT_LOCK, SWEEP_LOCK, Locked, Spool
from agent.store import AuditEntry, AuditEvent, Store, StoreError
from agent.store.choices import FETCH_SYNTAX
from agent.systemd import Watchdog, notify, status_line, watchdog_interval
from agent.tls import DicomTls
from agent.tls import load as load_tls
from agent.upload import Uploader, UploadWorkers, purge
from agent.watch import FolderWatch
from agent.web import HealthServer

logger = logging.getLogger(__name__)

DATABASE = "dirigo.db"
CACHE = "cache"
"""The directory in data_dir of instances fetched from the cloud for Query/Retrieve."""
SHUTDOWN_GRACE = 30.0
"""Seconds in-flight associations get after a stop signal (the unit's TimeoutStopSec is longer)."""
TICK = 0.25
"""How often the main loop checks its stop flag."""
ACCEPTOR_DEADLINE = 30.0
"""The most seconds the DICOM acceptor may go without looping (it loops twice a second)."""
NO_CONTEXT = "no presentation context was accepted"
"""Why the audit trail records an association that negotiated nothing as refused."""
IMPORTS_FLUSH = 60.0
"""Seconds between two writes of the studies the watch folders brought (audit rows)."""
SUPERVISOR = "supervisor"
ACCEPTOR = "dicom-acceptor"
TLS_ACCEPTOR = "dicom-tls-acceptor"


class StartupError(Exception):
    """The daemon cannot start (port taken, data_dir unusable, …); the message says why."""


class Daemon:
    """One agent process: the DICOM server plus periodic study-stability and lease checks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spool = Spool(settings.data_dir, settings.spool.high_water)
        self.store: Store | None = None
        self.receiver: Receiver | None = None
        self.server: Any = None
        self.tls_server: Any = None
        """The server of the TLS port (`dicom.tls`), beside the plain one."""
        self.tls: DicomTls | None = None
        self.workers: UploadWorkers | None = None
        self.query_retrieve: QueryRetrieve | None = None
        self.watch: FolderWatch | None = None
        self._agent_lock: contextlib.ExitStack | None = None
        self._stopping = False
        self._reload_tls = False
        self._next_housekeeping = 0.0
        self.gate: Gate | None = None
        self.liveness = Liveness()
        """What `/healthz` (and the systemd watchdog) judge: the acceptor, workers, supervisor."""
        self.health_server: HealthServer | None = None
        self.metrics = Metrics()
        self.probe: CloudProbe | None = None
        self.watchdog: Watchdog | None = None
        self.heartbeat: Heartbeat | None = None
        self.auditor: Auditor | None = None
        self.associations: Associations | None = None
        self._started = False
        """The start was recorded in the audit trail (so its stop will be)."""
        self._next_imports_flush = 0.0

    def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then stop gracefully. SIGHUP reads the
        `dicom.tls` certificate files again (`reload_tls`)."""
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGHUP, self._request_tls_reload)
        try:
            self.start()
        except BaseException:
            # What did start (the health server, whose thread would keep the process alive
            # with nothing listening for DICOM) stops, and the error goes on to the CLI.
            self.stop()
            raise
        stall_after = self.settings.health.stall_after
        self.liveness.watch(SUPERVISOR, stall_after, threading.current_thread())
        try:
            while not self._stopping:
                self.liveness.beat(SUPERVISOR)
                if self._reload_tls:
                    self._reload_tls = False
                    self.reload_tls()
                try:
                    self.housekeeping(time.time())
                except (OSError, StoreError) as exc:
                    # Transient (a full disk, a busy database): receiving goes on, and the
                    # next tick tries again. One line per failure, no traceback.
                    logger.error("housekeeping failed, will retry: %s", exc)
                time.sleep(TICK)
        finally:
            self.stop()

    def start(self) -> None:
        """Prepare the data directory, recover from any interrupted run, and start listening.

        Raise ConfigError if a secret file (a private key, a token) is readable by others."""
        if exposed := self.settings.exposed_secret_files():
            raise ConfigError(exposed)
        self.tls = load_tls(self.settings.dicom.tls)  # unusable certificate files: ConfigError
        try:
            self.spool.prepare()
        except OSError as exc:
            raise StartupError(f"cannot prepare data_dir {self.settings.data_dir}: {exc}") from exc
        self._hold_agent_lock()
        # pynetdicom streams each incoming dataset into a NamedTemporaryFile; putting those in the
        # spool's own filesystem makes the final placement a rename, not a copy. multiprocessing
        # (the transcoding forkserver) keeps its socket in a directory of its own, made first
        # in the system's temporary directory: under data_dir its path can pass the 108 bytes
        # a Unix socket allows, and the start-up sweep of incoming/ is no place for it.
        multiprocessing.util.get_temp_dir()
        tempfile.tempdir = str(self.spool.incoming)
        # CloudConfigError: before anything starts
        http = CloudHttp.open(
            self.settings.cloud, Throttle(self.settings.upload.max_bandwidth or None)
        )
        self.store = Store.open(self.settings.data_dir / DATABASE, migrate=True)
        identity = Identity.here(self.settings.dicom.ae_title, self.settings.site)
        self.auditor = Auditor.open(self.store, self.settings.audit, identity)
        with self.spool.lock(SWEEP_LOCK, exclusive=True, wait=True):  # waits for `dirigo send`
            self.spool.sweep(self.store.spool_paths())
            self.spool.sweep_quarantine(self.store.quarantine_paths())
            self.spool.lost(self.store.needed_copies())
        self.spool.sweep_bundles(self.store.uploads.bundle_paths())
        # One agent owns data_dir, so every job still claimed belongs to a run that is over.
        requeued = self.store.jobs.requeue_expired(time.time(), every_claim=True)
        if requeued:
            logger.warning("returned %d interrupted job(s) to the queue", requeued)
        self.query_retrieve = QueryRetrieve(self.settings, self._retriever(), self.tls)
        self.query_retrieve.audit = self.auditor.record
        cloud = self.settings.cloud
        self.probe = CloudProbe(CloudHttp.open(cloud), cloud.upload_url, DicomWeb.open(cloud))
        endpoints = Endpoints(
            self.settings,
            self.store,
            self.spool,
            self.liveness,
            self._servers,
            self.metrics,
            self.probe,
            audit=self.auditor.status,
        )
        # Health first: a start that fails (its port taken) must fail before the PACS has seen
        # the DICOM port answer. /readyz says not ready until that port listens.
        self.health_server = self._start_health(endpoints)
        self.server = self._start_server(self.store, self.query_retrieve, self.auditor)
        self.workers = self._start_uploads(self.store, http, self.auditor)
        self.probe.start()
        if self.settings.watch.dirs and self.receiver is not None:
            importer = Importer(self.spool, self.receiver)
            if self.associations is not None:
                associations, ae_title = self.associations, self.settings.dicom.ae_title
                importer.observed = lambda reply: associations.imported(ae_title, reply)
            stall_after = self.settings.health.stall_after
            self.watch = FolderWatch(self.settings.watch, importer, self.liveness, stall_after)
            self.watch.start()
        host, port = self.server.server_address[:2]
        tls = f", TLS on port {self.tls_server.server_address[1]}" if self.tls_server else ""
        logger.info(
            "listening as %s on %s:%d%s (data_dir %s)",
            self.settings.dicom.ae_title,
            host,
            port,
            tls,
            self.settings.data_dir,
        )
        self.auditor.record(
            AuditEntry(time.time(), AuditEvent.APPLICATION_START, calling_ae=identity.ae_title)
        )
        self._started = True
        notify("READY=1")
        self._start_monitoring(endpoints)

    def _hold_agent_lock(self) -> None:
        """Hold data_dir's agent lock until the process ends: two agents on one data_dir would
        each take the other's files for leftovers of a dead run."""
        held = contextlib.ExitStack()
        try:
            held.enter_context(self.spool.lock(AGENT_LOCK, exclusive=True, wait=False))
        except Locked:
            where = self.settings.data_dir
            raise StartupError(f"another dirigo agent is running with data_dir {where}") from None
        self._agent_lock = held

    def _retriever(self) -> Retriever | None:
        """Return what Query/Retrieve fetches with, or None without cloud.dicomweb_url (then
        every Q/R request is answered with a failure that says so)."""
        dicomweb = DicomWeb.open(self.settings.cloud)
        if dicomweb is None:
            logger.info("cloud.dicomweb_url is not set: Query/Retrieve requests will be refused")
            return None
        cache_dir = self.settings.data_dir / CACHE
        try:
            cache = InstanceCache(
                cache_dir, self.settings.serve.cache_size, self.spool.above_high_water
            ).open()
        except OSError as exc:
            raise StartupError(f"cannot prepare the cache {cache_dir}: {exc}") from exc
        retriever = Retriever(
            dicomweb, cache, self.settings.serve.page_size, self.settings.serve.fetch_syntax
        )
        retriever.fetched = self.metrics.instance_retrieved
        retriever.syntaxes.told = self._fetch_syntax_chosen
        return retriever

    def _fetch_syntax_chosen(self, choice: Choice) -> None:
        """Keep the fetch syntax chosen where `dirigo status` reads it (a fetch thread calls
        this: a store that cannot take it costs the status line, not the fetch)."""
        logger.info("fetching instances held uncompressed as %s: %s", choice.asks, choice.why)
        if self.store is None:
            return
        try:
            self.store.choices.record(FETCH_SYNTAX, choice.document())
        except StoreError as exc:
            logger.warning("cannot record the fetch syntax chosen: %s", exc)

    def _start_server(self, store: Store, query_retrieve: QueryRetrieve, auditor: Auditor) -> Any:
        dicom = self.settings.dicom
        try:
            policy = PeerPolicy(dicom.peers, dicom.accept_unknown_peers)
        except OSError as exc:
            raise StartupError(f"a peer host in dicom.peers does not resolve: {exc}") from exc
        receiver = Receiver(
            self.spool, store, concurrency=dicom.max_associations, limits=self.settings.spool
        )
        receiver.observe = self._count
        receiver.audit = auditor.record
        self.receiver = receiver
        associations = Associations(auditor.record)
        self.associations = associations

        def on_store(event: evt.Event) -> Any:
            request = cast(C_STORE, event.request)
            uid = request.AffectedSOPInstanceUID
            arrival = Arrival(
                path=Path(event.dataset_path),
                calling_ae=event.assoc.requestor.ae_title.strip(),
                address=event.assoc.requestor.address,
                sop_instance_uid=str(uid) if uid else None,
            )
            reply = receiver.accept(arrival)
            associations.stored(event.assoc, reply)
            return reply.as_dataset()

        def on_closed(event: evt.Event) -> None:
            # pynetdicom accepts an association whose contexts it all refused: for the audit
            # trail that peer got nothing
            refused = None if event.assoc.accepted_contexts else NO_CONTEXT
            associations.ended(event.assoc, failure=refused)

        def on_rejected(event: evt.Event) -> None:
            # pynetdicom's own limit, after the Gate admitted it (rare: see build_ae)
            associations.ended(event.assoc, failure="rejected: too many connections")

        self.gate = Gate(dicom, policy)
        self.gate.on_admitted = lambda assoc: associations.admitted(
            assoc, *_parties(assoc), tls=is_tls(assoc)
        )
        self.gate.on_refused = lambda assoc, reason: associations.refused(
            *_parties(assoc), reason, tls=is_tls(assoc)
        )
        handlers: list[EventHandlerType] = [
            *self.gate.handlers(),
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_CONN_CLOSE, on_closed),
            (evt.EVT_REJECTED, on_rejected),
            *query_retrieve.handlers(),
        ]
        ae = build_ae(dicom)
        server = self._listen(ae, dicom.port, handlers, None, ACCEPTOR)
        if dicom.tls is not None and self.tls is not None:
            # the same AE, Gate and handlers: the TLS port differs only in its transport
            try:
                self.tls_server = self._listen(
                    ae, dicom.tls.port, handlers, self.tls.server, TLS_ACCEPTOR
                )
            except StartupError:
                server.shutdown()
                raise
        return server

    def _listen(
        self,
        ae: Any,
        port: int,
        handlers: list[EventHandlerType],
        ssl_context: ssl.SSLContext | None,
        acceptor: str,
    ) -> Any:
        """Start serving `port` on dicom.bind; raise StartupError if it cannot be bound."""
        bind = self.settings.dicom.bind
        try:
            server = ae.start_server(
                (bind, port), block=False, evt_handlers=handlers, ssl_context=ssl_context
            )
        except OSError as exc:
            raise StartupError(f"cannot listen on {bind}:{port}: {exc.strerror}") from exc
        self._watch_acceptor(server, acceptor)
        return server

    def _servers(self) -> list[Any]:
        """Return the DICOM servers running: the plain port's and the TLS port's."""
        return [server for server in (self.server, self.tls_server) if server is not None]

    def _count(self, reply: Reply, size: int) -> None:
        if reply.status == Status.SUCCESS:
            self.metrics.instance_received(size)
        else:
            self.metrics.instance_rejected(Status(reply.status).name.lower(), reply.quarantined)

    def _watch_acceptor(self, server: Any, name: str) -> None:
        """Have the acceptor beat each time round its loop: socketserver's `serve_forever` calls
        `service_actions` after every poll (half a second) and every accepted connection."""
        deadline = min(ACCEPTOR_DEADLINE, self.settings.health.stall_after)
        self.liveness.watch(name, deadline)
        loop_action = server.service_actions

        def service_actions() -> None:
            self.liveness.beat(name)
            loop_action()

        server.service_actions = service_actions

    def _start_monitoring(self, endpoints: Endpoints) -> None:
        """Under systemd, feed its watchdog while every part is live and keep its status line
        current; with `cloud.heartbeat_url`, send the heartbeat. Each on a thread of its own."""
        if os.environ.get("NOTIFY_SOCKET"):
            self.watchdog = Watchdog(
                self.liveness.check,
                lambda: status_line(endpoints.document()),
                watchdog_interval(),
            )
            self.watchdog.start()
        self.heartbeat = Heartbeat.open(self.settings.cloud, endpoints.document)
        if self.heartbeat is not None:
            self.heartbeat.start()

    def _start_health(self, endpoints: Endpoints) -> HealthServer | None:
        """Start the health HTTP server, or return None when `health.listen` is off."""
        health = self.settings.health
        if listen_address(health.listen) is None:
            logger.info("health.listen is off: no health endpoints")
            return None
        try:
            server = HealthServer(health, endpoints.routes())
            server.start()
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot serve health endpoints on {health.listen}: {exc}") from exc
        return server

    def _start_uploads(self, store: Store, http: CloudHttp, auditor: Auditor) -> UploadWorkers:
        upload = self.settings.upload
        client = TusClient(http, self.settings.cloud.upload_url)
        uploader = Uploader(
            self.settings,
            store,
            self.spool,
            client,
            http,
            progress=self.liveness.beat,
            metrics=self.metrics,
        )
        uploader.audit = auditor.record
        stall_after = self.settings.health.stall_after
        workers = UploadWorkers(uploader, upload.concurrency, self.liveness, stall_after)
        workers.start()
        return workers

    def housekeeping(self, now: float) -> None:
        """Close quiet studies, return expired job leases, revive dead upload workers, empty
        the instance cache while the disk is above high water, apply the spool's retention,
        bound the quarantine and settle the files of failed commits; at most once a second."""
        if now < self._next_housekeeping or self.store is None:
            return
        self._next_housekeeping = now + 1.0
        stable = self.store.mark_stable(now, self.settings.study.stable_after)
        for study_uid, part in stable:
            logger.info("study %s part %d is stable", study_uid, part)
        if stable and self.workers is not None:
            self.workers.wake()
        self.store.jobs.requeue_expired(now)
        if self.workers is not None:
            self.workers.revive()
        if self.watch is not None:
            self.watch.revive()
        if self.query_retrieve is not None and self.query_retrieve.retriever is not None:
            self.query_retrieve.retriever.cache.trim()  # a full disk empties the cache first
        purge(self.settings, self.store, self.spool, now)
        if self.auditor is not None:
            self.auditor.prune(now, self.settings.audit.keep)
        if self.associations is not None and now >= self._next_imports_flush:
            # studies from the watch folders: one row per study per minute, not per file
            self._next_imports_flush = now + IMPORTS_FLUSH
            self.associations.flush_imports()
        if self.receiver is not None:
            self.receiver.housekeeping(now)
        self._reap_associations()
        dicom = self.settings.dicom
        self.spool.sweep_incoming(2 * max(dicom.network_timeout, dicom.dimse_timeout), now)

    def _reap_associations(self) -> None:
        """Close connections that never asked for an association in time, and delete the
        half-received file of every association that has ended (and write its audit rows if
        its close event never came).

        pynetdicom leaves that file behind when a receive is cut off (sender gone, disk full: then
        its network thread dies with no event at all), and on a full disk it keeps the disk full.
        """
        if self.gate is None:
            return
        for assoc in self.gate.reap():
            if self.associations is not None:
                # its audit rows, when its thread died with no close event (written once)
                self.associations.ended(assoc)
            partial = partial_dataset_file(assoc)
            if partial is not None:
                partial.close()
                self.spool.discard(Path(partial.name))
                logger.warning(
                    "discarded a partial instance from %s (association ended mid-transfer)",
                    assoc.requestor.ae_title.strip(),
                )

    def stop(self) -> None:
        """Stop accepting, let in-flight associations finish (bounded), then close the store."""
        notify("STOPPING=1")
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.health_server is not None:
            self.health_server.stop()
            self.health_server = None
        if self.watch is not None:
            # Before the receiver closes: the file in hand is accepted and moved, or left.
            self.watch.stop(SHUTDOWN_GRACE)
            self.watch = None
        if self.probe is not None:
            self.probe.stop()
            self.probe = None
        if self.workers is not None:
            # Each worker pauses after its current chunk and gives its job back.
            self.workers.stop(SHUTDOWN_GRACE)
            self.workers = None
        servers = self._servers()
        for server in servers:
            server.shutdown()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while any(s.active_associations for s in servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        for server in servers:
            for assoc in server.active_associations:
                logger.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
                assoc.abort()
        self.server = self.tls_server = None
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        if self.query_retrieve is not None:
            self.query_retrieve.close()
            self.query_retrieve = None
        if self.associations is not None:
            self.associations.flush_imports()
            self.associations = None
        if self.auditor is not None:
            if self._started:  # a start that failed half-way has no stop to record
                stopped = time.time()
                ae_title = self.settings.dicom.ae_title
                self.auditor.record(
                    AuditEntry(stopped, AuditEvent.APPLICATION_STOP, calling_ae=ae_title)
                )
            self.auditor.close()
            self.auditor = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._agent_lock is not None:
            self._agent_lock.close()
            self._agent_lock = None
        logger.info("stopped")

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _request_tls_reload(self, signum: int, frame: FrameType | None) -> None:
        self._reload_tls = True

    def reload_tls(self) -> None:
        """Read the `dicom.tls` files again (a renewed certificate, key or CA, at the same
        paths) and use them for every TLS connection from now on; those open keep theirs. Files
        that are now unusable change nothing: the current ones stay, and the log says why."""
        if self.settings.dicom.tls is None:
            logger.info("SIGHUP: dicom.tls is not set, no certificates to reload")
            return
        try:
            tls = DicomTls.load(self.settings.dicom.tls)
        except ConfigError as exc:
            logger.error(
                "dicom.tls certificates not reloaded, the current ones stay: %s",
                "; ".join(exc.problems),
            )
            return
        self.tls = tls
        if self.tls_server is not None:
            self.tls_server.ssl_context = tls.server  # read at each accepted connection
        if self.query_retrieve is not None:
            self.query_retrieve.tls = tls
        logger.info("dicom.tls certificates reloaded")


def _parties(assoc: Association) -> tuple[str, str, str]:
    """Return an association's calling AE title, called AE title and the peer's address."""
    request = assoc.requestor.primitive
    calling = request.calling_ae_title if request is not None else assoc.requestor.ae_title
    called = request.called_ae_title if request is not None else ""
    return str(calling).strip(), str(called).strip(), str(assoc.requestor.address)
