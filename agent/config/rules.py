"""Value rules, each returning the clean value or raising ValueError with a human sentence, and
the annotated types of the settings built from them (parse, check, format back for dumping)."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from pydantic import BeforeValidator, PlainSerializer, ValidationInfo

from agent.config.units import (
    NUMBER,
    YEAR,
    as_bytes,
    as_seconds,
    format_duration,
    format_percent,
    format_size,
    show,
)

T = TypeVar("T")
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
Service = Literal["store", "echo", "find", "get", "move"]
SERVICES: tuple[Service, ...] = get_args(Service)
MiB = 1024 * 1024
MAX_DURATION = 365 * 86400.0  # beyond a year a timeout is a typo, and datetime arithmetic overflows
MAX_PDU = 2**32 - 1  # the PDU length field is 32 bits
MIN_PDU = 4096
# a query parameter whose name has one of these words carries a secret (e.g. X-Amz-Signature)
SECRET_WORDS = frozenset(
    {"token", "secret", "password", "passwd", "signature", "sig", "key", "apikey", "auth"}
)


def _text(value: object, what: str) -> str:
    if isinstance(value, str):
        return value
    hint = ""
    if isinstance(value, bool):
        hint = " (YAML reads yes/no/on/off as true/false; put the value in quotes)"
    elif not isinstance(value, dict | list):
        hint = " (put it in quotes)"
    raise ValueError(f"{show(value)} is not {what}{hint}")


def _bounded_int(low: int, high: int, what: str) -> Callable[[object], int]:
    def check(value: object) -> int:
        number = value.strip() if isinstance(value, str) else value
        if isinstance(number, str) and re.fullmatch("[0-9]{1,10}", number):
            number = int(number)
        if isinstance(number, int) and not isinstance(number, bool) and low <= number <= high:
            return number
        raise ValueError(f"{show(value)} is not a valid {what} ({low}-{high})")

    return check


def check_ae_title(value: object) -> str:
    text = _text(value, "an AE title")
    title = text.strip(" ")  # DICOM pads AE titles with spaces; they are not part of the title
    if not title:
        raise ValueError("an AE title must not be empty or only spaces")
    if any(not " " <= char <= "~" or char == "\\" for char in title):
        raise ValueError(f"{show(text)} is not a valid AE title (printable ASCII, no backslash)")
    if len(title) > 16:
        raise ValueError(f"{show(text)} is too long for an AE title ({len(title)} > 16 characters)")
    return title


_SITE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _site(value: object) -> str:
    text = _text(value, "a site id")
    if _SITE.fullmatch(text):
        return text
    fixed = text.strip().lower()
    hint = f"; did you mean {fixed!r}?" if _SITE.fullmatch(fixed) else ""
    rule = "1-64 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
    raise ValueError(f"{show(text)} is not a valid site id ({rule}{hint})")


def _bind(value: object) -> str:
    text = _text(value, "an IP address")
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(
            f"{show(text)} is not an IP address (e.g. 0.0.0.0 for every IPv4 interface, "
            "127.0.0.1, or :: for every interface)"
        ) from None


LISTEN_OFF = "off"


def _listen(value: object) -> str:
    """Return `off` or `HOST:PORT` (an IPv6 host in brackets) with HOST an IP address."""
    if value is False:  # YAML reads a bare `off` as false
        return LISTEN_OFF
    text = _text(value, "an address and port (e.g. 127.0.0.1:8080) or off").strip()
    if text.lower() == LISTEN_OFF:
        return LISTEN_OFF
    problem = f"{show(text)} is not IP:PORT (e.g. 127.0.0.1:8080, [::1]:8080, 0.0.0.0:8080) or off"
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(problem)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(problem) from None
    number = _bounded_int(1, 65535, "port")(port)
    return f"[{address}]:{number}" if address.version == 6 else f"{address}:{number}"


def listen_address(listen: str) -> tuple[str, int] | None:
    """Return a `health.listen` value as (IP address, port), or None when it is `off`."""
    if listen == LISTEN_OFF:
        return None
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


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
    raise ValueError(f"{show(text)} is not a host name or IP address{hint}")


def _url_parts(value: object, what: str, form: str) -> tuple[str, SplitResult]:
    """Return `value` as text and split; raise ValueError, saying it is not `form`, if it holds
    white space or control characters or cannot be split (an unclosed '[' of an IPv6 host)."""
    text = _text(value, what).strip()
    problem = f"{show(text)} is not {form}"
    if any(char.isspace() or not char.isprintable() for char in text):
        raise ValueError(problem)
    try:
        return text, urlsplit(text)
    except ValueError:
        raise ValueError(problem) from None


def _url(value: object) -> str:
    form = "an http:// or https:// URL with a host"
    text, parts = _url_parts(value, "a URL", form)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{show(text)} is not {form}")
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked for it
    except ValueError:
        raise ValueError(f"{show(text)} has an invalid port (1-65535)") from None
    return text


SYSLOG_SCHEMES = ("tcp", "tcp+tls")


def _syslog(value: object) -> str:
    """A syslog collector as `tcp://host:port` or `tcp+tls://host:port`: the port is required
    (RFC 5425's 6514 for TLS is only a convention, and a guess would send audit messages to a
    port nobody reads)."""
    form = "tcp://host:port or tcp+tls://host:port"
    text, parts = _url_parts(value, "a syslog address", form)
    try:
        port = parts.port
    except ValueError:
        port = None
    extra = parts.path not in ("", "/") or parts.query or parts.fragment or parts.username
    if parts.scheme.lower() not in SYSLOG_SCHEMES or not parts.hostname or port is None or extra:
        raise ValueError(f"{show(text)} is not {form}")
    return text


def _percent(value: object) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool) and 1 <= value <= 100:
        number = float(value)  # compared first: NaN fails, and a huge int never meets float()
    elif isinstance(value, str) and (match := re.fullmatch(NUMBER + r"\s*%?", value.strip())):
        number = float(match[1])
    if number is not None and 1 <= number <= 100:
        return number
    raise ValueError(f"{show(value)} is not a valid percentage (1% to 100%)")


def check_flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    hint = " (write it without quotes)" if value in ("true", "false") else ""
    raise ValueError(f"{show(value)} is not true or false{hint}")


def _log_level(value: object) -> LogLevel:
    text = _text(value, "a log level")
    for level in LOG_LEVELS:
        if text.strip().lower() == level:
            return level
    close = difflib.get_close_matches(text.strip().lower(), LOG_LEVELS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{show(text)} is not a log level (debug, info, warning or error{hint})")


def _duration(
    minimum: float, *, inclusive: bool, maximum: float = MAX_DURATION
) -> Callable[[object], float]:
    def check(value: object) -> float:
        seconds = as_seconds(value)
        if seconds < minimum or (seconds == minimum and not inclusive):
            bound = "at least" if inclusive else "more than"
            raise ValueError(f"{show(value)} is too short ({bound} {format_duration(minimum)})")
        if seconds > maximum:
            raise ValueError(f"{show(value)} is too long (at most {format_duration(maximum)})")
        return seconds

    return check


def _pdu_size(value: object) -> int:
    size = as_bytes(value)
    if size == 0 or MIN_PDU <= size <= MAX_PDU:
        return size
    raise ValueError(
        f"{show(value)} is not a valid PDU size (0 for unlimited, or {MIN_PDU} to {MAX_PDU} bytes)"
    )


def choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = _text(value, "one of " + ", ".join(choices)).strip().lower()
        if text in choices:
            return text
        raise ValueError(f"{show(value)} is not one of {', '.join(choices)}")

    return check


def _services(value: object) -> tuple[Service, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{show(value)} is not a list of services (of {', '.join(SERVICES)})")
    chosen: list[Service] = []
    for item in value:
        text = _text(item, "a service").strip().lower()
        service = next((known for known in SERVICES if known == text), None)
        if service is None:
            close = difflib.get_close_matches(text, SERVICES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{show(item)} is not a service ({', '.join(SERVICES)}{hint})")
        if service not in chosen:
            chosen.append(service)
    return tuple(chosen)


def _size_between(low: int, high: int, what: str) -> Callable[[object], int]:
    def check(value: object) -> int:
        size = as_bytes(value)
        if low <= size <= high:
            return size
        bounds = f"{format_size(low) or 0} to {format_size(high)}"
        raise ValueError(f"{show(value)} is not a valid {what} ({bounds})")

    return check


def _absolute_path(value: object, info: ValidationInfo) -> Path:
    """Return the absolute path; a relative one is taken from the config file's directory,
    which `load_config` passes in the validation context."""
    text = str(value) if isinstance(value, Path) else _text(value, "a path")
    if not text.strip() or "\0" in text:
        raise ValueError(f"{show(text)} is not a path")
    if text.startswith("~"):
        raise ValueError(f"{show(text)}: '~' is not expanded here; give an absolute path")
    path = Path(text)
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    if not path.is_absolute():
        if not isinstance(base, Path):
            raise ValueError(f"{show(text)} is relative; give an absolute path")
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


def rule(check: Callable[[object], T], *, optional: bool = False) -> BeforeValidator:
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


def empty_as_no_items(value: object) -> object:
    return () if value is None else value


# The types of the settings: each parses the YAML forms, checks, and formats back for dumping.
SiteId = Annotated[str, rule(_site)]
DataDir = Annotated[Path, BeforeValidator(_absolute_path)]
File = Annotated[Path, BeforeValidator(_absolute_path)]
OptionalFile = Annotated[Path | None, BeforeValidator(_optional_path)]
Level = Annotated[LogLevel, rule(_log_level)]
AETitle = Annotated[str, rule(check_ae_title)]
BindAddress = Annotated[str, rule(_bind)]
Listen = Annotated[str, rule(_listen)]
Host = Annotated[str | None, rule(_host, optional=True)]
check_port = _bounded_int(1, 65535, "port")
Port = Annotated[int, rule(check_port)]
OptionalPort = Annotated[int | None, rule(check_port, optional=True)]
Associations = Annotated[int, rule(_bounded_int(1, 1000, "number of associations"))]
PduSize = Annotated[int, rule(_pdu_size), PlainSerializer(format_size)]
Timeout = Annotated[float, rule(_duration(0, inclusive=False)), PlainSerializer(format_duration)]
QuietTime = Annotated[float, rule(_duration(1, inclusive=True)), PlainSerializer(format_duration)]
Percent = Annotated[float, rule(_percent), PlainSerializer(format_percent)]
Flag = Annotated[bool, rule(check_flag)]
Services = Annotated[tuple[Service, ...], rule(_services)]
Url = Annotated[str, rule(_url), PlainSerializer(redact_url)]
OptionalUrl = Annotated[
    str | None, rule(_url, optional=True), PlainSerializer(_redact_optional_url)
]
UnsetUrl = Annotated[str, BeforeValidator(_url_or_unset), PlainSerializer(_redact_unset_url)]
ChunkSize = Annotated[
    int, rule(_size_between(64 * 1024, 1024 * MiB, "chunk size")), PlainSerializer(format_size)
]
StowBatch = Annotated[
    int, rule(_size_between(64 * 1024, 1024 * MiB, "batch size")), PlainSerializer(format_size)
]
Bandwidth = Annotated[
    int, rule(_size_between(0, 10**12, "bandwidth")), PlainSerializer(format_size)
]
Workers = Annotated[int, rule(_bounded_int(1, 64, "number of uploads"))]
CompressionLevel = Annotated[int, rule(_bounded_int(1, 19, "zstd level"))]
CompressionThreads = Annotated[int, rule(_bounded_int(0, 64, "number of threads"))]
Retention = Annotated[float, rule(_duration(0, inclusive=True)), PlainSerializer(format_duration)]
AuditRetention = Annotated[
    float,
    rule(_duration(0, inclusive=True, maximum=30 * YEAR)),
    PlainSerializer(format_duration),
]
"""How long audit records are kept: records laws ask for years (HIPAA's six, some longer)."""
SyslogAddress = Annotated[str | None, rule(_syslog, optional=True)]
QueueLength = Annotated[int, rule(_bounded_int(1, 1_000_000, "queue length"))]
CacheSize = Annotated[
    int, rule(_size_between(0, 2**50, "cache size")), PlainSerializer(format_size)
]
PageSize = Annotated[int, rule(_bounded_int(1, 10000, "page size"))]
QuarantineSize = Annotated[
    int, rule(_size_between(0, 2**50, "quarantine size")), PlainSerializer(format_size)
]
Section = BeforeValidator(_empty_as_default)
