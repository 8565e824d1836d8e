"""Configuration: read the YAML file, validate all of it at once, hand out frozen settings.

Every problem is reported together, each naming its key (``At 'dicom.port': ...``), so that an
administrator fixes the file in one pass instead of one restart per typo. The rules for each
kind of value live in the annotated types below (parse, check, format back); the models only
say which key has which type and default.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast, get_args, get_origin
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails

T = TypeVar("T")
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
MiB = 1024 * 1024
MAX_DURATION = 365 * 86400.0  # beyond a year a timeout is a typo, and datetime arithmetic overflows
MAX_PDU = 2**32 - 1  # the PDU length field is 32 bits
MIN_PDU = 4096
# a query parameter whose name has one of these words carries a secret (e.g. X-Amz-Signature)
SECRET_WORDS = frozenset(
    {"token", "secret", "password", "passwd", "signature", "sig", "key", "apikey", "auth"}
)


class ConfigError(Exception):
    """The configuration cannot be used. `problems` holds one line per problem: ``At 'key': ...``
    for a bad key, or a sentence about the file itself (missing, empty, not YAML)."""

    def __init__(self, problems: list[str], source: str = "<config>") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {problem}" for problem in problems))


# --- durations and sizes -------------------------------------------------------------------

_NUMBER = r"([0-9]{1,30}(?:\.[0-9]{1,30})?)"  # ASCII digits only: \d would accept Arabic-Indic
_DURATION = re.compile(_NUMBER + r"\s*(ms|s|m|h|d|)")
_SIZE = re.compile(_NUMBER + r"\s*([A-Za-z]*)")
_SECONDS_PER = {"ms": Fraction(1, 1000), "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
_BYTES_PER = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BYTES_PER |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_UNITS = (
    ("GiB", 2**30),
    ("MiB", 2**20),
    ("KiB", 2**10),
    ("GB", 10**9),
    ("MB", 10**6),
    ("kB", 10**3),
)


def parse_duration(text: str | int | float) -> float:
    """Given ``90s``, ``5m``, ``2h``, ``7d``, ``500ms`` or a bare number of seconds, return the
    number of seconds. Raise ValueError for anything else, including negative, infinite or NaN
    values and compound forms such as ``1h30m``."""
    return _seconds(text)


def parse_size(text: str | int) -> int:
    """Given ``8MiB``, ``512KiB``, ``1GiB`` (powers of 1024), ``8MB``, ``10kB`` (powers of 1000)
    or a bare number of bytes, return the number of bytes. Units are case-insensitive. Raise
    ValueError for anything else, including negative or fractional byte counts."""
    return _bytes(text)


def _seconds(value: object) -> float:
    amount = _amount(value, _DURATION, _SECONDS_PER, allow_float=True)
    try:
        if amount is not None:
            return float(amount)
    except OverflowError:
        pass
    raise ValueError(f"{_show(value)} is not a duration (use e.g. 90s, 5m, 2h)")


def _bytes(value: object) -> int:
    amount = _amount(value, _SIZE, _BYTES_PER, allow_float=False)
    if amount is None or amount.denominator != 1:
        raise ValueError(f"{_show(value)} is not a size (use e.g. 8MiB, 512KiB, 10MB)")
    return int(amount)


def _amount(
    value: object, pattern: re.Pattern[str], units: dict[str, Any], *, allow_float: bool
) -> Fraction | None:
    """Return the non-negative amount `value` stands for, or None if it is not one."""
    if isinstance(value, bool):  # YAML's `yes` is a bool, and bool is an int in Python
        return None
    if isinstance(value, int):
        amount: Fraction | None = Fraction(value)
    elif allow_float and isinstance(value, float):
        amount = Fraction(value) if math.isfinite(value) else None
    elif isinstance(value, str) and (match := pattern.fullmatch(value.strip())):
        unit = units.get(match[2].lower())
        amount = None if unit is None else Fraction(match[1]) * unit
    else:
        return None
    return amount if amount is not None and amount >= 0 else None


def _format_duration(seconds: float) -> str | float:
    """Return the shortest exact text for `seconds` (``7d``, ``500ms``), else the number."""
    seconds = float(seconds)  # an int from Python code has no is_integer() before 3.12
    if seconds == 0:
        return "0s"
    if seconds.is_integer():
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds % size == 0:
                return f"{int(seconds // size)}{unit}"
        return f"{int(seconds)}s"
    millis = seconds * 1000
    if millis.is_integer() and _seconds(f"{int(millis)}ms") == seconds:
        return f"{int(millis)}ms"
    return seconds  # a bare number is seconds, and YAML keeps a float exactly


def _format_size(size: int) -> str | int:
    for unit, factor in _SIZE_UNITS:
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return size


def _format_percent(percent: float) -> str:
    return f"{int(percent)}%" if percent.is_integer() else f"{percent!r}%"


# --- value rules: each returns the clean value or raises ValueError with a human sentence ------


def _show(value: object) -> str:
    """Return `value` as the user would recognise it from the YAML file, kept short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, int) and value.bit_length() > 64:
        return "a very large number"  # repr of a huge int is slow, then refused
    if isinstance(value, int | float):
        return repr(value)
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _text(value: object, what: str) -> str:
    if isinstance(value, str):
        return value
    hint = ""
    if isinstance(value, bool):
        hint = " (YAML reads yes/no/on/off as true/false; put the value in quotes)"
    elif not isinstance(value, dict | list):
        hint = " (put it in quotes)"
    raise ValueError(f"{_show(value)} is not {what}{hint}")


