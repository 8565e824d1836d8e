"""Durations and sizes as administrators write them (``90s``, ``8MiB``), parsed and formatted
back, and how a value is shown in a problem sentence."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

NUMBER = r"([0-9]{1,30}(?:\.[0-9]{1,30})?)"  # ASCII digits only: \d would accept Arabic-Indic
_DURATION = re.compile(NUMBER + r"\s*(ms|s|m|h|d|w|y|)")
_SIZE = re.compile(NUMBER + r"\s*([A-Za-z]*)")
YEAR = 365 * 86400
"""A year as retention periods count it: 365 days (a leap day is not worth a unit of its own)."""
_SECONDS_PER = {"ms": Fraction(1, 1000), "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
_SECONDS_PER |= {"w": 7 * 86400, "y": YEAR}
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
    """Given ``90s``, ``5m``, ``2h``, ``7d``, ``2w``, ``1y`` (365 days), ``500ms`` or a bare
    number of seconds, return the number of seconds. Raise ValueError for anything else,
    including negative, infinite or NaN values and compound forms such as ``1h30m``."""
    return as_seconds(text)


def parse_size(text: str | int) -> int:
    """Given ``8MiB``, ``512KiB``, ``1GiB`` (powers of 1024), ``8MB``, ``10kB`` (powers of 1000)
    or a bare number of bytes, return the number of bytes. Units are case-insensitive. Raise
    ValueError for anything else, including negative or fractional byte counts."""
    return as_bytes(text)


def as_seconds(value: object) -> float:
    amount = _amount(value, _DURATION, _SECONDS_PER, allow_float=True)
    try:
        if amount is not None:
            return float(amount)
    except OverflowError:
        pass
    raise ValueError(f"{show(value)} is not a duration (use e.g. 90s, 5m, 2h)")


def as_bytes(value: object) -> int:
    amount = _amount(value, _SIZE, _BYTES_PER, allow_float=False)
    if amount is None or amount.denominator != 1:
        raise ValueError(f"{show(value)} is not a size (use e.g. 8MiB, 512KiB, 10MB)")
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


def format_duration(seconds: float) -> str | float:
    """Return the shortest exact text for `seconds` (``7d``, ``500ms``), else the number."""
    seconds = float(seconds)  # an int from Python code has no is_integer() before 3.12
    if seconds == 0:
        return "0s"
    if seconds.is_integer():
        for unit, size in (("y", YEAR), ("d", 86400), ("h", 3600), ("m", 60)):
            if seconds % size == 0:
                return f"{int(seconds // size)}{unit}"
        return f"{int(seconds)}s"
    millis = seconds * 1000
    if millis.is_integer() and as_seconds(f"{int(millis)}ms") == seconds:
        return f"{int(millis)}ms"
    return seconds  # a bare number is seconds, and YAML keeps a float exactly


def rough_duration(seconds: float) -> str:
    """Return a span of time, rounded, as people read it: `42s`, `7min`, `3h`, `2d`."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def format_size(size: int) -> str | int:
    for unit, factor in _SIZE_UNITS:
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return size


def format_percent(percent: float) -> str:
    return f"{int(percent)}%" if percent.is_integer() else f"{percent!r}%"


def show(value: object) -> str:
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
