"""How a server serves one call: what ``register`` recorded for a procedure
(``Registration``) and what the handler is given (``CallContext``).  How a server-side
stream ends (``fail_stream``, ``complete_stream``) is ``stream``'s, beside the stream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .constants import MessageStatus
from .errors import ErrorCode, ErrorDomain, RPCError
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
