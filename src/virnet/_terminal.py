"""The client side of ``virnet console``: the terminal in raw mode, restored on every way
out, and the pump between the terminal (or standard input and output) and the stream.

Terminal mode (standard input is a terminal): raw mode (no echo, no line editing, no
signals from keys: ^C and ^Z go to the console), the window size sent at attach and on
SIGWINCH, and the escape character (``^]`` unless ``--escape``) detaching wherever it
falls in what was typed; bytes before it are still sent.  The terminal's settings are
put back when the session ends for any reason: the escape, the console's EOF, an error
(the daemon gone, the console taken over), SIGTERM, SIGHUP, SIGINT, SIGQUIT.

Pipe mode (standard input is not a terminal): standard input goes to the console as it
comes, output to standard output, no escape, nothing else printed.  After standard
input's EOF the output keeps flowing until the console has been quiet for ``linger``
seconds (0.5 unless ``--linger``), or its stream ends, then the session detaches.

The pump runs on the event loop, as virsh's console does: standard input watched for
reading, the stream for READABLE, WRITABLE interest only while typed input waits for
room in the stream, standard output written without blocking (a terminal or pipe is
opened again, non-blocking, as a description of its own, so the shell's is untouched),
each direction bounded (reading pauses while the other side is behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass

from . import console as _console
from .client import Client
from .errors import StreamError, VirnetError
from .stream import Stream, StreamEvent

DEFAULT_ESCAPE = "^]"
DEFAULT_LINGER = 0.5
READ_SIZE = 64 * 1024
#: Typed input the stream has not taken yet before reading standard input pauses.
IN_LIMIT = 64 * 1024
#: Console output not yet written out before reading the stream pauses.
OUT_LIMIT = 256 * 1024
#: Input writes up to this size make the connection run lean (keystrokes).
INTERACTIVE_INPUT = 4096
#: Seconds the end of a session (finish or abort) may take before we leave anyway.
END_TIMEOUT = 5.0

_ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def parse_escape(text: str) -> int:
    """``^X`` (X one of ``@ A-Z [ \\ ] ^ _``, letters in either case) or that control
    character itself; returns the byte."""
    if len(text) == 2 and text[0] == "^":
        ch = text[1].upper()
        if "@" <= ch <= "_":
            return ord(ch) - 0x40
    if len(text) == 1 and ord(text) < 0x20:
        return ord(text)
    raise ValueError(
        f"the escape character must be ^X with X one of @ A-Z [ \\ ] ^ _, not {text!r}"
    )


def escape_name(byte: int) -> str:
    return "^" + chr(byte + 0x40)


def raw_attributes(attrs: list[int | list[bytes | int]]) -> list[int | list[bytes | int]]:
    """``cfmakeraw``: bytes in and out as they are, one at a time, no echo, no signals."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    assert isinstance(iflag, int) and isinstance(oflag, int)
    assert isinstance(cflag, int) and isinstance(lflag, int) and isinstance(cc, list)
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag &= ~(termios.CSIZE | termios.PARENB)
    cflag |= termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class Terminal:
    """A terminal's settings, saved; ``raw()`` changes them, ``restore()`` puts them back
    (safe to call more than once)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved = termios.tcgetattr(fd)
        self.is_raw = False

    def raw(self) -> None:
        termios.tcsetattr(self.fd, termios.TCSADRAIN, raw_attributes(self.saved))
        self.is_raw = True

    def restore(self) -> None:
        if self.is_raw:
            self.is_raw = False
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def window_size(fd: int) -> tuple[int, int] | None:
    import fcntl
    import struct

    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def _own_fd(fd: int, flags: int) -> tuple[int, bool]:
    """A descriptor for ``fd``'s terminal or pipe that we may make non-blocking: the same
    file opened again, an open file description of our own, so that neither O_NONBLOCK
    (which the event loop may set on what it watches: libuv does) nor anything else we
    do to it reaches the shell's.  Anything else (a file, a socket) is used as it is.
    Returns (descriptor, whether we opened it)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return fd, False
    if os.isatty(fd):
        path = os.ttyname(fd)
    elif stat.S_ISFIFO(st.st_mode):
        path = f"/proc/self/fd/{fd}"
    else:
        return fd, False
    try:
        return os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC), True
    except OSError:
        return fd, False


@dataclass
class Outcome:
    """How a session ended: ``detach`` (the escape), ``eof`` (the console's stream
    ended), ``input-done`` (pipe mode: standard input ended and output went quiet),
    ``output-closed`` (nobody reads our output any more), ``error``, ``signal``."""

    kind: str
    error: BaseException | None = None
    signo: int = 0