def _bounded_int(low: int, high: int, what: str) -> Callable[[object], int]:
    def check(value: object) -> int:
        number = value.strip() if isinstance(value, str) else value
        if isinstance(number, str) and re.fullmatch("[0-9]{1,10}", number):
            number = int(number)
        if isinstance(number, int) and not isinstance(number, bool) and low <= number <= high:
            return number
        raise ValueError(f"{_show(value)} is not a valid {what} ({low}-{high})")

    return check


def _ae_title(value: object) -> str:
    text = _text(value, "an AE title")
    title = text.strip(" ")  # DICOM pads AE titles with spaces; they are not part of the title
    if not title:
        raise ValueError("an AE title must not be empty or only spaces")
    if any(not " " <= char <= "~" or char == "\\" for char in title):
        raise ValueError(f"{_show(text)} is not a valid AE title (printable ASCII, no backslash)")
    if len(title) > 16:
        raise ValueError(
            f"{_show(text)} is too long for an AE title ({len(title)} > 16 characters)"
        )
    return title


_SITE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _site(value: object) -> str:
    text = _text(value, "a site id")
    if _SITE.fullmatch(text):
        return text
    fixed = text.strip().lower()
    hint = f"; did you mean {fixed!r}?" if _SITE.fullmatch(fixed) else ""
    rule = "1-64 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
    raise ValueError(f"{_show(text)} is not a valid site id ({rule}{hint})")


def _bind(value: object) -> str:
    text = _text(value, "an IP address")
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(
            f"{_show(text)} is not an IP address (e.g. 0.0.0.0 for every IPv4 interface, "
            "127.0.0.1, or :: for every interface)"
        ) from None


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _host(value: object) -> str:
    text = _text(value, "a host name or IP address").strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if len(text) <= 253 and _HOSTNAME.fullmatch(text):
        return text
    hint = " (give the port in 'port')" if re.search(r":[0-9]+$", text) else ""
    raise ValueError(f"{_show(text)} is not a host name or IP address{hint}")


def _url(value: object) -> str:
    text = _text(value, "a URL").strip()
    problem = f"{_show(text)} is not an http:// or https:// URL with a host"
    if any(char.isspace() or not char.isprintable() for char in text):
        raise ValueError(problem)
    try:
        parts = urlsplit(text)
        ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:  # an unclosed '[' of an IPv6 host
        ok = False
    if not ok:
        raise ValueError(problem)
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked for it
    except ValueError:
        raise ValueError(f"{_show(text)} has an invalid port (1-65535)") from None
    return text


def _percent(value: object) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool) and 1 <= value <= 100:
        number = float(value)  # compared first: NaN fails, and a huge int never meets float()
    elif isinstance(value, str) and (match := re.fullmatch(_NUMBER + r"\s*%?", value.strip())):
        number = float(match[1])
    if number is not None and 1 <= number <= 100:
        return number
    raise ValueError(f"{_show(value)} is not a valid percentage (1% to 100%)")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    hint = " (write it without quotes)" if value in ("true", "false") else ""
    raise ValueError(f"{_show(value)} is not true or false{hint}")


