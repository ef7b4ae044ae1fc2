"""Sans-IO state of one RPC connection, shared by the client and the server role.

``ConnectionCore`` turns received bytes into calls to its ``on_*`` hooks and queues
outgoing packets as buffer lists; it never touches an event loop, a socket or a clock.
The asyncio glue (``_protocol.py``) subclasses it, implements the hooks with futures and
tasks, moves bytes between the transport and the core, and drives the keepalive timer.

What the core owns:

* the frame decoder, and validation of every packet's type/status against the role;
* serial allocation and the set of calls awaiting a reply (replies may come in any order),
  kept by the wire core's ``Calls``, which also checks and routes every CALL and REPLY
  (the per-call hot path) and hands the other packets to ``receive_other``;
* the stream routing table: streams are opened and unregistered only here
  (``open_stream`` / ``unregister_stream``); each stream's own state machine, queues and
  credit are a ``_streams.StreamCore``;
* stream flow control shared by the connection's streams: the receive budget
  (``rx_buffered`` against ``rx_budget``, CREDIT deferred past it) and the decision to
  stop reading for a legacy stream over its limit (reported to ``on_rx_pause``);
* keepalive state (PING answered with PONG, idle ticks counted, timeout decided);
* HELLO negotiation: the offer, accepting an offer (server), applying the reply
  (client), and the resulting mode, features and peer window;
* the outgoing queue: control packets, calls and replies first, stream data after.

A protocol violation raises ``ProtocolError`` from ``receive``; the glue then closes the
connection with that reason.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from typing import Any, Protocol

from . import protocol, xdr
from ._impl import Calls, FrameDecoder, Message, encode_message, queue_message
from ._streams import StreamCore
from .constants import (
    CONTROL_CREDIT,
    CONTROL_PROGRAM,
    FEATURE_FLOW_CONTROL,
    FEATURE_KEEPALIVE,
    KEEPALIVE_PING,
    KEEPALIVE_PONG,
    KEEPALIVE_PROGRAM,
    KEEPALIVE_VERSION,
    STREAM_CHUNK,
    MessageStatus,
    MessageType,
)
from .errors import ErrorCode, ErrorDomain, ProtocolError, RPCError, XdrError
from .limits import DEFAULT_LIMITS, Limits

Buffer = bytes | bytearray | memoryview
_CREDIT = struct.Struct(">IIiII")  # protocol.Credit
StreamKey = tuple[int, int, int, int]

_REPLY = int(MessageType.REPLY)
_MESSAGE = int(MessageType.MESSAGE)
_STREAM = int(MessageType.STREAM)
_HOLE = int(MessageType.STREAM_HOLE)
_CALL_FDS = int(MessageType.CALL_WITH_FDS)
_REPLY_FDS = int(MessageType.REPLY_WITH_FDS)
_OK = int(MessageStatus.OK)
_ERROR = int(MessageStatus.ERROR)
_CONTINUE = int(MessageStatus.CONTINUE)

_PING = encode_message(KEEPALIVE_PROGRAM, KEEPALIVE_VERSION, KEEPALIVE_PING, _MESSAGE, 0, _OK)
_PONG = encode_message(KEEPALIVE_PROGRAM, KEEPALIVE_VERSION, KEEPALIVE_PONG, _MESSAGE, 0, _OK)
#: The features this implementation offers in HELLO and accepts from a peer.
FEATURES = FEATURE_FLOW_CONTROL | FEATURE_KEEPALIVE


class Mode(enum.Enum):
    """How far feature negotiation got."""

    UNKNOWN = "unknown"  # nothing negotiated yet: libvirt's rules apply
    LEGACY = "legacy"  # the peer refused HELLO (a libvirt peer): libvirt's rules
    NATIVE = "native"  # both sides are virnet: negotiated features apply


class StreamEndpoint(Protocol):
    """What the core routes STREAM, STREAM_HOLE and CREDIT packets to."""

    def on_packet(self, msg: Message) -> None: ...

    def next_packet(self, limit: int) -> tuple[list[Buffer], int, bool] | None: ...

    def on_credit(self, amount: int) -> None: ...

    def connection_lost(self, exc: BaseException) -> None: ...


class KeepaliveAction(enum.Enum):
    NONE = 0
    PING = 1
    TIMEOUT = 2


class Keepalive:
    """libvirt's keepalive rules, counted in ticks instead of read from a clock.

    The glue calls ``tick()`` once per interval.  Any received packet resets the count.
    A tick after an idle interval sends a PING; once ``count`` PINGs went unanswered the
    next idle tick is a timeout, so a dead peer is detected after about
    ``interval * (count + 1)``.
    """

    __slots__ = ("count", "enabled", "interval", "missed", "seen")

    def __init__(self, interval: float = 5.0, count: int = 5) -> None:
        self.interval = interval
        self.count = count
        self.enabled = False
        self.missed = 0
        self.seen = False

    def tick(self) -> KeepaliveAction:
        if self.seen:
            self.seen = False
            self.missed = 0
            return KeepaliveAction.NONE
        if self.missed >= self.count:
            return KeepaliveAction.TIMEOUT
        self.missed += 1
        return KeepaliveAction.PING


class ConnectionCore:
    """One connection's protocol state; subclass and implement the ``on_*`` hooks."""

    def __init__(
        self,
        *,
        is_client: bool,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        #: Serials, the calls awaiting a reply, and the routing of received packets.
        self.calls = Calls(is_client)
        self.limits = limits
        self.decoder = FrameDecoder(limits.max_message)
        self.peer = "?"  # a label for log messages (the glue sets the peer's address)
        self.mode = Mode.UNKNOWN
        self.features = 0
        self.peer_window = 0
        self._hello_offered = 0  # client: the features our HELLO asked for
        self.keepalive = Keepalive(limits.keepalive_interval, limits.keepalive_count)
        #: Our per-stream receive window (native) or receive limit (legacy), in bytes.
        self.window = limits.window
        self.legacy_rx_limit = limits.window
        #: Connection-wide budget of received, unread stream data (native mode): past
        #: it, no stream is granted more credit until readers catch up.
        self.rx_budget = limits.rx_budget
        self.rx_buffered = 0
        self.deferred_grants: list[StreamCore] = []
        # Legacy streams over their receive limit: while any is, reading pauses.
        self._rx_over_limit: set[StreamCore] = set()
        #: The routing table, written only by ``open_stream``/``unregister_stream``.
        self.streams: dict[StreamKey, StreamEndpoint] = {}
        # Control packets, calls, replies and events: always sent before stream data.
        self._urgent: list[Buffer] = []
        # Stream endpoints with data ready, served round-robin one packet at a time.
        self._ready: deque[Any] = deque()
        self.bytes_received = 0

    @property
    def is_client(self) -> bool:
        return self.calls.is_client

    # ------------------------------------------------------------------ hooks
    def on_call(self, msg: Message) -> None:
        """A CALL arrived (server role)."""
        raise ProtocolError("unexpected CALL")

    def on_reply(self, serial: int, status: int, payload: Buffer) -> None:
        """The reply to one of our calls arrived (client role): its serial, program,
        version and procedure were checked against the call (``Calls.dispatch``)."""

    def on_event(self, msg: Message) -> None:
        """A MESSAGE packet (async event) arrived that the core does not handle itself."""

    def on_credit(self, payload: Buffer) -> None:
        """A VIRNET_CONTROL CREDIT message arrived (native mode): route it to its stream.
        Credit for a stream that has ended is dropped, like its late data."""
        # Fixed 20-byte layout (protocol.Credit), decoded directly: it is on the hot path.
        if len(payload) != 20:
            raise ProtocolError(f"malformed CREDIT: {len(payload)} bytes, expected 20")
        prog, vers, proc, serial, amount = _CREDIT.unpack(payload)
        endpoint = self.streams.get((prog, vers, proc, serial))
        if endpoint is not None:
            endpoint.on_credit(amount)

    def on_unrouted_stream(self, msg: Message) -> None:
        """A stream packet matched no open stream: dropped silently, as libvirt does (it
        is usually a late packet of a stream that just ended)."""

    def on_pong(self) -> None:
        """A keepalive PONG arrived (``virnet ping`` measures round trips with it)."""

    def on_output(self) -> None:
        """Packets were queued; the glue should schedule a flush."""

    def on_rx_pause(self, paused: bool) -> None:
        """Stop reading the socket (``paused``: a legacy stream's reader fell behind its
        receive limit), or resume (every such reader caught up)."""

    def on_stream_closed(self, stream: StreamCore) -> None:
        """``stream`` ended and left the routing table (roles keep their own counts)."""

    # ------------------------------------------------------------------ bytes in
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        msgs = self.decoder.buffer_updated(nbytes)
        if msgs:
            self.keepalive.seen = True
            self.calls.dispatch(self, msgs)

    def feed(self, data: Buffer) -> None:
        """Decode bytes already in memory (tests, non-buffered transports)."""
        self.bytes_received += len(data)
        msgs = self.decoder.feed(data)
        if msgs:
            self.keepalive.seen = True
            self.calls.dispatch(self, msgs)

    def receive(self, msg: Message) -> None:
        """Validate one packet and route it."""
        self.calls.dispatch(self, [msg])

    def receive_other(self, msg: Message) -> None:
        """Validate and route a packet that is neither a CALL nor a REPLY (those, the
        per-call hot path, are checked and routed by ``Calls.dispatch`` in the wire
        core, which hands everything else here)."""
        mtype = msg.type
        status = msg.status
        if mtype in (_STREAM, _HOLE):
            if mtype == _HOLE and status != _CONTINUE:
                raise ProtocolError(f"STREAM_HOLE with status {status}")
            if status not in (_OK, _ERROR, _CONTINUE):
                raise ProtocolError(f"STREAM packet with unknown status {status}")
            endpoint = self.streams.get((msg.prog, msg.vers, msg.proc, msg.serial))
            if endpoint is None:
                self.on_unrouted_stream(msg)
            else:
                endpoint.on_packet(msg)
        elif mtype == _MESSAGE:
            if status != _OK:
                raise ProtocolError(f"MESSAGE with invalid status {status}")
            if msg.prog == KEEPALIVE_PROGRAM:
                self._keepalive_message(msg)
            elif msg.prog == CONTROL_PROGRAM and msg.proc == CONTROL_CREDIT:
                if self.mode is not Mode.NATIVE:
                    raise ProtocolError("CREDIT before flow control was negotiated")
                self.on_credit(msg.payload)
            else:
                self.on_event(msg)
        elif mtype in (_CALL_FDS, _REPLY_FDS):
            raise ProtocolError("file descriptor passing is not supported on this transport")
        else:
            raise ProtocolError(f"unknown message type {mtype}")

    def _keepalive_message(self, msg: Message) -> None:
        if msg.vers != KEEPALIVE_VERSION:
            raise ProtocolError(f"keepalive version {msg.vers} is not supported")
        if msg.proc == KEEPALIVE_PING:
            # Always answered, negotiated or not, as libvirt does.
            self.queue_urgent(_PONG)
        elif msg.proc == KEEPALIVE_PONG:
            self.on_pong()
        else:
            raise ProtocolError(f"unknown keepalive procedure {msg.proc}")

    # ------------------------------------------------------------------ bytes out
    def queue_urgent(self, buffers: list[Buffer], *, notify: bool = True) -> None:
        """Queue a control packet, call, reply or event.  ``notify=False``: the caller
        takes the output itself right after, so ``on_output`` is not called."""
        # Notify on every empty -> non-empty change, even with stream data pending: the
        # glue may be holding stream data back (transport full) but must still write
        # urgent packets now, so they queue behind as little data as possible.
        was_empty = not self._urgent
        self._urgent.extend(buffers)
        if was_empty and notify:
            self.on_output()

    def mark_ready(self, endpoint: Any) -> None:
        """``endpoint`` has stream packets to send; it will be asked for one at a time."""
        was_idle = not self._urgent and not self._ready
        self._ready.append(endpoint)
        if was_idle:
            self.on_output()

    def urgent_backlog(self) -> int:
        """Buffers of control packets, calls, replies and events queued, not yet taken."""
        return len(self._urgent)

    def has_output(self) -> bool:
        return bool(self._urgent or self._ready)

    def take_urgent_alone(self) -> list[Buffer] | None:
        """The urgent packets queued, taken, if no stream has data ready (then they are
        all there is to write: ``take_output`` without its stream round); else None and
        nothing is taken."""
        if self._ready:
            return None
        out = self._urgent
        self._urgent = []
        return out

    def take_output(self, budget: int, packet_limit: int = STREAM_CHUNK) -> list[Buffer]:
        """Buffers to write now: every urgent packet, then stream packets round-robin
        (one packet per ready stream per turn) until about ``budget`` bytes are taken,
        each packet carrying at most ``packet_limit`` payload bytes.

        An endpoint's ``next_packet(limit)`` returns ``(buffers, nbytes, more)``, or
        ``None`` when it has nothing to send after all (for example no credit left).
        """
        out = self._urgent
        self._urgent = []
        ready = self._ready
        taken = 0
        while ready and taken < budget:
            endpoint = ready.popleft()
            item = endpoint.next_packet(packet_limit)
            if item is None:
                continue
            buffers, nbytes, more = item
            out.extend(buffers)
            taken += nbytes
            if more:
                ready.append(endpoint)
        return out

    def ping(self) -> None:
        self.queue_urgent(_PING)

    # ------------------------------------------------------------------ streams
    @property
    def flow_control(self) -> bool:
        """Streams use credit-based flow control (native mode, negotiated)."""
        return self.mode is Mode.NATIVE and bool(self.features & FEATURE_FLOW_CONTROL)

    def open_stream(
        self,
        prog: int,
        vers: int,
        proc: int,
        serial: int,
        *,
        sparse: bool = False,
        can_send: bool = True,
        can_recv: bool = True,
    ) -> StreamCore:
        """Create the stream named by the call ``(prog, vers, proc, serial)`` and route
        its packets to it from now on (a client opens it before the call goes out, so
        data sent ahead of the reply is kept)."""
        stream = StreamCore(
            self, prog, vers, proc, serial, sparse=sparse, can_send=can_send, can_recv=can_recv
        )
        self.streams[stream.key] = stream
        return stream

    def unregister_stream(self, stream: StreamCore) -> None:
        """``stream`` ended: late packets for it are dropped from now on."""
        key = stream.key
        if self.streams.get(key) is stream:
            del self.streams[key]
        self._rx_over_limit.discard(stream)
        if not self.streams:
            # The packet buffers several streams kept busy at once are not needed now.
            self.decoder.trim_pool()
        self.on_stream_closed(stream)

    def stream_over_limit(self, stream: StreamCore, over: bool) -> None:
        """A legacy stream's receive queue passed (or fell back under) its limit: the
        connection reads only while no stream is over."""
        over_limit = self._rx_over_limit
        was = bool(over_limit)
        if over:
            over_limit.add(stream)
        else:
            over_limit.discard(stream)
        if bool(over_limit) != was:
            self.on_rx_pause(not was)

    def release_deferred_grants(self) -> None:
        """The connection is back within its receive budget: send the CREDIT held back."""
        waiting = self.deferred_grants
        self.deferred_grants = []
        for stream in waiting:
            stream.grant()

    # ------------------------------------------------------------------ HELLO
    def hello_offer(self, features: int = FEATURES) -> bytes:
        """Client: the HELLO call's payload, offering ``features`` and our window."""
        self._hello_offered = features
        return xdr.encode(protocol.Hello, protocol.Hello(features, self.window))

    def accept_hello(self, payload: Buffer) -> bytes:
        """Server: accept a HELLO offer; the connection is native from now on, with the
        features both sides know.  Returns the reply payload.  A malformed offer raises
        ``RPCError`` (the call's error reply) and changes nothing."""
        try:
            hello = xdr.decode(protocol.Hello, payload)
        except XdrError as exc:
            raise RPCError(
                f"invalid HELLO: {exc}", code=ErrorCode.RPC, domain=ErrorDomain.RPC
            ) from None
        self.features = hello.features & FEATURES
        self.peer_window = hello.window
        self.mode = Mode.NATIVE
        return xdr.encode(protocol.Hello, protocol.Hello(self.features, self.window))

    def apply_hello_reply(self, payload: Buffer) -> None:
        """Client: the peer accepted HELLO with ``payload``; the connection is native."""
        try:
            reply = xdr.decode(protocol.Hello, payload)
        except XdrError as exc:
            raise ProtocolError(f"bad HELLO reply: {exc}") from None
        self.mode = Mode.NATIVE
        self.features = reply.features & self._hello_offered
        self.peer_window = reply.window

    def hello_refused(self) -> None:
        """Client: the peer answered HELLO with an error (libvirt): legacy mode."""
        self.mode = Mode.LEGACY

    @property
    def keepalive_negotiated(self) -> bool:
        return self.mode is Mode.NATIVE and bool(self.features & FEATURE_KEEPALIVE)

    # ------------------------------------------------------------------ calls
    def allocate_serial(self) -> int:
        return self.calls.allocate_serial()

    def send_call(
        self,
        prog: int,
        vers: int,
        proc: int,
        payload: Buffer,
        serial: int | None = None,
        *,
        notify: bool = True,
    ) -> int:
        """Queue a CALL; returns its serial.  The reply comes to ``on_reply``.
        ``notify`` as for ``queue_urgent``."""
        urgent = self._urgent
        was_empty = not urgent
        serial = self.calls.add_call(urgent, prog, vers, proc, payload, serial)
        if was_empty and notify:
            self.on_output()
        return serial

    def send_reply(
        self,
        prog: int,
        vers: int,
        proc: int,
        serial: int,
        status: int,
        payload: Buffer,
        *,
        notify: bool = True,
    ) -> int:
        """Queue a REPLY; ``notify`` as for ``queue_urgent``.  Returns how many urgent
        buffers are queued now (a caller writing them itself can tell a full batch)."""
        urgent = self._urgent
        was_empty = not urgent
        queue_message(urgent, prog, vers, proc, _REPLY, serial, status, payload)
        if was_empty and notify:
            self.on_output()
        return len(urgent)

    def send_event(self, prog: int, vers: int, proc: int, payload: Buffer) -> None:
        self.queue_urgent(encode_message(prog, vers, proc, _MESSAGE, 0, _OK, payload))
