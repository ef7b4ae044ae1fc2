"""virnetd's log output: one format for every line the daemon writes to stderr.

* ``text`` (the default): ``TIME LEVEL LOGGER: MESSAGE``, for a terminal or a file.
  When stderr is the systemd journal (``JOURNAL_STREAM`` names the device and inode of
  stderr), the journal adds its own timestamps, so each line is ``<N>LOGGER: MESSAGE``
  with ``<N>`` the syslog priority (``<3>`` error, ``<4>`` warning, ``<6>`` info,
  ``<7>`` debug), which the journal files the line under.
* ``json``: one JSON object per line, for log collectors: ``time``, ``level``,
  ``logger``, ``message``, the fields passed with ``extra=`` and, for a logged
  exception, ``exception`` (its traceback).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import IO, Any

from .config import LOG_FORMATS as FORMATS

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "setup", "stderr_is_journal"]

#: Syslog priorities by logging level (sd-daemon(3) prefixes).
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

#: Attributes every ``LogRecord`` has; anything else came with ``extra=``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def stderr_is_journal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (stderr) is the connection systemd set up to the journal."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.datetime.fromtimestamp(record.created).astimezone()
    return when.isoformat(timespec="milliseconds")


def _priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``, or ``<N>LOGGER: MESSAGE`` for the journal."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:
            return f"<{_priority(record.levelno)}>{record.name}: {text}"
        return f"{_timestamp(record)} {record.levelname} {record.name}: {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            (key, value) for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) in ``fmt``;
    called again, replaces what an earlier call set up."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter(journal=stderr_is_journal(out))
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
