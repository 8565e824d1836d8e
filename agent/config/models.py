"""The settings: which key has which type and default, and the checks that span several keys."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails

from agent.config.rules import (
    AETitle,
    Associations,
    AuditRetention,
    Bandwidth,
    BindAddress,
    CacheSize,
    ChunkSize,
    CompressionLevel,
    CompressionThreads,
    DataDir,
    File,
    Flag,
    Host,
    Level,
    Listen,
    MiB,
    OptionalFile,
    OptionalPort,
    OptionalUrl,
    PageSize,
    PduSize,
    Percent,
    Port,
    QuarantineSize,
    QueueLength,
    QuietTime,
    Retention,
    Section,
    Service,
    Services,
    SiteId,
    StowBatch,
    SyslogAddress,
    Timeout,
    UnsetUrl,
    Workers,
    check_ae_title,
    check_flag,
    check_port,
    choice,
    empty_as_no_items,
    listen_address,
    redact_url,
    rule,
)
from agent.config.units import YEAR

PEER_SERVICES: tuple[Service, ...] = ("store", "echo", "find", "get", "move")
"""What a peer with a `host` may use unless its `services` say otherwise."""
HOSTLESS_SERVICES: tuple[Service, ...] = ("store", "echo")
"""What a peer without `host` (admitted from any address on its AE title alone) may use unless
its `services` say otherwise, and what an unknown peer may use with `accept_unknown_peers`."""


class Peer(BaseModel):
    """A DICOM node we talk to: a calling AE we admit, what it may ask of us, and optionally
    where to send to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: AETitle
    host: Host = None
    port: OptionalPort = None
    services: Services = PEER_SERVICES
    tls: Flag = False
    """The peer speaks DICOM over TLS: its associations are admitted on the TLS port only, and
    ours to it (C-MOVE destination, `dirigo echo`, `dirigo retrieve`) use TLS."""

    @model_validator(mode="before")
    @classmethod
    def _default_services(cls, data: object) -> object:
        """Without `services`, a peer with a host may use every service, one without only
        store and echo: an AE title alone proves nothing."""
        if isinstance(data, dict) and data.get("services") is None:
            default = HOSTLESS_SERVICES if data.get("host") is None else PEER_SERVICES
            return {**data, "services": default}
        return data


class TlsSettings(BaseModel):
    """DICOM over TLS (PS3.15 Annex B.9, the BCP 195 RFC 8996 TLS profile): a second port,
    served by the same agent, and the certificates for it and for our TLS associations."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: Port
    cert: File
    """Our certificate (PEM), followed by its chain; with the private key too when `key` is
    not set."""
    key: OptionalFile = None
    ca: OptionalFile = None
    """The CA certificates (PEM) that client certificates and TLS peers' certificates must
    chain to."""
    require_client_cert: Flag = True

    @model_validator(mode="wrap")
    @classmethod
    def _ca_to_verify(cls, value: Any, handler: ModelWrapValidatorHandler[TlsSettings]) -> Any:
        """Report a missing `ca` while client certificates are required together with the
        section's other problems."""
        return _with_problems(cls.__name__, _ca_problems(value), handler, value)


