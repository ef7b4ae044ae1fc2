"""Sizes and rates as people type them (``1M``, ``4GiB``, ``100M/s``) and print them.

Every unit is binary, like cp's and dd's ``K``: ``K``, ``KB`` and ``KiB`` all mean
1024 bytes, ``M`` 1024**2, then ``G``, ``T``, ``P``.  (dd reads ``KB`` as 1000; one
system for input and output is simpler than following it: sizes print in IEC units,
``1.5 GiB``, rates as ``210.7 MiB/s``.)  Plain numbers are bytes and may be written in
hex (``0x100``).
"""

from __future__ import annotations

import math
import re

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[kmgtp]?)(?:ib|b)?", re.I)

SIZE_HELP = "K, M, G, T suffixes, binary: 1K = 1024 = 1KiB = 1KB"


class UnitError(ValueError):
    """Text that is not a size or a rate; ``str()`` says what is expected."""


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes: ``4096``, ``0x1000``, ``4K``, ``1.5GiB``; a fraction must come out whole."""
    raw = text.strip()
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", raw):
        return int(raw, 16)
    m = _SIZE.fullmatch(raw)
    if m is None or (raw[-1:] in "bB" and not m.group("unit") and raw[-2:-1] in "iI"):
        raise UnitError(f"not a {what}: {text!r} (bytes; {SIZE_HELP})")
    value = float(m.group("num")) * UNITS[m.group("unit").lower()]
    if not math.isfinite(value):
        raise UnitError(f"not a {what}: {text!r}")
    if value != int(value):
        raise UnitError(f"not a whole number of bytes: {text!r}")
    return int(value)


def parse_rate(text: str) -> int:
    """Bytes per second: a size with an optional ``/s`` (``100M``, ``100MiB/s``)."""
    raw = text.strip()
    body = raw[:-2] if raw.lower().endswith("/s") else raw
    try:
        value = float(parse_size(body, what="rate")) if body else None
    except UnitError:
        value = None
    if value is None:
        raise UnitError(f"not a rate: {text!r} (bytes/s; K, M, G, T are binary: 100M is "
                        "100 MiB/s)")
    return int(value)


def format_size(n: float) -> str:
    """``512 B``, ``1.0 KiB``, ``3.2 GiB``: IEC units, one decimal above bytes."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_rate(bytes_per_second: float) -> str:
    """``210.7 MiB/s``: the same units as sizes."""
    return f"{format_size(bytes_per_second)}/s"
