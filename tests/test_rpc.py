"""The RPC engine over real sockets: concurrency, errors, bad input, keepalive, limits.

Every async test runs on stock asyncio and on uvloop (root conftest), and the whole file
runs with the compiled and the pure core (ci/test.sh).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator

import pytest

import virnet
from _rpcutil import (
    BLOCK,
    ECHO,
    FAIL_CRASH,
    FAIL_RPC,
    NOTE_EVENT,
    NOTIFY,
    TEST,
    UNREGISTERED,
    WRITE,
    DemoService,
    EchoArgs,
    Note,
    remove_tree,
    short_tmpdir,
    sock_uri,
)
from virnet import _impl, protocol, xdr
from virnet.constants import (
    CONTROL_HELLO,
    CONTROL_PROGRAM,
    FEATURE_FLOW_CONTROL,
    FEATURE_KEEPALIVE,
    KEEPALIVE_PROGRAM,
)
from virnet.errors import (
    CallTimeoutError,
    ConnectionClosedError,
    ErrorCode,
    ErrorDomain,
    ProtocolError,
    RPCError,
)


class Env:
    def __init__(self, server: virnet.Server, service: DemoService, uri: str) -> None:
        self.server = server
        self.service = service
        self.uri = uri
        self.ro_uri = ""


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    tmp = short_tmpdir()
    server = virnet.Server(max_calls=8, max_queued_calls=10_000)
    service = DemoService()
    service.register(server)
    uri = str(await server.listen(sock_uri(tmp)))
    e = Env(server, service, uri)
    e.ro_uri = str(await server.listen(sock_uri(tmp, "ro.sock"), readonly=True))
    try:
        yield e
    finally:
        service.gate.set()
        await server.close(grace=1)
        remove_tree(tmp)


async def test_native_negotiation(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        assert c.mode is virnet.Mode.NATIVE
        assert c.features == FEATURE_FLOW_CONTROL | FEATURE_KEEPALIVE
        assert c.protocol.peer_window == env.server.limits.window


async def test_simple_call(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        assert await c.call(ECHO, EchoArgs("abc", 0, 41)) == EchoArgs("cba", 0, 42)


async def test_1000_concurrent_calls_out_of_order(env: Env) -> None:
    env.server.limits = env.server.limits.replace(max_calls=256)
    rng = random.Random(7)
    async with await virnet.connect(env.uri) as c:
        delays = [rng.randrange(0, 30) for _ in range(1000)]
        results = await asyncio.gather(
            *(c.call(ECHO, EchoArgs(f"m{i}", d, i)) for i, d in enumerate(delays))
        )
    assert [r.n for r in results] == [i + 1 for i in range(1000)]
    assert all(r.text == f"m{i}"[::-1] for i, r in enumerate(results))


async def test_100_clients_at_once(env: Env) -> None:
    async def one(i: int) -> int:
        async with await virnet.connect(env.uri) as c:
            total = 0
            for j in range(5):
                total += (await c.call(ECHO, EchoArgs("x", 0, i * 10 + j))).n
            return total

    totals = await asyncio.gather(*(one(i) for i in range(100)))
    assert totals == [sum(i * 10 + j + 1 for j in range(5)) for i in range(100)]
    # Every client closed: the server lets go of each connection.
    for _ in range(500):
        if not env.server.connections:
            break
        await asyncio.sleep(0.01)
    assert len(env.server.connections) == 0


async def test_slow_handler_delays_no_other_call(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        slow = asyncio.ensure_future(c.call(BLOCK, EchoArgs("slow", 0, 1)))
        await asyncio.sleep(0.05)
        for i in range(20):
            assert (await c.call(ECHO, EchoArgs("fast", 0, i), timeout=5)).n == i + 1
        assert not slow.done()
        env.service.gate.set()
        assert (await slow).text == "slow"


async def test_calls_in_flight_are_bounded_and_queued_in_order(env: Env) -> None:
    env.server.limits = env.server.limits.replace(max_calls=4)
    async with await virnet.connect(env.uri) as c:
        calls = [asyncio.ensure_future(c.call(BLOCK, EchoArgs("", 0, i))) for i in range(20)]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(env.service.started) >= 4:
                break
        await asyncio.sleep(0.1)
        assert env.service.running == 4
        env.service.gate.set()
        results = await asyncio.gather(*calls)
    assert [r.n for r in results] == list(range(20))  # none dropped
    assert env.service.max_running == 4
    assert env.service.started == list(range(20))  # started in arrival order


async def test_rpc_error_carries_every_field(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(RPCError) as info:
            await c.call(FAIL_RPC)
    e = info.value
    assert (e.message, e.code, e.domain, e.level) == ("custom failure", 55, 18, 1)
    assert (e.str1, e.str2, e.str3, e.int1, e.int2) == ("a", "b", "c", 7, -8)


async def test_handler_crash_is_a_clean_error(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    async with await virnet.connect(env.uri) as c:
        with caplog.at_level(logging.ERROR, "virnet.server"):
            with pytest.raises(RPCError) as info:
                await c.call(FAIL_CRASH)
            # the connection is still good
            assert (await c.call(ECHO, EchoArgs("a", 0, 1))).n == 2
    assert info.value.code == ErrorCode.INTERNAL_ERROR
    assert "secret" not in str(info.value.message)
    assert "KeyError" in str(info.value.message)
    assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)


async def test_a_handler_registered_while_its_call_waits_serves_it(env: Env) -> None:
    """A call for a procedure nobody serves yet waits behind a busy worker; the handler
    is registered meanwhile: the call is looked up again when its turn comes and served,
    not refused with the "unknown procedure" it would have got when it arrived."""
    env.server.limits = env.server.limits.replace(max_calls=1)
    async with await virnet.connect(env.uri) as c:
        blocked = asyncio.ensure_future(c.call(BLOCK, EchoArgs("", 0, 1)))
        for _ in range(200):
            await asyncio.sleep(0.005)
            if env.service.running == 1:
                break
        assert env.service.running == 1
        late = asyncio.ensure_future(c.call(UNREGISTERED))
        (conn,) = env.server.connections
        for _ in range(200):
            await asyncio.sleep(0.005)
            if conn.waiting:
                break
        assert [m.proc for m, _ in conn.waiting] == [UNREGISTERED.number]
        assert conn.waiting[0][1] is None  # found no handler when it was read
        served: list[int] = []

        async def late_handler(ctx: virnet.CallContext, args: None) -> None:
            served.append(ctx.serial)

        env.server.register(UNREGISTERED, late_handler)
        env.service.gate.set()
        assert (await blocked).n == 1
        await late  # answered with the (void) reply, not an error
        assert len(served) == 1


async def test_unknown_program_version_procedure(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(RPCError, match="Cannot find program") as info:
            await c.call_raw(0x12345678, 1, 1)
        assert (info.value.code, info.value.domain) == (ErrorCode.RPC, ErrorDomain.RPC)
        with pytest.raises(RPCError, match="Cannot find program"):
            await c.call_raw(TEST.number, 2, 1)
        with pytest.raises(RPCError, match="unknown procedure: 99"):
            await c.call(UNREGISTERED)
        assert (await c.call(ECHO, EchoArgs("ok", 0, 0))).n == 1


async def test_bad_arguments_get_an_error_reply(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(RPCError, match=r"invalid arguments for TEST\.ECHO") as info:
            await c.call_raw(TEST.number, 1, ECHO.number, b"\x00\x00\x10\x00")
        assert info.value.code == ErrorCode.RPC
        with pytest.raises(RPCError, match="trailing"):
            payload = xdr.encode(EchoArgs, EchoArgs("a", 0, 0)) + b"junk"
            await c.call_raw(TEST.number, 1, ECHO.number, payload)


async def test_readonly_listener(env: Env) -> None:
    async with await virnet.connect(env.ro_uri) as c:
        assert (await c.call(ECHO, EchoArgs("", 0, 1))).n == 2
        with pytest.raises(RPCError, match="read only") as info:
            await c.call(WRITE)
        assert info.value.code == ErrorCode.OPERATION_DENIED
    async with await virnet.connect(env.uri) as c:
        await c.call(WRITE)


async def test_call_deadline(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(CallTimeoutError):
            await c.call(ECHO, EchoArgs("late", 300, 0), timeout=0.05)
        # the late reply is dropped quietly; the connection keeps working
        await asyncio.sleep(0.4)
        assert (await c.call(ECHO, EchoArgs("", 0, 5))).n == 6


async def test_events(env: Env) -> None:
    got: asyncio.Queue[Note] = asyncio.Queue()
    async with await virnet.connect(env.uri) as c:
        unsubscribe = c.subscribe(NOTE_EVENT, got.put_nowait)
        await c.call(NOTIFY, Note("hello"))
        assert (await asyncio.wait_for(got.get(), 5)).text == "hello"
        unsubscribe()
        await c.call(NOTIFY, Note("ignored"))
        await c.call(ECHO, EchoArgs("", 0, 0))
        assert got.empty()


async def test_pending_calls_fail_when_server_closes(env: Env) -> None:
    c = await virnet.connect(env.uri)
    pending = asyncio.ensure_future(c.call(BLOCK, EchoArgs("", 0, 0)))
    await asyncio.sleep(0.05)
    for conn in list(env.server.connections):
        assert conn.transport is not None
        conn.transport.abort()
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(ConnectionClosedError):
        await c.call(ECHO, EchoArgs("", 0, 0))
    await c.close()


async def test_connect_errors() -> None:
    with pytest.raises(ConnectionClosedError, match="cannot connect"):
        await virnet.connect("unix:///nonexistent/dir/x.sock")
    with pytest.raises(ValueError, match="unsupported scheme"):
        await virnet.connect("http://x")
    with pytest.raises(ValueError, match="port"):
        await virnet.connect("tcp://localhost")


async def test_tcp_listener() -> None:
    server = virnet.Server()
    DemoService().register(server)
    addr = await server.listen("tcp://127.0.0.1:0")
    try:
        async with await virnet.connect(str(addr)) as c:
            assert (await c.call(ECHO, EchoArgs("t", 0, 1))).n == 2
            sock = c.protocol.transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        await server.close()


# ----------------------------------------------------------------------------- bad input


async def _raw_exchange(uri: str, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes; return everything the server sends until it closes."""
    reader, writer = await asyncio.open_unix_connection(uri.removeprefix("unix://"))
    writer.write(data)
    await writer.drain()
    received = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                received += chunk
    finally:
        writer.close()
    return received


