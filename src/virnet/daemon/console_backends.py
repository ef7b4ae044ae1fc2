"""What a console is: a program on a pseudo-terminal or a relay to a Unix socket, its
output history, and how each is started, read, written, resized and stopped (the
overview is in ``console``, the CONSOLE program that attaches sessions to them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..errors import ErrorCode, ErrorDomain, RPCError
from ..services import console as c
from . import pty

if TYPE_CHECKING:
    from .console import Session

log = logging.getLogger("virnet.daemon.console")

#: Bytes of output each console keeps for replay unless configured otherwise.
DEFAULT_HISTORY = 64 * 1024
#: Bytes read from a console's descriptor per wake-up.
READ_SIZE = 64 * 1024
#: After a program exits: at most this much of its last output is read before the
#: status line (a child it left behind may go on writing).
EXIT_DRAIN_LIMIT = 1024 * 1024
#: Relays: how long one connection attempt may take, and the backoff between attempts.
CONNECT_TIMEOUT = 5.0
RETRY_FIRST = 0.1
RETRY_MAX = 2.0
#: Stopping a program: SIGHUP (and the terminal hung up), then SIGTERM, then SIGKILL,
#: this many seconds apart.
STOP_GRACE = 1.0


class ConsoleError(ValueError):
    """A console cannot be configured or started; the text names it."""


def console_error(message: str, code: int, domain: int = ErrorDomain.NONE) -> RPCError:
    return RPCError(message, code=code, domain=domain)


def validate_name(name: str) -> None:
    if not name:
        raise ConsoleError("a console needs a name")
    if len(name.encode()) > c.NAME_MAX:
        raise ConsoleError(f"console name {name[:40]!r}... is longer than {c.NAME_MAX} bytes")
    if not name.isprintable() or any(ch.isspace() for ch in name) or "=" in name:
        raise ConsoleError(f"console name {name!r} must be printable, without spaces or '='")


def relay_path(spec: str) -> str | None:
    """The socket path of a ``unix:/path`` (or ``unix:///path``) spec, else None."""
    if not spec.startswith("unix:"):
        return None
    path = spec[len("unix:") :]
    if path.startswith("///"):
        path = path[2:]
    if not path.startswith("/"):
        raise ConsoleError(f"console socket {spec!r}: the path must be absolute")
    return path


def split_command(spec: str) -> list[str]:
    """COMMAND split like a shell would (quotes, backslashes), without running one."""
    try:
        argv = shlex.split(spec)
    except ValueError as exc:
        raise ConsoleError(f"console command {spec!r}: {exc}") from None
    if not argv:
        raise ConsoleError("console command is empty")
    return argv


class History:
    """The newest ``limit`` bytes a console printed."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ConsoleError("console history size must not be negative")
        self.limit = limit
        self._buf = bytearray()
        self.dropped = 0  # bytes that fell off the front

    def __len__(self) -> int:
        return len(self._buf)

    def append(self, data: bytes | memoryview) -> None:
        limit = self.limit
        n = len(data)
        if n >= limit:
            self.dropped += len(self._buf) + n - limit
            self._buf[:] = data[n - limit :] if limit else b""
            return
        buf = self._buf
        buf += data
        excess = len(buf) - limit
        if excess > 0:
            del buf[:excess]  # O(1) for a bytearray: only its start moves
            self.dropped += excess

    def replay(self) -> bytes:
        """What a new session is sent first.  Once older output has fallen off, the
        replay starts after the first line break in its first quarter, if there is one,
        so that it does not begin inside a line (or an escape sequence)."""
        data = bytes(self._buf)
        if self.dropped:
            cut = data.find(b"\n", 0, max(1, len(data) // 4))
            if cut >= 0:
                return data[cut + 1 :]
        return data


class Console:
    """What both kinds share: the descriptor, the history, the session."""

    kind = "console"

    def __init__(self, name: str, history: int) -> None:
        self.name = name
        self.history = History(history)
        self.session: Session | None = None
        self.fd: int | None = None
        self.closing = False
        self._reading = False
        self._paused = False
        self._writer: Callable[[], None] | None = None
        self._at_line_start = True
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        raise NotImplementedError

    async def prepare(self) -> None:
        """Before a session attaches: make sure there is something to attach to."""
        raise NotImplementedError

    def resize(self, rows: int, cols: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ descriptor
    def _attach_fd(self, fd: int) -> None:
        self.fd = fd
        self._update_reading()

    def _detach_fd(self) -> int | None:
        fd = self.fd
        if fd is None:
            return None
        if self._reading:
            self.loop.remove_reader(fd)
            self._reading = False
        self.cancel_writable()
        self.fd = None
        return fd

    def _update_reading(self) -> None:
        want = self.fd is not None and not self._paused
        if want == self._reading:
            return
        assert self.fd is not None
        if want:
            self.loop.add_reader(self.fd, self._on_readable)
        else:
            self.loop.remove_reader(self.fd)
        self._reading = want

    def set_paused(self, paused: bool) -> None:
        """Stop (or resume) reading output: the session's stream is full."""
        if paused != self._paused:
            self._paused = paused
            self._update_reading()

    def _on_readable(self) -> None:
        fd = self.fd
        if fd is None:
            return
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._on_hangup(exc)
            return
        if not data:
            self._on_hangup(None)
            return
        self._output(data)

    def _output(self, data: bytes) -> None:
        self.history.append(data)
        self._at_line_start = data.endswith(b"\n")
        if self.session is not None:
            self.session.deliver(data)

    def _on_hangup(self, exc: OSError | None) -> None:
        """The descriptor reads EOF (socket) or EIO (no slave side left)."""
        raise NotImplementedError

    def note(self, text: str) -> None:
        """One line of the daemon's own into the output: history and session alike."""
        line = f"[virnetd: console {self.name}: {text}]\r\n".encode(errors="replace")
        if not self._at_line_start:
            line = b"\r\n" + line
        self._output(line)

    def write_input(self, data: memoryview) -> int:
        """Write session input; returns the bytes taken (0: try again when writable).
        Input for a console with nothing behind it is dropped."""
        fd = self.fd
        if fd is None:
            return len(data)
        try:
            return os.write(fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            log.debug("console %s: write failed: %s", self.name, exc)
            return len(data)  # EIO/EPIPE: the hang-up is noticed by the reader

    def wait_writable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when input can be written again."""
        fd = self.fd
        if fd is None:
            self.loop.call_soon(callback)
            return
        self.cancel_writable()

        def ready() -> None:
            self.cancel_writable()
            callback()

        self._writer = ready
        self.loop.add_writer(fd, ready)

    def cancel_writable(self) -> None:
        if self._writer is not None:
            self._writer = None
            if self.fd is not None:
                self.loop.remove_writer(self.fd)

    # ------------------------------------------------------------------ sessions
    def detach(self, session: Session) -> None:
        if self.session is session:
            self.session = None
            self.set_paused(False)
            self.cancel_writable()

    def end_session(self, err: RPCError | None, *, flush: bool) -> None:
        if self.session is not None:
            self.session.end(err, flush=flush)


class ProgramConsole(Console):
    """COMMAND on a pseudo-terminal."""

    kind = "program"

    def __init__(
        self, name: str, command: str, history: int, env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(name, history)
        self.command = command
        self.argv = split_command(command)
        self.env = dict(env) if env is not None else _program_env()
        self.proc: subprocess.Popen[bytes] | None = None
        self.rows = pty.DEFAULT_ROWS
        self.cols = pty.DEFAULT_COLS
        self.starts = 0
        self._pidfd: int | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._hung_up = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        loop = self.loop
        try:
            proc, master = pty.spawn(self.argv, rows=self.rows, cols=self.cols, env=self.env)
        except OSError as exc:
            raise ConsoleError(
                f"console {self.name}: cannot run {self.argv[0]!r}: {exc.strerror or exc}"
            ) from None
        self.proc = proc
        self.starts += 1
        self._hung_up = False
        self._attach_fd(master)
        self._pidfd = pty.open_pidfd(proc.pid)
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._on_exit)
        else:  # pragma: no cover - kernels before 5.3
            self._poll = loop.call_later(0.1, self._poll_exit)
        log.info("console %s: started %s (pid %d)", self.name, self.command, proc.pid)

    async def prepare(self) -> None:
        if self.proc is None:
            try:
                self.start()
            except ConsoleError as exc:
                raise console_error(str(exc), ErrorCode.OPERATION_FAILED) from None

    def resize(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        if self.fd is not None:
            try:
                pty.set_window_size(self.fd, rows, cols)
            except OSError as exc:
                raise console_error(
                    f"console {self.name}: cannot set the window size: {exc.strerror}",
                    ErrorCode.SYSTEM_ERROR,
                ) from None

    def _on_hangup(self, exc: OSError | None) -> None:
        # No slave side is open any more (the program closed it, or exited: the exit
        # itself is reported by the pidfd).  Nothing more to read; stop watching.
        self._hung_up = True
        if self._reading and self.fd is not None:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def _update_reading(self) -> None:
        if self._hung_up:
            return
        super()._update_reading()

    def _poll_exit(self) -> None:  # pragma: no cover - kernels before 5.3
        self._poll = None
        if self.proc is not None and self.proc.poll() is None:
            self._poll = self.loop.call_later(0.1, self._poll_exit)
        else:
            self._on_exit()

    def _forget_pidfd(self) -> None:
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    def _on_exit(self) -> None:
        proc = self.proc
        self._forget_pidfd()
        if proc is None or self.closing:
            return
        returncode = proc.wait()  # already exited: only reaps it
        self._drain()
        fd = self._detach_fd()
        if fd is not None:
            os.close(fd)  # hangs up whatever it left behind on the terminal
        self.proc = None
        how = pty.exit_description(returncode)
        log.info("console %s: %s (pid %d) %s", self.name, self.command, proc.pid, how)
        self.note(f"{self.argv[0]} {how}")
        self.end_session(None, flush=True)

    def _drain(self) -> None:
        """Read what the program wrote before it exited (still in the terminal)."""
        fd = self.fd
        total = 0
        while fd is not None and not self._hung_up and total < EXIT_DRAIN_LIMIT:
            try:
                data = os.read(fd, READ_SIZE)
            except OSError:  # EAGAIN: all read; EIO: nothing left
                return
            if not data:
                return
            total += len(data)
            self._output(data)

    async def close(self) -> None:
        self.closing = True
        proc = self.proc
        self._forget_pidfd()
        fd = self._detach_fd()
        self.end_session(
            console_error("the server is shutting down", ErrorCode.OPERATION_ABORTED,
                   ErrorDomain.STREAMS),
            flush=False,
        )
        if proc is None:
            if fd is not None:
                os.close(fd)
            return
        _signal_group(proc.pid, signal.SIGHUP)
        _signal_group(proc.pid, signal.SIGCONT)
        if fd is not None:
            os.close(fd)  # the terminal hangs up: its foreground group gets SIGHUP too
        for follow_up in (signal.SIGTERM, signal.SIGKILL):
            if await _exited(proc, STOP_GRACE):
                break
            _signal_group(proc.pid, follow_up)
        if proc.poll() is None:
            await _exited(proc, STOP_GRACE)
        if proc.poll() is None:  # pragma: no cover - SIGKILL did not end it in time
            log.warning("console %s: pid %d did not exit", self.name, proc.pid)
        self.proc = None


def _signal_group(pid: int, signo: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signo)


async def _exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proc.poll() is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _program_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TERM", "xterm-256color")
    return env


class RelayConsole(Console):
    """A Unix socket, connected to by the daemon and reconnected when lost."""

    kind = "relay"

    def __init__(self, name: str, path: str, history: int) -> None:
        super().__init__(name, history)
        self.path = path
        self.sock: socket.socket | None = None
        self.connects = 0
        self._lock: asyncio.Lock | None = None
        self._retry: asyncio.Task[None] | None = None
        self._lost = False

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def _connect_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def start(self) -> None:
        self._keep_trying()

    def _keep_trying(self) -> None:
        if self._retry is None or self._retry.done():
            self._retry = self.loop.create_task(self._reconnect())

    async def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self.loop.sock_connect(sock, self.path)
        except BaseException:
            sock.close()
            raise
        if self.closing:
            sock.close()
            return
        self.sock = sock
        self.connects += 1
        self._attach_fd(sock.fileno())
        log.info("console %s: connected to %s", self.name, self.path)
        if self._lost:
            self._lost = False
            self.note(f"reconnected to {self.path}")

    async def _try_connect(self) -> None:
        async with self._connect_lock():
            if self.sock is None and not self.closing:
                await self._connect()

    async def _reconnect(self) -> None:
        delay = RETRY_FIRST
        while self.sock is None and not self.closing:
            try:
                await self._try_connect()
            except (OSError, TimeoutError) as exc:
                log.debug("console %s: cannot connect to %s: %s", self.name, self.path, exc)
            else:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def prepare(self) -> None:
        if self.sock is not None:
            return
        try:
            await self._try_connect()
        except TimeoutError:
            reason = "timed out"
        except OSError as exc:
            reason = exc.strerror or str(exc)
        else:
            if self.sock is not None:
                return
            reason = "the daemon is stopping"
        raise console_error(
            f"console {self.name}: cannot connect to {self.path}: {reason}",
            ErrorCode.OPERATION_FAILED,
        )

    def resize(self, rows: int, cols: int) -> None:
        raise console_error(
            f"console {self.name} relays a socket: it has no window size",
            ErrorCode.NO_SUPPORT,
        )

    def _on_hangup(self, exc: OSError | None) -> None:
        self._drop_socket()
        why = "closed the connection" if exc is None else f"failed: {exc.strerror or exc}"
        log.info("console %s: %s %s", self.name, self.path, why)
        self._lost = True
        self.note(f"{self.path} {why}")
        self.end_session(None, flush=True)
        if not self.closing:
            self._keep_trying()

    def _drop_socket(self) -> None:
        self._detach_fd()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def close(self) -> None:
        self.closing = True
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
            self._retry = None
        self.end_session(
            console_error("the server is shutting down", ErrorCode.OPERATION_ABORTED,
                   ErrorDomain.STREAMS),
            flush=False,
        )
        self._drop_socket()


def make_console(name: str, spec: str, history: int) -> Console:
    """A console from its configuration: ``COMMAND`` or ``unix:/path``."""
    validate_name(name)
    if not isinstance(spec, str):
        raise ConsoleError(f"console {name}: the command must be a string")
    path = relay_path(spec)
    if path is not None:
        return RelayConsole(name, path, history)
    return ProgramConsole(name, spec, history)


def parse_option(item: str) -> tuple[str, str]:
    """``NAME=COMMAND`` or ``NAME=unix:/path`` from the command line, checked."""
    name, sep, spec = item.partition("=")
    if not sep or not name or not spec:
        raise ConsoleError(f"--console wants NAME=COMMAND or NAME=unix:/PATH, got {item!r}")
    make_console(name, spec, 0)  # validates without starting anything
    return name, spec
