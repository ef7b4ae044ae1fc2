"""Data streams over real sockets: both directions, finish, EOF, abort, holes, flow
control, fairness, bad input.  Both loops (root conftest), both cores (ci/test.sh)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import virnet
from _rpcutil import (
    ECHO,
    ECHO_STREAM,
    MODE_FAIL_EARLY,
    MODE_FAIL_MIDWAY,
    MODE_HOLES,
    MODE_NORMAL,
    MODE_STALL,
    SINK,
    SOURCE,
    SPARSE_SINK,
    TEST,
    DemoService,
    EchoArgs,
    StreamArgs,
    StreamService,
    pattern,
    remove_tree,
    short_tmpdir,
    sock_uri,
)
from virnet import _impl, _protocol, protocol, xdr
from virnet.constants import STREAM_CHUNK
from virnet.errors import ErrorCode, RPCError, StreamError
from virnet.stream import Hole, StreamEvent, StreamState


class Env:
    def __init__(self, server: virnet.Server, streams: StreamService, uri: str) -> None:
        self.server = server
        self.streams = streams
        self.uri = uri


def _transport(proto: Any) -> asyncio.Transport:
    transport: asyncio.Transport | None = proto.transport
    assert transport is not None, "the connection is closed"
    return transport


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    tmp = short_tmpdir()
    server = virnet.Server(window=1024 * 1024)
    DemoService().register(server)
    streams = StreamService()
    streams.register(server)
    uri = str(await server.listen(sock_uri(tmp)))
    try:
        yield Env(server, streams, uri)
    finally:
        await server.close(grace=1)
        remove_tree(tmp)


async def test_upload(env: Env) -> None:
    data = pattern(3_000_000, 1)
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SINK, StreamArgs(len(data), 1, MODE_NORMAL))
        assert st.reply.size == len(data)
        await st.send(data)
        await st.finish()
        assert st.state is StreamState.FINISHED
        assert st.bytes_sent == len(data)
    assert env.streams.received[1] == data


async def test_upload_mutable_buffer_is_copied(env: Env) -> None:
    data = bytearray(pattern(1_000_000, 2))
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SINK, StreamArgs(len(data), 2, MODE_NORMAL))
        await st.send(data)
        expected = bytes(data)
        data[:] = bytes(len(data))  # reuse after send() returned
        await st.finish()
    assert env.streams.received[2] == expected


async def test_download_and_eof(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SOURCE, StreamArgs(2_500_000, 3, MODE_NORMAL))
        got = bytearray()
        assert await st.recv_all(got.extend) == 2_500_000
        assert st.at_eof
        assert await st.recv() == b""  # EOF again
        await st.finish()
    assert bytes(got) == pattern(2_500_000, 3)


async def test_download_recv_sizes(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SOURCE, StreamArgs(100_000, 4, MODE_NORMAL))
        parts = []
        while chunk := await st.recv(777):
            assert len(chunk) <= 777
            parts.append(chunk)
        await st.finish()
    assert b"".join(parts) == pattern(100_000, 4)


async def test_packets_never_exceed_262120(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SOURCE, StreamArgs(2 * STREAM_CHUNK + 5, 5, MODE_NORMAL))
        sizes = []
        async for chunk in st:
            assert isinstance(chunk, memoryview)
            sizes.append(len(chunk))
        await st.finish()
    assert max(sizes) == STREAM_CHUNK
    assert sum(sizes) == 2 * STREAM_CHUNK + 5


async def test_two_way_stream(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(ECHO_STREAM, StreamArgs(0, 0, 0))
        for i in range(20):
            msg = f"line {i}\n".encode() * (i + 1)
            await st.send(msg)
            got = b""
            while len(got) < len(msg):
                got += await st.recv()
            assert got == msg
        await st.finish()
        assert st.state is StreamState.FINISHED


async def test_call_that_fails_leaves_no_stream(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(RPCError, match="refused before the stream") as info:
            await c.open_stream(SINK, StreamArgs(0, 6, MODE_FAIL_EARLY))
        assert not isinstance(info.value, StreamError)
        assert c.protocol.streams == {}
        assert (await c.call(ECHO, EchoArgs("", 0, 1))).n == 2


async def test_server_error_midway_upload(env: Env) -> None:
    data = pattern(2_000_000, 7)
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SINK, StreamArgs(len(data), 7, MODE_FAIL_MIDWAY))
        with pytest.raises(StreamError, match="sink failed midway") as info:
            await st.send(data)
            await st.finish()
        assert info.value.int1 == 5
        assert st.state is StreamState.FAILED
        with pytest.raises(StreamError):  # every later operation raises it
            await st.send(b"more")
        assert (await c.call(ECHO, EchoArgs("", 0, 1))).n == 2


async def test_server_error_midway_download(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SOURCE, StreamArgs(2_000_000, 8, MODE_FAIL_MIDWAY))
        got = 0
        with pytest.raises(StreamError, match="source failed midway"):
            async for chunk in st:
                got += len(chunk)  # type: ignore[arg-type]
        assert got == 1_000_000  # data before the error was delivered
        with pytest.raises(StreamError):
            await st.finish()


async def test_client_abort_mid_upload(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SINK, StreamArgs(10_000_000, 9, MODE_NORMAL))
        await st.send(pattern(1_000_000, 9))
        await st.abort("changed my mind")
        assert st.state is StreamState.ABORTED
        with pytest.raises(StreamError):
            await st.send(b"x")
        for _ in range(100):
            if env.streams.results.get(9):
                break
            await asyncio.sleep(0.01)
        assert "aborted by the client" in env.streams.results[9]
        assert (await c.call(ECHO, EchoArgs("", 0, 1))).n == 2
        assert not env.server.connections.copy().pop().open_streams


async def test_client_abort_mid_download(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SOURCE, StreamArgs(50_000_000, 10, MODE_NORMAL))
        await st.recv()
        await st.abort()
        assert st.state is StreamState.ABORTED
        # late packets of the aborted stream are dropped; the connection is fine
        for i in range(10):
            assert (await c.call(ECHO, EchoArgs("", 0, i))).n == i + 1


async def test_context_manager_aborts_without_finish(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        async with await c.open_stream(SINK, StreamArgs(0, 11, MODE_NORMAL)) as st:
            await st.send(b"partial")
        assert st.state is StreamState.ABORTED
        async with await c.open_stream(SINK, StreamArgs(0, 12, MODE_NORMAL)) as st2:
            await st2.send(b"complete")
            await st2.finish()
        assert st2.state is StreamState.FINISHED
    assert env.streams.received[12] == b"complete"
    assert 11 not in env.streams.received


async def test_sparse_download_and_upload(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SOURCE, StreamArgs(200_000, 13, MODE_HOLES), sparse=True)
        items = [bytes(i) if isinstance(i, memoryview) else i async for i in st]
        await st.finish()
        assert Hole(1 << 20) in items
        assert b"".join(i for i in items if isinstance(i, bytes)) == pattern(200_000, 13)

        up = await c.open_stream(SPARSE_SINK, StreamArgs(0, 14, 0), sparse=True)
        await up.send(b"head")
        await up.send_hole(4096)
        await up.send(b"tail")
        await up.finish()
    assert env.streams.sparse_log[14] == [b"head", Hole(4096), b"tail"]


async def test_hole_reads_as_zeros_with_recv(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SOURCE, StreamArgs(8, 15, MODE_HOLES), sparse=True)
        out = b""
        while chunk := await st.recv(300_000):
            out += chunk
        await st.finish()
    assert out == pattern(8, 15)[:4] + bytes(1 << 20) + pattern(8, 15)[4:]


async def test_hole_on_non_sparse_stream_is_a_stream_error(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SINK, StreamArgs(0, 16, MODE_NORMAL))
        with pytest.raises(StreamError, match="sparse"):
            await st.send_hole(100)
        # force one onto the wire: the server must fail the stream, not the connection
        payload = xdr.encode(protocol.StreamHole, protocol.StreamHole(100, 0))
        c.protocol.queue_urgent(_impl.encode_message(*st.key[:3], 6, st.serial, 2, payload))
        with pytest.raises(StreamError, match="Unexpected stream hole"):
            await st.finish()
        assert (await c.call(ECHO, EchoArgs("", 0, 1))).n == 2


async def test_flow_control_stalled_reader_blocks_nothing_else(env: Env) -> None:
    """A stream whose reader stops holds one window; calls and other streams go on."""
    async with await virnet.connect(env.uri, window=1024 * 1024) as c:
        stalled = await c.open_stream(SINK, StreamArgs(0, 17, MODE_STALL))
        writer = asyncio.ensure_future(stalled.send(bytes(50_000_000)))
        await asyncio.sleep(0.2)
        assert not writer.done()  # blocked on credit...
        assert stalled.bytes_sent <= env.server.limits.window  # ...after one window
        for i in range(50):
            assert (await c.call(ECHO, EchoArgs("", 0, i), timeout=5)).n == i + 1
        other = await c.open_stream(SOURCE, StreamArgs(5_000_000, 18, MODE_NORMAL))
        got = bytearray()
        await asyncio.wait_for(other.recv_all(got.extend), 20)
        await other.finish()
        assert bytes(got) == pattern(5_000_000, 18)
        writer.cancel()
        await stalled.abort()


async def test_sixteen_streams_and_1000_calls(env: Env) -> None:
    env.server.limits = env.server.limits.replace(max_calls=256)
    size = 1_000_000
    async with await virnet.connect(env.uri) as c:

        async def upload(seed: int) -> None:
            st = await c.open_stream(SINK, StreamArgs(size, seed, MODE_NORMAL))
            await st.send(pattern(size, seed))
            await st.finish()

        async def download(seed: int) -> bytes:
            st = await c.open_stream(SOURCE, StreamArgs(size, seed, MODE_NORMAL))
            buf = bytearray()
            await st.recv_all(buf.extend)
            await st.finish()
            return bytes(buf)

        async def calls() -> list[int]:
            res = await asyncio.gather(*(c.call(ECHO, EchoArgs("c", 0, i)) for i in range(1000)))
            return [r.n for r in res]

        results = await asyncio.gather(
            *(upload(100 + i) for i in range(8)),
            *(download(200 + i) for i in range(8)),
            calls(),
        )
    downloads = results[8:16]
    for i, data in enumerate(downloads):
        assert isinstance(data, bytes)
        assert hashlib.sha256(data).digest() == hashlib.sha256(pattern(size, 200 + i)).digest()
    for i in range(8):
        assert env.streams.received[100 + i] == pattern(size, 100 + i)
    assert results[16] == list(range(1, 1001))


async def test_fair_interleaving(env: Env) -> None:
    """Two concurrent downloads progress together, packet by packet."""
    async with await virnet.connect(env.uri) as c:
        a = await c.open_stream(SOURCE, StreamArgs(8_000_000, 19, MODE_NORMAL))
        b = await c.open_stream(SOURCE, StreamArgs(8_000_000, 20, MODE_NORMAL))
        order: list[str] = []

        async def drain(name: str, st: virnet.Stream) -> None:
            async for _ in st:
                order.append(name)  # noqa: PERF401 - arrival order matters
            await st.finish()

        await asyncio.gather(drain("a", a), drain("b", b))
    first_half = order[: len(order) // 2]
    assert first_half.count("a") > len(first_half) // 4
    assert first_half.count("b") > len(first_half) // 4


async def test_nonblocking_api_and_callbacks(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SOURCE, StreamArgs(600_000, 21, MODE_NORMAL))
        got = bytearray()
        done = asyncio.get_running_loop().create_future()
        seen: set[StreamEvent] = set()

        def on_event(stream: virnet.Stream, events: StreamEvent) -> None:
            seen.add(events)
            while True:
                try:
                    chunk = stream.try_recv(100_000)
                except BlockingIOError:
                    return
                if not chunk:
                    stream.remove_event_callback()
                    done.set_result(None)
                    return
                got.extend(chunk)

        st.add_event_callback(StreamEvent.READABLE | StreamEvent.HANGUP, on_event)
        with pytest.raises(StreamError, match="multiple"):
            st.add_event_callback(StreamEvent.READABLE, on_event)
        await asyncio.wait_for(done, 10)
        await st.finish()
        assert bytes(got) == pattern(600_000, 21)
        assert any(e & StreamEvent.READABLE for e in seen)

        up = await c.open_stream(SINK, StreamArgs(0, 22, MODE_NORMAL))
        writable = asyncio.Event()
        up.add_event_callback(StreamEvent.WRITABLE, lambda s, e: writable.set())
        await asyncio.wait_for(writable.wait(), 5)
        assert up.try_send(b"abc") == 3
        with pytest.raises(BlockingIOError):
            while True:
                up.try_send(bytes(1_000_000))
        up.remove_event_callback()
        await up.abort()
        empty = await c.open_stream(SOURCE, StreamArgs(0, 23, MODE_NORMAL))
        await asyncio.sleep(0.05)
        assert empty.try_recv() == b""
        await empty.finish()


async def test_connection_lost_mid_stream_fails_promptly(env: Env) -> None:
    c = await virnet.connect(env.uri)
    st = await c.open_stream(SOURCE, StreamArgs(100_000_000, 24, MODE_NORMAL))
    await st.recv()
    for conn in list(env.server.connections):
        assert conn.transport is not None
        conn.transport.abort()
    with pytest.raises(StreamError, match="connection lost") as info:
        async with asyncio.timeout(5):
            async for _ in st:
                pass
    assert str(info.value).count("connection lost") == 1, info.value
    await c.close()


async def test_server_sees_client_vanish(env: Env) -> None:
    c = await virnet.connect(env.uri)
    st = await c.open_stream(SINK, StreamArgs(0, 25, MODE_NORMAL))
    await st.send(b"x" * 1000)
    await asyncio.sleep(0.05)
    c.protocol.transport.abort()  # type: ignore[union-attr]
    for _ in range(200):
        if 25 in env.streams.results:
            break
        await asyncio.sleep(0.01)
    assert "connection lost" in env.streams.results[25]


async def test_bad_stream_input(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    async with await virnet.connect(env.uri) as c:
        proto = c.protocol
        # data for an unknown stream: dropped silently
        proto.queue_urgent(_impl.encode_stream_data(TEST.number, 1, SINK.number, 9999, b"zz"))
        # a finish (STREAM+OK) that answers nothing on the server: no stream, dropped
        proto.queue_urgent(_impl.encode_message(TEST.number, 1, SINK.number, 3, 9998, 0))
        assert (await c.call(ECHO, EchoArgs("", 0, 1))).n == 2

    # a STREAM+OK the client never asked for is a protocol violation on the client
    async def rogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        (call,) = _impl.FrameDecoder().feed(data)
        writer.write(_impl.wire.join(_impl.encode_message(call.prog, call.vers, call.proc, 1,
                                                          call.serial, 0, bytes(8))))
        writer.write(_impl.wire.join(_impl.encode_message(call.prog, call.vers, call.proc, 3,
                                                     call.serial, 0)))
        await writer.drain()
        await reader.read(65536)
        writer.close()

    tmp = short_tmpdir()
    srv = await asyncio.start_unix_server(rogue, f"{tmp}/r.sock")
    try:
        c2 = await virnet.connect(f"unix://{tmp}/r.sock", hello=False)
        st = await c2.open_stream(SOURCE, StreamArgs(10, 1, 0))
        with pytest.raises(StreamError, match="answers nothing"):
            await asyncio.wait_for(st.recv(), 5)
        await c2.close()
    finally:
        srv.close()
        await srv.wait_closed()
        remove_tree(tmp)


async def test_oversize_stream_packet_closes_connection(env: Env) -> None:
    tmp = short_tmpdir()
    server = virnet.Server(max_message=1 << 20)
    StreamService().register(server)
    uri = str(await server.listen(sock_uri(tmp)))
    try:
        async with await virnet.connect(uri) as c:
            st = await c.open_stream(SINK, StreamArgs(0, 1, 0))
            big = bytes(2 << 20)
            c.protocol.queue_urgent(_impl.encode_message(*st.key[:3], 3, st.serial, 2, big))
            with pytest.raises(StreamError):
                await asyncio.wait_for(st.finish(), 5)
    finally:
        await server.close()
        remove_tree(tmp)


async def test_peer_exceeding_window_fails_stream(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SINK, StreamArgs(0, 26, MODE_STALL))
        # bypass our own credit accounting: 3 windows of raw packets
        for _ in range(12):
            c.protocol.queue_urgent(
                _impl.encode_stream_data(*st.key[:3], st.serial, bytes(STREAM_CHUNK))
            )
        with pytest.raises(StreamError, match="flow-control window"):
            await asyncio.wait_for(st.finish(), 5)
        assert (await c.call(ECHO, EchoArgs("", 0, 1))).n == 2


async def test_max_streams_per_client(env: Env) -> None:
    env.server.limits = env.server.limits.replace(max_streams=2)
    async with await virnet.connect(env.uri) as c:
        s1 = await c.open_stream(SINK, StreamArgs(0, 27, MODE_NORMAL))
        s2 = await c.open_stream(SINK, StreamArgs(0, 28, MODE_NORMAL))
        with pytest.raises(RPCError, match="too many streams") as info:
            await c.open_stream(SINK, StreamArgs(0, 29, MODE_NORMAL))
        assert info.value.code == ErrorCode.OPERATION_FAILED
        await s1.finish()
        await s2.finish()
        s3 = await c.open_stream(SINK, StreamArgs(0, 30, MODE_NORMAL))
        await s3.finish()


async def test_server_shutdown_ends_streams_with_error(env: Env) -> None:
    c = await virnet.connect(env.uri)
    st = await c.open_stream(SINK, StreamArgs(0, 31, MODE_STALL))
    closing = asyncio.ensure_future(env.server.close(grace=0.5))
    with pytest.raises(StreamError, match=r"shutting down|connection lost"):
        await asyncio.wait_for(st.finish(), 10)
    await closing
    await c.close()


def test_stream_hole_payload_layout() -> None:
    payload = xdr.encode(protocol.StreamHole, protocol.StreamHole(5, 0))
    assert payload == struct.pack(">qI", 5, 0)


async def test_logs_quiet_on_normal_use(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(1000, 32, MODE_NORMAL))
            await st.recv_all(lambda b: None)
            await st.finish()
    assert not [r for r in caplog.records if r.name.startswith("virnet")]


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _offer(total: int, block: bytes) -> Iterator[bytes]:
    for _ in range(total // len(block)):
        yield block  # the same object again and again: offering costs no memory


@pytest.mark.parametrize("hello", [True, False], ids=["native", "legacy"])
async def test_memory_bounded_with_stalled_reader(env: Env, hello: bool) -> None:
    """4 GiB offered to a reader that stops: RSS grows < 64 MiB (native: credit stops the
    sender; legacy: the server stops reading the socket, libvirt's only lever)."""
    block = bytes(1024 * 1024)
    async with await virnet.connect(env.uri, hello=hello) as c:
        assert (c.mode is virnet.Mode.NATIVE) == hello  # without HELLO: libvirt's rules
        st = await c.open_stream(SINK, StreamArgs(0, 40, MODE_STALL))
        before = _rss()
        sender = asyncio.ensure_future(st.send_all(_offer(4 * 1024**3, block)))
        await asyncio.sleep(1.5)
        assert not sender.done()  # blocked, not buffering without bound
        grown = _rss() - before
        assert grown < 64 * 1024 * 1024, grown
        assert st.bytes_sent < 64 * 1024 * 1024
        if hello:  # calls and other streams are unaffected in native mode
            assert (await c.call(ECHO, EchoArgs("", 0, 1), timeout=5)).n == 2
        sender.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sender


async def test_connection_memory_budget() -> None:
    """Past the connection-wide budget no stream gets more credit; reading resumes it."""
    tmp = short_tmpdir()
    server = virnet.Server(window=1024 * 1024)
    streams = StreamService()
    streams.register(server)
    uri = str(await server.listen(sock_uri(tmp)))
    try:
        async with await virnet.connect(uri, window=1024 * 1024, rx_budget=1024 * 1024) as c:
            a = await c.open_stream(SOURCE, StreamArgs(8_000_000, 50, MODE_NORMAL))
            b = await c.open_stream(SOURCE, StreamArgs(8_000_000, 51, MODE_NORMAL))
            await asyncio.sleep(0.3)  # nobody reads: each stream fills its window
            assert c.protocol.rx_buffered == a.buffered + b.buffered > 1024 * 1024
            for _ in range(3):  # a's reader consumes, but b's unread data keeps the
                await a.recv_chunk()  # connection over budget: a's credit is held back
            received = a.bytes_received
            await asyncio.sleep(0.3)
            assert a._core in c.protocol.deferred_grants
            assert a.bytes_received == received
            total = {}
            for name, st in (("b", b), ("a", a)):  # reading b releases a's credit
                buf = bytearray()
                await asyncio.wait_for(st.recv_all(buf.extend), 20)
                await st.finish()
                total[name] = len(buf)
            assert total == {"a": 8_000_000 - 3 * STREAM_CHUNK, "b": 8_000_000}
            assert c.protocol.rx_buffered == 0
    finally:
        await server.close()
        remove_tree(tmp)


async def test_download_data_before_the_reply_is_kept() -> None:
    """A server may queue a download's first packets ahead of its reply (libvirt's
    daemon can): the client registered the stream before calling, so nothing is lost."""

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = _impl.FrameDecoder()
        calls: list[_impl.Message] = []
        while not calls:
            calls = dec.feed(await reader.read(65536))
        call = calls[0]
        key = (call.prog, call.vers, call.proc)
        writer.write(_impl.wire.join(_impl.encode_stream_data(*key, call.serial, b"early ")))
        writer.write(_impl.wire.join(_impl.encode_stream_data(*key, call.serial, b"bird")))
        writer.write(_impl.wire.join(_impl.encode_stream_data(*key, call.serial, b"")))
        writer.write(_impl.wire.join(_impl.encode_message(*key, 1, call.serial, 0, bytes(8))))
        while not (msgs := dec.feed(await reader.read(65536))):
            pass
        assert (msgs[0].type, msgs[0].status) == (3, 0)  # the client's finish
        writer.write(_impl.wire.join(_impl.encode_message(*key, 3, call.serial, 0)))
        await writer.drain()
        await reader.read(65536)
        writer.close()

    tmp = short_tmpdir()
    srv = await asyncio.start_unix_server(early, f"{tmp}/e.sock")
    try:
        async with await virnet.connect(f"unix://{tmp}/e.sock", hello=False) as c:
            st = await c.open_stream(SOURCE, StreamArgs(10, 1, 0))
            got = bytearray()
            await asyncio.wait_for(st.recv_all(got.extend), 5)
            await asyncio.wait_for(st.finish(), 5)
        assert bytes(got) == b"early bird"
    finally:
        srv.close()
        await srv.wait_closed()
        remove_tree(tmp)


# ---------------------------------------------------------------- calls beside bulk data


def _limits(proto: object) -> tuple[int, int]:
    transport = proto.transport  # type: ignore[attr-defined]
    assert transport is not None
    low, high = transport.get_write_buffer_limits()
    return low, high


BULK_LIMITS = (_protocol.WRITE_LOW_WATER, _protocol.WRITE_HIGH_WATER)
LEAN_LIMITS = (_protocol.LEAN_LOW_WATER, _protocol.LEAN_HIGH_WATER)


def _sndbuf(proto: object) -> int:
    """The kernel send buffer of the connection's Unix socket, as SO_SNDBUF reads back."""
    transport = proto.transport  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    assert sock.family == socket.AF_UNIX
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))