def _log_level(value: object) -> LogLevel:
    text = _text(value, "a log level")
    for level in LOG_LEVELS:
        if text.strip().lower() == level:
            return level
    close = difflib.get_close_matches(text.strip().lower(), LOG_LEVELS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{_show(text)} is not a log level (debug, info, warning or error{hint})")


def _duration(minimum: float, *, inclusive: bool) -> Callable[[object], float]:
    def check(value: object) -> float:
        seconds = _seconds(value)
        if seconds < minimum or (seconds == minimum and not inclusive):
            bound = "at least" if inclusive else "more than"
            raise ValueError(f"{_show(value)} is too short ({bound} {_format_duration(minimum)})")
        if seconds > MAX_DURATION:
            raise ValueError(f"{_show(value)} is too long (at most 365d)")
        return seconds

    return check


def _pdu_size(value: object) -> int:
    size = _bytes(value)
    if size == 0 or MIN_PDU <= size <= MAX_PDU:
        return size
    raise ValueError(
        f"{_show(value)} is not a valid PDU size (0 for unlimited, or {MIN_PDU} to {MAX_PDU} bytes)"
    )


def _choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = _text(value, "one of " + ", ".join(choices)).strip().lower()
        if text in choices:
            return text
        raise ValueError(f"{_show(value)} is not one of {', '.join(choices)}")

    return check


def _size_between(low: int, high: int, what: str) -> Callable[[object], int]:
    def check(value: object) -> int:
        size = _bytes(value)
        if low <= size <= high:
            return size
        bounds = f"{_format_size(low) or 0} to {_format_size(high)}"
        raise ValueError(f"{_show(value)} is not a valid {what} ({bounds})")

    return check


def _absolute_path(value: object, info: ValidationInfo) -> Path:
    """Return the absolute path; a relative one is taken from the config file's directory,
    which `load_config` passes in the validation context."""
    text = str(value) if isinstance(value, Path) else _text(value, "a path")
    if not text.strip() or "\0" in text:
        raise ValueError(f"{_show(text)} is not a path")
    if text.startswith("~"):
        raise ValueError(f"{_show(text)}: '~' is not expanded here; give an absolute path")
    path = Path(text)
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    if not path.is_absolute():
        if not isinstance(base, Path):
            raise ValueError(f"{_show(text)} is relative; give an absolute path")
        path = base / path
    return Path(os.path.normpath(path))


def redact_url(url: str) -> str:
    """Return `url` with any password (or lone userinfo token) and secret-looking query values
    replaced by ``***``; the result is still a valid URL. A URL without secrets is unchanged."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    netloc = (f"{user}:***@" if colon else "***@") + hostport if at else parts.netloc
    query = "&".join(_redact_query_field(field) for field in parts.query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # urlunsplit would drop an empty '?' or '#'
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _redact_query_field(field: str) -> str:
    name, equals, _ = field.partition("=")
    words = re.split(r"[^a-z]+", unquote(name).lower())
    secret = any(word in SECRET_WORDS for word in words)
    return f"{name}=***" if equals and secret else field


def _redact_optional_url(url: str | None) -> str | None:
    return None if url is None else redact_url(url)


def _url_or_unset(value: object) -> str:
    # "" stands for "not given": a str either way, so code that needs it does not check None
    return "" if value is None else _url(value)


def _redact_unset_url(url: str) -> str | None:
    return redact_url(url) if url else None


def _rule(check: Callable[[object], T], *, optional: bool = False) -> BeforeValidator:
    """Wrap a value rule so that an empty YAML value (`port:`) reads as a sentence too."""

    def validate(value: object) -> T | None:
        if value is None:
            if optional:
                return None
            raise ValueError("no value given")
        return check(value)

    return BeforeValidator(validate)


def _optional_path(value: object, info: ValidationInfo) -> Path | None:
    return None if value is None else _absolute_path(value, info)


def _empty_as_default(value: object) -> object:
    # `dicom:` with every line below it commented out is YAML null: treat it as "all defaults"
    return {} if value is None else value


def _empty_as_no_items(value: object) -> object:
    return () if value is None else value


# The types of the settings: each parses the YAML forms, checks, and formats back for dumping.
SiteId = Annotated[str, _rule(_site)]
DataDir = Annotated[Path, BeforeValidator(_absolute_path)]
OptionalFile = Annotated[Path | None, BeforeValidator(_optional_path)]
Level = Annotated[LogLevel, _rule(_log_level)]
AETitle = Annotated[str, _rule(_ae_title)]
BindAddress = Annotated[str, _rule(_bind)]
Host = Annotated[str | None, _rule(_host, optional=True)]
Port = Annotated[int, _rule(_bounded_int(1, 65535, "port"))]
OptionalPort = Annotated[int | None, _rule(_bounded_int(1, 65535, "port"), optional=True)]
Associations = Annotated[int, _rule(_bounded_int(1, 1000, "number of associations"))]
PduSize = Annotated[int, _rule(_pdu_size), PlainSerializer(_format_size)]
Timeout = Annotated[float, _rule(_duration(0, inclusive=False)), PlainSerializer(_format_duration)]
QuietTime = Annotated[float, _rule(_duration(1, inclusive=True)), PlainSerializer(_format_duration)]
Percent = Annotated[float, _rule(_percent), PlainSerializer(_format_percent)]
Flag = Annotated[bool, _rule(_boolean)]
Url = Annotated[str, _rule(_url), PlainSerializer(redact_url)]
OptionalUrl = Annotated[
    str | None, _rule(_url, optional=True), PlainSerializer(_redact_optional_url)
]
UnsetUrl = Annotated[str, BeforeValidator(_url_or_unset), PlainSerializer(_redact_unset_url)]
ChunkSize = Annotated[
    int, _rule(_size_between(64 * 1024, 1024 * MiB, "chunk size")), PlainSerializer(_format_size)
]
StowBatch = Annotated[
    int, _rule(_size_between(64 * 1024, 1024 * MiB, "batch size")), PlainSerializer(_format_size)
]
Bandwidth = Annotated[
    int, _rule(_size_between(0, 10**12, "bandwidth")), PlainSerializer(_format_size)
]
Workers = Annotated[int, _rule(_bounded_int(1, 64, "number of uploads"))]
CompressionLevel = Annotated[int, _rule(_bounded_int(1, 19, "zstd level"))]
CompressionThreads = Annotated[int, _rule(_bounded_int(0, 64, "number of threads"))]
Retention = Annotated[float, _rule(_duration(0, inclusive=True)), PlainSerializer(_format_duration)]
CacheSize = Annotated[
    int, _rule(_size_between(0, 2**50, "cache size")), PlainSerializer(_format_size)
]
PageSize = Annotated[int, _rule(_bounded_int(1, 10000, "page size"))]
Section = BeforeValidator(_empty_as_default)


# --- the settings ------------------------------------------------------------------------------


class Peer(BaseModel):
    """A DICOM node we talk to: a calling AE we admit, and optionally where to send to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: AETitle
    host: Host = None
    port: OptionalPort = None


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
    peers: Annotated[tuple[Peer, ...], BeforeValidator(_empty_as_no_items)] = ()
    accept_unknown_peers: Flag = False

    @field_validator("peers", mode="wrap")
    @classmethod
    def _unique_titles(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """Validate the peers and report every repeated AE title at its own index, together
        with the peers' other problems (pydantic would stop at the first)."""
        details = _duplicate_titles(value)
        try:
            peers = handler(value)
        except ValidationError as exc:
            details = [_init_details(error) for error in exc.errors()] + details
            raise ValidationError.from_exception_data(cls.__name__, details) from None
        if details:
            raise ValidationError.from_exception_data(cls.__name__, details)
        return peers


class StudySettings(BaseModel):
    """When a study counts as complete."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stable_after: QuietTime = 60.0


class SpoolSettings(BaseModel):
    """Limits on the spool in `data_dir`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    high_water: Percent = 90.0
    keep_sent_for: Retention = 7 * 86400.0


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

    @model_validator(mode="after")
    def _cert_with_key(self) -> CloudSettings:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("'client_key' is set without 'client_cert'")
        return self


class UploadSettings(BaseModel):
    """How complete studies are packed and sent to the cloud."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Annotated[str, _rule(_choice("tus", "stow-rs"))] = "tus"
    chunk_size: ChunkSize = 8 * MiB
    stow_batch: StowBatch = 16 * MiB
    concurrency: Workers = 2
    max_bandwidth: Bandwidth = 0
    compression: Annotated[str, _rule(_choice("zstd", "none"))] = "zstd"
    compression_level: CompressionLevel = 3
    compression_threads: CompressionThreads = 0
    transcode: Annotated[str, _rule(_choice("none", "jpeg-ls", "htj2k"))] = "none"
    retry_first: Timeout = 10.0
    retry_max: Timeout = 900.0


class ServeSettings(BaseModel):
    """Query/Retrieve for the local PACS: the cloud's archive answered as a DICOM node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_size: CacheSize = 10 * 2**30
    page_size: PageSize = 100


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

    @model_validator(mode="wrap")
    @classmethod
    def _protocol_needs(cls, value: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        """Report what the upload protocol needs (tus: `cloud.upload_url`; stow-rs:
        `cloud.dicomweb_url`) together with every other problem."""
        details = _protocol_problems(value)
        try:
            settings = handler(value)
        except ValidationError as exc:
            details = [_init_details(error) for error in exc.errors()] + details
            raise ValidationError.from_exception_data(cls.__name__, details) from None
        if details:
            raise ValidationError.from_exception_data(cls.__name__, details)
        return settings

    def redacted(self) -> dict[str, object]:
        """Return the effective configuration as plain YAML-able data with secrets replaced by
        ``***``. Without secrets it parses back (`parse_config`) to an equal Settings."""
        return self.model_dump(mode="json")


def _duplicate_titles(value: object) -> list[InitErrorDetails]:
    if not isinstance(value, list | tuple):
        return []
    seen: set[str] = set()
    details: list[InitErrorDetails] = []
    for index, entry in enumerate(value):
        raw = entry.ae_title if isinstance(entry, Peer) else None
        raw = entry.get("ae_title") if isinstance(entry, dict) else raw
        try:
            title = _ae_title(raw)
        except ValueError:
            continue  # reported by the peer's own validation
        if title in seen:
            error = ValueError(f"duplicate AE title {title!r}")
            details.append(_value_error((index, "ae_title"), raw, error))
        seen.add(title)
    return details


def _protocol_problems(value: object) -> list[InitErrorDetails]:
    """Return what the raw data's `upload.protocol` needs and its `cloud` section lacks."""
    data = value if isinstance(value, dict) else {}
    cloud, upload = data.get("cloud"), data.get("upload") or {}
    if not isinstance(cloud, dict) or not isinstance(upload, dict):
        return []  # no cloud section (reported as required) or not mappings (reported too)
    try:
        protocol = _choice("tus", "stow-rs")(upload.get("protocol", "tus"))
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


# --- loading -----------------------------------------------------------------------------------


def load_config(path: Path) -> Settings:
    """Given the path of a YAML file, return its validated Settings; a relative `data_dir` is
    taken from the file's directory. Raise ConfigError naming every problem at once."""
    source = str(path)
    text = _read_text(path, source)
    data, problems = _load_yaml(text, source)
    return _validate(data, source, problems, base_dir=path.absolute().parent)


def parse_config(data: object, source: str = "<config>") -> Settings:
    """Given already-loaded YAML data, return its validated Settings. Raise ConfigError naming
    every problem at once (`source` names where the data came from in the message)."""
    return _validate(data, source, [], base_dir=None)


def _read_text(path: Path, source: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(["the file does not exist"], source) from None
    except IsADirectoryError:
        raise ConfigError(["this is a directory, not a file"], source) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], source) from None
    try:
        return raw.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        raise ConfigError([problem], source) from None


def _load_yaml(text: str, source: str) -> tuple[object, list[str]]:
    """Return the data in `text` and the keys it gives twice (YAML keeps the last silently)."""
    try:
        data: object = yaml.safe_load(text)
        return data, list(_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), ()))
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_problem(exc)], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {str(exc).splitlines()[0]}"], source) from None
    except RecursionError:
        raise ConfigError(["not valid YAML: nested too deeply"], source) from None


