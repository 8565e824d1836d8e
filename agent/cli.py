"""The `dirigo` command. The one place where exceptions become exit codes and one-line messages."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import yaml
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from agent import __version__
from agent.audit import Associations, Auditor, parse_since
from agent.audit import entry_document as audit_document
from agent.audit import render_entries as render_audit
from agent.auditmessage import Identity
from agent.cloud import CloudConfigError, CloudError
from agent.config import ConfigError, Peer, Settings, load_config
from agent.config.units import parse_duration
from agent.daemon import CACHE, DATABASE, Daemon, StartupError
from agent.dicom import EchoFailed, echo, peer_by_title, quiet_tracebacks
from agent.dicomweb import DicomWeb
from agent.dimse import QRStatus
from agent.doctor import examine, failed
from agent.doctor import render as render_findings
from agent.health import job_document, render, render_jobs, snapshot
from agent.importer import Imported, Importer, Source, Tally, collect
from agent.pynetdicom_internals import quiet_identifiers
from agent.quarantine import Quarantine, entry_document, render_entries, render_entry
from agent.receive import Receiver
from agent.serve.cache import InstanceCache
from agent.serve.fetchsyntax import Choice
from agent.serve.query import QueryError, Scope, study_scope
from agent.serve.retrieve import Counts, Failed, Item, Listing, Retriever, push
from agent.serve.trail import Delivery, RequestTally, Who, retrieve_entry
from agent.spool import AGENT_LOCK, SWEEP_LOCK, Locked, Spool
from agent.store import AuditEntry, JobState, SchemaError, Store, StoreError
from agent.store.choices import FETCH_SYNTAX
from agent.store.maintenance import backup, version_of
from agent.store.schema import latest_version
from agent.systemd import JournalFormatter, journal_stream
from agent.tls import load as load_tls

logger = logging.getLogger("agent")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SCHEMA = 65  # sysexits' EX_DATAERR: the unit does not restart the agent on it
EXIT_SOFTWARE = 70
EXIT_CONFIG = 78
DEFAULT_CONFIG = Path("/etc/dirigo/config.yaml")
Handler = Callable[[Settings, argparse.Namespace], int]


class CommandError(Exception):
    """An operation failed for a reason the user can act on; the message says which."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `dirigo` subcommand and return its exit code (documented in the README)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # Patient data, the database and secrets: for the agent's user alone, whatever the umask
    # it was started with (the systemd unit sets the same).
    os.umask(0o077)
    try:
        settings = load_config(args.config)
        _configure_logging(settings.log_level, args.debug)
        code: int = args.handler(settings, args)
        return code
    except ConfigError as exc:
        print(f"dirigo: configuration error in {args.config}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except CloudConfigError as exc:
        return _fail(args.debug, f"configuration error: {exc}", EXIT_CONFIG)
    except SchemaError as exc:
        # The database is older (run `dirigo migrate`) or newer than this code: restarting the
        # same code cannot change that, so a service manager must not retry it every few seconds.
        return _fail(args.debug, str(exc), EXIT_SCHEMA)
    except (CommandError, StartupError, StoreError) as exc:
        return _fail(args.debug, str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`dirigo status | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        message = f"internal error: {exc!r} (run with --debug for details)"
        return _fail(args.debug, message, EXIT_SOFTWARE)


def _fail(debug: bool, message: str, code: int) -> int:
    if debug:
        logger.exception(message)
    print(f"dirigo: {message}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dirigo", description="Edge gateway between a hospital PACS and the image exchange."
    )
    parser.add_argument("--version", action="version", version=f"dirigo {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"YAML file (default {DEFAULT_CONFIG})"
    )
    common.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    command("run", _run, "run the agent in the foreground, logging to stderr")
    status = command(
        "status", _status, "show counts by state, uploads, failed jobs, disk and the last error"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
    echo = command("echo", _echo, "send a C-ECHO to a configured peer")
    echo.add_argument("peer", metavar="PEER_AE", help="AE title of a peer in dicom.peers")
    command("check-config", _check_config, "validate the configuration; print it, secrets redacted")
    send = command("send", _send, "import DICOM files or folders (a CD) as if sent by C-STORE")
    send.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="a file, or a folder searched recursively",
    )
    retrieve = command(
        "retrieve", _retrieve, "pull a study from the cloud archive and push it to a PACS"
    )
    retrieve.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    retrieve.add_argument(
        "--to",
        metavar="PEER_AE",
        help="AE title of a peer in dicom.peers (default: the first with host and port)",
    )
    _queue_parser(commands, common)
    _quarantine_parser(commands, common)
    doctor = command("doctor", _doctor, "check configuration, disk, database, cloud and peers")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    audit = command(
        "audit", _audit, "list the audit trail: associations, studies, parts, queries, retrieves"
    )
    audit.add_argument(
        "--since",
        metavar="WHEN",
        help="only records from this long ago (24h, 7d) or this ISO date/time (UTC) on",
    )
    audit.add_argument("--study", metavar="UID", help="only records of this Study Instance UID")
    audit.add_argument(
        "--peer", metavar="AE_OR_ADDRESS", help="only records involving this AE title or address"
    )
    audit.add_argument(
        "--limit", type=int, metavar="N", help="only the newest N records (default: all)"
    )
    audit.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
    copy = command("backup", _backup, "copy the database, consistent while the agent runs")
    copy.add_argument("--to", required=True, type=Path, metavar="FILE", help="the copy to write")
    migrate = command(
        "migrate", _migrate, "bring the database's schema up to date (the agent must be stopped)"
    )
    migrate.add_argument(
        "--schema-version",
        action="store_true",
        help="only print the database's schema version (0 when there is no database)",
    )
    return parser


def _actions(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    name: str,
    text: str,
) -> Callable[[str, Handler, str], argparse.ArgumentParser]:
    """Add the command `name` with actions of its own; return the function that adds one."""
    parser = commands.add_parser(name, help=text, description=text)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    return action


def _queue_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    action = _actions(commands, common, "queue", "inspect the job queue, retry or cancel jobs")
    listing = action("list", _queue_list, "list jobs (by default every job not done)")
    listing.add_argument(
        "--state", choices=[*JobState, "all"], help="only jobs in this state, or all of them"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    retry = action("retry", _queue_retry, "make failed or ready jobs ready and due now")
    retry.add_argument("ids", nargs="+", type=int, metavar="ID", help="job id (`queue list`)")
    cancel = action("cancel", _queue_cancel, "fail jobs for good (until retried)")
    cancel.add_argument("ids", nargs="+", type=int, metavar="ID", help="job id (`queue list`)")


def _quarantine_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    action = _actions(
        commands,
        common,
        "quarantine",
        "inspect refused input kept in quarantine, release or purge it",
    )
    listing = action("list", _quarantine_list, "list kept input: when, sender, reason, size")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = action("show", _quarantine_show, "show one entry with its details")
    show.add_argument("id", type=int, metavar="ID", help="entry id (`quarantine list`)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    release = action(
        "release", _quarantine_release, "accept kept input again; entries refused again stay"
    )
    release.add_argument("ids", nargs="+", type=int, metavar="ID", help="entry id")
    purge = action("purge", _quarantine_purge, "delete entries and their kept copies")
    purge.add_argument("ids", nargs="*", type=int, metavar="ID", help="entry id")
    purge.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="every entry last seen longer ago than this (30d, 12h)",
    )


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _configure_logging(level: str, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd, journald stamps each line and reads its priority from a `<N>` prefix.
    handler.setFormatter(
        JournalFormatter()
        if journal_stream(sys.stderr)
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level.upper()), handlers=[handler]
    )
    # pynetdicom logs every PDU at DEBUG and request identifiers (patient data) at INFO.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        quiet_identifiers()


def _run(settings: Settings, args: argparse.Namespace) -> int:
    logger.info("dirigo %s starting with configuration:\n%s", __version__, _dump(settings))
    Daemon(settings).run()
    return EXIT_OK


@contextlib.contextmanager
def _opened_store(settings: Settings) -> Iterator[Store]:
    """Open the agent's existing database (never create one, never migrate it), running agent
    or not."""
    try:
        store = Store.open(settings.data_dir / DATABASE, create=False)
    except SchemaError:
        raise  # its message says what to do
    except StoreError as exc:
        raise CommandError(f"{exc} (has `dirigo run` started with this configuration?)") from exc
    try:
        yield store
    finally:
        store.close()


def _status(settings: Settings, args: argparse.Namespace) -> int:
    with _opened_store(settings) as store:
        status = snapshot(settings, store, Spool(settings.data_dir, settings.spool.high_water))
    print(json.dumps(status, indent=2) if args.json else render(status))
    return EXIT_OK


def _queue_list(settings: Settings, args: argparse.Namespace) -> int:
    states: list[JobState]
    if args.state is None:
        states = [state for state in JobState if state != JobState.DONE]
    else:
        states = list(JobState) if args.state == "all" else [JobState(args.state)]
    with _opened_store(settings) as store:
        jobs = [job_document(job) for job in store.jobs.in_states(states)]
    print(json.dumps({"jobs": jobs}, indent=2) if args.json else render_jobs(jobs))
    return EXIT_OK


def _queue_retry(settings: Settings, args: argparse.Namespace) -> int:
    with _opened_store(settings) as store:
        jobs = store.jobs.retry(args.ids, time.time())
    for job in jobs:
        print(f"job {job.id}: ready, due now ({job.attempts} attempt(s) so far)")
    return EXIT_OK


def _queue_cancel(settings: Settings, args: argparse.Namespace) -> int:
    with _opened_store(settings) as store:
        jobs = store.jobs.cancel(args.ids, time.time())
    for job in jobs:
        print(f"job {job.id}: cancelled; `dirigo queue retry {job.id}` would queue it again")
    return EXIT_OK


def _send(settings: Settings, args: argparse.Namespace) -> int:
    try:
        sources, unreadable = collect(args.paths)
    except OSError as exc:
        raise CommandError(f"cannot import {exc.filename}: {exc.strerror}") from exc
    if not sources and not unreadable:
        raise CommandError("no files to import (only DICOMDIR or empty folders)")
    tally = Tally()
    for item in unreadable:
        _report(tally, item)
    with _acceptance(settings, "send") as (spool, store, receiver):
        auditor = _auditor(settings, store)
        associations = Associations(auditor.record)
        receiver.audit = auditor.record
        importer = Importer(spool, receiver)
        importer.observed = lambda reply: associations.imported(settings.dicom.ae_title, reply)
        try:
            interrupted = _import(importer, sources, tally, args.debug)
        finally:
            associations.flush_imports()
            auditor.close()
    print(tally.summary() + (" (interrupted)" if interrupted else ""))
    return EXIT_OK if tally.ok and not interrupted else EXIT_FAILURE


@contextlib.contextmanager
def _acceptance(settings: Settings, command: str) -> Iterator[tuple[Spool, Store, Receiver]]:
    """Yield the agent's spool, store and a receiver, to accept files as the agent does (the
    agent may be running), with the sweep lock shared for the whole block."""
    _check_owner(settings.data_dir, command)
    spool = Spool(settings.data_dir, settings.spool.high_water)
    with _opened_store(settings) as store:
        try:
            spool.prepare()  # the layout is the agent's, but may have been tidied away by hand
        except OSError as exc:
            raise CommandError(f"cannot prepare data_dir {settings.data_dir}: {exc}") from exc
        receiver = Receiver(spool, store, limits=settings.spool)
        # Shared with other imports; an agent starting up waits for it before its sweep.
        with spool.lock(SWEEP_LOCK, exclusive=False, wait=True):
            try:
                yield spool, store, receiver
            finally:
                receiver.close()
                _reconcile(receiver)


def _quarantine_list(settings: Settings, args: argparse.Namespace) -> int:
    with _opened_store(settings) as store:
        entries = _quarantine(settings, store).entries()
    documents = [entry_document(entry) for entry in entries]
    print(json.dumps({"quarantine": documents}, indent=2) if args.json else render_entries(entries))
    return EXIT_OK


def _quarantine_show(settings: Settings, args: argparse.Namespace) -> int:
    with _opened_store(settings) as store:
        quarantine = _quarantine(settings, store)
        entry = quarantine.entry(args.id)
        if entry is None:
            raise CommandError(f"no quarantine entry {args.id} (`dirigo quarantine list`)")
        document = entry_document(entry, quarantine.note(entry))
    print(json.dumps(document, indent=2) if args.json else render_entry(document))
    return EXIT_OK


def _quarantine_release(settings: Settings, args: argparse.Namespace) -> int:
    with _acceptance(settings, "quarantine release") as (spool, store, receiver):
        quarantine = Quarantine(spool, store)
        results = [quarantine.release(receiver, i, time.time()) for i in args.ids]
    for result in results:
        verdict = "released" if result.released else "kept"
        print(f"entry {result.entry_id}: {verdict} ({result.outcome})")
    return EXIT_OK if all(result.released for result in results) else EXIT_FAILURE


def _quarantine_purge(settings: Settings, args: argparse.Namespace) -> int:
    if not args.ids and args.older_than is None:
        raise CommandError("name the entries to purge, or --older-than DURATION")
    with _opened_store(settings) as store:
        quarantine = _quarantine(settings, store)
        # All the entries named or none, as `queue retry` and `queue cancel` do.
        if missing := [i for i in args.ids if quarantine.entry(i) is None]:
            raise CommandError(f"no quarantine entry {', '.join(map(str, missing))}; none purged")
        gone = quarantine.purge(time.time(), args.ids, args.older_than)
    print(f"purged {len(gone)} quarantine entr{'y' if len(gone) == 1 else 'ies'}")
    return EXIT_OK


def _quarantine(settings: Settings, store: Store) -> Quarantine:
    return Quarantine(Spool(settings.data_dir, settings.spool.high_water), store)


def _doctor(settings: Settings, args: argparse.Namespace) -> int:
    if not args.debug:
        # An unreachable peer is a finding; pynetdicom's own error lines would only repeat it.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    findings = examine(settings, args.config)
    if args.json:
        print(json.dumps({"checks": [asdict(f) for f in findings]}, indent=2))
    else:
        print(render_findings(findings))
    return EXIT_FAILURE if failed(findings) else EXIT_OK


def _audit(settings: Settings, args: argparse.Namespace) -> int:
    since = None
    if args.since is not None:
        try:
            since = parse_since(args.since, time.time())
        except ValueError as exc:
            raise CommandError(f"--since: {exc}") from None
    if args.limit is not None and args.limit < 1:
        raise CommandError("--limit: give a number of records, 1 or more")
    with _opened_store(settings) as store:
        entries = store.audit.each(since, args.study, args.peer, args.limit)
        if args.json:
            # streamed, one record a line: the document is valid JSON however many there are
            print('{"audit": [', end="")
            for index, entry in enumerate(entries):
                print(("," if index else "") + "\n  " + json.dumps(audit_document(entry)), end="")
            print("\n]}")
        else:
            for line in render_audit(entries):
                print(line)
    return EXIT_OK


def _auditor(settings: Settings, store: Store) -> Auditor:
    """Return an auditor for what this command does: it writes to the agent's audit trail
    and, with `audit.syslog`, sends (waiting briefly at `close`)."""
    return Auditor.open(
        store, settings.audit, Identity.here(settings.dicom.ae_title, settings.site)
    )


def _record_audit(settings: Settings, entry: AuditEntry) -> None:
    """Record what this command did in the agent's audit trail; a trail that cannot be
    written is a warning."""
    try:
        with _opened_store(settings) as store:
            auditor = _auditor(settings, store)
            try:
                auditor.record(entry)
            finally:
                auditor.close()
    except (CommandError, StoreError, ConfigError) as exc:  # its work is done: say so, go on
        logger.warning("audit record not kept: %s", exc)


def _record_fetch_syntax(settings: Settings, choice: Choice) -> None:
    """Keep the fetch syntax this command chose last where `dirigo status` reads it, as the
    agent keeps its own; a store that cannot take it is a warning."""
    try:
        with _opened_store(settings) as store:
            store.choices.record(FETCH_SYNTAX, choice.document())
    except (CommandError, StoreError) as exc:
        logger.warning("fetch syntax chosen not recorded: %s", exc)


def _backup(settings: Settings, args: argparse.Namespace) -> int:
    target: Path = args.to
    if target.is_dir():
        raise CommandError(f"{target} is a folder: name the file to write")
    try:
        made = backup(settings.data_dir / DATABASE, target)
    except StoreError as exc:
        raise CommandError(f"backup failed: {exc}") from exc
    except OSError as exc:
        raise CommandError(f"cannot write {exc.filename or target}: {exc.strerror}") from exc
    print(f"backup of {made.instances} instance rows written to {made.path} ({made.size} bytes)")
    return EXIT_OK


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Migrate the database with the agent stopped: an agent of the version before would run
    on a schema it does not know. `dirigo run` migrates the same way at start-up."""
    path = settings.data_dir / DATABASE
    _check_owner(settings.data_dir, "migrate")  # a journal made by root would lock the agent out
    if args.schema_version:
        print(version_of(path) if path.exists() else 0)
        return EXIT_OK
    if not path.exists():
        raise CommandError(f"no database at {path}: `dirigo run` creates it")
    spool = Spool(settings.data_dir, settings.spool.high_water)
    try:
        with spool.lock(AGENT_LOCK, exclusive=True, wait=False):
            before = version_of(path)
            Store.open(path, create=False, migrate=True).close()
    except Locked:
        raise CommandError(
            f"a dirigo agent is running with data_dir {settings.data_dir}: stop it first"
            " (`systemctl stop dirigo`)"
        ) from None
    after = latest_version()
    if before == after:
        print(f"the database at {path} is up to date (schema version {after})")
    else:
        print(f"the database at {path} migrated from schema version {before} to {after}")
    return EXIT_OK


def _reconcile(receiver: Receiver) -> None:
    """Settle the files of failed commits before exiting (the agent does it periodically)."""
    try:
        receiver.reconcile()
    except StoreError as exc:
        logger.warning("files of failed commits are left for the agent's start-up sweep: %s", exc)


def _import(importer: Importer, sources: list[Source], tally: Tally, debug: bool) -> bool:
    """Import `sources`, with a progress bar when stderr is a terminal; return True if
    interrupted (Ctrl-C). The file in hand then may or may not be stored: sending the same
    files again is safe, as those already stored count as duplicates."""
    if not debug:
        # Each file not accepted is reported below with its path and reason (the receiver's log
        # line knows neither), and the events table keeps the audit trail; --debug shows both.
        logging.getLogger("agent.receive").setLevel(logging.CRITICAL)
    bar = tqdm(
        total=sum(source.size for source in sources),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
    )
    copied = 0

    def progress(size: int) -> None:
        nonlocal copied
        copied += size
        bar.update(size)

    try:
        with bar, logging_redirect_tqdm():
            for done, source in enumerate(sources, start=1):
                copied = 0
                imported = importer.import_file(source.path, progress)
                bar.update(max(source.size - copied, 0))
                bar.set_postfix_str(f"{done}/{len(sources)} files", refresh=False)
                _report(tally, imported)
    except KeyboardInterrupt:
        return True
    return False


def _report(tally: Tally, imported: Imported) -> None:
    tally.add(imported)
    if imported.reason:
        tqdm.write(f"{imported.result} {imported.path}: {imported.reason}", file=sys.stderr)


def _check_owner(data_dir: Path, command: str) -> None:
    """Refuse to import as another user than the one owning data_dir (the agent's): the agent
    could not read files another user leaves in its spool or cache, nor a database journal root
    made."""
    try:
        owner = data_dir.stat().st_uid
    except FileNotFoundError:
        return  # opening the store says there is no database
    if os.geteuid() != owner:
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = f"uid {owner}"
        raise CommandError(
            f"run `dirigo {command}` as the user that owns {data_dir} ({name}), as the agent"
            " runs: it could not read files another user leaves in data_dir"
        )


def _echo(settings: Settings, args: argparse.Namespace) -> int:
    peer = peer_by_title(settings.dicom.peers, args.peer)
    if peer is None or peer.host is None or peer.port is None:
        known = ", ".join(p.ae_title for p in settings.dicom.peers) or "none"
        raise CommandError(
            f"no peer {args.peer!r} with a host and port in dicom.peers (configured: {known})"
        )
    tls = _tls_args(settings, peer)
    try:
        elapsed = echo(settings.dicom.ae_title, peer, settings.dicom.acse_timeout, tls)
    except EchoFailed as exc:
        raise CommandError(str(exc)) from None
    over = " over TLS" if tls is not None else ""
    print(
        f"C-ECHO to {peer.ae_title} at {peer.host}:{peer.port}{over}: Success"
        f" ({elapsed * 1000:.0f} ms)"
    )
    return EXIT_OK


def _tls_args(settings: Settings, peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """Return the TLS arguments of an association to `peer`: None unless it is marked `tls`.
    Raise ConfigError if a file of `dicom.tls` is unusable."""
    tls = load_tls(settings.dicom.tls) if peer.tls else None
    return tls.args_for(peer) if tls is not None else None


def _retrieve(settings: Settings, args: argparse.Namespace) -> int:
    """Pull a study from the cloud and push it to a peer: the same path as a C-MOVE."""
    peer = _push_destination(settings, args.to)
    tls = _tls_args(settings, peer)  # before any work: an unusable certificate stops it here
    try:
        scope = study_scope(args.study)
    except QueryError as exc:
        raise CommandError(str(exc)) from None
    if settings.cloud.dicomweb_url is None:
        raise CommandError("retrieve needs cloud.dicomweb_url in the configuration")
    if not settings.data_dir.is_dir():
        raise CommandError(
            f"data_dir {settings.data_dir} does not exist (has `dirigo run` started with this"
            " configuration?)"
        )
    _check_owner(settings.data_dir, "retrieve")
    cache_dir = settings.data_dir / CACHE
    try:
        spool = Spool(settings.data_dir, settings.spool.high_water)
        cache = InstanceCache(cache_dir, settings.serve.cache_size, spool.above_high_water).open()
    except OSError as exc:
        raise CommandError(f"cannot prepare the cache {cache_dir}: {exc}") from exc
    dicomweb = DicomWeb.open(settings.cloud)
    assert dicomweb is not None  # dicomweb_url is set
    retriever = Retriever(dicomweb, cache, settings.serve.page_size, settings.serve.fetch_syntax)
    try:
        return _push_study(settings, retriever, scope, args.study, peer, tls)
    finally:
        dicomweb.close()


def _push_study(
    settings: Settings,
    retriever: Retriever,
    scope: Scope,
    study_uid: str,
    peer: Peer,
    tls: tuple[ssl.SSLContext, str] | None,
) -> int:
    try:
        refs = retriever.instances(scope)
    except CloudError as exc:
        raise CommandError(f"cannot list the study in the cloud archive: {exc}") from exc
    with contextlib.closing(refs):
        if not refs:
            raise CommandError(f"the cloud archive has no instances of study {study_uid}")
        return _push_listed(settings, retriever, refs, peer, tls)


def _push_listed(
    settings: Settings,
    retriever: Retriever,
    refs: Listing,
    peer: Peer,
    tls: tuple[ssl.SSLContext, str] | None,
) -> int:
    from pynetdicom import AE

    quiet_tracebacks()
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.acse_timeout = settings.dicom.acse_timeout
    ae.dimse_timeout = settings.dicom.dimse_timeout
    ae.network_timeout = settings.dicom.network_timeout
    ae.maximum_pdu_size = settings.dicom.max_pdu
    assert peer.host is not None and peer.port is not None
    counts = Counts()
    bar = tqdm(total=len(refs), unit="instance", file=sys.stderr, disable=not sys.stderr.isatty())
    who = Who(settings.dicom.ae_title, peer.ae_title, peer.host)
    tally, delivery = RequestTally(), Delivery()
    chosen: list[Choice] = []
    retriever.syntaxes.told = chosen.append

    def progress(item: Item) -> None:
        bar.update(1)
        delivery.offered(item.ref, isinstance(item, Failed))

    def audited() -> None:
        entry = retrieve_entry(
            who, "dirigo retrieve", peer.ae_title, peer.host, {}, tally, delivery
        )
        _record_audit(settings, replace(entry, detail={**entry.detail, "operator": _operator()}))
        if chosen:
            _record_fetch_syntax(settings, chosen[-1])

    try:
        with bar, logging_redirect_tqdm():
            pushed = push(
                ae, peer.host, peer.port, peer.ae_title, retriever, refs, progress, counts, tls
            )
    except ConnectionError as exc:
        tally.final, tally.reason = QRStatus.UNABLE_TO_PROCESS, str(exc)
        audited()
        raise CommandError(str(exc)) from exc
    if pushed.failures:
        tally.final = QRStatus.SUB_OPERATIONS_FAILED
        tally.reason = f"{len(pushed.failures)} of {len(refs)} instances not sent"
    else:
        tally.final = QRStatus.SUCCESS
    audited()
    for failure in pushed.failures:
        print(f"not sent: {failure}", file=sys.stderr)
    print(
        f"{pushed.completed + pushed.warnings} of {len(refs)} instances sent to {peer.ae_title}"
        f" ({counts.summary()})"
    )
    return EXIT_OK if not pushed.failures else EXIT_FAILURE


def _operator() -> str:
    """Return the name of the user running this command."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _push_destination(settings: Settings, title: str | None) -> Peer:
    """Return the peer to push to: `title`, or the first peer with a host and port."""
    reachable = [p for p in settings.dicom.peers if p.host is not None and p.port is not None]
    if title is None:
        if not reachable:
            raise CommandError("no peer in dicom.peers has a host and port to push to")
        return reachable[0]
    peer = peer_by_title(reachable, title)
    if peer is None:
        known = ", ".join(p.ae_title for p in reachable) or "none"
        raise CommandError(
            f"no peer {title!r} with a host and port in dicom.peers (configured: {known})"
        )
    return peer


def _check_config(settings: Settings, args: argparse.Namespace) -> int:
    if exposed := settings.exposed_secret_files():
        raise ConfigError(exposed)  # the agent would refuse to start
    print(f"# {args.config}: valid")
    for warning in settings.warnings() + _tls_file_problems(settings):
        print(f"warning: {warning}", file=sys.stderr)
    print(_dump(settings), end="")
    return EXIT_OK


def _tls_file_problems(settings: Settings) -> list[str]:
    """Return what is wrong with the files `dicom.tls` names, each a sentence naming its key.
    Only warnings here: the file may be checked where the certificates are not installed (the
    agent itself refuses to start with them, and `dirigo doctor` checks them where it runs)."""
    try:
        load_tls(settings.dicom.tls)
    except ConfigError as exc:
        return [f"{problem} (`dirigo run` refuses to start)" for problem in exc.problems]
    return []


def _dump(settings: Settings) -> str:
    return yaml.safe_dump(settings.redacted(), sort_keys=False)
