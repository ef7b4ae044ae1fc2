"""Data streams: one ``Stream`` type for both ends, over one RPC connection.

A stream is named by the (prog, vers, proc, serial) of the call that opened it.  Data
travels as STREAM+CONTINUE packets of at most 262120 bytes, holes as STREAM_HOLE (only on
streams opened sparse), EOF as an empty STREAM+CONTINUE, the finish handshake as STREAM+OK
answered by STREAM+OK (or STREAM+ERROR carrying the reason), abort as STREAM+ERROR.

Send side: ``send()`` slices the data into packets (views, never copies of immutable
data) and queues them on the stream; the connection takes one packet per ready stream
per turn (round-robin) when it flushes, so streams interleave fairly and calls, replies
and control packets always go first.  In native mode a packet leaves only when the
peer granted credit for it; a stream with no credit simply is not ready.

Receive side: packets are appended to the stream's queue as they arrive (data lands in
its final buffer straight from the socket) and handed to the reader without copying.
In native mode the reader's consumption is returned to the peer as CREDIT once half the
window is used, so a stream whose reader stops holds at most one window of memory and
stops only its own sender.  In legacy mode (a libvirt peer) there is no credit: when a
stream's queue passes its limit the connection stops reading, libvirt's only lever.

The protocol state of a stream (its state machine, queues, credit and limits) is the
sans-IO ``virnet._streams.StreamCore``; ``Stream`` is the asyncio face of it: it waits
for what the core reports (``on_rx``, ``on_tx``, ...) and fires event callbacks.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Final

from ._core import Buffer
from ._fileio import FileSource, FileSpan
from ._streams import (
    EOF,
    SEND_QUEUE_LIMIT,
    Hole,
    StreamCore,
    StreamState,
    stream_error,
)
from .constants import STREAM_CHUNK
from .errors import ErrorCode, RPCError, StreamError

if TYPE_CHECKING:
    from ._protocol import RPCProtocol

__all__ = ["ABORT_TIMEOUT", "SEND_QUEUE_LIMIT", "Hole", "Stream", "StreamEvent", "StreamState"]

log = logging.getLogger("virnet.stream")

#: Seconds ``Stream.abort()`` waits for the peer to confirm, by default.
ABORT_TIMEOUT: Final = 30.0


class StreamEvent(enum.IntFlag):
    """libvirt's ``virStreamEventType`` values."""

    READABLE = 1
    WRITABLE = 2
    ERROR = 4
    HANGUP = 8


Sink = Callable[[memoryview], Any] | BinaryIO | Any
Source = BinaryIO | AsyncIterable[Buffer] | Iterable[Buffer] | Callable[[int], Any] | Any