def _syntax_problem(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"At line {mark.line + 1}, column {mark.column + 1}" if mark else "In the file"
    problem = exc.problem or exc.context or "not valid YAML"
    if exc.context and exc.context_mark and exc.problem:
        context = exc.context_mark
        problem += f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
    if "\\t" in problem or "\t" in problem:
        problem += "; YAML indents with spaces, never tabs"
    return f"{where}: YAML syntax error: {problem}"


def _duplicate_keys(
    node: yaml.Node | None, loc: tuple[int | str, ...], seen: set[int] | None = None
) -> Iterator[str]:
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # an alias can point back at its own anchor
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*loc, index), seen)
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key in first_line and key not in ("?", "<<"):  # `<<` merges: it may repeat
                first = first_line[key]
                lines = f"line {line}" if first == line else f"lines {first} and {line}"
                yield f"At {_path((*loc, key))}: given twice ({lines}); keep one"
            first_line.setdefault(key, line)
            yield from _duplicate_keys(value_node, (*loc, key), seen)


def _validate(data: object, source: str, problems: list[str], base_dir: Path | None) -> Settings:
    if data is None:
        raise ConfigError(
            ["the configuration is empty; it needs at least 'site' and 'cloud'"], source
        )
    if not isinstance(data, dict):
        message = f"the top level must be a mapping of keys such as 'site:', not {_show(data)}"
        raise ConfigError([message], source)
    try:
        settings = Settings.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = problems + [_problem(error) for error in exc.errors(include_url=False)]
        raise ConfigError(problems, source) from None
    if problems:  # the YAML had repeated keys, though what it kept was valid
        raise ConfigError(problems, source)
    return settings