class DicomSettings(BaseModel):
    """The DICOM listener: who we are, where we listen, whom we admit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: AETitle = "DIRIGO"
    bind: BindAddress = "0.0.0.0"
    port: Port = 11112
    max_associations: Associations = 10
    max_pdu: PduSize = MiB
    acse_timeout: Timeout = 30.0
    dimse_timeout: Timeout = 60.0
    network_timeout: Timeout = 120.0
    peers: Annotated[tuple[Peer, ...], BeforeValidator(empty_as_no_items)] = ()
    accept_unknown_peers: Flag = False
    tls: TlsSettings | None = None

    @field_validator("peers", mode="wrap")
    @classmethod
    def _unique_titles(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """Validate the peers and report every repeated AE title at its own index, together
        with the peers' other problems (pydantic would stop at the first)."""
        return _with_problems(cls.__name__, _duplicate_titles(value), handler, value)

    @model_validator(mode="wrap")
    @classmethod
    def _tls_for_peers(cls, value: Any, handler: ModelWrapValidatorHandler[DicomSettings]) -> Any:
        """Report what TLS needs (a peer marked `tls` needs `dicom.tls` with a `ca`; the TLS
        port is not the plain one) together with every other problem of the section."""
        return _with_problems(cls.__name__, _tls_problems(value), handler, value)

    def warnings(self) -> list[str]:
        """Return the admission rules that let a caller in on its AE title alone."""
        found = [
            f"At 'dicom.peers[{index}]': {peer.ae_title!r} has no host, so any machine calling"
            f" as this AE title is admitted (to {', '.join(peer.services) or 'no service'});"
            " set its host"
            for index, peer in enumerate(self.peers)
            if peer.host is None
        ]
        if self.accept_unknown_peers:
            found.append(
                "At 'dicom.accept_unknown_peers': any AE title from any address is admitted"
                f" (to {', '.join(HOSTLESS_SERVICES)}); list the senders in dicom.peers instead"
            )
        return found


class StudySettings(BaseModel):
    """When a study counts as complete."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stable_after: QuietTime = 60.0


class SpoolSettings(BaseModel):
    """Limits on the spool in `data_dir`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    high_water: Percent = 90.0
    keep_sent_for: Retention = 7 * 86400.0
    quarantine_keep: Retention = 30 * 86400.0
    quarantine_max: QuarantineSize = 2**30
    purge_unconfirmed: Flag = False
    """Without `cloud.dicomweb_url` no part is ever confirmed: may the high-water purge take
    merely sent parts before `keep_sent_for`?"""


class CloudSettings(BaseModel):
    """Where the state exchange is, and how to prove who we are to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    upload_url: UnsetUrl = ""
    """Required with `upload.protocol: tus` (checked by `Settings`); "" when not given."""
    dicomweb_url: OptionalUrl = None
    ca_file: OptionalFile = None
    client_cert: OptionalFile = None
    client_key: OptionalFile = None
    token_file: OptionalFile = None
    timeout: Timeout = 60.0
    heartbeat_url: OptionalUrl = None
    """Where the heartbeat goes (a Healthchecks-style ping URL); None: no heartbeat."""
    heartbeat_every: Timeout = 60.0

    @model_validator(mode="after")
    def _cert_with_key(self) -> CloudSettings:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("'client_key' is set without 'client_cert'")
        return self


class UploadSettings(BaseModel):
    """How complete studies are packed and sent to the cloud."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Annotated[str, rule(choice("tus", "stow-rs"))] = "tus"
    chunk_size: ChunkSize = 8 * MiB
    stow_batch: StowBatch = 16 * MiB
    concurrency: Workers = 2
    max_bandwidth: Bandwidth = 0
    compression: Annotated[str, rule(choice("zstd", "none"))] = "zstd"
    compression_level: CompressionLevel = 3
    compression_threads: CompressionThreads = 0
    transcode: Annotated[str, rule(choice("auto", "none", "jpeg-ls", "htj2k"))] = "auto"
    """The lossless codec applied before zstd; `auto` chooses per part by the link and this
    machine's pack speed (`agent.codecchoice`)."""
    retry_first: Timeout = 10.0
    retry_max: Timeout = 900.0


class ServeSettings(BaseModel):
    """Query/Retrieve for the local PACS: the cloud's archive answered as a DICOM node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_size: CacheSize = 10 * 2**30
    page_size: PageSize = 100
    fetch_syntax: Annotated[str, rule(choice("auto", "as-stored", "jpeg-ls", "htj2k"))] = "auto"
    """The transfer syntax asked of the archive for an instance it holds uncompressed
    (`agent.serve.fetchsyntax`)."""


class HealthSettings(BaseModel):
    """The health HTTP server: /healthz, /readyz, /status, /metrics and the status page."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    listen: Listen = "127.0.0.1:8080"
    cert: OptionalFile = None
    key: OptionalFile = None
    token_file: OptionalFile = None
    stall_after: QuietTime = 300.0
    """How long an upload worker or the supervisor may go without progress before /healthz
    reports it (the DICOM acceptor beats twice a second and gets the lesser of this and 30s)."""

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> HealthSettings:
        if self.key is not None and self.cert is None:
            raise ValueError("'key' is set without 'cert'")
        address = listen_address(self.listen)
        if address and not ipaddress.ip_address(address[0]).is_loopback and not self.token_file:
            raise ValueError(
                f"'token_file' is required when 'listen' ({self.listen}) is not a loopback"
                " address: /status, /metrics and the status page are shown only to a caller"
                " with the token"
            )
        return self


