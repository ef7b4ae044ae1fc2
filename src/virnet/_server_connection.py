"""One client's connection to a ``Server``: its calls queued and run on a pool of
worker tasks (at most ``max_calls``; beyond, they wait in arrival order), calls whose
handlers cannot suspend served as they are read, a client that leaves its replies unread
paused, and handler results turned into replies or libvirt's error replies."""

from __future__ import annotations

import asyncio
import inspect
import logging
import types
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import protocol, xdr
from ._call_context import CallContext, Registration
from ._impl import Message
from ._inline import run_to_end
from ._protocol import RPCProtocol
from ._streams import StreamCore
from .constants import CONTROL_HELLO, CONTROL_PROGRAM, CONTROL_VERSION, MessageStatus
from .errors import ErrorCode, ErrorDomain, RPCError, XdrError
from .program import Event, Procedure
from .stream import Stream, complete_stream, fail_stream

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("virnet.server")  # what it logs is the server's to say

_OK = int(MessageStatus.OK)
_ERROR = int(MessageStatus.ERROR)
_REFUSED = object()  # _decode_call answered the call with an error already
T = TypeVar("T")

#: Seconds a stream handler may run on after its client vanished before it is cancelled.
STREAM_TASK_GRACE = 10.0
#: Idle worker tasks kept per connection for the next calls.
IDLE_WORKERS = 64
_UNREAD_OUTPUT = "unread replies"  # a hold_reading reason


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
        self.waiting: deque[tuple[Message, Registration | None]] = deque()
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
        if not self.server.admit_connection(self):
            log.warning(
                "refusing connection from %s: max_clients (%d) reached",
                self.peer,
                self.server.limits.max_clients,
            )
            self.abort_connection(RPCError("too many clients"))
            return
        log.debug("client connected from %s", self.peer)

    def on_closed(self, exc: BaseException) -> None:
        self.server.forget_connection(self)
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

    async def _dispatch(self, msg: Message, reg: Registration | None) -> None:
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

    def _decode_call(self, msg: Message, reg: Registration) -> Any:
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

    def _serve_inline(self, msg: Message, reg: Registration) -> None:
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


def _inline_result(reg: Registration, ctx: CallContext, args: Any) -> Any:
    """Run an inline handler (``Registration.inline``): what it returned."""
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