def _packet(prog: int, vers: int, proc: int, mtype: int, serial: int, status: int,
            payload: bytes = b"") -> bytes:
    return struct.pack(">IIIiiIi", 28 + len(payload), prog, vers, proc, mtype, serial,
                       status) + payload


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xde\xad\xbe\xef" * 8, "exceeds"),
        (b"\x00\x00\x00\x00" + b"x" * 30, "below the minimum"),
        (b"\xff\xff\xff\xff" + b"x" * 30, "exceeds"),
        (_packet(0x3000_0001, 1, 1, 1, 1, 0), "REPLY sent to a server"),
        (_packet(0x3000_0001, 1, 1, 9, 1, 0), "unknown message type 9"),
        (_packet(0x3000_0001, 1, 1, 3, 1, 7), "unknown status 7"),
        (_packet(0x3000_0001, 1, 1, 2, 0, 1), "MESSAGE with invalid status"),
        (_packet(0x3000_0001, 1, 1, 4, 1, 0), "file descriptor passing"),
        (_packet(KEEPALIVE_PROGRAM, 1, 9, 2, 0, 0), "unknown keepalive procedure"),
    ],
    ids=["garbage", "len0", "lenmax", "reply", "type", "status", "msgstatus", "fds", "ka"],
)
async def test_malformed_input_closes_only_that_connection(
    env: Env, caplog: pytest.LogCaptureFixture, data: bytes, reason: str
) -> None:
    async with await virnet.connect(env.uri) as bystander:
        with caplog.at_level(logging.WARNING, "virnet"):
            received = await _raw_exchange(env.uri, data)
        assert received == b""  # closed without a reply
        assert any(reason in r.getMessage() for r in caplog.records), caplog.text
        # everyone else keeps working
        assert (await bystander.call(ECHO, EchoArgs("", 0, 1))).n == 2
        async with await virnet.connect(env.uri) as fresh:
            assert (await fresh.call(ECHO, EchoArgs("", 0, 2))).n == 3