# --- turning pydantic's errors into sentences ----------------------------------------------------


def _problem(error: ErrorDetails) -> str:
    kind, loc, value = error["type"], error["loc"], error["input"]
    if kind in ("extra_forbidden", "invalid_key"):
        key = value if kind == "invalid_key" else loc[-1]  # pydantic's loc spells None as 'None'
        name = key if isinstance(key, str) else _show(key).strip("'")
        return f"At {_path((*loc[:-1], name))}: unknown key{_suggestion(loc[:-1], name)}"
    if kind == "value_error":
        return f"At {_path(loc)}: {error.get('ctx', {}).get('error')}"
    if kind == "missing":
        return f"At {_path(loc)}: required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"At {_path(loc)}: expected a mapping of keys, not {_show(value)}"
    if kind in ("tuple_type", "list_type", "iterable_type"):
        return f"At {_path(loc)}: expected a list, not {_show(value)}"
    return f"At {_path(loc)}: {_show(value)} is not accepted here"


def _path(loc: tuple[int | str, ...]) -> str:
    """Return a location as the user writes it: ``'dicom.peers[1].ae_title'``."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return "'" + repr(text.lstrip("."))[1:-1] + "'"  # repr escapes newlines: one line each


def _suggestion(loc: tuple[int | str, ...], key: str) -> str:
    everywhere = list(_field_paths(Settings, ""))
    if key in everywhere:
        return f" (write {key!r} as nested keys, one per line)"
    model = _model_at(loc)
    close = difflib.get_close_matches(key, list(model.model_fields) if model else [], n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    elsewhere = [path for path in everywhere if path.rsplit(".", 1)[-1] == key]
    return f" (did you mean {' or '.join(repr(path) for path in elsewhere)}?)" if elsewhere else ""


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Settings
    for part in loc:
        if isinstance(part, int):
            continue  # an index into a list of models: the field already led to the item model
        field = model.model_fields.get(part) if model else None
        model = _item_model(field.annotation) if field else None
    return model


def _item_model(annotation: object) -> type[BaseModel] | None:
    candidates: tuple[object, ...] = (annotation, *get_args(annotation))
    for candidate in candidates:
        # a generic alias such as tuple[Peer, ...] is no class to test, whatever isinstance says
        is_class = get_origin(candidate) is None and isinstance(candidate, type)
        if is_class and issubclass(cast(type, candidate), BaseModel):
            return cast(type[BaseModel], candidate)
    return None


def _field_paths(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        inner = _item_model(field.annotation)
        if inner is not None:
            brackets = "[]" if get_origin(field.annotation) is tuple else ""
            yield from _field_paths(inner, f"{path}{brackets}.")
