"""The client: ``await virnet.connect(uri)`` and typed calls on one multiplexed connection."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from . import protocol, xdr
from ._core import Buffer, Mode
from ._impl import Message
from ._protocol import RPCProtocol
from ._uri import Address, default_uri, parse_uri
from .constants import CONTROL_HELLO, CONTROL_PROGRAM, CONTROL_VERSION, MessageStatus
from .errors import CallTimeoutError, ConnectionClosedError, ProtocolError, RPCError, XdrError
from .limits import DEFAULT_LIMITS, Limits
from .program import A, Event, Procedure, R, StreamDirection
from .stream import Stream, StreamState

log = logging.getLogger("virnet")

_ERROR = int(MessageStatus.ERROR)


EventCallback = Callable[[Any], None]


class ClientProtocol(RPCProtocol):
    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(is_client=True, limits=limits)
        self.waiters: dict[int, asyncio.Future[tuple[int, Buffer]]] = {}
        self.subscribers: dict[tuple[int, int, int], list[Callable[[Message], None]]] = {}
        self.pong_waiters: list[asyncio.Future[None]] = []

    def on_pong(self) -> None:
        waiters = self.pong_waiters
        self.pong_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def on_reply(self, serial: int, status: int, payload: Buffer) -> None:
        self.yield_read = True
        fut = self.waiters.pop(serial, None)
        if fut is not None and not fut.done():
            fut.set_result((status, payload))
        # else: the caller gave up (deadline); the late reply is dropped.

    def on_event(self, msg: Message) -> None:
        self.yield_read = True
        callbacks = self.subscribers.get((msg.prog, msg.vers, msg.proc))
        if not callbacks:
            log.debug("dropping unsubscribed event %#x/%d/%d", msg.prog, msg.vers, msg.proc)
            return
        for cb in list(callbacks):
            try:
                cb(msg)
            except Exception:
                log.exception("event callback %r failed", cb)

    def on_closed(self, exc: BaseException) -> None:
        waiters = list(self.waiters.values()) + self.pong_waiters
        self.waiters = {}
        self.pong_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(exc)


class Client:
    """A connection to a virnet or libvirt daemon.

    Many calls may run at once; replies are matched by serial in any order.  Use as an
    async context manager, or call ``close()``.
    """

    def __init__(self, proto: ClientProtocol, address: Address) -> None:
        self._proto = proto
        self.address = address

    # ------------------------------------------------------------------ properties
    @property
    def mode(self) -> Mode:
        """``Mode.NATIVE`` against a virnet peer, ``Mode.LEGACY`` against libvirt."""
        return self._proto.mode

    @property
    def features(self) -> int:
        return self._proto.features

    @property
    def is_closed(self) -> bool:
        return self._proto.transport is None

    @property
    def protocol(self) -> ClientProtocol:
        return self._proto

    # ------------------------------------------------------------------ calls
    async def call(
        self, procedure: Procedure[A, R], args: A | None = None, *, timeout: float | None = None
    ) -> R:
        """Call ``procedure`` with ``args``; returns the decoded reply.

        Raises ``RPCError`` (with libvirt's error fields) for an error reply,
        ``CallTimeoutError`` when ``timeout`` seconds pass first, and
        ``ConnectionClosedError`` when the connection ends.
        """
        # ``args`` is None for a void procedure (no ``cast()``: it is a call at run time).
        # ``args.encode`` and ``ret.decode`` are ``encode_args`` and ``decode_ret``
        # without their frames (once per call).
        payload = procedure.args.encode(args)  # type: ignore[arg-type]
        prog = procedure.program
        proto = self._proto
        if timeout is not None or proto.transport is None:
            data = await self.call_raw(
                prog.number, prog.version, procedure.number, payload, timeout
            )
        else:
            # The common case inline (no deadline): one coroutine frame less per call.
            fut: asyncio.Future[tuple[int, Buffer]] = proto.loop.create_future()
            waiters = proto.waiters
            proto.note_interactive()
            if waiters:
                serial = proto.send_call(prog.number, prog.version, procedure.number, payload)
                proto.flush_if_batched()
            else:  # a lone call: nothing to batch it with
                serial = proto.send_call_now(prog.number, prog.version, procedure.number, payload)
            waiters[serial] = fut
            try:
                status, data = await fut
            except asyncio.CancelledError:
                proto.waiters.pop(serial, None)
                raise
            if status == _ERROR:
                raise protocol.decode_error(data)
        try:
            return procedure.ret.decode(data)
        except XdrError as exc:
            raise ProtocolError(f"bad reply to {procedure!r}: {exc}") from None

    async def call_raw(
        self,
        prog: int,
        vers: int,
        proc: int,
        payload: Buffer = b"",
        timeout: float | None = None,
        *,
        serial: int | None = None,
    ) -> Buffer:
        """Send a CALL with an already encoded payload; returns the raw reply payload."""
        return await self._call_raw(prog, vers, proc, payload, timeout, serial, True)

    async def _call_raw(
        self,
        prog: int,
        vers: int,
        proc: int,
        payload: Buffer,
        timeout: float | None,
        serial: int | None,
        interactive: bool,
    ) -> Buffer:
        proto = self._proto
        if proto.transport is None:
            raise proto.close_exc or ConnectionClosedError("connection closed")
        fut: asyncio.Future[tuple[int, Buffer]] = proto.loop.create_future()
        serial = proto.send_call(prog, vers, proc, payload, serial)
        proto.waiters[serial] = fut
        if interactive:
            proto.note_interactive()
        try:
            if timeout is None:
                status, data = await fut
            else:
                async with asyncio.timeout(timeout):
                    status, data = await fut
        except TimeoutError:
            proto.waiters.pop(serial, None)
            raise CallTimeoutError(
                f"no reply to procedure {proc} within {timeout} s"
            ) from None
        except asyncio.CancelledError:
            proto.waiters.pop(serial, None)
            raise
        if status == _ERROR:
            raise protocol.decode_error(data)
        return data

    async def open_stream(
        self,
        procedure: Procedure[Any, Any],
        args: Any = None,
        *,
        sparse: bool = False,
        timeout: float | None = None,
    ) -> Stream:
        """Call a stream-carrying ``procedure``; returns its ``Stream`` (the decoded reply
        is ``stream.reply``).  The stream is registered before the call goes out, so data
        a server sends ahead of its reply is kept.  A failed call leaves no stream."""
        if procedure.stream is None:
            raise TypeError(f"{procedure!r} does not carry a stream")
        proto = self._proto
        prog = procedure.program
        payload = procedure.encode_args(args)
        serial = proto.allocate_serial()
        direction = procedure.stream
        core = proto.open_stream(
            prog.number,
            prog.version,
            procedure.number,
            serial,
            sparse=sparse,
            can_send=direction is not StreamDirection.DOWNLOAD,
            can_recv=direction is not StreamDirection.UPLOAD,
        )
        stream = Stream(proto, core)
        try:
            # Not interactive: bulk data follows, the connection need not run lean.
            data = await self._call_raw(
                prog.number, prog.version, procedure.number, payload, timeout, serial, False
            )
            stream.reply = procedure.decode_ret(data)
            if not proto.waiters:  # nothing else waits for a reply: bulk from here
                proto.end_lean()
        except BaseException as exc:
            core.terminate(StreamState.FAILED, None)  # unregisters it
            if isinstance(exc, XdrError):
                raise ProtocolError(f"bad reply to {procedure!r}: {exc}") from None
            raise
        return stream

    # ------------------------------------------------------------------ events
    def subscribe(self, event: Event, callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``callback(body)`` for every ``event`` MESSAGE; returns an unsubscriber."""
        key = (event.program.number, event.program.version, event.number)

        def deliver(msg: Message) -> None:
            try:
                body = xdr.decode(event.body, msg.payload)
            except XdrError as exc:
                log.warning("dropping malformed %r: %s", event, exc)
                return
            callback(body)

        self._proto.subscribers.setdefault(key, []).append(deliver)

        def unsubscribe() -> None:
            callbacks = self._proto.subscribers.get(key, [])
            if deliver in callbacks:
                callbacks.remove(deliver)

        return unsubscribe

    # ------------------------------------------------------------------ keepalive
    async def ping(self, timeout: float | None = 10.0) -> float:
        """Send a keepalive PING and wait for a PONG; returns the round trip in seconds.

        Every libvirt and virnet peer answers PING, negotiated or not.
        """
        proto = self._proto
        if proto.transport is None:
            raise proto.close_exc or ConnectionClosedError("connection closed")
        fut: asyncio.Future[None] = proto.loop.create_future()
        proto.pong_waiters.append(fut)
        start = time.perf_counter()  # loop.time() may tick in whole milliseconds
        proto.ping()
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise CallTimeoutError(f"no PONG within {timeout} s") from None
        return time.perf_counter() - start

    def enable_keepalive(self) -> None:
        """Start sending keepalive PINGs (call only once the peer is known to support
        them: negotiated in HELLO, or CONNECT_SUPPORTS_FEATURE(10) against libvirtd)."""
        self._proto.start_keepalive()

    # ------------------------------------------------------------------ lifetime
    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection: queued packets are flushed for up to ``timeout`` seconds
        (a peer that stopped reading cannot hold us longer), then the socket is dropped.
        Streams still open fail with "connection lost"."""
        proto = self._proto
        if proto._write_paused:
            timeout = min(timeout, 1.0)  # the peer is not reading: do not wait long
        if proto.transport is not None:
            proto.close_gracefully()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(proto.closed)
        except TimeoutError:
            if proto.transport is not None:
                proto.transport.abort()
            await proto.closed

    async def wait_closed(self) -> None:
        await self._proto.closed

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else self.mode.value
        return f"<virnet.Client {self.address} {state}>"


async def open_transport(
    address: Address, factory: Callable[[], RPCProtocol]
) -> asyncio.BaseProtocol:
    loop = asyncio.get_running_loop()
    if address.scheme == "unix":
        _, proto = await loop.create_unix_connection(factory, address.path)
    else:
        _, proto = await loop.create_connection(factory, address.host, address.port)
    return proto


async def connect(
    uri: str | None = None,
    *,
    hello: bool = True,
    limits: Limits = DEFAULT_LIMITS,
    timeout: float | None = 30.0,
    **changes: float,
) -> Client:
    """Connect to ``uri`` (``unix:///path`` or ``tcp://host:port``; default: the local
    daemon's socket) and, unless ``hello=False``, negotiate virnet's extensions.
    The connection keeps to ``limits`` (``virnet.Limits``) with ``changes`` applied
    (``connect(uri, window=1 << 20)``); ``timeout`` bounds the connection and HELLO.

    A libvirt peer refuses HELLO with an error reply; the connection then stays in
    legacy mode, which follows libvirt's rules exactly.
    """
    address = parse_uri(uri or default_uri())

    if changes:
        limits = limits.replace(**changes)

    def factory() -> ClientProtocol:
        return ClientProtocol(limits=limits)

    try:
        async with asyncio.timeout(timeout):
            proto = await open_transport(address, factory)
    except TimeoutError:
        raise ConnectionClosedError(f"cannot connect to {address}: timed out") from None
    except OSError as exc:
        raise ConnectionClosedError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    assert isinstance(proto, ClientProtocol)
    client = Client(proto, address)
    if hello:
        try:
            await _negotiate(client, timeout)
        except BaseException:
            await client.close()
            raise
    return client


async def _negotiate(client: Client, timeout: float | None) -> None:
    """HELLO: the core builds the offer and applies the answer; this only moves it."""
    proto = client.protocol
    try:
        # Not interactive: the connection need not start out lean.
        data = await client._call_raw(
            CONTROL_PROGRAM, CONTROL_VERSION, CONTROL_HELLO, proto.hello_offer(), timeout,
            None, False,
        )
    except RPCError as exc:
        log.debug("peer refused HELLO (%s): legacy mode", exc)
        proto.hello_refused()
        return
    proto.apply_hello_reply(data)
    if proto.keepalive_negotiated:
        proto.start_keepalive()