async def test_truncated_packet_then_disconnect(env: Env) -> None:
    data = _packet(TEST.number, 1, ECHO.number, 0, 1, 0, b"\x00" * 40)[:-10]
    _, writer = await asyncio.open_unix_connection(env.uri.removeprefix("unix://"))
    writer.write(data)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    async with await virnet.connect(env.uri) as c:
        assert (await c.call(ECHO, EchoArgs("", 0, 1))).n == 2


async def test_call_with_bad_status_gets_error_reply(env: Env) -> None:
    reader, writer = await asyncio.open_unix_connection(env.uri.removeprefix("unix://"))
    writer.write(_packet(TEST.number, 1, ECHO.number, 0, 5, 2))  # CALL with CONTINUE
    dec = _impl.FrameDecoder()
    msgs: list[_impl.Message] = []
    async with asyncio.timeout(5):
        while not msgs:
            msgs = dec.feed(await reader.read(65536))
    writer.close()
    (reply,) = msgs
    assert (reply.type, reply.status, reply.serial) == (1, 1, 5)
    assert "Unexpected message status 2" in str(protocol.decode_error(reply.payload))


async def test_ping_answered_with_pong(env: Env) -> None:
    reader, writer = await asyncio.open_unix_connection(env.uri.removeprefix("unix://"))
    writer.write(_packet(KEEPALIVE_PROGRAM, 1, 1, 2, 0, 0))
    async with asyncio.timeout(5):
        data = await reader.readexactly(28)
    writer.close()
    assert data == _packet(KEEPALIVE_PROGRAM, 1, 2, 2, 0, 0)