async def test_calls_make_both_ends_lean(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a call each end keeps almost no stream data in flight: nothing buffered in
    the transport, packets of at most LEAN_PACKET_LIMIT.  Setting up a connection or a
    stream does not count as a call."""
    monkeypatch.setattr(_protocol, "LEAN_HOLD", 60.0)
    async with await virnet.connect(env.uri) as c:
        (conn,) = env.server.connections
        bulk_sndbuf = (_sndbuf(c.protocol), _sndbuf(conn))
        # Linux's default (net.core.wmem_default) is 208 KiB; never grown by lean mode.
        lean = tuple(min(_protocol.LEAN_SOCKET_BUFFER, size) for size in bulk_sndbuf)
        bulk = await c.open_stream(SOURCE, StreamArgs(STREAM_CHUNK + 1, 30, MODE_NORMAL))
        assert _limits(c.protocol) == BULK_LIMITS
        assert _limits(conn) == BULK_LIMITS
        assert (_sndbuf(c.protocol), _sndbuf(conn)) == bulk_sndbuf
        assert await bulk.recv_all(bytearray().extend) == STREAM_CHUNK + 1
        await bulk.finish()

        assert (await c.call(ECHO, EchoArgs("abc", 0, 1))).n == 2
        assert _limits(c.protocol) == LEAN_LIMITS
        assert _limits(conn) == LEAN_LIMITS
        assert (_sndbuf(c.protocol), _sndbuf(conn)) == lean
        size = 3 * STREAM_CHUNK + 7
        # A call still waits while the streams run: they stay lean.  (With none waiting,
        # opening a stream leaves lean mode: test_call_batching.)
        slow = asyncio.ensure_future(c.call(ECHO, EchoArgs("abc", 1500, 1)))
        await asyncio.sleep(0.05)
        down = await c.open_stream(SOURCE, StreamArgs(size, 31, MODE_NORMAL))
        assert _limits(c.protocol) == LEAN_LIMITS
        sizes = []
        got = bytearray()
        async for chunk in down:
            assert not isinstance(chunk, virnet.Hole)
            sizes.append(len(chunk))
            got += chunk
        await down.finish()
        up = await c.open_stream(SINK, StreamArgs(size, 32, MODE_NORMAL))
        await up.send(pattern(size, 32))
        await up.finish()
        assert not slow.done()  # the streams really ran beside a waiting call
        assert (await slow).n == 2
    assert bytes(got) == pattern(size, 31)
    assert max(sizes) == _protocol.LEAN_PACKET_LIMIT
    assert env.streams.received[32] == pattern(size, 32)
    server_stream = env.streams.streams[-1]
    assert server_stream.bytes_received == size


async def test_lean_mode_ends_after_the_hold(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_protocol, "LEAN_HOLD", 0.0)
    async with await virnet.connect(env.uri) as c:
        (conn,) = env.server.connections
        bulk_sndbuf = (_sndbuf(c.protocol), _sndbuf(conn))
        await c.call(ECHO, EchoArgs("abc", 0, 1))  # lean until its own flush, no longer
        assert _limits(c.protocol) == BULK_LIMITS
        assert _limits(conn) == BULK_LIMITS
        assert (_sndbuf(c.protocol), _sndbuf(conn)) == bulk_sndbuf
        st = await c.open_stream(SOURCE, StreamArgs(2 * STREAM_CHUNK, 33, MODE_NORMAL))
        sizes = [len(chunk) async for chunk in st if not isinstance(chunk, virnet.Hole)]
        await st.finish()
    assert max(sizes) == STREAM_CHUNK


async def test_lean_mode_leaves_tcp_buffers_alone() -> None:
    """Setting SO_SNDBUF on TCP would end the kernel's autotuning for good: lean mode
    changes only the transport limits there, and a stream still moves every byte."""
    server = virnet.Server()
    DemoService().register(server)
    StreamService().register(server)
    uri = str(await server.listen("tcp://127.0.0.1:0"))
    try:
        async with await virnet.connect(uri) as c:
            (conn,) = server.connections
            socks = [_transport(p).get_extra_info("socket") for p in (c.protocol, conn)]
            before = [s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) for s in socks]
            assert (await c.call(ECHO, EchoArgs("abc", 0, 1))).n == 2
            assert _limits(c.protocol) == LEAN_LIMITS
            assert _limits(conn) == LEAN_LIMITS
            st = await c.open_stream(SOURCE, StreamArgs(STREAM_CHUNK + 5, 35, MODE_NORMAL))
            got = bytearray()
            await st.recv_all(got.extend)
            await st.finish()
            assert bytes(got) == pattern(STREAM_CHUNK + 5, 35)
            after = [s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) for s in socks]
            # Autotuning may have grown them meanwhile; lean mode never set them.
            assert all(a >= b for a, b in zip(after, before, strict=True))
            assert all(a != _protocol.LEAN_SOCKET_BUFFER for a in after)
    finally:
        await server.close(grace=1)


async def test_calls_beside_a_saturating_download(env: Env) -> None:
    """Calls keep completing while one download runs flat out on the same connection;
    every byte arrives and reading is never left paused afterwards."""
    size = 48 * 1024 * 1024
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(SOURCE, StreamArgs(size, 34, MODE_NORMAL))
        digest = hashlib.sha256()
        total = 0

        async def consume() -> None:
            nonlocal total
            async for chunk in st:
                assert not isinstance(chunk, virnet.Hole)
                digest.update(chunk)
                total += len(chunk)
            await st.finish()

        reader = asyncio.create_task(consume())
        n = 0
        while not reader.done():
            reply = await c.call(ECHO, EchoArgs("beside", 0, n))
            assert reply.n == n + 1
            n += 1
        await reader
        assert total == size
        assert digest.digest() == hashlib.sha256(pattern(size, 34)).digest()
        assert n > 0
        proto = c.protocol
        assert not proto._read_pausers and not proto._reading_paused
        assert (await c.call(ECHO, EchoArgs("after", 0, 7))).n == 8


async def _stream_whose_server_stopped_reading(env: Env, c: virnet.Client) -> virnet.Stream:
    """An upload stream whose server end no longer reads the socket: an abort is sent
    but never confirmed."""
    st = await c.open_stream(SINK, StreamArgs(10_000_000, 31, MODE_NORMAL))
    await st.send(b"x" * 1000)
    (conn,) = env.server.connections
    assert conn.transport is not None
    conn.transport.pause_reading()
    return st


async def test_abort_waits_at_most_its_timeout(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        st = await _stream_whose_server_stopped_reading(env, c)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await st.abort(timeout=0.2)
        assert 0.15 < loop.time() - start < 5
        assert st.state is StreamState.ABORTED


async def test_cancelling_a_task_inside_abort_cancels_it(env: Env) -> None:
    """abort() never swallows a cancellation: the task ends cancelled, and the stream is
    aborted locally all the same."""
    async with await virnet.connect(env.uri) as c:
        st = await _stream_whose_server_stopped_reading(env, c)
        after_abort: list[str] = []

        async def aborter() -> None:
            await st.abort(timeout=None)
            after_abort.append("carried on")  # must never run

        task = asyncio.ensure_future(aborter())
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled() and after_abort == []
        assert st.state is StreamState.ABORTED
