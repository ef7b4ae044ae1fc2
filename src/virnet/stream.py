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
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Final

from . import protocol, xdr
from ._core import Buffer, Mode
from ._impl import Message, encode_message, pack_header
from .constants import (
    CONTROL_CREDIT,
    CONTROL_PROGRAM,
    CONTROL_VERSION,
    FEATURE_FLOW_CONTROL,
    STREAM_CHUNK,
    MessageStatus,
    MessageType,
)
from .errors import ErrorCode, ErrorDomain, ProtocolError, RPCError, StreamError, XdrError

if TYPE_CHECKING:
    from ._protocol import RPCProtocol

log = logging.getLogger("virnet.stream")

_STREAM: Final = int(MessageType.STREAM)
_HOLE: Final = int(MessageType.STREAM_HOLE)
_MESSAGE: Final = int(MessageType.MESSAGE)
_OK: Final = int(MessageStatus.OK)
_ERROR: Final = int(MessageStatus.ERROR)
_CONTINUE: Final = int(MessageStatus.CONTINUE)

#: Bytes a stream may have queued for sending before ``send()`` waits (bounded memory
#: for copies of mutable data; views of immutable data cost nothing but count too).
SEND_QUEUE_LIMIT: Final = 1024 * 1024
#: Seconds ``Stream.abort()`` waits for the peer to confirm, by default.
ABORT_TIMEOUT: Final = 30.0
_CREDIT = struct.Struct(">IIiII")  # protocol.Credit, packed directly on the hot path


class StreamEvent(enum.IntFlag):
    """libvirt's ``virStreamEventType`` values."""

    READABLE = 1
    WRITABLE = 2
    ERROR = 4
    HANGUP = 8


class StreamState(enum.Enum):
    OPEN = "open"
    FINISHING = "finishing"  # finish sent (client) or requested (server)
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


class Hole:
    """A run of ``length`` bytes of nothing, received on a sparse stream."""

    __slots__ = ("length",)

    def __init__(self, length: int) -> None:
        self.length = length

    def __repr__(self) -> str:
        return f"Hole({self.length})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hole) and other.length == self.length

    __hash__ = None  # type: ignore[assignment]


