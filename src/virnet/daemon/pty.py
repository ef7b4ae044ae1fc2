"""Programs on pseudo-terminals: start one as a session leader with the terminal as its
controlling terminal, set the window size, describe how it ended.

The program gets the terminal's slave side as standard input, output and error, in a new
session (``setsid``) whose controlling terminal it is, so the line discipline works as on
a real terminal: ^C on the console interrupts the program in the foreground, a shell can
do job control, closing the master side hangs the session up.  The master side stays with
the daemon, non-blocking.  Exit is noticed through a pidfd (Linux 5.3+), so no SIGCHLD
handler and no child watcher of the event loop is involved.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import termios
from collections.abc import Mapping

#: Window size a console starts with until a client says otherwise.
DEFAULT_ROWS = 24
DEFAULT_COLS = 80

_WINSIZE = struct.Struct("HHHH")  # struct winsize: rows, cols, xpixel, ypixel


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on either side of a pseudo-terminal; the kernel sends SIGWINCH to the
    terminal's foreground process group when the size changes."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(rows, cols, 0, 0))


def get_window_size(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = _WINSIZE.unpack(fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


def _take_controlling_terminal() -> None:  # pragma: no cover - runs in the child
    # After setsid (start_new_session): standard input is the slave side; make it this
    # session's controlling terminal.  Only a system call: nothing else runs between
    # fork and exec.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def spawn(
    argv: list[str], *, rows: int, cols: int, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``argv`` on a new pseudo-terminal; returns the process and the master side
    (non-blocking, not inherited by children).  Raises ``OSError`` if it cannot run."""
    master, slave = os.openpty()
    try:
        set_window_size(master, rows, cols)
        os.set_blocking(master, False)
        proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_take_controlling_terminal,
            env=dict(env) if env is not None else None,
            close_fds=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        # Only the program holds the slave side now: when it and its children have
        # closed it, the master reads EIO.
        os.close(slave)
    return proc, master


def exit_description(returncode: int) -> str:
    """``exited with status N`` or ``killed by signal N (SIGNAME)``."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    signo = -returncode
    try:
        name = signal.Signals(signo).name
    except ValueError:
        return f"killed by signal {signo}"
    return f"killed by signal {signo} ({name})"


def open_pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits, or None where the system
    has none (the caller then polls)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:
        return None
    return fd