class Stream:
    """One end of a data stream.  Get one from ``Client.open_stream`` (client side) or
    ``CallContext.accept_stream`` (server side); do not construct it yourself."""

    def __init__(self, proto: RPCProtocol, core: StreamCore) -> None:
        self._loop = proto.loop
        self._proto = proto  # for direct runs (``recv_into``) only
        self._direct = False  # ``recv_into`` waits on a run
        self._core = core
        core.listener = self
        self.key = core.key
        self.serial = core.serial
        self.sparse = core.sparse
        self.can_send = core.can_send
        self.can_recv = core.can_recv
        self.is_client = core.is_client
        self.native = core.native
        self.reply: Any = None
        self._rx_waiter: asyncio.Future[None] | None = None
        self._tx_waiter: asyncio.Future[None] | None = None
        self._control_waiter: asyncio.Future[None] | None = None
        self._change_waiter: asyncio.Future[None] | None = None  # ``until``
        # event callbacks
        self._event_cb: Callable[[Stream, StreamEvent], None] | None = None
        self._event_mask = StreamEvent(0)
        self._event_handle: asyncio.Handle | None = None

    # ------------------------------------------------------------------ info
    @property
    def state(self) -> StreamState:
        return self._core.state

    @property
    def error(self) -> StreamError | None:
        return self._core.error

    @property
    def bytes_sent(self) -> int:
        return self._core.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._core.bytes_received

    @property
    def holes_sent(self) -> int:
        return self._core.holes_sent

    @property
    def holes_received(self) -> int:
        return self._core.holes_received

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def at_eof(self) -> bool:
        return self._core.at_eof

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return self._core.rx_bytes

    def __repr__(self) -> str:
        core = self._core
        role = "client" if self.is_client else "server"
        return (
            f"<Stream {role} proc={core.proc} serial={self.serial} {core.state.value} "
            f"sent={core.bytes_sent} received={core.bytes_received}>"
        )

    # ------------------------------------------------------------------ core events
    # on_rx and on_tx run once per packet: the common case (nobody else watching) is
    # two attribute checks, no further call.
    def on_rx(self) -> None:
        fut = self._rx_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self._direct:
            self._proto.direct.stream_changed(self._core)
        if self._change_waiter is not None or self._event_cb is not None:
            self._changed()

    def on_tx(self) -> None:
        fut = self._tx_waiter
        if fut is not None and self._core.tx_bytes < SEND_QUEUE_LIMIT and not fut.done():
            fut.set_result(None)
        if self._change_waiter is not None or self._event_cb is not None:
            self._changed()

    def on_confirm(self, err: StreamError | None) -> None:
        fut = self._control_waiter
        if fut is not None and not fut.done():
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)

    def on_finish_request(self) -> None:
        self._changed()

    def _changed(self) -> None:
        fut = self._change_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self._event_cb is not None:
            self._notify()

    async def _until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, checked whenever the core reports a change
        (used by the server's completion of a stream)."""
        while not condition():
            fut = self._loop.create_future()
            self._change_waiter = fut
            try:
                await fut
            finally:
                self._change_waiter = None

    # ------------------------------------------------------------------ sending
    async def _wait_send_room(self) -> None:
        core = self._core
        while core.tx_bytes >= SEND_QUEUE_LIMIT:
            core.check()
            fut = self._loop.create_future()
            self._tx_waiter = fut
            try:
                await fut
            finally:
                self._tx_waiter = None
        core.check()

    async def send(self, data: Buffer) -> None:
        """Send ``data`` (any bytes-like object), split into packets of at most 262120
        bytes; waits while the stream's send queue is full or (native mode) the peer has
        granted no credit.  Immutable data is sent without copying; mutable buffers are
        copied packet by packet, so they may be reused once this returns."""
        core = self._core
        core.check_send()
        view = memoryview(data).cast("B")
        total = len(view)
        copy = not view.readonly
        pos = 0
        chunk = core.chunk
        queue = core.queue
        while pos < total:
            if core.tx_bytes >= SEND_QUEUE_LIMIT and copy:
                await self._wait_send_room()
                core.check_send()
            n = min(chunk, total - pos)
            piece = view[pos : pos + n]
            queue(bytes(piece) if copy else piece, n)
            pos += n
        if core.tx_bytes >= SEND_QUEUE_LIMIT:
            await self._wait_send_room()

    @property
    def sends_files(self) -> bool:
        """True where ``send_file`` hands file data to the kernel without reading it
        into this process (a plain socket); elsewhere (TLS) it reads it here."""
        return self._proto.socket_fd >= 0

    async def send_file(self, fd: int, offset: int, length: int) -> None:
        """Send ``length`` bytes of the regular file ``fd`` from ``offset``, like
        ``send`` of their contents.  Where the connection can (``sends_files``), the
        bytes are read when they go out, with ``sendfile``, never through a buffer of
        ours: the file must not shrink meanwhile (if it does, the connection is closed:
        a packet's header already announced the bytes).  ``fd`` may be closed once this
        returns: queued data refers to a duplicate."""
        if not self.sends_files:
            from ._fileio import read_blocks

            blocks = read_blocks(fd, offset, length)
            try:
                async for block in blocks:
                    await self.send(block)
            finally:
                await blocks.aclose()
            return
        core = self._core
        core.check_send()
        source = FileSource(fd)
        end = offset + length
        chunk = core.chunk
        queue = core.queue
        while offset < end:
            if core.tx_bytes >= SEND_QUEUE_LIMIT:
                await self._wait_send_room()
                core.check_send()
            n = min(chunk, end - offset)
            queue(FileSpan(source, offset, n), n)
            offset += n
        if core.tx_bytes >= SEND_QUEUE_LIMIT:
            await self._wait_send_room()

    def try_send(self, data: Buffer) -> int:
        """Queue as much of ``data`` as fits without waiting; returns the byte count.
        Raises ``BlockingIOError`` when nothing fits (libvirt's -2)."""
        core = self._core
        core.check_send()
        view = memoryview(data).cast("B")
        room = SEND_QUEUE_LIMIT - core.tx_bytes
        if core.native:
            room = min(room, max(0, core.credit - core.tx_bytes))
        if room <= 0 or not view:
            if not view:
                return 0
            raise BlockingIOError("stream send queue is full")
        total = min(room, len(view))
        pos = 0
        chunk = core.chunk
        while pos < total:
            n = min(chunk, total - pos)
            core.queue(bytes(view[pos : pos + n]), n)
            pos += n
        return total

    async def send_hole(self, length: int) -> None:
        """Tell the receiver to skip ``length`` bytes (sparse streams only)."""
        self._core.queue_hole(length)
        await self._wait_send_room()

    async def send_all(self, source: Source, *, chunk_size: int = STREAM_CHUNK) -> int:
        """Send everything from ``source``: a binary file (read in chunks), an async or
        plain iterable of bytes-like objects, or a callable ``f(n) -> bytes`` (or an
        awaitable of bytes) returning ``b""`` at the end.  Does not finish the stream.
        Returns the byte count."""
        total = 0
        if hasattr(source, "readinto") or hasattr(source, "read"):
            read = source.read  # type: ignore[union-attr]
            while data := read(chunk_size):
                await self.send(data)
                total += len(data)
        elif hasattr(source, "__aiter__"):
            async for data in source:
                await self.send(data)
                total += len(data)
        elif callable(source):
            while True:
                data = source(chunk_size)
                if isinstance(data, Awaitable):
                    data = await data
                if not data:
                    break
                await self.send(data)
                total += len(data)
        else:
            for data in source:
                await self.send(data)
                total += len(data)
        return total

    # ------------------------------------------------------------------ receiving
    async def _wait_readable(self) -> None:
        core = self._core
        while not core.rx:
            if core.error is not None:
                raise core.error
            if core.closed:
                raise stream_error("stream is closed", ErrorCode.OPERATION_FAILED)
            fut = self._loop.create_future()
            self._rx_waiter = fut
            try:
                await fut
            finally:
                self._rx_waiter = None

    async def recv_chunk(self, maximum: int | None = None) -> memoryview | Hole:
        """The next piece of the stream, without copying: a ``memoryview`` of data, a
        ``Hole`` (sparse streams), or an empty memoryview at EOF."""
        core = self._core
        if not core.can_recv:
            core.check_recv()
        if not core.rx:
            await self._wait_readable()
        item = core.take(maximum)
        if item is EOF:
            return memoryview(b"")
        return item  # type: ignore[no-any-return]

    @property
    def can_recv_directly(self) -> bool:
        """``recv_into`` can take runs on this connection (a plain socket, not TLS)."""
        return self._proto.socket_fd >= 0

    async def recv_into(
        self,
        fd: int,
        offset: int | None = None,
        *,
        limit: int | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Write the stream's next run of data straight into the file descriptor
        ``fd`` (at ``offset``, or at ``fd``'s own position if None) and return the
        byte count.  A worker thread reads the run off the socket and splices it into
        ``fd`` (no copy through this process) until something else than this
        stream's data comes: a hole, EOF, a packet of another stream, a call.
        ``limit`` bounds the bytes taken; ``progress(n)`` is called on the loop as
        they arrive.  Returns 0, having waited for nothing, where a run cannot be
        taken now (TLS, a hole or EOF is next, the connection already has a run, too
        many runs in the process): take the next item with ``recv_chunk`` then.
        Raises the ``OSError`` of a failed write; the data packet it happened in is
        still taken off the socket, and the stream stays open."""
        core = self._core
        if not core.can_recv:
            core.check_recv()
        fut = self._proto.direct.request(core, fd, offset, limit, progress)
        if fut is None:
            return 0
        self._direct = True
        try:
            return await fut
        finally:
            self._direct = False

    async def recv(self, maximum: int = STREAM_CHUNK) -> bytes:
        """Up to ``maximum`` bytes; ``b""`` at EOF.  A hole reads as zero bytes (like
        libvirt without STOP_AT_HOLE); use ``recv_chunk`` to see holes as ``Hole``."""
        if maximum <= 0:
            raise ValueError("maximum must be positive")
        item = await self.recv_chunk(maximum)
        if isinstance(item, Hole):
            return bytes(self._core.take_hole(item, maximum))
        return bytes(item)

    def try_recv(self, maximum: int = STREAM_CHUNK) -> bytes:
        """Like ``recv`` without waiting; raises ``BlockingIOError`` when nothing is
        buffered (libvirt's -2)."""
        core = self._core
        core.check_recv()
        if not core.rx:
            if core.error is not None:
                raise core.error
            raise BlockingIOError("no stream data buffered")
        item = core.take(maximum)
        if item is EOF:
            return b""
        if isinstance(item, Hole):
            return bytes(core.take_hole(item, maximum))
        return bytes(item)

    def __aiter__(self) -> AsyncIterator[memoryview | Hole]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[memoryview | Hole]:
        while True:
            item = await self.recv_chunk()
            if isinstance(item, memoryview) and not item:
                return
            yield item

    async def recv_all(self, sink: Sink, *, on_hole: Callable[[int], Any] | None = None) -> int:
        """Write everything up to EOF into ``sink`` (a binary file, or a callable taking
        a memoryview, sync or async).  Holes go to ``on_hole(length)`` if given, else to
        ``sink.seek(length, SEEK_CUR)`` for files, else are written as zeros.  Returns the
        number of bytes covered (data plus holes)."""
        write = sink.write if hasattr(sink, "write") else sink
        total = 0
        async for item in self:
            if isinstance(item, Hole):
                total += item.length
                if on_hole is not None:
                    result = on_hole(item.length)
                    if isinstance(result, Awaitable):
                        await result
                elif hasattr(sink, "seek"):
                    sink.seek(item.length, 1)
                else:
                    left = item.length
                    while left:
                        n = min(left, STREAM_CHUNK)
                        res = write(memoryview(bytes(n)))
                        if isinstance(res, Awaitable):
                            await res
                        left -= n
                continue
            result = write(item)
            if isinstance(result, Awaitable):
                await result
            total += len(item)
        return total

    # ------------------------------------------------------------------ ending
    def send_eof(self) -> None:
        """Signal end of data (downloads, and each direction of a two-way stream)."""
        self._core.queue_eof()

    async def finish(self) -> None:
        """The finish handshake; raises ``StreamError`` with the peer's reason if the
        transfer failed anywhere (this is where asynchronous errors surface)."""
        core = self._core
        core.start_finish()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._control_waiter = fut
        await fut  # raises the peer's StreamError if the transfer failed anywhere
        self._control_waiter = None
        core.terminate(StreamState.FINISHED, None)

    async def abort(
        self, reason: str | None = None, *, timeout: float | None = ABORT_TIMEOUT
    ) -> None:
        """Cancel the transfer.  A client sends an empty STREAM+ERROR and waits up to
        ``timeout`` seconds (None: no limit) for the server's confirmation; a server sends
        STREAM+ERROR carrying ``reason``.  Either way the stream is aborted locally when
        this returns.  Cancelling the task that waits here cancels it as usual (the
        stream is still marked aborted)."""
        core = self._core
        if core.closed:
            return
        err = core.start_abort(reason)
        if not self.is_client:
            return
        fut = self._control_waiter
        if fut is None or fut.done():
            fut = self._loop.create_future()
            self._control_waiter = fut
        try:
            async with asyncio.timeout(timeout):
                await fut
        except (StreamError, TimeoutError):
            pass  # the peer answered with an error, or not at all: aborted either way
        finally:
            core.terminate(StreamState.ABORTED, err)

    # ------------------------------------------------------------------ context manager
    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.closed and self.is_client:
            await self.abort("stream left without finish" if exc is None else repr(exc))

    # ------------------------------------------------------------------ event callbacks
    def _levels(self) -> StreamEvent:
        core = self._core
        ev = StreamEvent(0)
        closed = core.closed
        if core.rx or (closed and self.can_recv):
            ev |= StreamEvent.READABLE
        if (
            self.can_send
            and core.state is StreamState.OPEN
            and not core.eof_sent
            and core.send_room() > 0
        ):
            ev |= StreamEvent.WRITABLE
        if core.error is not None:
            ev |= StreamEvent.ERROR
        if core.rx_eof or closed:
            ev |= StreamEvent.HANGUP
        return ev

    def add_event_callback(
        self, events: StreamEvent, callback: Callable[[Stream, StreamEvent], None]
    ) -> None:
        """Call ``callback(stream, ready_events)`` when any of ``events`` becomes ready
        (one callback per stream, as in libvirt).  Fired from the event loop on real
        state changes: data arriving, send room or credit appearing, errors, EOF."""
        if self._event_cb is not None:
            raise stream_error(
                "multiple stream callbacks not supported", ErrorCode.OPERATION_INVALID
            )
        self._event_cb = callback
        self._event_mask = StreamEvent(events)
        self._notify()

    def update_event_callback(self, events: StreamEvent) -> None:
        if self._event_cb is None:
            raise stream_error("no stream callback registered", ErrorCode.OPERATION_INVALID)
        self._event_mask = StreamEvent(events)
        self._notify()

    def remove_event_callback(self) -> None:
        if self._event_cb is None:
            raise stream_error("no stream callback registered", ErrorCode.OPERATION_INVALID)
        self._event_cb = None
        self._event_mask = StreamEvent(0)
        if self._event_handle is not None:
            self._event_handle.cancel()
            self._event_handle = None

    def _notify(self) -> None:
        if self._event_handle is None and self._levels() & self._event_mask:
            self._event_handle = self._loop.call_soon(self._fire)

    def _progress(self) -> tuple[int, int, int, int]:
        core = self._core
        return (core.bytes_sent, core.bytes_received, core.tx_bytes, core.rx_bytes)

    def _fire(self) -> None:
        self._event_handle = None
        cb = self._event_cb
        if cb is None:
            return
        ready = self._levels() & self._event_mask
        if not ready:
            return
        progress = self._progress()
        try:
            cb(self, ready)
        except Exception:
            log.exception("stream event callback %r failed", cb)
        # Level-triggered, but only while the callback makes progress: a callback that
        # ignores a ready event is called again on the next state change, not in a loop.
        if self._progress() != progress and not (ready & StreamEvent.HANGUP and self.closed):
            self._notify()


# ---------------------------------------------------------------------- server side
# How a server ends the stream of a call it served (``virnet.server``); here, beside the
# ``Stream`` whose core they drive.
def fail_stream(stream: Stream, exc: RPCError) -> None:
    """Server side: end ``stream`` with ``exc``.  The STREAM+ERROR carrying it goes out
    after the data already sent, as libvirt's daemon orders it; from now on every
    operation on this end raises it and incoming data is dropped."""
    core = stream._core
    if core.closed or core.failing:
        return
    if isinstance(exc, StreamError):
        err = exc
    else:
        err = StreamError(
            exc.message,
            code=exc.code,
            domain=exc.domain,
            level=exc.level,
            str1=exc.str1,
            str2=exc.str2,
            str3=exc.str3,
            int1=exc.int1,
            int2=exc.int2,
        )
    core.fail_after_data(err)


async def complete_stream(stream: Stream) -> None:
    """Server side, after the handler returned: send EOF if we send, wait for the
    client's finish (STREAM+OK), drain what it sent, and confirm with STREAM+OK."""
    core = stream._core
    if core.closed:
        return
    if core.can_send and not core.eof_sent:
        core.queue_eof()
    # Data the handler did not read is dropped (and credited, so nothing stalls).
    core.discard_unread()
    if not core.finish_requested:
        await stream._until(lambda: core.finish_requested or core.closed)
    if core.closed:
        return
    # The confirmation must follow any data still queued: it goes in the stream's queue.
    core.queue_finish_confirmation()
    await stream._until(lambda: not core.tx or core.closed)
    core.terminate(StreamState.FINISHED, None)
