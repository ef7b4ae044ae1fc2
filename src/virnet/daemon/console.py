"""The CONSOLE program: consoles configured on the daemon, one session each.

A console is either a program on a pseudo-terminal (``NAME=COMMAND``) or a relay to a
Unix socket (``NAME=unix:/path``, a QEMU serial chardev for example).  Either way the
daemon holds one descriptor for it (the PTY's master side, or the connected socket),
watched by the event loop:

* **Output** is read whenever the descriptor is readable, attached or not, into the
  console's bounded ``History`` (default 64 KiB, the newest bytes).  With nobody attached
  nothing else happens, so a program never blocks on an absent reader and a flood costs
  the history and one read buffer.  With a session attached each read also goes to its
  stream (``try_send``); what the stream cannot take yet waits in the session (at most
  ``SESSION_OUT_LIMIT``, then reading pauses until the stream drains: an attached client
  that reads slowly slows the program down, as a real terminal does).
* **Input** from the session's stream is written to the descriptor; when the console
  cannot take more, the session stops reading its stream until it can (the stream's flow
  control then holds the client back).
* **Sessions**: one per console.  OPEN on a held console fails unless FORCE, which ends
  the old session's stream with an error saying it was taken over.  The session ends when
  its client finishes (detach) or aborts, when its connection goes, when the program exits
  or the socket closes (the stream then ends with EOF after the last output), and when
  the daemon stops.  The console is free again the moment its session ends.
* **Programs** start with the daemon and keep running across sessions.  When one exits,
  its remaining output is read, a line with its exit status goes into the history (and
  to the session), the session ends, and the program is started again at the next OPEN.
* **Relays** connect at start and, whenever the socket is lost or could not be reached,
  try again in the background (backoff from 0.1 s to 2 s), so output produced while the
  other end restarts is captured as soon as it is back.  OPEN on a relay that is not
  connected tries at once and fails if it cannot connect.

Everything runs on the event loop thread; the only blocking step is starting a program
(fork and exec).
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

from ..errors import ErrorCode, ErrorDomain, RPCError, StreamError
from ..server import CallContext, Server, ServerConnection
from ..services import console as c
from ..stream import Stream, StreamEvent
from . import pty

log = logging.getLogger("virnet.daemon.console")

#: Bytes of output each console keeps for replay unless configured otherwise.
DEFAULT_HISTORY = 64 * 1024
#: Bytes read from a console's descriptor per wake-up.
READ_SIZE = 64 * 1024
#: Console output a session holds beyond what its stream took before reading pauses.
SESSION_OUT_LIMIT = 256 * 1024
#: After a program exits: at most this much of its last output is read before the
#: status line (a child it left behind may go on writing).
EXIT_DRAIN_LIMIT = 1024 * 1024
#: Output deliveries up to this size make the connection run lean (keystroke echoes: the
#: path to the client kept clear of bulk data); bigger ones are a flood, not a person.
INTERACTIVE_OUTPUT = 4096
#: Relays: how long one connection attempt may take, and the backoff between attempts.
CONNECT_TIMEOUT = 5.0
RETRY_FIRST = 0.1
RETRY_MAX = 2.0
#: Stopping a program: SIGHUP (and the terminal hung up), then SIGTERM, then SIGKILL,
#: this many seconds apart.
STOP_GRACE = 1.0

_EVENTS = StreamEvent.READABLE | StreamEvent.ERROR | StreamEvent.HANGUP
_KNOWN_FLAGS = int(c.OpenFlags.FORCE | c.OpenFlags.NO_HISTORY)


class ConsoleError(ValueError):
    """A console cannot be configured or started; the text names it."""


def _error(message: str, code: int, domain: int = ErrorDomain.NONE) -> RPCError:
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
                raise _error(str(exc), ErrorCode.OPERATION_FAILED) from None

    def resize(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        if self.fd is not None:
            try:
                pty.set_window_size(self.fd, rows, cols)
            except OSError as exc:
                raise _error(
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
            _error("the server is shutting down", ErrorCode.OPERATION_ABORTED,
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
        raise _error(
            f"console {self.name}: cannot connect to {self.path}: {reason}",
            ErrorCode.OPERATION_FAILED,
        )

    def resize(self, rows: int, cols: int) -> None:
        raise _error(
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
            _error("the server is shutting down", ErrorCode.OPERATION_ABORTED,
                   ErrorDomain.STREAMS),
            flush=False,
        )
        self._drop_socket()


class Session:
    """A console's one attached stream.  Runs on stream event callbacks: READABLE moves
    input to the console, WRITABLE (asked for only while output waits) moves output that
    the stream could not take at once."""

    def __init__(self, console: Console, connection: ServerConnection, stream: Stream) -> None:
        self.console = console
        self.connection = connection
        self.stream = stream
        self.done: asyncio.Future[RPCError | None] = console.loop.create_future()
        self.flush = False  # at the end, send what output still waits (then EOF)
        self.out = bytearray()  # output the stream did not take yet
        self._in: memoryview | None = None  # input the console did not take yet
        self._mask = _EVENTS
        self._paused_console = False

    def begin(self, history: bytes) -> None:
        self.stream.add_event_callback(self._mask, self._on_event)
        if history:
            self.deliver(history)

    def _want(self, event: StreamEvent, on: bool) -> None:
        mask = self._mask | event if on else self._mask & ~event
        if mask != self._mask and not self.done.done():
            self._mask = mask
            self.stream.update_event_callback(mask)

    # ------------------------------------------------------------------ output
    def deliver(self, data: bytes) -> None:
        if self.done.done():
            return
        if not self.out:
            try:
                n = self.stream.try_send(data)
            except BlockingIOError:
                n = 0
            except StreamError as exc:
                self.end(exc)
                return
            if n and len(data) <= INTERACTIVE_OUTPUT:
                self.connection.note_interactive()
            if n == len(data):
                return
            self.out += memoryview(data)[n:]
        else:
            self.out += data
        self._want(StreamEvent.WRITABLE, True)
        if len(self.out) >= SESSION_OUT_LIMIT and not self._paused_console:
            self._paused_console = True
            self.console.set_paused(True)

    def _flush_out(self) -> None:
        try:
            n = self.stream.try_send(self.out)
        except BlockingIOError:
            return
        except StreamError as exc:
            self.end(exc)
            return
        del self.out[:n]
        if not self.out:
            self._want(StreamEvent.WRITABLE, False)
        if self._paused_console and len(self.out) < SESSION_OUT_LIMIT // 2:
            self._paused_console = False
            self.console.set_paused(False)

    # ------------------------------------------------------------------ input
    def _pump_in(self) -> None:
        while self._in is None and not self.done.done():
            try:
                data = self.stream.try_recv()
            except BlockingIOError:
                return
            except StreamError as exc:
                self.end(exc)
                return
            if not data:
                self.end(None)  # the client finished: it detached
                return
            self._write_in(memoryview(data))

    def _write_in(self, view: memoryview) -> None:
        n = self.console.write_input(view)
        if n < len(view):
            self._in = view[n:]
            self._want(StreamEvent.READABLE, False)
            self.console.wait_writable(self._console_writable)

    def _console_writable(self) -> None:
        view, self._in = self._in, None
        if view is None or self.done.done():
            return
        self._write_in(view)
        if self._in is None:
            self._want(StreamEvent.READABLE, True)

    # ------------------------------------------------------------------ events
    def _on_event(self, stream: Stream, events: StreamEvent) -> None:
        if self.done.done():
            return
        if events & StreamEvent.WRITABLE and self.out:
            self._flush_out()
        if events & StreamEvent.READABLE:
            self._pump_in()
        if not self.done.done() and (events & StreamEvent.ERROR or stream.closed):
            self.end(stream.error or _error("stream closed", ErrorCode.INVALID_STREAM,
                                            ErrorDomain.STREAMS))

    def end(self, err: RPCError | None, *, flush: bool = False) -> None:
        """Detach from the console; the handler then ends the stream: with ``err``, or
        (None) cleanly, after the waiting output if ``flush``."""
        if self.done.done():
            return
        self.console.detach(self)
        self.flush = flush
        with contextlib.suppress(StreamError):
            self.stream.remove_event_callback()
        self.done.set_result(err)


class ConsoleService:
    """The consoles of one daemon and the CONSOLE procedures."""

    def __init__(self, specs: Mapping[str, str], history: int = DEFAULT_HISTORY) -> None:
        if history < 0:
            raise ConsoleError("console history size must not be negative")
        self.consoles: dict[str, Console] = {}
        for name, spec in specs.items():
            self.consoles[name] = make_console(name, spec, history)

    def register(self, server: Server) -> None:
        server.register(c.LIST, self.list, readonly=True)
        server.register(c.OPEN, self.open)
        server.register(c.RESIZE, self.resize)

    async def start(self) -> None:
        """Start the programs and the relays' first connection attempts."""
        started: list[Console] = []
        try:
            for console in self.consoles.values():
                console.start()
                started.append(console)
        except BaseException:
            for console in started:
                await console.close()
            raise

    async def close(self) -> None:
        await asyncio.gather(*(console.close() for console in self.consoles.values()))

    def _get(self, name: str) -> Console:
        console = self.consoles.get(name)
        if console is None:
            raise _error(f"no console named {name!r}", ErrorCode.INVALID_ARG)
        return console

    # ------------------------------------------------------------------ procedures
    async def list(self, ctx: CallContext, args: None) -> c.ListReply:
        return c.ListReply(list(self.consoles))

    async def open(self, ctx: CallContext, args: c.OpenArgs) -> None:
        console = self._get(args.name)
        if args.flags & ~_KNOWN_FLAGS:
            raise _error(f"unsupported flags {args.flags & ~_KNOWN_FLAGS:#x}",
                         ErrorCode.INVALID_ARG)
        force = bool(args.flags & c.OpenFlags.FORCE)
        if console.session is not None and not force:
            raise _busy(console)
        if console.closing:
            raise _error("the server is shutting down", ErrorCode.OPERATION_ABORTED)
        await console.prepare()
        old = console.session
        if old is not None and not force:
            raise _busy(console)  # someone else attached while we prepared
        stream = ctx.accept_stream()  # may still refuse (too many streams): old stays
        if old is not None:
            old.end(
                _error(f"console {console.name} was taken over by another session",
                       ErrorCode.OPERATION_ABORTED, ErrorDomain.STREAMS)
            )
        session = Session(console, ctx.connection, stream)
        console.session = session
        history = b"" if args.flags & c.OpenFlags.NO_HISTORY else console.history.replay()
        session.begin(history)
        try:
            err = await session.done
        finally:
            session.end(_error("stream cancelled", ErrorCode.OPERATION_ABORTED,
                               ErrorDomain.STREAMS))
        if err is not None:
            raise err
        if session.flush and session.out:
            await stream.send(bytes(session.out))
        # Returning sends EOF after the output and completes the client's finish.

    async def resize(self, ctx: CallContext, args: c.ResizeArgs) -> None:
        console = self._get(args.name)
        session = console.session
        if session is None or session.connection is not ctx.connection:
            raise _error(
                f"console {console.name}: RESIZE is allowed only on the connection "
                "holding its session",
                ErrorCode.OPERATION_INVALID,
            )
        if not (0 < args.rows <= 0xFFFF and 0 < args.cols <= 0xFFFF):
            raise _error(f"invalid window size {args.rows}x{args.cols}", ErrorCode.INVALID_ARG)
        console.resize(args.rows, args.cols)


def _busy(console: Console) -> RPCError:
    return _error(
        f"console {console.name} is in use by another session (FORCE takes it over)",
        ErrorCode.OPERATION_FAILED,
    )


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


__all__ = [
    "DEFAULT_HISTORY",
    "Console",
    "ConsoleError",
    "ConsoleService",
    "History",
    "ProgramConsole",
    "RelayConsole",
    "Session",
    "make_console",
    "parse_option",
]