class WatchDir(BaseModel):
    """A folder files are dropped into (a CD copied, an export from another hospital's
    system), and where each file goes once taken: `done` when accepted, `rejected` (beside a
    `.reason` text) when not. The three are distinct and none lies inside another."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: DataDir
    done: DataDir
    rejected: DataDir

    @model_validator(mode="after")
    def _apart(self) -> WatchDir:
        folders = {"path": self.path, "done": self.done, "rejected": self.rejected}
        for name, folder in folders.items():
            for other, inner in folders.items():
                if name != other and inner.is_relative_to(folder):
                    where = "is" if inner == folder else "lies inside"
                    raise ValueError(f"'{other}' {where} '{name}' ({folder}); keep them apart")
        return self


class WatchSettings(BaseModel):
    """Watch folders: files dropped there are imported like `dirigo send`, then moved away."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dirs: Annotated[tuple[WatchDir, ...], BeforeValidator(empty_as_no_items)] = ()
    settle: QuietTime = 5.0
    """How long a file (or everything in a folder dropped in) must stay unchanged."""
    poll: Flag = False
    """Poll instead of inotify: network shares and mounted CDs send no inotify events."""

    @model_validator(mode="after")
    def _watched_apart(self) -> WatchSettings:
        """A watched folder may not overlap another entry's folders (its files would be taken
        twice); entries may share `done` and `rejected`."""
        for i, one in enumerate(self.dirs):
            for j, other in enumerate(self.dirs):
                if i == j:
                    continue
                for folder in (other.path, other.done, other.rejected):
                    if one.path.is_relative_to(folder) or folder.is_relative_to(one.path):
                        raise ValueError(
                            f"'dirs[{i}].path' ({one.path}) overlaps {folder} of 'dirs[{j}]'"
                        )
        return self


class AuditSettings(BaseModel):
    """The audit trail: every association, study, part, query, retrieve and quarantine is kept
    in the database for `keep`; with `syslog`, each is also sent as a DICOM audit message
    (PS3.15 A.5) to a syslog collector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    syslog: SyslogAddress = None
    """`tcp://host:port` or `tcp+tls://host:port` (RFC 5425); None: kept in the database only."""
    ca: OptionalFile = None
    """With `tcp+tls`, the CA bundle that signed the collector's certificate (default: the
    system's trusted CAs)."""
    keep: AuditRetention = float(YEAR)
    queue: QueueLength = 10000
    """Messages waiting for the collector at most; beyond, new ones are dropped (and counted),
    never waited for: they stay in the database either way."""

    @model_validator(mode="after")
    def _ca_with_tls(self) -> AuditSettings:
        if self.ca is not None and not (self.syslog or "").lower().startswith("tcp+tls://"):
            raise ValueError("'ca' is set but 'syslog' is not a tcp+tls:// address")
        return self


