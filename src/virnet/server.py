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

Listening sockets and accepting on them are ``_listen``'s; one client's connection
(its call queue, workers and bounded output) is ``_server_connection``'s; what a handler
is given, ``_call_context``'s; how a server-side stream ends, ``stream``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from ._blocking import WORKERS as BLOCKING_WORKERS
from ._blocking import BlockingPool
from ._call_context import CallContext, Handler, InlineHandler, Registration
from ._inline import never_suspends
from ._listen import Listener, Refusals, remove_stale_socket, tcp_listeners, unix_listener
from ._server_connection import ServerConnection
from ._uri import Address, parse_uri
from .errors import ErrorCode, ErrorDomain, RPCError
from .limits import DEFAULT_LIMITS, Limits
from .program import Procedure, Program
from .stream import fail_stream

__all__ = [
    "CallContext",
    "Handler",
    "InlineHandler",
    "Server",
    "ServerConnection",
    "fail_stream",
]

log = logging.getLogger("virnet.server")

T = TypeVar("T")
H = TypeVar("H", bound=Callable[..., Any])

#: Worker threads for jobs that read whole files (checksums), apart from the quick ones.
LONG_WORKERS = 2


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
        self.handlers: dict[tuple[int, int, int], Registration] = {}
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
        self.handlers[key] = Registration(
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

    def admit_connection(self, conn: ServerConnection) -> bool:
        """For a new connection: False if the server is closing or has ``max_clients``
        connections already (the connection then refuses its client)."""
        if self._closing or len(self.connections) >= self.limits.max_clients:
            return False
        self.connections.add(conn)
        return True

    def forget_connection(self, conn: ServerConnection) -> None:
        """For a connection that closed."""
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