async def test_client_rejects_bad_server_input() -> None:
    """A server that answers a call with a REPLY for another serial breaks the protocol."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(_packet(1, 1, 1, 1, 999, 0))
        await writer.drain()
        await reader.read(65536)
        writer.close()

    tmp = short_tmpdir()
    path = f"{tmp}/bad.sock"
    srv = await asyncio.start_unix_server(handle, path)
    try:
        c = await virnet.connect(f"unix://{path}", hello=False)
        with pytest.raises(ConnectionClosedError, match="answers no call"):
            await c.call_raw(1, 1, 1, b"", timeout=5)
        await c.close()
    finally:
        srv.close()
        await srv.wait_closed()
        remove_tree(tmp)


# ----------------------------------------------------------------------------- keepalive


async def _silent_server(path: str) -> asyncio.AbstractServer:
    """Accepts, reads and never answers: a peer whose process has stopped."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    return await asyncio.start_unix_server(handle, path)


async def test_client_keepalive_timeout() -> None:
    tmp = short_tmpdir()
    path = f"{tmp}/silent.sock"
    srv = await _silent_server(path)
    try:
        c = await virnet.connect(
            f"unix://{path}", hello=False, keepalive_interval=0.1, keepalive_count=3
        )
        c.enable_keepalive()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ConnectionClosedError, match="keepalive timeout"):
            await c.call_raw(1, 1, 1, b"", timeout=10)
        elapsed = loop.time() - start
        # interval * (count + 1) = 0.4 s, plus at most one tick of slack
        assert 0.35 <= elapsed < 2.0, elapsed
        await c.close()
    finally:
        srv.close()
        await srv.wait_closed()
        remove_tree(tmp)


async def test_server_keepalive_timeout(caplog: pytest.LogCaptureFixture) -> None:
    tmp = short_tmpdir()
    server = virnet.Server(keepalive_interval=0.1, keepalive_count=2)
    DemoService().register(server)
    uri = str(await server.listen(sock_uri(tmp)))
    try:
        reader, writer = await asyncio.open_unix_connection(uri.removeprefix("unix://"))
        hello = xdr.encode(protocol.Hello, protocol.Hello(FEATURE_KEEPALIVE, 0))
        writer.write(_packet(CONTROL_PROGRAM, 1, CONTROL_HELLO, 0, 1, 0, hello))
        pings = 0
        with caplog.at_level(logging.WARNING, "virnet"):
            async with asyncio.timeout(5):
                data = await reader.read(65536)
                while chunk := await reader.read(65536):
                    data += chunk
        writer.close()
        msgs = _impl.FrameDecoder().feed(data)
        pings = sum(1 for m in msgs if m.prog == KEEPALIVE_PROGRAM and m.proc == 1)
        assert pings == 2  # count PINGs, then the connection was closed
        assert "keepalive timeout" in caplog.text
    finally:
        await server.close()
        remove_tree(tmp)


async def test_keepalive_keeps_a_live_connection(env: Env) -> None:
    env.server.limits = env.server.limits.replace(keepalive_interval=0.05, keepalive_count=2)
    async with await virnet.connect(env.uri, keepalive_interval=0.05, keepalive_count=2) as c:
        await asyncio.sleep(0.6)  # many intervals of silence: PING/PONG keeps both alive
        assert (await c.call(ECHO, EchoArgs("", 0, 0))).n == 1


def test_protocol_error_type() -> None:
    assert issubclass(ProtocolError, virnet.VirnetError)


async def test_wait_idle_ends_when_the_last_call_does(env: Env) -> None:
    """Graceful shutdown waits for the running calls and ends with the last of them."""
    async with await virnet.connect(env.uri) as client:
        calls = [asyncio.ensure_future(client.call(BLOCK, EchoArgs("x", 0, i))) for i in range(3)]
        while env.service.running < 3:
            await asyncio.sleep(0.005)
        (conn,) = env.server.connections
        idle = asyncio.ensure_future(conn.wait_idle())
        await asyncio.sleep(0.05)
        assert not idle.done()
        env.service.gate.set()
        await asyncio.wait_for(idle, 5)
        assert conn.active == 0 and not conn.waiting
        assert [r.n for r in await asyncio.gather(*calls)] == [0, 1, 2]
