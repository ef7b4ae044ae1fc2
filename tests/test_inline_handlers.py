"""Plain-function handlers: served as their call is read, with no task woken, and with
the same errors, read-only rules and output bounds as async handlers.

Over real Unix sockets, on stock asyncio and uvloop (root conftest), with either core
(ci/test.sh).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import virnet
from _rpcutil import (
    ECHO,
    FAIL_CRASH,
    FAIL_RPC,
    SINK,
    TEST,
    WRITE,
    EchoArgs,
    remove_tree,
    short_tmpdir,
)
from virnet import xdr
from virnet._impl import encode_message
from virnet.constants import MessageStatus, MessageType
from virnet.errors import ErrorCode, RPCError

BIG = TEST.procedure(60, "BIG", None, xdr.opaque(256 * 1024))


class Served:
    """Plain-function handlers that note where they ran."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any] | None] = []

    def echo(self, ctx: virnet.CallContext, args: EchoArgs) -> EchoArgs:
        self.tasks.append(asyncio.current_task())
        return EchoArgs(args.text.upper(), 0, args.n + 1)

    def fail_rpc(self, ctx: virnet.CallContext, args: None) -> None:
        raise RPCError("refused on purpose", code=55)

    def fail_crash(self, ctx: virnet.CallContext, args: None) -> None:
        raise KeyError("a private detail")

    def write(self, ctx: virnet.CallContext, args: None) -> None:
        return None

    def big(self, ctx: virnet.CallContext, args: None) -> bytes:
        return b"b" * (256 * 1024)


@pytest.fixture
async def env() -> AsyncIterator[tuple[virnet.Server, Served, Path]]:
    path = Path(short_tmpdir())
    served = Served()
    server = virnet.Server()
    server.register(ECHO, served.echo, readonly=True)
    server.register(FAIL_RPC, served.fail_rpc, readonly=True)
    server.register(FAIL_CRASH, served.fail_crash, readonly=True)
    server.register(WRITE, served.write)
    server.register(BIG, served.big, readonly=True)
    await server.listen(f"unix://{path / 's.sock'}")
    await server.listen(f"unix://{path / 'ro.sock'}", readonly=True)
    try:
        yield server, served, path
    finally:
        await server.close()
        remove_tree(str(path))


async def test_a_plain_function_handler_answers_without_a_task(
    env: tuple[virnet.Server, Served, Path],
) -> None:
    _, served, path = env
    async with await virnet.connect(f"unix://{path / 's.sock'}") as client:
        reply = await client.call(ECHO, EchoArgs("abc", 0, 1))
        assert (reply.text, reply.n) == ("ABC", 2)
        replies = await asyncio.gather(
            *(client.call(ECHO, EchoArgs("x", 0, n)) for n in range(100))
        )
        assert [r.n for r in replies] == [n + 1 for n in range(100)]
    # Run from the read itself, not from a worker task.
    assert served.tasks and all(task is None for task in served.tasks)


