"""Memory sizes: parse ``24GiB``/``512MB``/``1e9`` and format bytes for people."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


MAX_BYTES = 2**50  # 1 PiB: more than any device or host; larger is a typo
MIN_BARE_BYTES = 2**20  # a number without a unit below 1 MiB is surely not meant as bytes


def parse_size(text: str | int | float) -> int:
    """Bytes in ``text``: ``24GiB`` (2**30), ``24GB`` (10**9), ``24G`` (2**30), ``8B``, or a
    plain byte count of at least 1 MiB (``--memory 8`` is refused: 8 bytes is never meant).
    Numbers (a TOML ``memory = 12``) follow the same rules; other types are refused."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise UsageError(f"memory size must be a string like '24GiB', got {text!r}")
    text = str(text)
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise UsageError(
            f"cannot read memory size {text!r}; use e.g. 24GiB, 16GB, 512MiB or a byte count"
        )
    number = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(number):
        raise UsageError(f"memory size {text!r} is more than any device (the limit is 1 PiB); "
                         "check the unit")
    value = int(number)
    if value <= 0:
        raise UsageError(f"memory size must be positive, got {text!r}")
    if unit == "" and value < MIN_BARE_BYTES:
        raise UsageError(f"memory size {text!r} has no unit, which would mean {value} bytes; "
                         f"write {text}GiB or {text}GB (or {text}B if you mean bytes)")
    if value > MAX_BYTES:
        raise UsageError(f"memory size {text!r} is {format_bytes(value)}, more than any device "
                         "(the limit is 1 PiB); check the unit")
    return value


def format_bytes(n: float) -> str:
    """``1.50 GiB`` — binary units, three significant digits."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1000 or unit == "EiB":  # 1000..1023 reads better as 0.98 of the next unit
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_percent(fraction: float) -> str:
    """``20%``; as many digits as the value has, so that rounding never changes what is said:
    ``99.99999%`` for a margin of 0.9999999, never ``100%`` for a margin below 1. (The shortest
    decimal that reads back as ``fraction``, times 100 exactly: 0.12345 gives 12.345%, not
    12.345000000000001%.)"""
    if not math.isfinite(fraction) or fraction == 0:  # inf, nan; 0 and -0.0 as 0%
        return f"{fraction * 100:g}%".replace("-0%", "0%")
    from decimal import Decimal

    percent = (Decimal(repr(float(fraction))) * 100).normalize()
    return f"{percent:f}%"


def json_document(data: Any) -> Any:
    """``data`` as its JSON reads back: lists where it has tuples, strings where it has
    enums or paths (``str``, as ``emit_json`` writes them). A result's ``to_json()`` returns
    this, so that it equals the command's ``--json`` (it had tuples: review)."""
    import json

    return json.loads(json.dumps(data, default=str))

