"""How a server serves one call: what ``register`` recorded for a procedure
(``Registration``), what the handler is given (``CallContext``), and the two ways a
server-side stream ends, with an error after its data (``fail_stream``) or through the
finish handshake once its handler returned (``complete_stream``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ._streams import StreamState
from .constants import MessageStatus
from .errors import ErrorCode, ErrorDomain, RPCError, StreamError
from .program import Event, Procedure, StreamDirection
from .stream import Stream

if TYPE_CHECKING:
    from ._server_connection import ServerConnection

_OK = int(MessageStatus.OK)
T = TypeVar("T")

Handler = Callable[["CallContext", Any], Awaitable[Any]]
#: A handler that never waits may be a plain function: it runs as its call is read.
InlineHandler = Callable[["CallContext", Any], Any]


@dataclass(frozen=True)
class Registration:
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
