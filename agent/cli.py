"""The `dirigo` command. The one place where exceptions become exit codes and one-line messages."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from agent import __version__
from agent.cloud import CloudConfigError
from agent.config import ConfigError, Settings, load_config
from agent.daemon import DATABASE, Daemon, StartupError
from agent.dicom import peer_by_title, quiet_identifiers
from agent.health import render, snapshot
from agent.spool import Spool
from agent.store import Store, StoreError

logger = logging.getLogger("agent")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
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
    status = command("status", _status, "show studies, instances, jobs, disk and the last error")
    status.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
    echo = command("echo", _echo, "send a C-ECHO to a configured peer")
    echo.add_argument("peer", metavar="PEER_AE", help="AE title of a peer in dicom.peers")
    command("check-config", _check_config, "validate the configuration; print it, secrets redacted")
    return parser


def _configure_logging(level: str, debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at DEBUG and request identifiers (patient data) at INFO.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        quiet_identifiers()


def _run(settings: Settings, args: argparse.Namespace) -> int:
    logger.info("dirigo %s starting with configuration:\n%s", __version__, _dump(settings))
    Daemon(settings).run()
    return EXIT_OK


def _status(settings: Settings, args: argparse.Namespace) -> int:
    try:
        store = Store.open(settings.data_dir / DATABASE, create=False)
    except StoreError as exc:
        raise CommandError(f"{exc} (has `dirigo run` started with this configuration?)") from exc
    try:
        status = snapshot(settings, store, Spool(settings.data_dir, settings.spool.high_water))
    finally:
        store.close()
    print(json.dumps(status, indent=2) if args.json else render(status))
    return EXIT_OK


def _echo(settings: Settings, args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    peer = peer_by_title(settings.dicom.peers, args.peer)
    if peer is None or peer.host is None or peer.port is None:
        known = ", ".join(p.ae_title for p in settings.dicom.peers) or "none"
        raise CommandError(
            f"no peer {args.peer!r} with a host and port in dicom.peers (configured: {known})"
        )
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dicom.acse_timeout
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        outcome = "rejected the association" if assoc.is_rejected else "could not be reached"
        raise CommandError(f"{peer.ae_title} at {peer.host}:{peer.port} {outcome}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    elapsed = (time.monotonic() - started) * 1000
    if not status or status.Status != 0:
        code = f"0x{status.Status:04X}" if status else "no response"
        raise CommandError(f"C-ECHO to {peer.ae_title} failed: {code}")
    print(f"C-ECHO to {peer.ae_title} at {peer.host}:{peer.port}: Success ({elapsed:.0f} ms)")
    return EXIT_OK


def _check_config(settings: Settings, args: argparse.Namespace) -> int:
    print(f"# {args.config}: valid")
    print(_dump(settings), end="")
    return EXIT_OK


def _dump(settings: Settings) -> str:
    return yaml.safe_dump(settings.redacted(), sort_keys=False)
