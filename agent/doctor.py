"""`dirigo doctor`: every check an operator would make by hand, each with a verdict and a hint.

Nothing here changes anything: the database is opened read-only, the cloud is asked questions
(OPTIONS, a QIDO-RS search for one study) and peers get a C-ECHO. Each check is one `Finding`;
a FAIL means the agent cannot do its job as configured, a WARN that it can but someone should
look.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

import requests

from agent.cloud import CloudConfigError, CloudError, CloudHttp, TusClient
from agent.config import ConfigError, Settings
from agent.daemon import DATABASE
from agent.dicom import EchoFailed, echo
from agent.dicomweb import DicomWeb
from agent.spool import Spool
from agent.store import StoreError
from agent.store.maintenance import check
from agent.store.schema import outdated, too_new
from agent.tls import DicomTls

CERT_WARN_DAYS = 30
CLOCK_WARN_SECONDS = 300.0
DISK_WARN_MARGIN = 10.0
"""Percentage points below `spool.high_water` where the disk gets a warning."""
NETWORK_TIMEOUT = 10.0
"""At most this long per network check (less if `cloud.timeout` is shorter)."""


class Verdict(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    """The outcome of one check: what was checked, the verdict, what was seen and what to do."""

    check: str
    verdict: Verdict
    message: str
    hint: str = ""


def examine(settings: Settings, config_path: Path) -> list[Finding]:
    """Run every check against `settings` (loaded from `config_path`); return the findings in
    order. Never raises for what it finds: that is a finding."""
    timeout = min(settings.cloud.timeout, NETWORK_TIMEOUT)
    findings = [_configuration(settings, config_path), *_data_dir(settings), _database(settings)]
    findings += _endpoints(settings, timeout)
    findings.append(_token(settings))
    findings += _cloud_services(settings, timeout)
    findings += _peers(settings, timeout)
    return findings


def failed(findings: list[Finding]) -> bool:
    return any(f.verdict is Verdict.FAIL for f in findings)


def render(findings: list[Finding]) -> str:
    """Return one line per finding (verdict, check, message), each WARN or FAIL followed by its
    hint on a line of its own."""
    lines = []
    for finding in findings:
        lines.append(f"{finding.verdict:<4}  {finding.check}: {finding.message}")
        if finding.hint and finding.verdict is not Verdict.OK:
            lines.append(f"      hint: {finding.hint}")
    return "\n".join(lines)


# -- local ------------------------------------------------------------------------------------


def _configuration(settings: Settings, config_path: Path) -> Finding:
    if exposed := settings.exposed_secret_files():
        return Finding(
            "config", Verdict.FAIL, exposed[0], "the agent refuses to start until this is fixed"
        )
    if warnings := settings.warnings():
        more = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
        return Finding(
            "config", Verdict.WARN, warnings[0] + more, "`dirigo check-config` lists every warning"
        )
    return Finding("config", Verdict.OK, f"{config_path} is valid")


def _data_dir(settings: Settings) -> Iterator[Finding]:
    data_dir = settings.data_dir
    try:
        info = data_dir.stat()
    except OSError as exc:
        yield Finding(
            "data_dir",
            Verdict.FAIL,
            f"{data_dir}: {exc.strerror}",
            "start `dirigo run` once as the agent's user: it creates data_dir",
        )
        return
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.geteuid():
        yield Finding(
            "data_dir",
            Verdict.FAIL,
            f"{data_dir} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})",
            "run `dirigo doctor` as the agent's user, or chown -R data_dir to it",
        )
    elif not os.access(data_dir, os.W_OK | os.X_OK):
        yield Finding(
            "data_dir", Verdict.FAIL, f"{data_dir} is not writable", f"chmod 700 {data_dir}"
        )
    elif mode & 0o077:
        yield Finding(
            "data_dir",
            Verdict.WARN,
            f"{data_dir} is mode {mode:04o}: other users may see patient data",
            f"chmod 700 {data_dir}",
        )
    else:
        yield Finding("data_dir", Verdict.OK, f"{data_dir} is mode 0700, owned by this user")
    yield _disk(settings)


def _disk(settings: Settings) -> Finding:
    spool = Spool(settings.data_dir, settings.spool.high_water)
    usage = spool.disk_usage()
    seen = f"{usage.percent:.0f}% used, {usage.free / 2**30:.1f} GiB free"
    mark = settings.spool.high_water
    if usage.percent >= mark:
        return Finding(
            "disk",
            Verdict.FAIL,
            f"{seen}: above spool.high_water ({mark:g}%); C-STOREs are refused",
            "free space on the data_dir filesystem, or check why studies are not leaving",
        )
    if usage.percent >= mark - DISK_WARN_MARGIN:
        return Finding(
            "disk",
            Verdict.WARN,
            f"{seen}: near spool.high_water ({mark:g}%)",
            "free space, or check `dirigo status` for studies that are not leaving",
        )
    return Finding("disk", Verdict.OK, seen)


def _database(settings: Settings) -> Finding:
    path = settings.data_dir / DATABASE
    try:
        integrity = check(path)
    except StoreError as exc:
        return Finding(
            "database", Verdict.FAIL, str(exc), "has `dirigo run` started with this data_dir?"
        )
    if not integrity.ok:
        shown = "; ".join(integrity.problems[:3])
        return Finding(
            "database",
            Verdict.FAIL,
            f"quick_check: {shown}",
            "stop the agent and restore the latest `dirigo backup`",
        )
    if integrity.schema_version > integrity.known_version:
        message = too_new(path, integrity.schema_version, integrity.known_version)
        return Finding("database", Verdict.FAIL, message, "upgrade Dirigo")
    if integrity.schema_version < integrity.known_version:
        message = outdated(path, integrity.schema_version, integrity.known_version)
        return Finding("database", Verdict.FAIL, message, "run `dirigo migrate`")
    return Finding("database", Verdict.OK, f"quick_check ok, schema {integrity.schema_version}")


def _token(settings: Settings) -> Finding:
    path = settings.cloud.token_file
    if path is None:
        return Finding("token", Verdict.OK, "none configured (cloud.token_file)")
    try:
        text = path.read_text(errors="replace").strip()
    except OSError as exc:
        return Finding(
            "token", Verdict.FAIL, f"{path}: {exc.strerror}", "make it readable by this user"
        )
    if not text or any(c.isspace() for c in text):
        problem = "is empty" if not text else "holds more than one token"
        return Finding(
            "token",
            Verdict.FAIL,
            f"{path} {problem}",
            "write the token the exchange issued for this site, alone, into the file",
        )
    return Finding("token", Verdict.OK, f"{path} holds one token ({len(text)} characters)")


# -- cloud ------------------------------------------------------------------------------------


def _endpoints(settings: Settings, timeout: float) -> Iterator[Finding]:
    """DNS, TCP and TLS (certificate expiry) of each host the cloud settings name."""
    seen = set()
    for url in (settings.cloud.upload_url, settings.cloud.dicomweb_url):
        if not url:
            continue
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if (parts.scheme, host, port) in seen:
            continue
        seen.add((parts.scheme, host, port))
        yield from _endpoint(settings, parts.scheme, host, port, timeout)


def _endpoint(
    settings: Settings, scheme: str, host: str, port: int, timeout: float
) -> Iterator[Finding]:
    try:
        addresses = {
            str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        }
    except socket.gaierror as exc:
        yield Finding(
            "cloud dns", Verdict.FAIL, f"{host}: {exc.strerror}", "check the name and DNS"
        )
        return
    yield Finding("cloud dns", Verdict.OK, f"{host} is {', '.join(sorted(addresses))}")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        yield Finding(
            "cloud tcp",
            Verdict.FAIL,
            f"{host}:{port}: {exc.strerror or exc}",
            "is the exchange up? a firewall or proxy in the way?",
        )
        return
    yield Finding("cloud tcp", Verdict.OK, f"{host}:{port} accepts connections")
    if scheme != "https":
        yield Finding(
            "cloud tls",
            Verdict.WARN,
            f"{host}:{port} is plain HTTP: images and token travel unencrypted",
            "use https:// URLs for the cloud",
        )
        return
    yield _certificate(settings, host, port, timeout)


def _certificate(settings: Settings, host: str, port: int, timeout: float) -> Finding:
    cloud = settings.cloud
    try:
        context = ssl.create_default_context(
            cafile=str(cloud.ca_file or requests.utils.DEFAULT_CA_BUNDLE_PATH)
        )
        if cloud.client_cert is not None:
            key = str(cloud.client_key) if cloud.client_key is not None else None
            context.load_cert_chain(str(cloud.client_cert), key)
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            certificate = tls.getpeercert() or {}
    except (OSError, ssl.SSLError) as exc:
        return Finding(
            "cloud tls",
            Verdict.FAIL,
            f"{host}:{port}: {getattr(exc, 'reason', None) or exc}",
            "check cloud.ca_file, the client certificate and the server's certificate",
        )
    not_after = ssl.cert_time_to_seconds(str(certificate.get("notAfter")))
    days = (not_after - time.time()) / 86400
    until = time.strftime("%Y-%m-%d", time.gmtime(not_after))
    if days < CERT_WARN_DAYS:
        return Finding(
            "cloud tls",
            Verdict.WARN,
            f"{host}:{port}: the certificate expires on {until}, in {days:.0f} day(s)",
            "tell the exchange's operators before it expires",
        )
    return Finding("cloud tls", Verdict.OK, f"{host}:{port}: certificate valid until {until}")


def _cloud_services(settings: Settings, timeout: float) -> Iterator[Finding]:
    """Clock (the cloud's Date header), tus OPTIONS and QIDO-RS, through the agent's own edge."""
    cloud = settings.cloud.model_copy(update={"timeout": timeout})
    try:
        http = CloudHttp.open(cloud)
    except CloudConfigError as exc:
        yield Finding(
            "cloud", Verdict.FAIL, str(exc), "the agent refuses to start until this is fixed"
        )
        return
    try:
        yield _clock(http, cloud.upload_url or cloud.dicomweb_url or "", timeout)
        if cloud.upload_url and settings.upload.protocol == "tus":
            yield _tus(http, cloud.upload_url)
        if cloud.dicomweb_url:
            yield _qido(DicomWeb(http, cloud.dicomweb_url.rstrip("/")))
    finally:
        http.session.close()


def _clock(http: CloudHttp, url: str, timeout: float) -> Finding:
    if not url:
        return Finding(
            "clock", Verdict.WARN, "no cloud URL to compare with", "set cloud.upload_url"
        )
    try:
        response = http.session.request("OPTIONS", url, timeout=timeout)
        response.close()
        theirs = parsedate_to_datetime(response.headers["Date"]).timestamp()
    except requests.RequestException as exc:
        return Finding(
            "clock", Verdict.WARN, f"cannot ask the cloud: {type(exc).__name__}", "see cloud tcp"
        )
    except (KeyError, TypeError, ValueError):
        return Finding("clock", Verdict.WARN, "the cloud's answer has no usable Date header")
    skew = time.time() - theirs
    if abs(skew) > CLOCK_WARN_SECONDS:
        ahead = "ahead of" if skew > 0 else "behind"
        return Finding(
            "clock",
            Verdict.WARN,
            f"this clock is {abs(skew):.0f} s {ahead} the cloud's",
            "enable NTP (timedatectl set-ntp true); TLS and retention depend on the time",
        )
    return Finding("clock", Verdict.OK, f"within {abs(skew):.0f} s of the cloud's")


def _tus(http: CloudHttp, url: str) -> Finding:
    try:
        capabilities = TusClient(http, url).capabilities()
    except CloudError as exc:
        return Finding("tus", Verdict.FAIL, str(exc), _cloud_hint(exc))
    missing = {"creation"} - capabilities.extensions
    if missing:
        return Finding(
            "tus",
            Verdict.FAIL,
            f"the server lacks the tus extension(s) {', '.join(sorted(missing))}",
            "cloud.upload_url must be the exchange's tus creation endpoint",
        )
    limit = f", max size {capabilities.max_size} bytes" if capabilities.max_size else ""
    extensions = ", ".join(sorted(capabilities.extensions))
    return Finding(
        "tus",
        Verdict.OK,
        f"tus {', '.join(capabilities.versions)}; extensions {extensions}{limit}",
    )


def _qido(dicomweb: DicomWeb) -> Finding:
    try:
        answers = dicomweb.search("studies", [], 0, 1)
    except CloudError as exc:
        return Finding("qido", Verdict.FAIL, str(exc), _cloud_hint(exc))
    return Finding("qido", Verdict.OK, f"QIDO-RS answered ({len(answers)} study of limit=1)")


def _cloud_hint(exc: CloudError) -> str:
    if exc.status in (401, 403):
        return "the exchange refused our credentials: check cloud.token_file and the certificate"
    if exc.status is None:
        return "see the cloud dns/tcp/tls checks above"
    return "check the URL in the configuration"


# -- peers ------------------------------------------------------------------------------------


def _peers(settings: Settings, timeout: float) -> Iterator[Finding]:
    tls: DicomTls | None = None
    if settings.dicom.tls is not None:
        try:
            tls = DicomTls.load(settings.dicom.tls)
        except ConfigError as exc:
            more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
            hint = "the agent refuses to start until this is fixed"
            yield Finding("dicom tls", Verdict.FAIL, exc.problems[0] + more, hint)
        else:
            port = settings.dicom.tls.port
            yield Finding("dicom tls", Verdict.OK, f"the certificates load; TLS port {port}")
    for peer in settings.dicom.peers:
        if peer.host is None or peer.port is None:
            continue
        name = f"peer {peer.ae_title}"
        if peer.tls and tls is None:
            yield Finding(name, Verdict.FAIL, "marked tls, and dicom.tls is unusable", "see above")
            continue
        try:
            elapsed = echo(
                settings.dicom.ae_title, peer, timeout, tls.args_for(peer) if tls else None
            )
        except EchoFailed as exc:
            yield Finding(
                name,
                Verdict.FAIL,
                str(exc),
                f"is it up, does it know {settings.dicom.ae_title} at this host, a firewall?",
            )
            continue
        yield Finding(
            name,
            Verdict.OK,
            f"C-ECHO to {peer.host}:{peer.port}{' over TLS' if peer.tls else ''}: Success"
            f" ({elapsed * 1000:.0f} ms)",
        )