class Pump:
    """Moves bytes between an input descriptor, an output descriptor and a stream."""

    def __init__(
        self,
        stream: Stream,
        infd: int,
        outfd: int,
        *,
        escape: int | None,
        linger: float,
        interactive: Callable[[], None] | None = None,
    ) -> None:
        self.stream = stream
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[Outcome] = self.loop.create_future()
        self.infd, self._in_owned = _own_fd(infd, os.O_RDONLY)
        self.escape = escape
        self.linger = linger
        self.interactive = interactive
        self.pending_in = bytearray()  # typed, not yet taken by the stream
        self._out = bytearray()  # received, not yet written
        self._mask = StreamEvent.READABLE | StreamEvent.ERROR | StreamEvent.HANGUP
        self._in_poll = False  # input watched with add_reader (else read when scheduled)
        self._reading_in = False
        self._in_eof = False
        self._in_handle: asyncio.Handle | None = None
        self._linger_handle: asyncio.TimerHandle | None = None
        self._ending: Outcome | None = None  # ends once the output is written
        self.outfd, self._out_owned = _own_fd(outfd, os.O_WRONLY)
        self._writing = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.stream.add_event_callback(self._mask, self._guard(self._on_stream))
        try:
            self.loop.add_reader(self.infd, self._guard(self._read_input))
            self.loop.remove_reader(self.infd)
            self._in_poll = True
        except (OSError, ValueError):
            # A regular file, /dev/null and the like cannot be watched: always readable.
            self._in_poll = False
        self._resume_input()

    def stop(self) -> None:
        self._pause_input()
        if self._in_handle is not None:
            self._in_handle.cancel()
            self._in_handle = None
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        if self._writing:
            self.loop.remove_writer(self.outfd)
            self._writing = False
        with contextlib.suppress(StreamError):
            self.stream.remove_event_callback()
        if self._out_owned:
            os.close(self.outfd)
            self._out_owned = False
        if self._in_owned:
            os.close(self.infd)
            self._in_owned = False

    def finish(self, outcome: Outcome) -> None:
        if not self.done.done():
            self.done.set_result(outcome)

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        def call(*args: object) -> None:
            try:
                fn(*args)
            except Exception as exc:  # an unexpected failure still ends cleanly
                self.finish(Outcome("error", exc))

        return call

    def _want(self, event: StreamEvent, on: bool) -> None:
        mask = self._mask | event if on else self._mask & ~event
        if mask != self._mask and not self.done.done():
            self._mask = mask
            self.stream.update_event_callback(mask)

    # ------------------------------------------------------------------ input
    def _pause_input(self) -> None:
        if self._reading_in:
            self._reading_in = False
            if self._in_poll:
                self.loop.remove_reader(self.infd)

    def _resume_input(self) -> None:
        if self._reading_in or self._in_eof or self.done.done():
            return
        self._reading_in = True
        if self._in_poll:
            self.loop.add_reader(self.infd, self._guard(self._read_input))
        else:
            self._schedule_file_read()

    def _schedule_file_read(self) -> None:
        if self._in_handle is None:
            self._in_handle = self.loop.call_soon(self._guard(self._file_read))

    def _file_read(self) -> None:
        self._in_handle = None
        if self._reading_in:
            self._read_input()
            if self._reading_in:
                self._schedule_file_read()

    def _read_input(self) -> None:
        try:
            data = os.read(self.infd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: the terminal hung up; EBADF: no standard input
            data = b""
        if not data:
            self._input_ended()
            return
        if self.escape is not None:
            at = data.find(self.escape)
            if at >= 0:
                self.pending_in += data[:at]
                self.finish(Outcome("detach"))
                return
        self.pending_in += data
        self._flush_in()

    def _input_ended(self) -> None:
        self._pause_input()
        self._in_eof = True
        if self.escape is not None:
            # A terminal does not end; it hung up.  Nothing left to type into.
            self.finish(Outcome("detach"))
            return
        if not self.pending_in:
            self._restart_linger()

    def _flush_in(self) -> None:
        if self.pending_in:
            try:
                n = self.stream.try_send(self.pending_in)
            except BlockingIOError:
                n = 0
            except StreamError as exc:
                self._error(exc)
                return
            if n:
                if n <= INTERACTIVE_INPUT and self.interactive is not None:
                    self.interactive()
                del self.pending_in[:n]
        self._want(StreamEvent.WRITABLE, bool(self.pending_in))
        if len(self.pending_in) >= IN_LIMIT:
            self._pause_input()
        else:
            self._resume_input()
        if self._in_eof and not self.pending_in and self._linger_handle is None:
            self._restart_linger()

    def _restart_linger(self) -> None:
        if self._linger_handle is not None:
            self._linger_handle.cancel()
        self._linger_handle = self.loop.call_later(
            self.linger, self.finish, Outcome("input-done")
        )

    # ------------------------------------------------------------------ output
    def _on_stream(self, stream: Stream, events: StreamEvent) -> None:
        if self.done.done():
            return
        if events & StreamEvent.WRITABLE and self.pending_in:
            self._flush_in()
        if events & (StreamEvent.READABLE | StreamEvent.ERROR | StreamEvent.HANGUP):
            self._pump_out()

    def _pump_out(self) -> None:
        got = False
        while len(self._out) < OUT_LIMIT and self._ending is None:
            try:
                data = self.stream.try_recv()
            except BlockingIOError:
                break
            except StreamError as exc:
                self._ending = Outcome("error", exc)
                break
            if not data:
                self._ending = Outcome("eof")
                break
            self._out += data
            got = True
        if got and self._in_eof and self._linger_handle is not None:
            self._restart_linger()
        self._write_out()

    def _write_out(self) -> None:
        while self._out:
            try:
                n = os.write(self.outfd, self._out)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self.loop.add_writer(self.outfd, self._guard(self._write_out))
                self._want(StreamEvent.READABLE, len(self._out) < OUT_LIMIT)
                return
            except OSError as exc:  # EPIPE: whoever read our output is gone
                self.finish(Outcome("output-closed", exc))
                return
            del self._out[:n]
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.outfd)
        if self._ending is not None:
            self.finish(self._ending)
            return
        if not self._mask & StreamEvent.READABLE:
            self._want(StreamEvent.READABLE, True)

    def _error(self, exc: BaseException) -> None:
        self._ending = Outcome("error", exc)
        self._write_out()


