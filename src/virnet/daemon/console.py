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
from collections.abc import Mapping

from ..errors import ErrorCode, ErrorDomain, RPCError, StreamError
from ..server import CallContext, Server, ServerConnection
from ..services import console as c
from ..stream import Stream, StreamEvent
from .console_backends import (
    DEFAULT_HISTORY,
    Console,
    ConsoleError,
    History,
    ProgramConsole,
    RelayConsole,
    console_error,
    make_console,
    parse_option,
)

log = logging.getLogger("virnet.daemon.console")

#: Console output a session holds beyond what its stream took before reading pauses.
SESSION_OUT_LIMIT = 256 * 1024
#: Output deliveries up to this size make the connection run lean (keystroke echoes: the
#: path to the client kept clear of bulk data); bigger ones are a flood, not a person.
INTERACTIVE_OUTPUT = 4096

_EVENTS = StreamEvent.READABLE | StreamEvent.ERROR | StreamEvent.HANGUP
_KNOWN_FLAGS = int(c.OpenFlags.FORCE | c.OpenFlags.NO_HISTORY)


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
            self.end(stream.error or console_error("stream closed", ErrorCode.INVALID_STREAM,
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
            raise console_error(f"no console named {name!r}", ErrorCode.INVALID_ARG)
        return console

    # ------------------------------------------------------------------ procedures
    async def list(self, ctx: CallContext, args: None) -> c.ListReply:
        return c.ListReply(list(self.consoles))

    async def open(self, ctx: CallContext, args: c.OpenArgs) -> None:
        console = self._get(args.name)
        if args.flags & ~_KNOWN_FLAGS:
            raise console_error(f"unsupported flags {args.flags & ~_KNOWN_FLAGS:#x}",
                         ErrorCode.INVALID_ARG)
        force = bool(args.flags & c.OpenFlags.FORCE)
        if console.session is not None and not force:
            raise _busy(console)
        if console.closing:
            raise console_error("the server is shutting down", ErrorCode.OPERATION_ABORTED)
        await console.prepare()
        old = console.session
        if old is not None and not force:
            raise _busy(console)  # someone else attached while we prepared
        stream = ctx.accept_stream()  # may still refuse (too many streams): old stays
        if old is not None:
            old.end(
                console_error(f"console {console.name} was taken over by another session",
                       ErrorCode.OPERATION_ABORTED, ErrorDomain.STREAMS)
            )
        session = Session(console, ctx.connection, stream)
        console.session = session
        history = b"" if args.flags & c.OpenFlags.NO_HISTORY else console.history.replay()
        session.begin(history)
        try:
            err = await session.done
        finally:
            session.end(console_error("stream cancelled", ErrorCode.OPERATION_ABORTED,
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
            raise console_error(
                f"console {console.name}: RESIZE is allowed only on the connection "
                "holding its session",
                ErrorCode.OPERATION_INVALID,
            )
        if not (0 < args.rows <= 0xFFFF and 0 < args.cols <= 0xFFFF):
            raise console_error(
                f"invalid window size {args.rows}x{args.cols}", ErrorCode.INVALID_ARG
            )
        console.resize(args.rows, args.cols)


def _busy(console: Console) -> RPCError:
    return console_error(
        f"console {console.name} is in use by another session (FORCE takes it over)",
        ErrorCode.OPERATION_FAILED,
    )


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
