"""Human and JSON output: sizes in IEC units, times in local time."""

from __future__ import annotations

import sys
import time
from typing import Any

from .._units import format_rate, format_size


def emit_json(value: Any, *, stderr: bool = False) -> None:
    import json  # only for --json: a few ms of every command's start otherwise

    print(json.dumps(value), file=sys.stderr if stderr else sys.stdout)


def local_time(mtime_ns: int, *, precise: bool = False) -> str:
    """``2026-12-02 14:05:07`` in local time; ``precise`` adds the nanoseconds and the
    UTC offset (what stat(1) prints)."""
    seconds, ns = divmod(mtime_ns, 1_000_000_000)
    t = time.localtime(seconds)
    if not precise:
        return time.strftime("%Y-%m-%d %H:%M:%S", t)
    return time.strftime("%Y-%m-%d %H:%M:%S", t) + f".{ns:09d} " + time.strftime("%z", t)


def iso_time(mtime_ns: int) -> str:
    """ISO 8601 in local time with its offset, to the microsecond (JSON)."""
    from datetime import datetime

    return datetime.fromtimestamp(mtime_ns / 1e9).astimezone().isoformat()


def summary(verb: str, done: int, elapsed: float) -> str:
    """``uploaded 1.0 GiB in 5.10 s (200.8 MiB/s)``: one unit system, IEC."""
    elapsed = max(elapsed, 1e-9)
    return f"{verb} {format_size(done)} in {elapsed:.2f} s ({format_rate(done / elapsed)})"


def transfer_json(operation: str, done: int, elapsed: float, **extra: Any) -> dict[str, Any]:
    elapsed = max(elapsed, 1e-9)
    return {"operation": operation, **extra, "bytes": done, "seconds": round(elapsed, 6),
            "bytes_per_second": round(done / elapsed)}
