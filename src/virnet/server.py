"""The server framework: register handlers for procedures, listen, shut down gracefully.

Every call runs in a task of its own, so a slow handler delays no other call.  Calls in
flight per connection are bounded (``max_calls``); beyond it they wait in arrival order
and none is dropped, and if even that queue grows large the connection stops reading
until it drains.  A handler's ``RPCError`` becomes libvirt's error reply with the same
fields; any other exception is logged with its traceback and the client gets a clean
internal-error message.  A malformed packet closes only that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import protocol, xdr
from ._core import Mode
from ._impl import Message
from ._protocol import RPCProtocol
from ._uri import Address, parse_uri
from .constants import (
    CONTROL_HELLO,
    CONTROL_PROGRAM,
    CONTROL_VERSION,
    FEATURE_FLOW_CONTROL,
    FEATURE_KEEPALIVE,
    MAX_MESSAGE,
    MessageStatus,
)
from .errors import ErrorCode, ErrorDomain, RPCError, XdrError
from .program import Event, Procedure, Program, StreamDirection
from .stream import Stream

log = logging.getLogger("virnet.server")

_OK = int(MessageStatus.OK)
_ERROR = int(MessageStatus.ERROR)

Handler = Callable[["CallContext", Any], Awaitable[Any]]

DEFAULT_WINDOW = 4 * 1024 * 1024
#: Seconds a stream handler may run on after its client vanished before it is cancelled.
STREAM_TASK_GRACE = 10.0
#: Idle worker tasks kept per connection for the next calls.
IDLE_WORKERS = 64


@dataclass(frozen=True)
class _Registration:
    procedure: Procedure
    handler: Handler
    readonly: bool


class CallContext:
    """What a handler knows about the call it is serving."""

    __slots__ = ("connection", "procedure", "serial", "stream")

    def __init__(self, connection: ServerConnection, procedure: Procedure, serial: int):
        self.connection = connection
        self.procedure = procedure
        self.serial = serial
        self.stream: Stream | None = None

    def accept_stream(self, reply: Any = None, *, sparse: bool = False) -> Stream:
        """Accept a stream-carrying call: the reply (``reply``, encoded as the
        procedure's return type) goes out now and the stream is open.  Validate the
        arguments first; an ``RPCError`` raised before this becomes a plain error reply
        and no stream exists.  After it, returning from the handler completes the finish
        handshake and raising aborts the stream with that error."""
        proc = self.procedure
        if proc.stream is None:
            raise TypeError(f"{proc!r} does not carry a stream")
        if self.stream is not None:
            raise RuntimeError("the stream was already accepted")
        conn = self.connection
        if len(conn.open_streams) >= conn.server.max_streams:
            raise RPCError(
                f"too many streams on this connection (max {conn.server.max_streams})",
                code=ErrorCode.OPERATION_FAILED,
                domain=ErrorDomain.STREAMS,
            )
        payload = proc.encode_ret(reply)
        prog = proc.program
        stream = Stream(
            conn,
            prog.number,
            prog.version,
            proc.number,
            self.serial,
            sparse=sparse,
            can_send=proc.stream is not StreamDirection.UPLOAD,
            can_recv=proc.stream is not StreamDirection.DOWNLOAD,
        )
        conn.streams[stream.key] = stream
        conn.open_streams.add(stream)
        task = asyncio.current_task()
        if task is not None:
            conn.stream_tasks.add(task)
        conn.send_reply(prog.number, prog.version, proc.number, self.serial, _OK, payload)
        self.stream = stream
        return stream

    @property
    def readonly(self) -> bool:
        return self.connection.readonly

    def emit_event(self, event: Event, body: Any = None) -> None:
        self.connection.emit_event(event, body)



class ServerConnection(RPCProtocol):
    """One client's connection to a ``Server``."""

    def __init__(self, server: Server, readonly: bool) -> None:
        super().__init__(
            is_client=False,
            max_message=server.max_message,
            keepalive_interval=server.keepalive_interval,
            keepalive_count=server.keepalive_count,
            window=server.window,
            rx_budget=server.rx_budget,
        )
        self.server = server
        self.readonly = readonly
        # Calls run on a pool of worker tasks (at most max_calls), reused from call to
        # call: creating a task per call was a quarter of the server's time.
        self.workers: set[asyncio.Task[None]] = set()
        self.idle: list[asyncio.Future[None]] = []  # idle workers' wake-up futures
        self.wakeups = 0  # workers woken that have not started running yet
        self.active = 0  # calls being handled now
        self.waiting: deque[Message] = deque()
        self.state: dict[str, Any] = {}  # per-connection storage for services
        self.open_streams: set[Stream] = set()
        self.stream_tasks: set[asyncio.Task[Any]] = set()

    def stream_closed(self, stream: object) -> None:
        if isinstance(stream, Stream):
            self.open_streams.discard(stream)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.server._admit(self):
            log.warning(
                "refusing connection from %s: max_clients (%d) reached",
                self.peer,
                self.server.max_clients,
            )
            self.abort_connection(RPCError("too many clients"))
            return
        log.debug("client connected from %s", self.peer)

    def on_closed(self, exc: BaseException) -> None:
        self.server._forget(self)
        self.waiting.clear()
        for task in list(self.workers):
            if task in self.stream_tasks:
                # Its stream already failed with "connection lost": let the handler see
                # that and clean up (remove a temporary file...) before cancelling it.
                self.loop.call_later(STREAM_TASK_GRACE, task.cancel)
            else:
                task.cancel()
        log.debug("client %s gone: %s", self.peer, exc)

    # ------------------------------------------------------------------ calls
    def on_call(self, msg: Message) -> None:
        self.yield_read = True
        self.waiting.append(msg)
        self._ensure_worker()
        self.defer_flush()  # let the woken worker run (and reply) before more bulk data
        if len(self.waiting) >= self.server.max_queued_calls:
            # Even the queue is long: stop reading until it drains (bounded memory).
            self.hold_reading("call queue", True)

    def _ensure_worker(self) -> None:
        """Make sure some worker will look at the queue: one is already woken, or an idle
        one is woken, or a new one starts (up to max_calls; beyond, calls wait)."""
        if self.wakeups:
            return
        if self.idle:
            self.wakeups += 1
            self.idle.pop().set_result(None)
        elif len(self.workers) < self.server.max_calls:
            self.wakeups += 1
            task = self.loop.create_task(self._worker())
            self.workers.add(task)
            task.add_done_callback(self.workers.discard)

    async def _worker(self) -> None:
        task = asyncio.current_task()
        waiting = self.waiting
        max_queued = self.server.max_queued_calls
        while True:
            self.wakeups -= 1
            while waiting:
                msg = waiting.popleft()
                if self._read_pausers and len(waiting) < max_queued // 2:
                    self.hold_reading("call queue", False)
                if waiting:
                    # Hand the rest of the queue on before this call may suspend, so a
                    # slow handler delays no other call.
                    self._ensure_worker()
                self.active += 1
                try:
                    await self._dispatch(msg)
                except Exception:  # pragma: no cover - _dispatch handles everything
                    log.exception("internal error dispatching a call from %s", self.peer)
                finally:
                    self.active -= 1
                    if task is not None:
                        self.stream_tasks.discard(task)
            # The queue is drained: send the replies now, in one write, rather than a
            # loop iteration later.
            self.flush_now()
            if self.transport is None or len(self.idle) >= IDLE_WORKERS:
                return
            fut = self.loop.create_future()
            self.idle.append(fut)
            await fut

    async def wait_idle(self) -> None:
        """Until no call is running or waiting (graceful shutdown)."""
        while self.active or self.waiting:
            await asyncio.sleep(0.01)

    def reply_error(self, msg: Message, exc: RPCError) -> None:
        self.send_reply(
            msg.prog, msg.vers, msg.proc, msg.serial, _ERROR, protocol.encode_error(exc)
        )

    async def _dispatch(self, msg: Message) -> None:
        if msg.status != _OK:
            self.reply_error(msg, _rpc_error(f"Unexpected message status {msg.status}"))
            return
        if msg.prog == CONTROL_PROGRAM and msg.vers == CONTROL_VERSION:
            self._control_call(msg)
            return
        program = self.server.programs.get((msg.prog, msg.vers))
        if program is None:
            self.reply_error(
                msg, _rpc_error(f"Cannot find program {msg.prog} version {msg.vers}")
            )
            return
        reg = self.server.handlers.get((msg.prog, msg.vers, msg.proc))
        if reg is None:
            self.reply_error(msg, _rpc_error(f"unknown procedure: {msg.proc}"))
            return
        proc = reg.procedure
        if proc.stream is None:
            self.note_interactive()  # keep stream data from piling up ahead of the reply
        if self.readonly and not reg.readonly:
            self.reply_error(
                msg,
                RPCError(
                    f"operation {program.name}.{proc.name} forbidden on a read only "
                    "connection",
                    code=ErrorCode.OPERATION_DENIED,
                    domain=ErrorDomain.RPC,
                ),
            )
            return
        try:
            args = proc.decode_args(msg.payload)
        except XdrError as exc:
            self.reply_error(
                msg,
                RPCError(
                    f"invalid arguments for {program.name}.{proc.name}: {exc}",
                    code=ErrorCode.RPC,
                    domain=ErrorDomain.RPC,
                ),
            )
            return
        ctx = CallContext(self, proc, msg.serial)
        try:
            result = await reg.handler(ctx, args)
            if proc.stream is None:
                payload = proc.encode_ret(result)
            elif ctx.stream is None:
                raise RuntimeError("stream handler returned without accepting its stream")
        except RPCError as exc:
            self._fail_call(msg, ctx, exc)
            return
        except asyncio.CancelledError:
            if ctx.stream is not None:
                ctx.stream.server_fail(
                    RPCError("stream cancelled: the server is shutting down",
                             code=ErrorCode.OPERATION_ABORTED, domain=ErrorDomain.STREAMS)
                )
            raise
        except Exception as exc:
            log.exception("handler for %s.%s failed", program.name, proc.name)
            self._fail_call(
                msg,
                ctx,
                RPCError(
                    f"internal error in {program.name}.{proc.name}: {type(exc).__name__}",
                    code=ErrorCode.INTERNAL_ERROR,
                    domain=ErrorDomain.RPC,
                ),
            )
            return
        if ctx.stream is not None:
            await ctx.stream.server_complete()
            return
        self.send_reply(msg.prog, msg.vers, msg.proc, msg.serial, _OK, payload)

    def _fail_call(self, msg: Message, ctx: CallContext, exc: RPCError) -> None:
        """An error before the stream was accepted is the call's error reply; after, it
        aborts the stream with that error."""
        if ctx.stream is None:
            self.reply_error(msg, exc)
        else:
            ctx.stream.server_fail(exc)

    def _control_call(self, msg: Message) -> None:
        if msg.proc != CONTROL_HELLO:
            self.reply_error(msg, _rpc_error(f"unknown procedure: {msg.proc}"))
            return
        try:
            hello = xdr.decode(protocol.Hello, msg.payload)
        except XdrError as exc:
            self.reply_error(msg, _rpc_error(f"invalid HELLO: {exc}"))
            return
        offered = FEATURE_FLOW_CONTROL | FEATURE_KEEPALIVE
        self.features = hello.features & offered
        self.peer_window = hello.window
        self.mode = Mode.NATIVE
        payload = xdr.encode(protocol.Hello, protocol.Hello(self.features, self.server.window))
        self.send_reply(msg.prog, msg.vers, msg.proc, msg.serial, _OK, payload)
        if self.features & FEATURE_KEEPALIVE:
            self.start_keepalive()

    # ------------------------------------------------------------------ events
    def emit_event(self, event: Event, body: Any = None) -> None:
        """Send ``event`` (a MESSAGE, serial 0) to this client."""
        prog = event.program
        self.send_event(prog.number, prog.version, event.number, xdr.encode(event.body, body))
        self.note_interactive()


def _rpc_error(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.RPC, domain=ErrorDomain.RPC)


class Server:
    """Serves registered procedures on any number of listening sockets."""

    def __init__(
        self,
        *,
        max_message: int = MAX_MESSAGE,
        max_clients: int = 1024,
        max_calls: int = 256,
        max_queued_calls: int = 1024,
        max_streams: int = 64,
        keepalive_interval: float = 5.0,
        keepalive_count: int = 5,
        window: int = DEFAULT_WINDOW,
        rx_budget: int = 64 * 1024 * 1024,
    ) -> None:
        self.max_message = max_message
        self.max_clients = max_clients
        self.max_calls = max_calls
        self.max_queued_calls = max_queued_calls
        self.max_streams = max_streams
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        self.window = window
        self.rx_budget = rx_budget
        self.programs: dict[tuple[int, int], Program] = {}
        self.handlers: dict[tuple[int, int, int], _Registration] = {}
        self.connections: set[ServerConnection] = set()
        self._listeners: list[tuple[asyncio.AbstractServer, Address]] = []
        self._closing = False

    # ------------------------------------------------------------------ registration
    def register(self, procedure: Procedure, handler: Handler, *, readonly: bool = False) -> None:
        """Serve ``procedure`` with ``async handler(ctx, args) -> reply``.

        ``readonly=True`` allows it on read-only listeners too.
        """
        prog = procedure.program
        key = (prog.number, prog.version, procedure.number)
        if key in self.handlers:
            raise ValueError(f"{procedure!r} already has a handler")
        self.programs[prog.key] = prog
        self.handlers[key] = _Registration(procedure, handler, readonly)

    def handler(
        self, procedure: Procedure, *, readonly: bool = False
    ) -> Callable[[Handler], Handler]:
        """Decorator form of ``register``."""

        def decorate(func: Handler) -> Handler:
            self.register(procedure, func, readonly=readonly)
            return func

        return decorate

    # ------------------------------------------------------------------ listening
    async def listen(self, uri: str, *, readonly: bool = False) -> Address:
        """Start listening on ``uri``; returns the bound address (the real port for
        ``tcp://host:0``).  A Unix socket is created mode 0600 (its directory too)."""
        address = parse_uri(uri)
        loop = asyncio.get_running_loop()

        def factory() -> ServerConnection:
            return ServerConnection(self, readonly)

        if address.scheme == "unix":
            path = address.path
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            _remove_stale_socket(path)
            old = os.umask(0o177)
            try:
                srv = await loop.create_unix_server(factory, path, backlog=256)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
        else:
            srv = await loop.create_server(factory, address.host, address.port, backlog=256)
            sock = srv.sockets[0]
            host, port = sock.getsockname()[:2]
            address = Address("tcp", host=host, port=port)
        self._listeners.append((srv, address))
        log.debug("listening on %s", address)
        return address

    @property
    def addresses(self) -> list[Address]:
        return [a for _, a in self._listeners]

    def _admit(self, conn: ServerConnection) -> bool:
        if self._closing or len(self.connections) >= self.max_clients:
            return False
        self.connections.add(conn)
        return True

    def _forget(self, conn: ServerConnection) -> None:
        self.connections.discard(conn)

    async def serve_forever(self) -> None:
        await asyncio.gather(*(srv.serve_forever() for srv, _ in self._listeners))

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, let running calls finish for up to ``grace`` seconds, then close
        every connection and remove the Unix socket files."""
        self._closing = True
        for srv, address in self._listeners:
            srv.close()
            if address.scheme == "unix":
                try:
                    os.unlink(address.path)
                except FileNotFoundError:
                    pass
        conns = list(self.connections)
        shutdown = RPCError(
            "the server is shutting down", code=ErrorCode.OPERATION_ABORTED,
            domain=ErrorDomain.STREAMS,
        )
        for conn in conns:  # running streams end with an error, not silently
            for stream in list(conn.open_streams):
                stream.server_fail(shutdown)
        if conns:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(c.wait_idle() for c in conns))
        for conn in conns:
            conn.close_gracefully()
        closing = [c.closed for c in conns]
        if closing:
            await asyncio.wait(closing, timeout=grace)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.abort()
        for srv, _ in self._listeners:
            await srv.wait_closed()
        self._listeners.clear()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _remove_stale_socket(path: str) -> None:
    """Remove a leftover socket file (a previous daemon that died); refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server")
    finally:
        probe.close()