class _ErrorItem:
    """A STREAM+ERROR queued behind the data already sent (server-side failure)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


_EOF: Final = object()
_FINISH: Final = object()  # a control item in the send queue: STREAM+OK after the data

Sink = Callable[[memoryview], Any] | BinaryIO | Any
Source = BinaryIO | AsyncIterable[Buffer] | Iterable[Buffer] | Callable[[int], Any] | Any


def _stream_error(message: str, code: int = ErrorCode.INVALID_STREAM) -> StreamError:
    return StreamError(message, code=code, domain=ErrorDomain.STREAMS)


class Stream:
    """One end of a data stream.  Get one from ``Client.open_stream`` (client side) or
    ``CallContext.accept_stream`` (server side); do not construct it yourself."""

    def __init__(
        self,
        proto: RPCProtocol,
        prog: int,
        vers: int,
        proc: int,
        serial: int,
        *,
        sparse: bool = False,
        can_send: bool = True,
        can_recv: bool = True,
    ) -> None:
        self._proto = proto
        self.key = (prog, vers, proc, serial)
        self._prog = prog
        self._vers = vers
        self._proc = proc
        self.serial = serial
        self.sparse = sparse
        self.can_send = can_send
        self.can_recv = can_recv
        self.is_client = proto.is_client
        self.native = proto.mode is Mode.NATIVE and bool(proto.features & FEATURE_FLOW_CONTROL)
        self.state = StreamState.OPEN
        self.error: StreamError | None = None
        self.reply: Any = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.holes_sent = 0
        self.holes_received = 0
        # receive side
        self._rx: deque[Any] = deque()  # memoryview/bytes chunks, Hole, or _EOF
        self._rx_bytes = 0
        self._rx_offset = 0  # bytes of _rx[0] already consumed
        self._rx_eof = False
        self._rx_waiter: asyncio.Future[None] | None = None
        self._window = proto.window if self.native else proto.legacy_rx_limit
        self._consumed = 0  # consumed since the last CREDIT we granted
        self._budget_released = False  # our queued bytes left the connection's total
        self._grant_step = max(1, min(self._window // 2, self._window - STREAM_CHUNK))
        self._over_limit = False
        # send side
        self._tx: deque[Any] = deque()  # (memoryview chunk) | (Hole) | _EOF | _FINISH
        self._tx_bytes = 0
        self._tx_waiter: asyncio.Future[None] | None = None
        self._credit = proto.peer_window if self.native else 0
        self._chunk = STREAM_CHUNK
        if self.native and 0 < proto.peer_window < STREAM_CHUNK:
            self._chunk = proto.peer_window
        self._scheduled = False
        self._eof_sent = False
        # control
        self._control_waiter: asyncio.Future[None] | None = None
        self._finish_requested = False  # server: the client sent STREAM+OK
        self._on_finish_request: Callable[[], None] | None = None
        self._discard = False  # server handler returned: drop (and credit) further data
        self._failing = False  # server: an error is queued behind the data
        # event callbacks
        self._event_cb: Callable[[Stream, StreamEvent], None] | None = None
        self._event_mask = StreamEvent(0)
        self._event_handle: asyncio.Handle | None = None

    # ------------------------------------------------------------------ info
    @property
    def closed(self) -> bool:
        return self.state in (StreamState.FINISHED, StreamState.ABORTED, StreamState.FAILED)

    @property
    def at_eof(self) -> bool:
        return self._rx_eof and (not self._rx or self._rx[0] is _EOF)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return self._rx_bytes

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        return (
            f"<Stream {role} proc={self._proc} serial={self.serial} {self.state.value} "
            f"sent={self.bytes_sent} received={self.bytes_received}>"
        )

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise _stream_error("stream is closed", ErrorCode.OPERATION_FAILED)

    # ------------------------------------------------------------------ sending
    def _send_room(self) -> int:
        return SEND_QUEUE_LIMIT - self._tx_bytes

    def _queue_chunk(self, chunk: Any, n: int) -> None:
        self._tx.append(chunk)
        self._tx_bytes += n
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._tx and self._sendable():
            self._scheduled = True
            self._proto.mark_ready(self)

    def _sendable(self) -> bool:
        head = self._tx[0]
        if self.native and isinstance(head, memoryview | bytes):
            return len(head) <= self._credit
        return True

    async def _wait_send_room(self) -> None:
        while self._tx_bytes >= SEND_QUEUE_LIMIT:
            self._check()
            fut = self._proto.loop.create_future()
            self._tx_waiter = fut
            try:
                await fut
            finally:
                self._tx_waiter = None
        self._check()

    def _check_send(self) -> None:
        self._check()
        if not self.can_send:
            raise _stream_error("this stream does not send in this direction")
        if self._eof_sent or self.state is not StreamState.OPEN:
            raise _stream_error("stream already finished sending", ErrorCode.OPERATION_INVALID)

    async def send(self, data: Buffer) -> None:
        """Send ``data`` (any bytes-like object), split into packets of at most 262120
        bytes; waits while the stream's send queue is full or (native mode) the peer has
        granted no credit.  Immutable data is sent without copying; mutable buffers are
        copied packet by packet, so they may be reused once this returns."""
        self._check_send()
        view = memoryview(data).cast("B")
        total = len(view)
        copy = not view.readonly
        pos = 0
        chunk = self._chunk
        while pos < total:
            if self._tx_bytes >= SEND_QUEUE_LIMIT and copy:
                await self._wait_send_room()
                self._check_send()
            n = min(chunk, total - pos)
            piece = view[pos : pos + n]
            self._queue_chunk(bytes(piece) if copy else piece, n)
            pos += n
        if self._tx_bytes >= SEND_QUEUE_LIMIT:
            await self._wait_send_room()

    def try_send(self, data: Buffer) -> int:
        """Queue as much of ``data`` as fits without waiting; returns the byte count.
        Raises ``BlockingIOError`` when nothing fits (libvirt's -2)."""
        self._check_send()
        view = memoryview(data).cast("B")
        room = self._send_room()
        if self.native:
            room = min(room, max(0, self._credit - self._tx_bytes))
        if room <= 0 or not view:
            if not view:
                return 0
            raise BlockingIOError("stream send queue is full")
        total = min(room, len(view))
        pos = 0
        while pos < total:
            n = min(self._chunk, total - pos)
            self._queue_chunk(bytes(view[pos : pos + n]), n)
            pos += n
        return total

    async def send_hole(self, length: int) -> None:
        """Tell the receiver to skip ``length`` bytes (sparse streams only)."""
        self._check_send()
        if not self.sparse:
            raise _stream_error(
                "holes are only allowed on sparse streams", ErrorCode.OPERATION_INVALID
            )
        if length <= 0:
            raise ValueError("hole length must be positive")
        self._queue_chunk(Hole(length), 0)
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

    def next_packet(self, limit: int = STREAM_CHUNK) -> tuple[list[Buffer], int, bool] | None:
        """Called by the connection when it flushes: this stream's next packet, with at
        most ``limit`` payload bytes (smaller while calls want the path kept clear)."""
        self._scheduled = False
        tx = self._tx
        if not tx or self._proto.transport is None:
            return None
        head = tx[0]
        if isinstance(head, memoryview | bytes):
            n = len(head)
            split = n > limit
            if split:
                n = limit
            if self.native and n > self._credit:
                return None  # a CREDIT will reschedule us
            if split:
                view = memoryview(head)
                tx[0] = view[n:]
                head = view[:n]
            else:
                tx.popleft()
            if self.native:
                self._credit -= n
            self._tx_bytes -= n
            self.bytes_sent += n
            out: list[Buffer] = [
                pack_header(self._prog, self._vers, self._proc, _STREAM, self.serial, _CONTINUE, n),
                head,
            ]
        elif isinstance(head, Hole):
            tx.popleft()
            self.holes_sent += 1
            payload = xdr.encode(protocol.StreamHole, protocol.StreamHole(head.length, 0))
            out = encode_message(
                self._prog, self._vers, self._proc, _HOLE, self.serial, _CONTINUE, payload
            )
            n = len(payload)
        elif isinstance(head, _ErrorItem):
            tx.popleft()
            out = encode_message(
                self._prog, self._vers, self._proc, _STREAM, self.serial, _ERROR, head.payload
            )
            n = 0
            self._terminate(StreamState.FAILED, None)
        elif head is _EOF:
            tx.popleft()
            out = encode_message(
                self._prog, self._vers, self._proc, _STREAM, self.serial, _CONTINUE
            )
            n = 0
        else:  # _FINISH
            tx.popleft()
            out = encode_message(self._prog, self._vers, self._proc, _STREAM, self.serial, _OK)
            n = 0
        waiter = self._tx_waiter
        if waiter is not None and self._tx_bytes < SEND_QUEUE_LIMIT and not waiter.done():
            waiter.set_result(None)
        more = bool(tx) and self._sendable()
        self._scheduled = more
        if self._event_cb is not None:
            self._notify()
        return out, n, more

    def on_credit(self, amount: int) -> None:
        self._credit += amount
        if not self._scheduled:
            self._schedule()
        if self._event_cb is not None:
            self._notify()

    # ------------------------------------------------------------------ receiving
    def on_packet(self, msg: Message) -> None:
        """Route one STREAM / STREAM_HOLE packet of this stream (called by the core)."""
        mtype = msg.type
        status = msg.status
        if mtype == _STREAM and status == _CONTINUE:
            payload = msg.payload
            n = len(payload)
            if self._rx_eof:
                self._fail_local("data after end of stream")
                return
            if not self.can_recv:
                self._fail_local("data received in the wrong direction")
                return
            if n == 0:
                self._rx_eof = True
                self._rx.append(_EOF)
            elif self._failing:
                return  # the peer is about to get our error
            elif self._discard:
                self.bytes_received += n
                self._rx_bytes += n
                self._proto.rx_buffered += n
                self._consume(n)
                return
            else:
                self._rx.append(payload)
                self._rx_bytes += n
                self._proto.rx_buffered += n
                self.bytes_received += n
                if self._rx_bytes > self._window:
                    if self.native:
                        self._fail_local(
                            f"peer exceeded the flow-control window ({self._window} bytes)"
                        )
                        return
                    if not self._over_limit:
                        self._over_limit = True
                        self._proto.stream_over_limit(self, True)
            self._wake_reader()
        elif mtype == _HOLE:
            if not self.sparse:
                self._fail_local("Unexpected stream hole")
                return
            try:
                hole = xdr.decode(protocol.StreamHole, msg.payload)
            except XdrError as exc:
                self._fail_local(f"malformed stream hole: {exc}")
                return
            if hole.length <= 0 or hole.flags != 0:
                self._fail_local(f"invalid stream hole (length {hole.length}, flags {hole.flags})")
                return
            self._rx.append(Hole(hole.length))
            self.holes_received += 1
            self._wake_reader()
        elif status == _OK:
            self._on_ok()
        else:  # ERROR
            self._on_error(msg.payload)

    def _on_ok(self) -> None:
        if self.is_client:
            fut = self._control_waiter
            if fut is None or fut.done():
                raise ProtocolError(f"stream confirmation for serial {self.serial} answers nothing")
            fut.set_result(None)
            return
        # Server: the client finished (upload end marker, or done reading a download).
        if self._finish_requested:
            raise ProtocolError(f"second finish request on stream serial {self.serial}")
        self._finish_requested = True
        if not self._rx_eof:
            self._rx_eof = True
            self._rx.append(_EOF)
        self._wake_reader()
        if self._on_finish_request is not None:
            self._on_finish_request()

    def _on_error(self, payload: Buffer) -> None:
        if self.is_client:
            try:
                err = protocol.decode_error(payload, StreamError) if len(payload) else None
            except XdrError as exc:
                raise ProtocolError(f"malformed stream error: {exc}") from None
            if err is None:
                err = _stream_error("stream aborted by the server")
            assert isinstance(err, StreamError)
            self._terminate(StreamState.FAILED, err)
            fut = self._control_waiter
            if fut is not None and not fut.done():
                fut.set_exception(err)
            return
        # Server: the client aborted.  Confirm with STREAM+OK, as libvirt does.
        self._control(_OK)
        self._terminate(
            StreamState.ABORTED,
            _stream_error("stream aborted by the client", ErrorCode.OPERATION_ABORTED),
        )

    def _control(self, status: int, payload: bytes = b"") -> None:
        """Queue a STREAM control packet (finish/abort/error) ahead of all data."""
        self._proto.queue_urgent(
            encode_message(
                self._prog, self._vers, self._proc, _STREAM, self.serial, status, payload
            )
        )

    def _fail_local(self, reason: str) -> None:
        """This end detected a stream-level error: tell the peer and fail the stream."""
        err = _stream_error(reason)
        log.warning("stream %s from %s: %s", self.serial, self._proto.peer, reason)
        if self.is_client:
            # Clients abort with an empty STREAM+ERROR; the confirmation is ignored.
            self._control(_ERROR)
        else:
            self._control(_ERROR, protocol.encode_error(err))
        self._terminate(StreamState.FAILED, err)

    def _terminate(self, state: StreamState, err: StreamError | None) -> None:
        if self.closed:
            return
        self.state = state
        if err is not None and self.error is None:
            self.error = err
        self._tx.clear()
        self._tx_bytes = 0
        self._proto.streams.pop(self.key, None)
        self._proto.stream_closed(self)
        if not self._budget_released:
            # What is still queued (it may yet be read) no longer counts against the
            # connection: this stream will never be granted credit again.
            self._budget_released = True
            self._proto.rx_buffered -= self._rx_bytes
        if self._over_limit:
            self._over_limit = False
            self._proto.stream_over_limit(self, False)
        self._wake_reader()
        if self._tx_waiter is not None and not self._tx_waiter.done():
            self._tx_waiter.set_result(None)
        if self._on_finish_request is not None:
            self._on_finish_request()
        if self._event_cb is not None:
            self._notify()

    def connection_lost(self, exc: BaseException) -> None:
        err = _stream_error(f"connection lost: {exc}", ErrorCode.OPERATION_FAILED)
        err.__cause__ = exc
        fut = self._control_waiter
        self._terminate(StreamState.FAILED, err)
        if fut is not None and not fut.done():
            fut.set_exception(err)

    def _wake_reader(self) -> None:
        fut = self._rx_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self._event_cb is not None:
            self._notify()

    async def _wait_readable(self) -> None:
        while not self._rx:
            if self.error is not None:
                raise self.error
            if self.closed:
                raise _stream_error("stream is closed", ErrorCode.OPERATION_FAILED)
            fut = self._proto.loop.create_future()
            self._rx_waiter = fut
            try:
                await fut
            finally:
                self._rx_waiter = None

    def _consume(self, n: int) -> None:
        self._rx_bytes -= n
        proto = self._proto
        if not self._budget_released:
            proto.rx_buffered -= n
        if self._over_limit and self._rx_bytes <= self._window // 2:
            self._over_limit = False
            proto.stream_over_limit(self, False)
        if self.native and not self.closed:
            self._consumed += n
            # Grant in half-window steps (h2, yamux, SSH do the same): few CREDIT
            # messages, and the sender never runs dry while one is in flight.
            if self._consumed >= self._grant_step:
                self._grant()
        if proto.deferred_grants and proto.rx_buffered <= proto.rx_budget:
            waiting = proto.deferred_grants
            proto.deferred_grants = []
            for stream in waiting:
                stream._grant()

    def _grant(self) -> None:
        if self.closed or not self._consumed:
            return
        proto = self._proto
        if proto.rx_buffered > proto.rx_budget:
            # The connection as a whole holds too much unread data: grant nothing more
            # until some reader catches up (connection-wide memory budget).
            if self not in proto.deferred_grants:
                proto.deferred_grants.append(self)
            return
        amount = self._consumed
        self._consumed = 0
        payload = _CREDIT.pack(self._prog, self._vers, self._proc, self.serial, amount)
        self._proto.queue_urgent(
            encode_message(
                CONTROL_PROGRAM, CONTROL_VERSION, CONTROL_CREDIT, _MESSAGE, 0, _OK, payload
            )
        )

    def _take(self, maximum: int | None) -> Any:
        """Pop the next item (data view, Hole or _EOF), at most ``maximum`` data bytes."""
        head = self._rx[0]
        if head is _EOF:
            return _EOF
        if isinstance(head, Hole):
            self._rx.popleft()
            return head
        off = self._rx_offset
        avail = len(head) - off
        if maximum is None or maximum >= avail:
            self._rx.popleft()
            self._rx_offset = 0
            piece = head if off == 0 else memoryview(head)[off:]
            self._consume(avail)
            return memoryview(piece) if not isinstance(piece, memoryview) else piece
        self._rx_offset = off + maximum
        self._consume(maximum)
        return memoryview(head)[off : off + maximum]

    async def recv_chunk(self, maximum: int | None = None) -> memoryview | Hole:
        """The next piece of the stream, without copying: a ``memoryview`` of data, a
        ``Hole`` (sparse streams), or an empty memoryview at EOF."""
        if not self.can_recv:
            raise _stream_error("this stream does not receive in this direction")
        if not self._rx:
            await self._wait_readable()
        item = self._take(maximum)
        if item is _EOF:
            return memoryview(b"")
        return item  # type: ignore[no-any-return]

    async def recv(self, maximum: int = STREAM_CHUNK) -> bytes:
        """Up to ``maximum`` bytes; ``b""`` at EOF.  A hole reads as zero bytes (like
        libvirt without STOP_AT_HOLE); use ``recv_chunk`` to see holes as ``Hole``."""
        if maximum <= 0:
            raise ValueError("maximum must be positive")
        item = await self.recv_chunk(maximum)
        if isinstance(item, Hole):
            return self._hole_as_zeros(item, maximum)
        return bytes(item)

    def _hole_as_zeros(self, hole: Hole, maximum: int) -> bytes:
        n = min(hole.length, maximum)
        if hole.length > n:
            self._rx.appendleft(Hole(hole.length - n))
        return bytes(n)

    def try_recv(self, maximum: int = STREAM_CHUNK) -> bytes:
        """Like ``recv`` without waiting; raises ``BlockingIOError`` when nothing is
        buffered (libvirt's -2)."""
        self._check_recv_ready()
        if not self._rx:
            raise BlockingIOError("no stream data buffered")
        item = self._take(maximum)
        if item is _EOF:
            return b""
        if isinstance(item, Hole):
            return self._hole_as_zeros(item, maximum)
        return bytes(item)

    def _check_recv_ready(self) -> None:
        if not self.can_recv:
            raise _stream_error("this stream does not receive in this direction")
        if not self._rx and self.error is not None:
            raise self.error

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
        self._check()
        if not self._eof_sent:
            self._eof_sent = True
            self._queue_chunk(_EOF, 0)

    async def finish(self) -> None:
        """The finish handshake; raises ``StreamError`` with the peer's reason if the
        transfer failed anywhere (this is where asynchronous errors surface)."""
        self._check()
        if not self.is_client:
            raise _stream_error(
                "a server finishes a stream by returning from its handler",
                ErrorCode.OPERATION_INVALID,
            )
        if self.state is not StreamState.OPEN:
            raise _stream_error("finish already in progress", ErrorCode.OPERATION_INVALID)
        self.state = StreamState.FINISHING
        fut: asyncio.Future[None] = self._proto.loop.create_future()
        self._control_waiter = fut
        self._queue_chunk(_FINISH, 0)
        await fut  # raises the peer's StreamError if the transfer failed anywhere
        self._control_waiter = None
        self._terminate(StreamState.FINISHED, None)

    async def abort(
        self, reason: str | None = None, *, timeout: float | None = ABORT_TIMEOUT
    ) -> None:
        """Cancel the transfer.  A client sends an empty STREAM+ERROR and waits up to
        ``timeout`` seconds (None: no limit) for the server's confirmation; a server sends
        STREAM+ERROR carrying ``reason``.  Either way the stream is aborted locally when
        this returns.  Cancelling the task that waits here cancels it as usual (the
        stream is still marked aborted)."""
        if self.closed:
            return
        err = _stream_error(reason or "stream aborted", ErrorCode.OPERATION_ABORTED)
        self._tx.clear()
        self._tx_bytes = 0
        if not self.is_client:
            self._control(_ERROR, protocol.encode_error(err))
            self._terminate(StreamState.ABORTED, err)
            return
        fut = self._control_waiter
        if fut is None or fut.done():
            fut = self._proto.loop.create_future()
            self._control_waiter = fut
        self.state = StreamState.FINISHING
        self._control(_ERROR)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except (StreamError, TimeoutError):
            pass  # the peer answered with an error, or not at all: aborted either way
        finally:
            self._terminate(StreamState.ABORTED, err)

    def server_fail(self, exc: RPCError) -> None:
        """Server side: end the stream with ``exc``.  The STREAM+ERROR carrying it goes
        out after the data already sent, as libvirt's daemon orders it; from now on every
        operation on this end raises it and incoming data is dropped."""
        if self.closed or self._failing:
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
        self.error = err
        self._failing = True
        self._discard = True
        self._queue_chunk(_ErrorItem(protocol.encode_error(err)), 0)
        self._wake_reader()

    async def server_complete(self) -> None:
        """Server side, after the handler returned: send EOF if we send, wait for the
        client's finish (STREAM+OK), drain what it sent, and confirm with STREAM+OK."""
        if self.closed:
            return
        if self.can_send and not self._eof_sent:
            self.send_eof()
        # Data the handler did not read is dropped (and credited, so nothing stalls).
        self._discard = True
        while self._rx and self._rx[0] is not _EOF:
            self._take(None)
        if not self._finish_requested:
            fut: asyncio.Future[None] = self._proto.loop.create_future()

            def done() -> None:
                if not fut.done():
                    fut.set_result(None)

            self._on_finish_request = done
            await fut
            self._on_finish_request = None
        if self.closed:
            return
        # The confirmation must follow any data still queued: put it in the stream queue.
        self._queue_chunk(_FINISH, 0)
        while self._tx and not self.closed:
            fut2: asyncio.Future[None] = self._proto.loop.create_future()
            self._tx_waiter = fut2
            try:
                await fut2
            finally:
                self._tx_waiter = None
        self._terminate(StreamState.FINISHED, None)

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
        ev = StreamEvent(0)
        if self._rx or (self.closed and self.can_recv):
            ev |= StreamEvent.READABLE
        if self.can_send and self.state is StreamState.OPEN and not self._eof_sent:
            room = self._send_room()
            if self.native:
                room = min(room, self._credit - self._tx_bytes)
            if room > 0:
                ev |= StreamEvent.WRITABLE
        if self.error is not None:
            ev |= StreamEvent.ERROR
        if self._rx_eof or self.closed:
            ev |= StreamEvent.HANGUP
        return ev

    def add_event_callback(
        self, events: StreamEvent, callback: Callable[[Stream, StreamEvent], None]
    ) -> None:
        """Call ``callback(stream, ready_events)`` when any of ``events`` becomes ready
        (one callback per stream, as in libvirt).  Fired from the event loop on real
        state changes: data arriving, send room or credit appearing, errors, EOF."""
        if self._event_cb is not None:
            raise _stream_error(
                "multiple stream callbacks not supported", ErrorCode.OPERATION_INVALID
            )
        self._event_cb = callback
        self._event_mask = StreamEvent(events)
        self._notify()

    def update_event_callback(self, events: StreamEvent) -> None:
        if self._event_cb is None:
            raise _stream_error("no stream callback registered", ErrorCode.OPERATION_INVALID)
        self._event_mask = StreamEvent(events)
        self._notify()

    def remove_event_callback(self) -> None:
        if self._event_cb is None:
            raise _stream_error("no stream callback registered", ErrorCode.OPERATION_INVALID)
        self._event_cb = None
        self._event_mask = StreamEvent(0)
        if self._event_handle is not None:
            self._event_handle.cancel()
            self._event_handle = None

    def _notify(self) -> None:
        if self._event_handle is None and self._levels() & self._event_mask:
            self._event_handle = self._proto.loop.call_soon(self._fire)

    def _fire(self) -> None:
        self._event_handle = None
        cb = self._event_cb
        if cb is None:
            return
        ready = self._levels() & self._event_mask
        if not ready:
            return
        progress = (self.bytes_sent, self.bytes_received, self._tx_bytes, self._rx_bytes)
        try:
            cb(self, ready)
        except Exception:
            log.exception("stream event callback %r failed", cb)
        # Level-triggered, but only while the callback makes progress: a callback that
        # ignores a ready event is called again on the next state change, not in a loop.
        after = (self.bytes_sent, self.bytes_received, self._tx_bytes, self._rx_bytes)
        if after != progress and not (ready & StreamEvent.HANGUP and self.closed):
            self._notify()
