"""Sans-IO state of one data stream: the state machine, the send and receive queues,
credit (native mode) and the legacy receive limit.

A ``StreamCore`` is created and registered by its ``ConnectionCore``
(``ConnectionCore.open_stream``), which routes the stream's packets to ``on_packet`` and
its CREDIT to ``on_credit`` and asks ``next_packet`` for one packet at a time when it
flushes.  The connection keeps what is shared between streams: the receive budget
(``rx_buffered`` / ``rx_budget``, grants deferred past it) and whether reading must
pause (a legacy stream over its limit).

Bytes and packets come in, packets go out to the connection's queues, and what changed
is reported to the stream's ``listener`` (the asyncio ``Stream`` facade) by plain method
calls: no loop, no futures, no clock.  Errors of the peer's making either fail the stream
(a legal transition: STREAM+ERROR is sent) or raise ``ProtocolError`` (the connection
closes); misuse by the application raises ``StreamError``.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Protocol

from . import protocol, xdr
from ._fileio import FileSpan
from ._impl import Message, encode_message, pack_header
from .constants import (
    CONTROL_CREDIT,
    CONTROL_PROGRAM,
    CONTROL_VERSION,
    STREAM_CHUNK,
    MessageStatus,
    MessageType,
)
from .errors import ErrorCode, ErrorDomain, ProtocolError, StreamError, XdrError

if TYPE_CHECKING:
    from ._core import Buffer, ConnectionCore

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
_CREDIT = struct.Struct(">IIiII")  # protocol.Credit, packed directly on the hot path
#: Extra credit granted once to a stream when its data starts going straight into a
#: file (a direct run): such data holds no memory here, and the window alone (4 MiB,
#: most of it sitting in the socket buffers) left the sender waiting for CREDIT: a
#: 2 GiB upload in place took 1.1-1.2 s with it, 0.9-1.0 s with 16 MiB.  The
#: stream's window grows by the same amount, so if its reader goes back to reading
#: through memory, what it may hold is bounded by the larger window.
DIRECT_BONUS: Final = 12 * 1024 * 1024


class StreamState(enum.Enum):
    OPEN = "open"
    FINISHING = "finishing"  # finish sent (client) or requested (server)
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


_CLOSED: Final = frozenset({StreamState.FINISHED, StreamState.ABORTED, StreamState.FAILED})


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


EOF: Final = object()  # in the receive queue: end of data; in the send queue: send EOF
FINISH: Final = object()  # in the send queue: STREAM+OK after the data


def stream_error(message: str, code: int = ErrorCode.INVALID_STREAM) -> StreamError:
    return StreamError(message, code=code, domain=ErrorDomain.STREAMS)


class StreamListener(Protocol):
    """What a ``StreamCore`` reports to (the asyncio facade implements it)."""

    def on_rx(self) -> None:
        """Something was queued for the reader (data, a hole, EOF) or the stream ended."""

    def on_tx(self) -> None:
        """A packet left the send queue, credit arrived, or the stream ended."""

    def on_confirm(self, err: StreamError | None) -> None:
        """Client: the server answered our finish or abort (``err``: it failed)."""

    def on_finish_request(self) -> None:
        """Server: the client sent its finish (STREAM+OK), or the stream ended."""


class _NoListener:
    def on_rx(self) -> None:
        pass

    def on_tx(self) -> None:
        pass

    def on_confirm(self, err: StreamError | None) -> None:
        pass

    def on_finish_request(self) -> None:
        pass


_NO_LISTENER: Final = _NoListener()


class StreamCore:
    """One stream end's protocol state (see the module docstring)."""

    __slots__ = (
        "bonus_granted",
        "budget_released",
        "bytes_received",
        "bytes_sent",
        "can_recv",
        "can_send",
        "chunk",
        "confirm",
        "conn",
        "consumed",
        "credit",
        "discard",
        "eof_sent",
        "error",
        "error_pending",
        "failing",
        "finish_requested",
        "grant_step",
        "holes_received",
        "holes_sent",
        "is_client",
        "key",
        "listener",
        "native",
        "over_limit",
        "proc",
        "prog",
        "rx",
        "rx_bytes",
        "rx_eof",
        "rx_offset",
        "scheduled",
        "serial",
        "sparse",
        "state",
        "tx",
        "tx_bytes",
        "vers",
        "window",
    )

    def __init__(
        self,
        conn: ConnectionCore,
        prog: int,
        vers: int,
        proc: int,
        serial: int,
        *,
        sparse: bool = False,
        can_send: bool = True,
        can_recv: bool = True,
    ) -> None:
        self.conn = conn
        self.listener: StreamListener = _NO_LISTENER
        self.key = (prog, vers, proc, serial)
        self.prog = prog
        self.vers = vers
        self.proc = proc
        self.serial = serial
        self.sparse = sparse
        self.can_send = can_send
        self.can_recv = can_recv
        self.is_client = conn.is_client
        native = self.native = conn.flow_control
        self.state = StreamState.OPEN
        self.error: StreamError | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.holes_sent = 0
        self.holes_received = 0
        # receive side
        self.rx: deque[Any] = deque()  # memoryview/bytes chunks, Hole, or EOF
        self.rx_bytes = 0
        self.rx_offset = 0  # bytes of rx[0] already consumed
        self.rx_eof = False
        window = self.window = conn.window if native else conn.legacy_rx_limit
        self.consumed = 0  # consumed since the last CREDIT we granted
        self.budget_released = False  # our queued bytes left the connection's total
        self.bonus_granted = False  # ``grant_direct_bonus`` happened
        # Grant in half-window steps (h2, yamux, SSH do the same): few CREDIT messages,
        # and the sender never runs dry while one is in flight.
        self.grant_step = max(1, min(window // 2, window - STREAM_CHUNK))
        self.over_limit = False
        # send side
        self.tx: deque[Any] = deque()  # chunk (buffer, FileSpan) | Hole | EOF | FINISH | error
        self.tx_bytes = 0
        peer_window = conn.peer_window
        self.credit = peer_window if native else 0
        self.chunk = STREAM_CHUNK
        if native and 0 < peer_window < STREAM_CHUNK:
            self.chunk = peer_window
        self.scheduled = False
        self.eof_sent = False
        # control
        self.confirm: StreamState | None = None  # client: what the server's OK ends in
        self.error_pending: StreamError | None = None  # client: the abort's error
        self.finish_requested = False  # server: the client sent STREAM+OK
        self.discard = False  # server handler returned: drop (and credit) further data
        self.failing = False  # server: an error is queued behind the data

    # ------------------------------------------------------------------ info
    @property
    def closed(self) -> bool:
        return self.state in _CLOSED

    @property
    def at_eof(self) -> bool:
        return self.rx_eof and (not self.rx or self.rx[0] is EOF)

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.state in _CLOSED:
            raise stream_error("stream is closed", ErrorCode.OPERATION_FAILED)

    def check_send(self) -> None:
        self.check()
        if not self.can_send:
            raise stream_error("this stream does not send in this direction")
        if self.eof_sent or self.state is not StreamState.OPEN:
            raise stream_error("stream already finished sending", ErrorCode.OPERATION_INVALID)

    def check_recv(self) -> None:
        if not self.can_recv:
            raise stream_error("this stream does not receive in this direction")

    def send_room(self) -> int:
        """Bytes that may be queued now without waiting (credit counts in native mode)."""
        room = SEND_QUEUE_LIMIT - self.tx_bytes
        if self.native:
            room = min(room, self.credit - self.tx_bytes)
        return room

    # ------------------------------------------------------------------ sending
    def queue(self, item: Any, n: int) -> None:
        """Append a data chunk (``n`` bytes), a ``Hole``, ``EOF`` or ``FINISH``."""
        self.tx.append(item)
        self.tx_bytes += n
        if not self.scheduled and self.sendable():
            self.scheduled = True
            self.conn.mark_ready(self)

    def sendable(self) -> bool:
        tx = self.tx
        if not tx:
            return False
        if self.native:
            head = tx[0]
            if isinstance(head, memoryview | bytes | FileSpan):
                return len(head) <= self.credit
        return True

    def queue_hole(self, length: int) -> None:
        self.check_send()
        if not self.sparse:
            raise stream_error(
                "holes are only allowed on sparse streams", ErrorCode.OPERATION_INVALID
            )
        if length <= 0:
            raise ValueError("hole length must be positive")
        self.queue(Hole(length), 0)

    def queue_eof(self) -> None:
        self.check()
        if not self.eof_sent:
            self.eof_sent = True
            self.queue(EOF, 0)

    def start_finish(self) -> None:
        """Client: queue the finish (STREAM+OK) behind the data."""
        self.check()
        if not self.is_client:
            raise stream_error(
                "a server finishes a stream by returning from its handler",
                ErrorCode.OPERATION_INVALID,
            )
        if self.state is not StreamState.OPEN:
            raise stream_error("finish already in progress", ErrorCode.OPERATION_INVALID)
        self.state = StreamState.FINISHING
        self.confirm = StreamState.FINISHED
        self.queue(FINISH, 0)

    def start_abort(self, reason: str | None) -> StreamError:
        """Drop what is queued and abort: a server sends STREAM+ERROR with ``reason``
        and is aborted at once; a client sends an empty STREAM+ERROR and is aborted when
        the server confirms (``on_confirm``), or when the facade gives up waiting."""
        err = stream_error(reason or "stream aborted", ErrorCode.OPERATION_ABORTED)
        if self.state in _CLOSED:
            return err  # nothing to abort
        self.tx.clear()
        self.tx_bytes = 0
        if not self.is_client:
            self.control(_ERROR, protocol.encode_error(err))
            self.terminate(StreamState.ABORTED, err)
            return err
        self.state = StreamState.FINISHING
        self.confirm = StreamState.ABORTED
        self.error_pending = err
        self.control(_ERROR)
        return err

    def fail_after_data(self, err: StreamError) -> None:
        """Server: end the stream with ``err``, sent after the data already queued (as
        libvirt's daemon orders it); from now on incoming data is dropped."""
        if self.state in _CLOSED or self.failing:
            return
        self.error = err
        self.failing = True
        self.discard = True
        self.queue(_ErrorItem(protocol.encode_error(err)), 0)
        self.listener.on_rx()

    def queue_finish_confirmation(self) -> None:
        """Server: confirm the client's finish (STREAM+OK) behind the data still queued."""
        if self.state not in _CLOSED:
            self.queue(FINISH, 0)

    def next_packet(self, limit: int = STREAM_CHUNK) -> tuple[list[Buffer], int, bool] | None:
        """Called by the connection when it flushes: this stream's next packet, with at
        most ``limit`` payload bytes (smaller while calls want the path kept clear)."""
        self.scheduled = False
        tx = self.tx
        if not tx:
            return None
        head = tx[0]
        out: list[Buffer]
        if isinstance(head, memoryview | bytes | FileSpan):
            n = len(head)
            split = n > limit
            if split:
                n = limit
            if self.native:
                if n > self.credit:
                    return None  # a CREDIT will reschedule us
                self.credit -= n
            if split:
                if isinstance(head, FileSpan):
                    head, tx[0] = head.split(n)
                else:
                    view = memoryview(head)
                    tx[0] = view[n:]
                    head = view[:n]
            else:
                tx.popleft()
            self.tx_bytes -= n
            self.bytes_sent += n
            out = [
                pack_header(self.prog, self.vers, self.proc, _STREAM, self.serial, _CONTINUE, n),
                head,
            ]
        else:
            tx.popleft()
            n = 0
            if isinstance(head, Hole):
                self.holes_sent += 1
                payload = xdr.encode(protocol.StreamHole, protocol.StreamHole(head.length, 0))
                out = encode_message(
                    self.prog, self.vers, self.proc, _HOLE, self.serial, _CONTINUE, payload
                )
                n = len(payload)
            elif isinstance(head, _ErrorItem):
                out = encode_message(
                    self.prog, self.vers, self.proc, _STREAM, self.serial, _ERROR, head.payload
                )
                self.terminate(StreamState.FAILED, None)
            elif head is EOF:
                out = encode_message(
                    self.prog, self.vers, self.proc, _STREAM, self.serial, _CONTINUE
                )
            else:  # FINISH
                out = encode_message(self.prog, self.vers, self.proc, _STREAM, self.serial, _OK)
        more = self.scheduled = self.sendable()
        self.listener.on_tx()
        return out, n, more

    def on_credit(self, amount: int) -> None:
        """The peer granted ``amount`` more bytes (native mode)."""
        self.credit += amount
        if not self.scheduled and self.sendable():
            self.scheduled = True
            self.conn.mark_ready(self)
        self.listener.on_tx()

    def control(self, status: int, payload: bytes = b"") -> None:
        """Queue a STREAM control packet (finish/abort/error) ahead of all data."""
        self.conn.queue_urgent(
            encode_message(self.prog, self.vers, self.proc, _STREAM, self.serial, status, payload)
        )

    # ------------------------------------------------------------------ receiving
    def on_packet(self, msg: Message) -> None:
        """One STREAM / STREAM_HOLE packet of this stream (routed by the connection)."""
        mtype = msg.type
        status = msg.status
        if mtype == _STREAM and status == _CONTINUE:
            payload = msg.payload
            n = len(payload)
            if self.rx_eof:
                self.fail_local("data after end of stream")
                return
            if not self.can_recv:
                self.fail_local("data received in the wrong direction")
                return
            if n == 0:
                self.rx_eof = True
                self.rx.append(EOF)
            elif self.failing:
                return  # the peer is about to get our error
            elif self.discard:
                self.bytes_received += n
                self.rx_bytes += n
                self.conn.rx_buffered += n
                self.consume(n)
                return
            else:
                self.rx.append(payload)
                self.rx_bytes += n
                self.conn.rx_buffered += n
                self.bytes_received += n
                if self.rx_bytes > self.window:
                    if self.native:
                        self.fail_local(
                            f"peer exceeded the flow-control window ({self.window} bytes)"
                        )
                        return
                    if not self.over_limit:
                        self.over_limit = True
                        self.conn.stream_over_limit(self, True)
            self.listener.on_rx()
        elif mtype == _HOLE:
            if not self.sparse:
                self.fail_local("Unexpected stream hole")
                return
            try:
                hole = xdr.decode(protocol.StreamHole, msg.payload)
            except XdrError as exc:
                self.fail_local(f"malformed stream hole: {exc}")
                return
            if hole.length <= 0 or hole.flags != 0:
                self.fail_local(f"invalid stream hole (length {hole.length}, flags {hole.flags})")
                return
            self.rx.append(Hole(hole.length))
            self.holes_received += 1
            self.listener.on_rx()
        elif status == _OK:
            self._on_ok()
        else:  # ERROR
            self._on_error(msg.payload)

    def _on_ok(self) -> None:
        if self.is_client:
            confirm = self.confirm
            if confirm is None:
                raise ProtocolError(f"stream confirmation for serial {self.serial} answers nothing")
            self.confirm = None
            if confirm is StreamState.ABORTED:
                self.terminate(StreamState.ABORTED, self.error_pending)
            else:
                self.terminate(StreamState.FINISHED, None)
            self.listener.on_confirm(None)
            return
        # Server: the client finished (upload end marker, or done reading a download).
        if self.finish_requested:
            raise ProtocolError(f"second finish request on stream serial {self.serial}")
        self.finish_requested = True
        if not self.rx_eof:
            self.rx_eof = True
            self.rx.append(EOF)
        self.listener.on_rx()
        self.listener.on_finish_request()

    def _on_error(self, payload: Buffer) -> None:
        if self.is_client:
            try:
                err = protocol.decode_error(payload, StreamError) if len(payload) else None
            except XdrError as exc:
                raise ProtocolError(f"malformed stream error: {exc}") from None
            if err is None:
                err = stream_error("stream aborted by the server")
            assert isinstance(err, StreamError)
            self.confirm = None
            self.terminate(StreamState.FAILED, err)
            self.listener.on_confirm(err)
            return
        # Server: the client aborted.  Confirm with STREAM+OK, as libvirt does.
        self.control(_OK)
        self.terminate(
            StreamState.ABORTED,
            stream_error("stream aborted by the client", ErrorCode.OPERATION_ABORTED),
        )

    def fail_local(self, reason: str) -> None:
        """This end detected a stream-level error: tell the peer and fail the stream."""
        err = stream_error(reason)
        log.warning("stream %s from %s: %s", self.serial, self.conn.peer, reason)
        if self.is_client:
            # Clients abort with an empty STREAM+ERROR; the confirmation is ignored.
            self.control(_ERROR)
        else:
            self.control(_ERROR, protocol.encode_error(err))
        self.terminate(StreamState.FAILED, err)

    # ------------------------------------------------------------------ reading
    def take(self, maximum: int | None) -> Any:
        """Pop the next item (data view, Hole or EOF), at most ``maximum`` data bytes.
        The queue must not be empty."""
        rx = self.rx
        head = rx[0]
        if head is EOF:
            return EOF
        if isinstance(head, Hole):
            rx.popleft()
            return head
        off = self.rx_offset
        avail = len(head) - off
        if maximum is None or maximum >= avail:
            rx.popleft()
            self.rx_offset = 0
            piece = head if off == 0 else memoryview(head)[off:]
            self.consume(avail)
            return piece if isinstance(piece, memoryview) else memoryview(piece)
        self.rx_offset = off + maximum
        self.consume(maximum)
        return memoryview(head)[off : off + maximum]

    def take_hole(self, hole: Hole, maximum: int) -> int:
        """Read at most ``maximum`` bytes of ``hole`` (just taken) as zeros: the rest of
        it goes back to the front of the queue.  Returns the byte count."""
        n = min(hole.length, maximum)
        if hole.length > n:
            self.rx.appendleft(Hole(hole.length - n))
        return n

    # ------------------------------------------------------------------ direct runs
    def can_take_direct(self) -> bool:
        """Data may now be received straight into a file (``virnet._direct``): the
        stream is open for reading and delivers its data to a reader."""
        return (
            self.can_recv
            and not self.rx_eof
            and not self.discard
            and not self.failing
            and self.state is StreamState.OPEN
        )

    def queued_data(self) -> int:
        """Bytes of data queued for the reader, or -1 if anything else (a hole, EOF)
        is queued too."""
        total = -self.rx_offset
        for item in self.rx:
            if not isinstance(item, memoryview | bytes):
                return -1
            total += len(item)
        return total

    def take_queued_data(self) -> list[Buffer]:
        """Everything queued, which must all be data (``queued_data() >= 0``), taken
        as if read."""
        rx = self.rx
        out: list[Buffer] = []
        while rx:
            out.append(self.take(None))
        return out

    def received_directly(self, n: int) -> None:
        """``n`` payload bytes of this stream were written straight to their target,
        never queued: count them, and return them to the peer as CREDIT as if read."""
        self.bytes_received += n
        if self.native and self.state not in _CLOSED:
            self._return_credit(n)

    def grant_direct_bonus(self) -> None:
        """A direct run starts: once per stream, grant ``DIRECT_BONUS`` more credit."""
        if self.native and not self.bonus_granted and self.state not in _CLOSED:
            self.bonus_granted = True
            self.window += DIRECT_BONUS
            self.consumed += DIRECT_BONUS
            self.grant()

    def discard_unread(self) -> None:
        """Server, the handler returned: drop (and credit) what it did not read, and
        everything that still comes."""
        self.discard = True
        rx = self.rx
        while rx and rx[0] is not EOF:
            self.take(None)

    def consume(self, n: int) -> None:
        self.rx_bytes -= n
        conn = self.conn
        if not self.budget_released:
            conn.rx_buffered -= n
        if self.over_limit and self.rx_bytes <= self.window // 2:
            self.over_limit = False
            conn.stream_over_limit(self, False)
        if self.native and self.state not in _CLOSED:
            self._return_credit(n)
        if conn.deferred_grants and conn.rx_buffered <= conn.rx_budget:
            conn.release_deferred_grants()

    def _return_credit(self, n: int) -> None:
        """``n`` bytes were consumed (native mode, open stream): CREDIT them back once a
        grant step's worth has gathered."""
        self.consumed += n
        if self.consumed >= self.grant_step:
            self.grant()

    def grant(self) -> None:
        """Return what the reader consumed to the peer as CREDIT, unless the connection
        as a whole is over its receive budget (then later, ``release_deferred_grants``)."""
        if self.state in _CLOSED or not self.consumed:
            return
        conn = self.conn
        if conn.rx_buffered > conn.rx_budget:
            # The connection as a whole holds too much unread data: grant nothing more
            # until some reader catches up (connection-wide memory budget).
            if self not in conn.deferred_grants:
                conn.deferred_grants.append(self)
            return
        amount = self.consumed
        self.consumed = 0
        payload = _CREDIT.pack(self.prog, self.vers, self.proc, self.serial, amount)
        conn.queue_urgent(
            encode_message(
                CONTROL_PROGRAM, CONTROL_VERSION, CONTROL_CREDIT, _MESSAGE, 0, _OK, payload
            )
        )

    # ------------------------------------------------------------------ ending
    def terminate(self, state: StreamState, err: StreamError | None) -> None:
        """Enter the closed ``state`` (no-op if closed already) and unregister."""
        if self.state in _CLOSED:
            return
        self.state = state
        if err is not None and self.error is None:
            self.error = err
        self.tx.clear()
        self.tx_bytes = 0
        conn = self.conn
        if not self.budget_released:
            # What is still queued (it may yet be read) no longer counts against the
            # connection: this stream will never be granted credit again.
            self.budget_released = True
            conn.rx_buffered -= self.rx_bytes
        if self.over_limit:
            self.over_limit = False
            conn.stream_over_limit(self, False)
        conn.unregister_stream(self)
        if conn.deferred_grants and conn.rx_buffered <= conn.rx_budget:
            # Its unread data no longer counts: the others may be back within budget.
            conn.release_deferred_grants()
        listener = self.listener
        listener.on_rx()
        listener.on_tx()
        listener.on_finish_request()

    def connection_lost(self, exc: BaseException) -> None:
        # The connection's own reason may already say so ("connection lost: [Errno
        # 104] ..."): say it once.
        reason = str(exc)
        if not reason.startswith("connection lost"):
            reason = f"connection lost: {reason}"
        err = stream_error(reason, ErrorCode.OPERATION_FAILED)
        err.__cause__ = exc
        self.confirm = None
        self.terminate(StreamState.FAILED, err)
        self.listener.on_confirm(err)