async def run(
    client: Client,
    name: str,
    *,
    force: bool = False,
    history: bool = True,
    escape: str = DEFAULT_ESCAPE,
    linger: float = DEFAULT_LINGER,
    quiet: bool = False,
) -> tuple[int, str | None]:
    """Attach standard input and output to console ``name``; returns the exit status
    and, for a failure, the one line to print."""
    escape_byte = parse_escape(escape)
    interactive = os.isatty(0)
    stream = await _console.open(client, name, force=force, history=history)
    loop = asyncio.get_running_loop()
    terminal: Terminal | None = None
    pump = Pump(
        stream, 0, 1,
        escape=escape_byte if interactive else None,
        linger=linger,
        interactive=client.protocol.note_interactive,
    )
    resizing: asyncio.Task[None] | None = None
    resize_again = False

    async def send_size() -> None:
        nonlocal resize_again
        while True:
            resize_again = False
            size = window_size(0) or window_size(1)
            if size is not None:
                try:
                    await _console.resize(client, name, *size)
                except VirnetError:
                    # A relay has no window size (NO_SUPPORT); any other failure means
                    # the session is ending, and its stream says why.
                    return
            if not resize_again:
                return

    def on_winch() -> None:
        nonlocal resizing, resize_again
        if resizing is not None and not resizing.done():
            resize_again = True
        else:
            resizing = loop.create_task(send_size())

    def on_signal(signo: int) -> None:
        pump.finish(Outcome("signal", signo=signo))

    def on_cont() -> None:
        if terminal is not None:
            terminal.raw()  # a shell may have reset it while we were stopped

    handled: list[int] = []
    try:
        for sig in _ENDING_SIGNALS:
            loop.add_signal_handler(sig, on_signal, int(sig))
            handled.append(sig)
        if interactive:
            terminal = Terminal(0)
            if not quiet:
                sys.stderr.write(
                    f"Connected to console {name} (escape character is "
                    f"{escape_name(escape_byte)})\n"
                )
                sys.stderr.flush()
            terminal.raw()
            for sig, handler in ((signal.SIGWINCH, on_winch), (signal.SIGCONT, on_cont)):
                loop.add_signal_handler(sig, handler)
                handled.append(sig)
            on_winch()
        pump.start()
        outcome = await pump.done
    except BaseException:
        pump.stop()
        if terminal is not None:
            terminal.restore()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(END_TIMEOUT):
                await stream.abort()
        raise
    finally:
        for signo in handled:
            loop.remove_signal_handler(signo)
    pump.stop()
    if terminal is not None:
        terminal.restore()
        if not quiet:
            sys.stderr.write("\n")
            sys.stderr.flush()
    if resizing is not None and not resizing.done():
        resizing.cancel()
    return await _end(stream, pump, outcome, name)


async def _end(stream: Stream, pump: Pump, outcome: Outcome, name: str) -> tuple[int, str | None]:
    if outcome.kind == "error":
        with contextlib.suppress(Exception):
            async with asyncio.timeout(END_TIMEOUT):
                await stream.abort()
        return 1, f"console {name}: {_describe(outcome.error)}"
    if outcome.kind == "signal":
        with contextlib.suppress(Exception):
            async with asyncio.timeout(END_TIMEOUT):
                await stream.abort()
        return 128 + outcome.signo, None
    # detach, eof, input-done, output-closed: a clean finish (what was typed before the
    # escape goes first).
    try:
        async with asyncio.timeout(END_TIMEOUT):
            if pump.pending_in and outcome.kind != "eof":
                await stream.send(bytes(pump.pending_in))
            await stream.finish()
    except (VirnetError, TimeoutError) as exc:
        if outcome.kind == "eof":
            return 1, f"console {name}: {_describe(exc)}"
        with contextlib.suppress(Exception):
            async with asyncio.timeout(END_TIMEOUT):
                await stream.abort()
    return 0, None


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out ending the session"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, VirnetError):
        return exc.strerror
    return str(exc) if exc is not None else "unknown error"
