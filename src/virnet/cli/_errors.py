"""What goes wrong, as one line: ``virnet: error: OPERATION PATH: reason``.

The operation and the path (remote, local, or both for a transfer) come first; the
reason never shows ``[Errno N]``, a Python exception name or a temporary file's name.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Iterator

from ..errors import (
    CallTimeoutError,
    ConnectionClosedError,
    ProtocolError,
    RPCError,
    VirnetError,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
EXIT_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `cat` when `head` stopped reading


class CommandError(Exception):
    """The one line to print after ``virnet: error: `` (exit status 1)."""


class Interrupted(CommandError):
    """Ctrl-C, with the line to print (exit status 130)."""


class PipeClosed(Exception):
    """stdout's reader went away: leave quietly (exit status 141)."""


def reason(exc: BaseException, wire: str | None = None) -> str:
    """The reason part of an error line.  A daemon's message that repeats the
    operation and the path (``cannot stat 'a/b': No such file or directory``) keeps
    only what follows them."""
    if isinstance(exc, RPCError):
        text = exc.message or str(exc)
        if wire is not None:
            quoted = f"{wire!r}"
            if text.startswith("cannot ") and f"{quoted}: " in text:
                return text.split(f"{quoted}: ", 1)[1]
            if text.startswith(f"{quoted} "):
                return text[len(quoted) + 1:]
        return text
    if isinstance(exc, CallTimeoutError):
        m = re.search(r"within ([\d.]+) s", str(exc))
        within = f" within {float(m.group(1)):g} s" if m else ""
        return f"no reply{within} (the daemon is busy or stuck; --timeout sets the wait)"
    if isinstance(exc, OSError) and not isinstance(exc, VirnetError):
        text = exc.strerror or str(exc)
        return f"{exc.filename}: {text}" if exc.filename else text
    return str(exc)


def is_broken_pipe(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EPIPE and (
        isinstance(exc, BrokenPipeError) or getattr(exc, "filename", None) == "stdout"
    )


@contextlib.contextmanager
def failing(operation: str, wire: str | None = None) -> Iterator[None]:
    """Turn what an operation raises into ``CommandError("OPERATION: reason")``."""
    try:
        yield
    except (VirnetError, OSError, ValueError) as exc:
        if is_broken_pipe(exc):
            raise PipeClosed() from None
        raise CommandError(f"{operation}: {reason(exc, wire)}") from None


DAEMON_HINT = "is virnetd running? start it with `virnetd`, or pass -c URI"


def connect_error(exc: BaseException, uri: str, timeout: float, default: bool) -> str:
    """Why ``connect URI`` failed, with what to try next."""
    cause = exc.__cause__
    if isinstance(exc, ConnectionClosedError) and str(exc).startswith("cannot connect"):
        text = str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)
        if text == "timed out":
            text = f"no connection within {timeout:g} s (--timeout sets the wait)"
        code = getattr(cause, "errno", None)
        if code in (errno.ENOENT, errno.ECONNREFUSED):
            text += f" ({DAEMON_HINT})" if default else " (is a virnetd listening there?)"
        return f"connect {uri}: {text}"
    if isinstance(exc, CallTimeoutError):
        return (f"connect {uri}: no answer to the handshake within {timeout:g} s: not a "
                "virnet or libvirt peer, or a stuck one (--timeout sets the wait)")
    if isinstance(exc, ProtocolError) or str(exc).startswith("protocol error: "):
        # What came back is not libvirt's framing (an HTTP server, say).
        detail = str(exc).removeprefix("protocol error: ")
        return f"connect {uri}: not a virnet/libvirt peer ({detail})"
    if isinstance(exc, ConnectionClosedError):
        return (f"connect {uri}: the peer closed the connection during the handshake "
                "(not a virnet/libvirt peer, or one refusing clients)")
    # A bad URI: parse_uri's reason starts with the URI itself.
    return f"connect {uri}: {reason(exc).removeprefix(f'{uri!r}: ')}"