async def test_plain_function_errors_are_error_replies(
    env: tuple[virnet.Server, Served, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, _, path = env
    async with await virnet.connect(f"unix://{path / 's.sock'}") as client:
        with pytest.raises(RPCError, match="refused on purpose") as info:
            await client.call(FAIL_RPC)
        assert info.value.code == 55
        with (
            caplog.at_level(logging.ERROR, logger="virnet.server"),
            pytest.raises(RPCError, match=r"internal error in TEST\.FAIL_CRASH: KeyError") as crash,
        ):
            await client.call(FAIL_CRASH)
        assert crash.value.code == ErrorCode.INTERNAL_ERROR
        assert "a private detail" not in str(crash.value)
        assert any("handler for TEST.FAIL_CRASH failed" in r.getMessage() for r in caplog.records)
        # Arguments that do not decode: an error reply, the connection goes on.
        with pytest.raises(RPCError, match=r"invalid arguments for TEST\.ECHO"):
            await client.call_raw(TEST.number, TEST.version, ECHO.number, b"\x00\x00")
        assert (await client.call(ECHO, EchoArgs("z", 0, 0))).text == "Z"


async def test_plain_function_write_procedure_is_refused_read_only(
    env: tuple[virnet.Server, Served, Path],
) -> None:
    _, _, path = env
    async with await virnet.connect(f"unix://{path / 'ro.sock'}") as client:
        with pytest.raises(RPCError, match="forbidden on a read only connection"):
            await client.call(WRITE)
        assert (await client.call(ECHO, EchoArgs("r", 0, 0))).text == "R"


def test_a_stream_procedure_needs_an_async_handler() -> None:
    server = virnet.Server()
    with pytest.raises(TypeError, match="must be async"):
        server.register(SINK, lambda ctx, args: None)


def test_an_object_with_an_async_call_is_taken_as_async() -> None:
    class Handler:
        async def __call__(self, ctx: virnet.CallContext, args: None) -> None:
            return None

    server = virnet.Server()
    server.register(SINK, Handler())  # a stream procedure: refused if taken as plain


async def test_a_client_that_reads_nothing_holds_plain_function_calls_back(
    env: tuple[virnet.Server, Served, Path],
) -> None:
    """Replies to a client that does not read stop at the output bound: its further
    calls wait in the queue (none dropped) until it reads, then all are answered."""
    server, _, path = env
    calls = 200  # 200 x 256 KiB: 50 MiB of replies, far over the 4 MiB bound
    loop = asyncio.get_running_loop()
    greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    greedy.setblocking(False)
    try:
        await loop.sock_connect(greedy, str(path / "s.sock"))
        await loop.sock_sendall(greedy, b"".join(
            b"".join(encode_message(TEST.number, TEST.version, BIG.number,
                                    int(MessageType.CALL), serial, int(MessageStatus.OK)))
            for serial in range(1, calls + 1)
        ))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if any(conn.waiting for conn in server.connections):
                break
        assert any(conn.waiting for conn in server.connections), "nothing was held back"
        # Now read: every call is answered, in full.
        buf = bytearray()
        serials: list[int] = []
        while len(serials) < calls:
            buf.extend(await loop.sock_recv(greedy, 1 << 20))
            while len(buf) >= 4:
                (length,) = struct.unpack_from(">I", buf)
                if len(buf) < length:
                    break
                _, _, proc, mtype, serial, status = struct.unpack_from(">IIIiIi", buf, 4)
                assert (proc, mtype, status) == (BIG.number, int(MessageType.REPLY), 0)
                assert length == 28 + 4 + 256 * 1024
                serials.append(serial)
                del buf[:length]
        assert sorted(serials) == list(range(1, calls + 1))
    finally:
        greedy.close()


def test_an_awaitable_from_a_plain_function_is_refused_even_after_plain_results() -> None:
    """The check of a plain handler's result caches the types found not awaitable; an
    awaitable is refused whatever was returned before, and a proxy claiming another
    class is never taken from the cache."""
    import inspect
    import types

    from virnet import _server_connection as connection_mod

    class Result:
        pass

    class Proxy:
        def __init__(self, cls: type) -> None:
            self._cls = cls

        @property  # type: ignore[misc]
        def __class__(self) -> type:  # what a proxy does
            return self._cls

    class Awaits:
        def __await__(self) -> Any:
            yield

    @types.coroutine
    def legacy() -> Any:
        yield

    async def coro() -> None:
        pass

    for _ in range(2):  # the second time from the cache
        value = Result()
        assert connection_mod._plain_result(ECHO, value) is value
    assert Result in connection_mod._NOT_AWAITABLE
    pending = coro()
    with pytest.raises(TypeError, match="returned an awaitable"):
        connection_mod._plain_result(ECHO, pending)
    assert inspect.getcoroutinestate(pending) == inspect.CORO_CLOSED  # no warning
    for awaitable in (Awaits(), legacy()):
        with pytest.raises(TypeError, match="returned an awaitable"):
            connection_mod._plain_result(ECHO, awaitable)
        with pytest.raises(TypeError, match="returned an awaitable"):
            connection_mod._plain_result(ECHO, awaitable)
    assert types.GeneratorType not in connection_mod._NOT_AWAITABLE
    for _ in range(2):
        with pytest.raises(TypeError, match="returned an awaitable"):
            connection_mod._plain_result(ECHO, Proxy(Awaits))
    assert Proxy not in connection_mod._NOT_AWAITABLE


# ---------------------------------------------------------------- async handlers that never wait


def test_which_async_handlers_can_never_suspend() -> None:
    """Read from the handler's own bytecode: any await, async for or async with keeps
    the worker path; awaits in nested functions do not count; anything that is not
    plainly an ``async def`` (a partial, a plain wrapper) keeps the worker path too."""
    import functools

    from virnet._inline import never_suspends

    async def returns(ctx: Any, args: Any) -> Any:
        return args

    async def awaits(ctx: Any, args: Any) -> Any:
        await asyncio.sleep(0)
        return args

    async def iterates(ctx: Any, args: Any) -> Any:
        async for _ in args:
            pass

    async def enters(ctx: Any, args: Any) -> Any:
        async with args:
            pass

    async def nests(ctx: Any, args: Any) -> Any:
        async def later() -> None:
            await asyncio.sleep(0)

        return later

    def plain(ctx: Any, args: Any) -> Any:
        return args

    def wrapper(ctx: Any, args: Any) -> Any:  # returns a coroutine that does wait
        return awaits(ctx, args)

    class Callable_:
        async def __call__(self, ctx: Any, args: Any) -> Any:
            return args

        async def method(self, ctx: Any, args: Any) -> Any:
            return args

    assert never_suspends(returns)
    assert never_suspends(nests)
    assert never_suspends(Callable_())
    assert never_suspends(Callable_().method)
    assert not never_suspends(awaits)
    assert not never_suspends(iterates)
    assert not never_suspends(enters)
    assert not never_suspends(plain)
    assert not never_suspends(wrapper)
    assert not never_suspends(functools.partial(returns, None))


async def test_an_async_handler_without_await_is_served_as_read(tmp_path: Path) -> None:
    """Such a handler runs as its call is read (no worker task: ``current_task()`` is
    None in it) with the same replies and errors; one that awaits still gets a task."""
    tasks: dict[str, list[asyncio.Task[Any] | None]] = {"echo": [], "waits": []}

    async def echo(ctx: virnet.CallContext, args: EchoArgs) -> EchoArgs:
        tasks["echo"].append(asyncio.current_task())
        if args.text == "rpc":
            raise RPCError("refused on purpose", code=55)
        if args.text == "crash":
            raise KeyError("a private detail")
        return EchoArgs(args.text.upper(), 0, args.n + 1)

    async def waits(ctx: virnet.CallContext, args: None) -> None:
        tasks["waits"].append(asyncio.current_task())
        await asyncio.sleep(0)

    path = Path(short_tmpdir())
    server = virnet.Server()
    server.register(ECHO, echo)
    server.register(WRITE, waits)
    await server.listen(f"unix://{path / 's.sock'}")
    try:
        async with await virnet.connect(f"unix://{path / 's.sock'}") as c:
            replies = await asyncio.gather(*(c.call(ECHO, EchoArgs("ab", 0, i)) for i in range(50)))
            assert [r.n for r in replies] == list(range(1, 51))
            assert {r.text for r in replies} == {"AB"}
            with pytest.raises(RPCError) as refused:
                await c.call(ECHO, EchoArgs("rpc", 0, 0))
            assert (refused.value.code, refused.value.message) == (55, "refused on purpose")
            with pytest.raises(RPCError) as crashed:
                await c.call(ECHO, EchoArgs("crash", 0, 0))
            assert "a private detail" not in str(crashed.value)
            await c.call(WRITE, None)
            assert (await c.call(ECHO, EchoArgs("x", 0, 7))).n == 8  # still serving
    finally:
        await server.close()
        remove_tree(str(path))
    assert tasks["echo"] and all(t is None for t in tasks["echo"])
    assert tasks["waits"] and all(t is not None for t in tasks["waits"])