class Settings(BaseModel):
    """The whole validated configuration. Dumping it (`redacted`, `model_dump`) gives the YAML
    form: durations as ``90s``, sizes as ``1MiB``, percentages as ``90%``, URLs redacted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: SiteId
    data_dir: DataDir = Path("/var/lib/dirigo")
    log_level: Level = "info"
    dicom: Annotated[DicomSettings, Section] = Field(default_factory=DicomSettings)
    study: Annotated[StudySettings, Section] = Field(default_factory=StudySettings)
    spool: Annotated[SpoolSettings, Section] = Field(default_factory=SpoolSettings)
    cloud: Annotated[CloudSettings, Section]
    upload: Annotated[UploadSettings, Section] = Field(default_factory=UploadSettings)
    serve: Annotated[ServeSettings, Section] = Field(default_factory=ServeSettings)
    health: Annotated[HealthSettings, Section] = Field(default_factory=HealthSettings)
    watch: Annotated[WatchSettings, Section] = Field(default_factory=WatchSettings)
    audit: Annotated[AuditSettings, Section] = Field(default_factory=AuditSettings)

    @model_validator(mode="wrap")
    @classmethod
    def _protocol_needs(cls, value: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        """Report what the upload protocol needs (tus: `cloud.upload_url`; stow-rs:
        `cloud.dicomweb_url`) together with every other problem."""
        settings: Settings = _with_problems(cls.__name__, _protocol_problems(value), handler, value)
        return settings

    def warnings(self) -> list[str]:
        """Return what is valid but unsafe, one sentence per finding, each naming its key
        (`dirigo check-config` prints them; the agent still starts)."""
        found = self.dicom.warnings()
        for key in ("upload_url", "dicomweb_url", "heartbeat_url"):
            url = getattr(self.cloud, key)
            if url and urlsplit(url).scheme.lower() == "http":
                found.append(
                    f"At 'cloud.{key}': {redact_url(url)} is plain http: the token and patient"
                    " data would cross the network unencrypted; use https"
                )
        address = listen_address(self.health.listen)
        if address and not ipaddress.ip_address(address[0]).is_loopback and not self.health.cert:
            found.append(
                f"At 'health.listen': {self.health.listen} is beyond loopback without"
                " 'health.cert': the bearer token and the status would cross the network"
                " unencrypted; set health.cert"
            )
        return found

    def exposed_secret_files(self) -> list[str]:
        """Return, one sentence per file, every secret file (a private key, a token) that its
        group or other users may read: the agent refuses to start with one. A file that is
        missing or cannot be inspected is left to the code that reads it."""
        found = []
        for key, path in _secret_files(self, ""):
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
            except OSError:
                continue
            if mode & (stat.S_IRGRP | stat.S_IROTH):
                found.append(
                    f"At '{key}': {path} is readable by its group or"
                    f" by others (mode {mode:04o}); make it readable by the agent's user"
                    f" alone (chmod 600 {path})"
                )
        return found

    def redacted(self) -> dict[str, object]:
        """Return the effective configuration as plain YAML-able data with secrets replaced by
        ``***``. Without secrets it parses back (`parse_config`) to an equal Settings."""
        return self.model_dump(mode="json")


SECRET_FILE_KEYS = frozenset({"key", "client_key", "token_file"})
"""Keys, in any section, whose file holds a secret: the agent refuses one others may read."""
KEY_IN_CERT = {"cert": "key", "client_cert": "client_key"}
"""A certificate key whose file holds the private key too when its key file is not set."""


def _secret_files(model: BaseModel, prefix: str) -> Iterator[tuple[str, Path]]:
    """Yield (key path, file) of every secret file set anywhere in `model`."""
    for name, value in model:
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for index, item in items:
            key = f"{prefix}{name}" if index is None else f"{prefix}{name}[{index}]"
            if isinstance(item, BaseModel):
                yield from _secret_files(item, f"{key}.")
            elif isinstance(item, Path) and (
                name in SECRET_FILE_KEYS
                or (name in KEY_IN_CERT and getattr(model, KEY_IN_CERT[name], "") is None)
            ):
                yield key, item


def _with_problems(
    title: str, details: list[InitErrorDetails], handler: Callable[[Any], Any], value: object
) -> Any:
    """Validate `value` with `handler` and raise the problems it finds together with `details`
    (found beforehand across several keys), so one run reports all of them."""
    try:
        validated = handler(value)
    except ValidationError as exc:
        details = [_init_details(error) for error in exc.errors()] + details
        raise ValidationError.from_exception_data(title, details) from None
    if details:
        raise ValidationError.from_exception_data(title, details)
    return validated


def _duplicate_titles(value: object) -> list[InitErrorDetails]:
    if not isinstance(value, list | tuple):
        return []
    seen: set[str] = set()
    details: list[InitErrorDetails] = []
    for index, entry in enumerate(value):
        raw = entry.ae_title if isinstance(entry, Peer) else None
        raw = entry.get("ae_title") if isinstance(entry, dict) else raw
        try:
            title = check_ae_title(raw)
        except ValueError:
            continue  # reported by the peer's own validation
        if title in seen:
            error = ValueError(f"duplicate AE title {title!r}")
            details.append(_value_error((index, "ae_title"), raw, error))
        seen.add(title)
    return details


def _ca_problems(value: object) -> list[InitErrorDetails]:
    """Return the raw `dicom.tls` data's missing `ca` while client certificates are required."""
    if not isinstance(value, dict) or value.get("ca") is not None:
        return []
    try:
        required = check_flag(value.get("require_client_cert", True))
    except ValueError:
        return []  # reported by the field itself
    if not required:
        return []
    error = ValueError(
        "required while 'require_client_cert' is true: client certificates are checked against"
        " it (set require_client_cert: false to admit TLS clients without one)"
    )
    return [_value_error(("ca",), None, error)]


