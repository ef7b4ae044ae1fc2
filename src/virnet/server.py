"""The server framework: register handlers for procedures, listen, shut down gracefully.

Every call runs in a task of its own, so a slow handler delays no other call.  Calls in
flight per connection are bounded (``max_calls``); beyond it they wait in arrival order
and none is dropped, and if even that queue grows large the connection stops reading
until it drains.  A client that leaves more than ``max_client_output`` bytes of replies
unread is paused the same way, and none of its waiting calls or blocking jobs starts
until it catches up.  Blocking work runs in worker threads shared between clients in
turns (``run_blocking``).  A handler's ``RPCError`` becomes libvirt's error reply with the same
fields; any other exception is logged with its traceback and the client gets a clean
internal-error message.  A malformed packet closes only that connection.

Listening sockets and accepting on them are ``_listen``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import types
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import protocol, xdr
from ._blocking import WORKERS as BLOCKING_WORKERS
from ._blocking import BlockingPool
from ._impl import Message
from ._inline import never_suspends, run_to_end
from ._listen import Listener, Refusals, remove_stale_socket, tcp_listeners, unix_listener
from ._protocol import RPCProtocol
from ._streams import StreamCore, StreamState
from ._uri import Address, parse_uri
from .constants import CONTROL_HELLO, CONTROL_PROGRAM, CONTROL_VERSION, MessageStatus
from .errors import ErrorCode, ErrorDomain, RPCError, StreamError, XdrError
from .limits import DEFAULT_LIMITS, Limits
from .program import Event, Procedure, Program, StreamDirection
from .stream import Stream

log = logging.getLogger("virnet.server")

_OK = int(MessageStatus.OK)
_ERROR = int(MessageStatus.ERROR)

Handler = Callable[["CallContext", Any], Awaitable[Any]]
#: A handler that never waits may be a plain function: it runs as its call is read.
InlineHandler = Callable[["CallContext", Any], Any]
_REFUSED = object()  # _decode_call answered the call with an error already
T = TypeVar("T")
H = TypeVar("H", bound=Callable[..., Any])

#: Worker threads for jobs that read whole files (checksums), apart from the quick ones.
LONG_WORKERS = 2
#: Seconds a stream handler may run on after its client vanished before it is cancelled.
STREAM_TASK_GRACE = 10.0
#: Idle worker tasks kept per connection for the next calls.
IDLE_WORKERS = 64
_UNREAD_OUTPUT = "unread replies"  # a hold_reading reason


@dataclass(frozen=True)
class _Registration:
    procedure: Procedure[Any, Any]
    handler: Handler | InlineHandler
    readonly: bool
    #: A plain function, or an async one that never suspends (``_inline``): served as
    #: the call is read, with no task to wake; the reply goes out with the others of
    #: the same read.
    inline: bool
    #: The handler is ``async def`` without a suspension point: run its coroutine to
    #: the end at once.
    coroutine: bool = False


class CallContext:
    """What a handler knows about the call it is serving."""

    __slots__ = ("connection", "procedure", "serial", "stream")

    def __init__(
        self, connection: ServerConnection, procedure: Procedure[Any, Any], serial: int
    ):
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
        if len(conn.open_streams) >= conn.server.limits.max_streams:
            raise RPCError(
                f"too many streams on this connection (max {conn.server.limits.max_streams})",
                code=ErrorCode.OPERATION_FAILED,
                domain=ErrorDomain.STREAMS,
            )
        payload = proc.encode_ret(reply)
        prog = proc.program
        core = conn.open_stream(
            prog.number,
            prog.version,
            proc.number,
            self.serial,
            sparse=sparse,
            can_send=proc.stream is not StreamDirection.UPLOAD,
            can_recv=proc.stream is not StreamDirection.DOWNLOAD,
        )
        stream = Stream(conn, core)
        conn.open_streams.add(stream)
        task = asyncio.current_task()
        if task is not None:
            conn.stream_tasks.add(task)
        conn.send_reply(prog.number, prog.version, proc.number, self.serial, _OK, payload)
        if conn.active <= 1 and not conn.waiting:  # this call alone: bulk from here
            conn.end_lean()
        self.stream = stream
        return stream

    @property
    def readonly(self) -> bool:
        return self.connection.readonly

    def emit_event(self, event: Event, body: Any = None) -> None:
        self.connection.emit_event(event, body)

    def run_blocking(
        self, fn: Callable[..., T], *args: Any, long: bool = False
    ) -> asyncio.Future[T]:
        """``fn(*args)`` in a worker thread, taking turns with other clients' calls;
        ``long=True`` for jobs that read whole files (checksums), which get workers of
        their own so they never hold up quick metadata calls."""
        return self.connection.run_blocking(fn, *args, long=long)


# ---------------------------------------------------------------------- stream ends
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


class ServerConnection(RPCProtocol):
    """One client's connection to a ``Server``."""

    def __init__(self, server: Server, readonly: bool) -> None:
        super().__init__(is_client=False, limits=server.limits)
        self.server = server
        self.readonly = readonly
        self._handlers = server.handlers  # the server's own table, read once per call
        # Calls run on a pool of worker tasks (at most max_calls), reused from call to
        # call: creating a task per call was a quarter of the server's time.
        self.workers: set[asyncio.Task[None]] = set()
        self.idle: list[asyncio.Future[None]] = []  # idle workers' wake-up futures
        self.wakeups = 0  # workers woken that have not started running yet
        self.active = 0  # calls being handled now
        #: Calls read but not started, with the registration ``on_call`` found for each
        #: (None: not found then), so a worker need not look it up again.
        self.waiting: deque[tuple[Message, _Registration | None]] = deque()
        self.state: dict[str, Any] = {}  # per-connection storage for services
        self.open_streams: set[Stream] = set()
        self.stream_tasks: set[asyncio.Task[Any]] = set()
        # Set while calls wait for the client to read its replies (max_client_output).
        self._drained: asyncio.Future[None] | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []  # wait_idle

    def on_stream_closed(self, stream: StreamCore) -> None:
        listener = stream.listener
        if isinstance(listener, Stream):
            self.open_streams.discard(listener)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.server._admit(self):
            log.warning(
                "refusing connection from %s: max_clients (%d) reached",
                self.peer,
                self.server.limits.max_clients,
            )
            self.abort_connection(RPCError("too many clients"))
            return
        log.debug("client connected from %s", self.peer)

    def on_closed(self, exc: BaseException) -> None:
        self.server._forget(self)
        self.waiting.clear()
        self._output_drained()  # its waiters are cancelled with the workers below
        self._maybe_idle()
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
        reg = self._handlers.get((msg.prog, msg.vers, msg.proc))
        if reg is not None and reg.inline and msg.status == _OK and self._drained is None:
            self._serve_inline(msg, reg)
            return
        self.waiting.append((msg, reg))
        self._ensure_worker()
        self.defer_flush()  # let the woken worker run (and reply) before more bulk data
        if len(self.waiting) >= self.server.limits.max_queued_calls:
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
        elif len(self.workers) < self.server.limits.max_calls:
            self.wakeups += 1
            task = self.loop.create_task(self._worker())
            self.workers.add(task)
            task.add_done_callback(self.workers.discard)

    async def _worker(self) -> None:
        task = asyncio.current_task()
        waiting = self.waiting
        max_queued = self.server.limits.max_queued_calls
        while True:
            self.wakeups -= 1
            while waiting:
                if self._drained is not None:
                    # Paused for unread replies (``_pause_for_output``).
                    await asyncio.shield(self._drained)
                    if not waiting:
                        break
                msg, reg = waiting.popleft()
                if self._read_pausers and len(waiting) < max_queued // 2:
                    self.hold_reading("call queue", False)
                if waiting:
                    # Hand the rest of the queue on before this call may suspend, so a
                    # slow handler delays no other call.
                    self._ensure_worker()
                self.active += 1
                try:
                    await self._dispatch(msg, reg)
                except Exception:  # pragma: no cover - _dispatch handles everything
                    log.exception("internal error dispatching a call from %s", self.peer)
                finally:
                    self.active -= 1
                    # The checks are inlined: this runs for every call.
                    if self._idle_waiters:
                        self._maybe_idle()
                    if self.stream_tasks and task is not None:
                        self.stream_tasks.discard(task)
                self.flush_if_batched()
            # The queue is drained: send the replies now, in one write, rather than a
            # loop iteration later.
            self.flush_now()
            if self.transport is None or len(self.idle) >= IDLE_WORKERS:
                return
            fut = self.loop.create_future()
            self.idle.append(fut)
            await fut

    # ------------------------------------------------------------------ bounded output
    def output_backlog(self) -> int:
        """Bytes written to this client that it has not read yet (what the transport
        holds; the kernel's socket buffer is bounded already)."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def on_written(self) -> None:
        # Only a transport that paused writing can hold more than the bound (it is below
        # the transport's high-water mark): once per write, so the cheap test first.
        if (
            self._write_paused
            and self._drained is None
            and self.output_backlog() > self.server.limits.max_client_output
        ):
            self._pause_for_output()

    def _pause_for_output(self) -> None:
        """The client is not reading what we send: stop reading its calls, start none
        of those already read (they wait, none is dropped) and start none of its
        blocking jobs, until its replies drain."""
        self._drained = self.loop.create_future()
        self.hold_reading(_UNREAD_OUTPUT, True)
        self.server.pause_owner(self)
        log.debug(
            "client %s has %d bytes of unread replies: pausing it",
            self.peer,
            self.output_backlog(),
        )

    def _output_drained(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None:
            self.hold_reading(_UNREAD_OUTPUT, False)
            self.server.resume_owner(self)
            if not drained.done():
                drained.set_result(None)

    def resume_writing(self) -> None:
        super().resume_writing()
        # The transport fell to its low-water mark, far below the bound.
        if self._drained is not None:
            self._output_drained()

    def run_blocking(
        self, fn: Callable[..., T], *args: Any, long: bool = False
    ) -> asyncio.Future[T]:
        """``fn(*args)`` in one of the server's worker threads, taking turns with other
        clients (``Server.run_blocking``)."""
        return self.server.run_blocking(self, fn, *args, long=long)

    async def wait_idle(self) -> None:
        """Until no call is running or waiting (graceful shutdown)."""
        while self.active or self.waiting:
            fut = self.loop.create_future()
            self._idle_waiters.append(fut)
            await fut

    def _maybe_idle(self) -> None:
        if self._idle_waiters and not self.active and not self.waiting:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def reply_error(self, msg: Message, exc: RPCError) -> None:
        self.send_reply(
            msg.prog, msg.vers, msg.proc, msg.serial, _ERROR, protocol.encode_error(exc)
        )

    async def _dispatch(self, msg: Message, reg: _Registration | None) -> None:
        # ``on_call`` looked the handler up already; a call it found none for is looked
        # up again (its handler may have been registered since), then ``_unroutable``.
        if reg is None:
            reg = self._handlers.get((msg.prog, msg.vers, msg.proc))
        if reg is None or msg.status != _OK:
            self._unroutable(msg)
            return
        args = self._decode_call(msg, reg)
        if args is _REFUSED:
            return
        proc = reg.procedure
        ctx = CallContext(self, proc, msg.serial)
        try:
            if reg.inline:  # queued while the client's replies drain (_pause_for_output)
                result = _inline_result(reg, ctx, args)
            else:
                result = await reg.handler(ctx, args)
            if proc.stream is None:
                payload = proc.ret.encode(result)
            elif ctx.stream is None:
                raise RuntimeError("stream handler returned without accepting its stream")
        except RPCError as exc:
            self._fail_call(msg, ctx, exc)
            return
        except asyncio.CancelledError:
            if ctx.stream is not None:
                fail_stream(
                    ctx.stream,
                    RPCError("stream cancelled: the server is shutting down",
                             code=ErrorCode.OPERATION_ABORTED, domain=ErrorDomain.STREAMS)
                )
            raise
        except Exception as exc:
            self._fail_call(msg, ctx, _handler_failed(proc, exc))
            return
        if ctx.stream is not None:
            await complete_stream(ctx.stream)
            return
        if self.waiting:
            self.send_reply(msg.prog, msg.vers, msg.proc, msg.serial, _OK, payload)
        else:
            # The run's last call: ``_worker`` writes the reply (``flush_now``) as soon as
            # this returns, with nothing that can suspend in between.
            self.send_reply(
                msg.prog, msg.vers, msg.proc, msg.serial, _OK, payload, notify=False
            )

    def _decode_call(self, msg: Message, reg: _Registration) -> Any:
        """The call's arguments, or ``_REFUSED`` once it has been answered with an error
        (a write procedure on a read-only listener, arguments that do not decode)."""
        proc = reg.procedure
        if proc.stream is None:
            self.note_interactive()  # keep stream data from piling up ahead of the reply
        if self.readonly and not reg.readonly:
            self.reply_error(
                msg,
                RPCError(
                    f"operation {proc.program.name}.{proc.name} forbidden on a read only "
                    "connection",
                    code=ErrorCode.OPERATION_DENIED,
                    domain=ErrorDomain.RPC,
                ),
            )
            return _REFUSED
        try:
            return proc.args.decode(msg.payload)  # (``decode_args`` without its frame)
        except XdrError as exc:
            self.reply_error(
                msg,
                RPCError(
                    f"invalid arguments for {proc.program.name}.{proc.name}: {exc}",
                    code=ErrorCode.RPC,
                    domain=ErrorDomain.RPC,
                ),
            )
            return _REFUSED

    def _serve_inline(self, msg: Message, reg: _Registration) -> None:
        """Serve a call whose handler is a plain function, as it is read: no worker is
        woken, and the reply is written with the others of the same read."""
        args = self._decode_call(msg, reg)
        if args is _REFUSED:
            return
        proc = reg.procedure
        try:
            result = _inline_result(reg, CallContext(self, proc, msg.serial), args)
            payload = proc.ret.encode(result)  # (``encode_ret`` without its frame)
        except RPCError as exc:
            self.reply_error(msg, exc)
            return
        except Exception as exc:
            self.reply_error(msg, _handler_failed(proc, exc))
            return
        self.send_reply_after_read(msg.prog, msg.vers, msg.proc, msg.serial, _OK, payload)

    def _unroutable(self, msg: Message) -> None:
        """A CALL with a bad status, for VIRNET_CONTROL, or for a program or procedure
        not registered: answered here (HELLO), or with the error libvirt would give."""
        if msg.status != _OK:
            self.reply_error(msg, _rpc_error(f"Unexpected message status {msg.status}"))
        elif msg.prog == CONTROL_PROGRAM and msg.vers == CONTROL_VERSION:
            self._control_call(msg)
        elif (msg.prog, msg.vers) not in self.server.programs:
            self.reply_error(
                msg, _rpc_error(f"Cannot find program {msg.prog} version {msg.vers}")
            )
        else:
            self.reply_error(msg, _rpc_error(f"unknown procedure: {msg.proc}"))

    def _fail_call(self, msg: Message, ctx: CallContext, exc: RPCError) -> None:
        """An error before the stream was accepted is the call's error reply; after, it
        aborts the stream with that error."""
        if ctx.stream is None:
            self.reply_error(msg, exc)
        else:
            fail_stream(ctx.stream, exc)

    def _control_call(self, msg: Message) -> None:
        """VIRNET_CONTROL: the core accepts the HELLO offer; this only moves bytes."""
        if msg.proc != CONTROL_HELLO:
            self.reply_error(msg, _rpc_error(f"unknown procedure: {msg.proc}"))
            return
        try:
            payload = self.accept_hello(msg.payload)
        except RPCError as exc:
            self.reply_error(msg, exc)
            return
        self.send_reply(msg.prog, msg.vers, msg.proc, msg.serial, _OK, payload)
        if self.keepalive_negotiated:
            self.start_keepalive()

    # ------------------------------------------------------------------ events
    def emit_event(self, event: Event, body: Any = None) -> None:
        """Send ``event`` (a MESSAGE, serial 0) to this client."""
        prog = event.program
        self.send_event(prog.number, prog.version, event.number, xdr.encode(event.body, body))
        self.note_interactive()


#: Types whose instances ``inspect.isawaitable`` refused (for every call of a plain
#: handler it costs as much as the rest of the check: the ``Awaitable`` ABC goes through
#: ``ABCMeta.__instancecheck__``).  It depends on the type alone except for generators
#: (one made by ``types.coroutine`` is awaitable), which are never cached.  Bounded: a
#: handler returning ever new types just stops being cached.
_NOT_AWAITABLE: set[type] = set()
_NOT_AWAITABLE_MAX = 256


def _inline_result(reg: _Registration, ctx: CallContext, args: Any) -> Any:
    """Run an inline handler (``_Registration.inline``): what it returned."""
    result = reg.handler(ctx, args)
    if reg.coroutine:
        return run_to_end(result)  # type: ignore[arg-type]  # an async def, checked
    return _plain_result(reg.procedure, result)


def _plain_result(proc: Procedure[Any, Any], result: Any) -> Any:
    """What a plain-function handler returned, refused if it is an awaitable: the
    handler was taken for a plain function but is not one (a server bug)."""
    kind = type(result)
    # (``isinstance`` also consults ``__class__``: a proxy claiming another class is
    # checked in full every time.)
    plain_class = result.__class__ is kind
    if plain_class and kind in _NOT_AWAITABLE:
        return result
    if not inspect.isawaitable(result):
        if (
            plain_class
            and kind is not types.GeneratorType
            and len(_NOT_AWAITABLE) < _NOT_AWAITABLE_MAX
        ):
            _NOT_AWAITABLE.add(kind)
        return result
    if inspect.iscoroutine(result):
        result.close()
    raise TypeError(f"the plain-function handler of {proc!r} returned an awaitable")


def _handler_failed(proc: Procedure[Any, Any], exc: Exception) -> RPCError:
    """A handler raised something other than ``RPCError``: logged with its traceback
    here, answered without the details (they may be private)."""
    name = f"{proc.program.name}.{proc.name}"
    log.error("handler for %s failed", name, exc_info=exc)
    return RPCError(
        f"internal error in {name}: {type(exc).__name__}",
        code=ErrorCode.INTERNAL_ERROR,
        domain=ErrorDomain.RPC,
    )


def _rpc_error(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.RPC, domain=ErrorDomain.RPC)


class Server:
    """Serves registered procedures on any number of listening sockets."""

    def __init__(
        self,
        *,
        limits: Limits = DEFAULT_LIMITS,
        blocking_workers: int = BLOCKING_WORKERS,
        long_workers: int = LONG_WORKERS,
        **changes: float,
    ) -> None:
        """``limits`` (``virnet.Limits``), with ``changes`` applied on top
        (``Server(max_calls=8)``); ``blocking_workers`` and ``long_workers`` threads for
        blocking work (``run_blocking``)."""
        self.limits = limits.replace(**changes) if changes else limits
        self.blocking_workers = blocking_workers
        self.long_workers = long_workers
        self._pools: dict[bool, BlockingPool] = {}  # long? -> pool (``_blocking_pools``)
        self.programs: dict[tuple[int, int], Program] = {}
        self.handlers: dict[tuple[int, int, int], _Registration] = {}
        self.connections: set[ServerConnection] = set()
        self._listeners: list[Listener] = []
        self._adopted_paths: set[str] = set()  # Unix sockets bound by someone else
        self._closing = False
        self._closed = asyncio.Event()
        self._refusals = Refusals()

    # ------------------------------------------------------------------ blocking work
    def run_blocking(
        self, owner: Hashable, fn: Callable[..., T], *args: Any, long: bool = False
    ) -> asyncio.Future[T]:
        """``fn(*args)`` in a worker thread.  Each ``owner`` (a connection) has a queue
        of its own and the workers serve the owners in turn, so one client's burst
        delays another's call by at most one call per busy client."""
        return self._blocking_pools()[long].run(fn, *args, owner=owner)

    def _blocking_pools(self) -> dict[bool, BlockingPool]:
        """Both pools (quick: False, long: True), made together on first use on the
        serving loop, so that a pause reaches every pool there will be.  Their threads
        start with their first job."""
        if not self._pools:
            loop = asyncio.get_running_loop()
            self._pools[False] = BlockingPool(loop, self.blocking_workers)
            self._pools[True] = BlockingPool(loop, self.long_workers)
        return self._pools

    def pause_owner(self, owner: Hashable) -> None:
        """Start none of ``owner``'s blocking jobs until ``resume_owner``."""
        for pool in self._blocking_pools().values():
            pool.pause(owner)

    def resume_owner(self, owner: Hashable) -> None:
        for pool in self._pools.values():
            pool.resume(owner)

    # ------------------------------------------------------------------ registration
    def register(
        self,
        procedure: Procedure[Any, Any],
        handler: Handler | InlineHandler,
        *,
        readonly: bool = False,
    ) -> None:
        """Serve ``procedure`` with ``async handler(ctx, args) -> reply``.

        A handler that never waits may be a plain function instead: it is then run as
        its call is read, with no task to wake (the fastest way to answer small calls),
        and must not block.  An ``async def`` handler with no ``await``, ``async for``
        or ``async with`` in its body is served the same way (it cannot suspend; it
        then has no task of its own: ``asyncio.current_task()`` is None in it).
        Stream procedures need an async handler.
        ``readonly=True`` allows it on read-only listeners too.
        """
        prog = procedure.program
        key = (prog.number, prog.version, procedure.number)
        if key in self.handlers:
            raise ValueError(f"{procedure!r} already has a handler")
        inline = not (
            inspect.iscoroutinefunction(handler)
            or inspect.iscoroutinefunction(type(handler).__call__)
        )
        if inline and procedure.stream is not None:
            raise TypeError(f"{procedure!r} carries a stream: its handler must be async")
        # An async handler that can never suspend is served like a plain function.
        coroutine = not inline and procedure.stream is None and never_suspends(handler)
        self.programs[prog.key] = prog
        self.handlers[key] = _Registration(
            procedure, handler, readonly, inline or coroutine, coroutine
        )

    def handler(
        self, procedure: Procedure[Any, Any], *, readonly: bool = False
    ) -> Callable[[H], H]:
        """Decorator form of ``register``."""

        def decorate(func: H) -> H:
            self.register(procedure, func, readonly=readonly)
            return func

        return decorate

    # ------------------------------------------------------------------ listening
    async def listen(self, uri: str, *, readonly: bool = False) -> Address:
        """Start listening on ``uri``; returns the bound address (the real port for
        ``tcp://host:0``).  A Unix socket is created mode 0600 (its directory too)."""
        address = parse_uri(uri)
        loop = asyncio.get_running_loop()
        if address.scheme == "unix":
            path = address.path
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            remove_stale_socket(path)
            socks = [unix_listener(path)]
        else:
            socks = await tcp_listeners(loop, address.host, address.port)
            host, port = socks[0].getsockname()[:2]
            address = Address("tcp", host=host, port=port)
        self._refusals.ensure_spare()
        for sock in socks:
            listener = Listener(
                loop, sock, address, self._protocol_factory(readonly), self._refusals
            )
            self._listeners.append(listener)
            listener.start()
        log.debug("listening on %s", address)
        return address

    async def adopt(self, sock: socket.socket, *, readonly: bool = False) -> Address:
        """Accept on ``sock``, a listening socket bound by someone else (socket
        activation); returns its address.  Its Unix socket file is left in place on
        close: whoever bound it owns it."""
        loop = asyncio.get_running_loop()
        name = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            path = name.decode() if isinstance(name, bytes) else str(name)
            address = Address("unix", path=path)
            self._adopted_paths.add(path)
        else:
            address = Address("tcp", host=name[0], port=name[1])
        self._refusals.ensure_spare()
        listener = Listener(
            loop, sock, address, self._protocol_factory(readonly), self._refusals
        )
        self._listeners.append(listener)
        listener.start()
        log.debug("listening on %s (inherited)", address)
        return address

    @property
    def addresses(self) -> list[Address]:
        seen: list[Address] = []
        for listener in self._listeners:
            if listener.address not in seen:
                seen.append(listener.address)
        return seen

    def _protocol_factory(self, readonly: bool) -> Callable[[], ServerConnection]:
        return lambda: ServerConnection(self, readonly)

    def _admit(self, conn: ServerConnection) -> bool:
        if self._closing or len(self.connections) >= self.limits.max_clients:
            return False
        self.connections.add(conn)
        return True

    def _forget(self, conn: ServerConnection) -> None:
        self.connections.discard(conn)

    async def serve_forever(self) -> None:
        """Until ``close()``."""
        await self._closed.wait()

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, let running calls finish for up to ``grace`` seconds, then close
        every connection and remove the Unix socket files."""
        self._closing = True
        for listener in self._listeners:
            listener.close()
        for address in self.addresses:
            if address.scheme == "unix" and address.path not in self._adopted_paths:
                try:
                    os.unlink(address.path)
                except FileNotFoundError:
                    pass
        self._listeners.clear()
        self._refusals.close()
        conns = list(self.connections)
        shutdown = RPCError(
            "the server is shutting down", code=ErrorCode.OPERATION_ABORTED,
            domain=ErrorDomain.STREAMS,
        )
        for conn in conns:  # running streams end with an error, not silently
            for stream in list(conn.open_streams):
                fail_stream(stream, shutdown)
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
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._closed.set()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