def _tls_problems(value: object) -> list[InitErrorDetails]:
    """Return what the raw `dicom` data's peers marked `tls` need and its `tls` lacks, and a
    TLS port that is the plain port too."""
    data = value if isinstance(value, dict) else {}
    tls, peers = data.get("tls"), data.get("peers")
    tls = tls if isinstance(tls, dict) else None
    details: list[InitErrorDetails] = []
    for index, peer in enumerate(peers if isinstance(peers, list | tuple) else ()):
        marked = peer.tls if isinstance(peer, Peer) else isinstance(peer, dict) and peer.get("tls")
        if marked is True and (tls is None or tls.get("ca") is None):
            missing = "dicom.tls.ca" if tls is not None else "dicom.tls"
            error = ValueError(
                f"the peer is marked tls but {missing} is not set: it is what the peer's"
                " certificate is checked against"
            )
            details.append(_value_error(("peers", index, "tls"), True, error))
    if tls is not None:
        try:
            port = check_port(tls.get("port"))
            plain = check_port(data.get("port", DicomSettings.model_fields["port"].default))
        except ValueError:
            return details  # reported by the fields themselves
        if port == plain:
            error = ValueError(f"{port} is dicom.port too; the TLS port needs a port of its own")
            details.append(_value_error(("tls", "port"), tls.get("port"), error))
    return details


def _protocol_problems(value: object) -> list[InitErrorDetails]:
    """Return what the raw data's `upload.protocol` needs and its `cloud` section lacks."""
    data = value if isinstance(value, dict) else {}
    cloud, upload = data.get("cloud"), data.get("upload") or {}
    if not isinstance(cloud, dict) or not isinstance(upload, dict):
        return []  # no cloud section (reported as required) or not mappings (reported too)
    try:
        protocol = choice("tus", "stow-rs")(upload.get("protocol", "tus"))
    except ValueError:
        return []  # reported by the field itself
    if protocol == "tus" and cloud.get("upload_url") is None:
        return [InitErrorDetails(type="missing", loc=("cloud", "upload_url"), input=cloud)]
    if protocol == "stow-rs" and cloud.get("dicomweb_url") is None:
        error = ValueError("'stow-rs' needs 'cloud.dicomweb_url', the archive's DICOMweb base")
        return [_value_error(("upload", "protocol"), upload.get("protocol"), error)]
    return []


def _value_error(loc: tuple[int | str, ...], value: object, error: ValueError) -> InitErrorDetails:
    return InitErrorDetails(type="value_error", loc=loc, input=value, ctx={"error": error})


def _init_details(error: ErrorDetails) -> InitErrorDetails:
    details = InitErrorDetails(type=error["type"], loc=error["loc"], input=error["input"])
    if "ctx" in error:
        details["ctx"] = error["ctx"]
    return details
