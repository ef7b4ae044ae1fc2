"""When calls and replies reach the socket: a run of them is written in batches, so the
peer starts on the first ones while the rest are made; a lone call is written at once.

Observed over real Unix sockets from the other end (a raw socket in the test), on stock
asyncio and uvloop (root conftest), with either core (ci/test.sh).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import virnet
from _rpcutil import ECHO, TEST, EchoArgs, remove_tree, short_tmpdir
from virnet import _protocol, xdr
from virnet._impl import FrameDecoder, Message, encode_message
from virnet._protocol import OUTPUT_BATCH
from virnet.constants import MessageStatus, MessageType

RUN = 64  # calls in one run, well over a batch
BATCH_PACKETS = OUTPUT_BATCH // 2  # header and payload: two buffers per packet


def _packet(msg_type: int, serial: int, args: EchoArgs) -> bytes:
    payload = xdr.encode(EchoArgs, args)
    return b"".join(
        encode_message(TEST.number, TEST.version, ECHO.number, msg_type, serial,
                       int(MessageStatus.OK), payload)
    )


def _readable(sock: socket.socket) -> bytes:
    """Everything the peer has written to ``sock`` so far (never waits)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _messages(data: bytes) -> list[Message]:
    return list(FrameDecoder(1 << 20).feed(data))


@pytest.fixture
async def workdir() -> AsyncIterator[Path]:
    path = Path(short_tmpdir())
    try:
        yield path
    finally:
        remove_tree(str(path))


async def _echo_server(workdir: Path, echo: Any) -> tuple[virnet.Server, Path]:
    """A server with ``echo`` as ECHO, listening on ``workdir/s.sock``."""
    server = virnet.Server()
    server.register(ECHO, echo)
    path = workdir / "s.sock"
    await server.listen(f"unix://{path}")
    return server, path


async def test_server_writes_the_first_replies_of_a_run_before_the_run_ends(
    workdir: Path,
) -> None:
    """64 calls arrive in one read; by the time the last one is handled, the replies to
    at least the first batch are already readable at the client."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    seen_at: dict[int, int] = {}  # call number -> replies readable when it was handled
    received = bytearray()

    async def echo(ctx: virnet.CallContext, args: EchoArgs) -> EchoArgs:
        received.extend(_readable(peer))
        seen_at[args.n] = len(_messages(bytes(received)))
        return args

    server, path = await _echo_server(workdir, echo)
    try:
        loop = asyncio.get_running_loop()
        peer.setblocking(False)
        await loop.sock_connect(peer, str(path))
        run = b"".join(
            _packet(int(MessageType.CALL), n + 1, EchoArgs("x", 0, n)) for n in range(RUN)
        )
        await loop.sock_sendall(peer, run)
        while len(_messages(bytes(received))) < RUN:
            received.extend(await loop.sock_recv(peer, 1 << 20))
        replies = _messages(bytes(received))
        assert sorted(m.serial for m in replies) == list(range(1, RUN + 1))
        assert all(m.type == int(MessageType.REPLY) for m in replies)
        assert len(seen_at) == RUN
        # Without batching nothing is written before the whole run is handled.
        assert seen_at[RUN - 1] >= BATCH_PACKETS, seen_at
    finally:
        peer.close()
        await server.close()


async def _connect_raw(path: Path) -> tuple[virnet.Client, socket.socket]:
    """A virnet client connected to a raw socket the test plays the server on."""
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
        client, (peer, _) = await asyncio.gather(
            virnet.connect(f"unix://{path}", hello=False), loop.sock_accept(listener)
        )
    finally:
        listener.close()
    peer.setblocking(False)
    return client, peer


async def test_client_writes_a_run_of_calls_in_batches(workdir: Path) -> None:
    """64 calls made in one loop turn: after half of them, all but the last partial
    batch are already in the socket (the first call on its own, then full batches)."""
    path = workdir / "raw.sock"
    client, peer = await _connect_raw(path)
    try:
        counted: list[int] = []
        buffer = bytearray()

        def probe() -> None:
            buffer.extend(_readable(peer))
            counted.append(len(_messages(bytes(buffer))))

        loop = asyncio.get_running_loop()
        half = RUN // 2
        calls = [loop.create_task(client.call(ECHO, EchoArgs("x", 0, n))) for n in range(half)]
        loop.call_soon(probe)  # runs after the first half's first steps
        calls += [
            loop.create_task(client.call(ECHO, EchoArgs("x", 0, n))) for n in range(half, RUN)
        ]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        # The first call went out alone; of the next 31, every full batch did too.
        assert counted and counted[0] >= 1 + BATCH_PACKETS * ((half - 1) // BATCH_PACKETS)
        # Answer them all; every call gets its own reply.
        while len(_messages(bytes(buffer))) < RUN:
            buffer.extend(await loop.sock_recv(peer, 1 << 20))
        answers = b"".join(
            _packet(int(MessageType.REPLY), m.serial, xdr.decode(EchoArgs, m.payload))
            for m in _messages(bytes(buffer))
        )
        await loop.sock_sendall(peer, answers)
        results = await asyncio.gather(*calls)
        assert sorted(r.n for r in results) == list(range(RUN))
    finally:
        peer.close()
        await client.close()


class _CountingLoop:
    """The real loop, counting what the connection schedules with ``call_soon``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.scheduled = 0

    def call_soon(self, *args: Any, **kwargs: Any) -> asyncio.Handle:
        self.scheduled += 1
        return self._loop.call_soon(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


async def test_a_lone_call_is_written_at_once_without_scheduling_a_flush(
    workdir: Path,
) -> None:
    """A flush scheduled only to be cancelled would still cost the loop a turn (an
    extra ``epoll_wait``) per call."""
    path = workdir / "raw.sock"
    client, peer = await _connect_raw(path)
    try:
        loop = asyncio.get_running_loop()
        counting = _CountingLoop(loop)
        client.protocol.loop = counting  # type: ignore[assignment]
        call = loop.create_task(client.call(ECHO, EchoArgs("x", 0, 7)))
        await asyncio.sleep(0)  # the call's first step: made and written
        buffer = bytearray(_readable(peer))
        assert len(_messages(bytes(buffer))) == 1
        assert counting.scheduled == 0
        (msg,) = _messages(bytes(buffer))
        await loop.sock_sendall(
            peer, _packet(int(MessageType.REPLY), msg.serial, EchoArgs("y", 0, 8))
        )
        assert (await call).n == 8
    finally:
        peer.close()
        await client.close()


async def test_lean_mode_lasts_while_calls_keep_coming_and_ends_after(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call makes the connection lean (nothing buffered in the transport); each later
    call renews the hold, and the first flush after the hold has passed goes back to the
    bulk limits.  The hold is stretched so that the loop's timing cannot decide it."""
    hold = 0.5
    monkeypatch.setattr(_protocol, "LEAN_HOLD", hold)

    async def echo(ctx: virnet.CallContext, args: EchoArgs) -> EchoArgs:
        return args

    server, path = await _echo_server(workdir, echo)
    try:
        async with await virnet.connect(f"unix://{path}") as client:
            transport = client.protocol.transport
            assert transport is not None
            bulk = transport.get_write_buffer_limits()
            assert bulk != (0, 0)
            loop = asyncio.get_running_loop()
            start = loop.time()
            while loop.time() - start < 2 * hold:  # well past one hold, calls keep coming
                await client.call(ECHO, EchoArgs("x", 0, 0))
                assert transport.get_write_buffer_limits() == (0, 0)
                await asyncio.sleep(hold / 10)
            await asyncio.sleep(hold * 1.5)
            await client.ping()  # a flush after the hold: back to bulk
            assert transport.get_write_buffer_limits() == bulk
    finally:
        await server.close()


async def test_a_stream_opened_after_a_lone_call_starts_in_bulk_mode(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call (a STAT before an upload, say) makes both ends lean for LEAN_HOLD; the
    stream opened next carries bulk data and nothing waits for a reply, so both ends
    leave lean mode at once instead of sending the stream's start in small packets.
    With another call still waiting, the client stays lean."""
    from _rpcutil import SOURCE, StreamArgs, StreamService

    monkeypatch.setattr(_protocol, "LEAN_HOLD", 30.0)  # only the open can end it here
    seen: list[tuple[int, int]] = []

    release = asyncio.Event()

    async def echo(ctx: virnet.CallContext, args: EchoArgs) -> EchoArgs:
        if args.text == "hold":
            await release.wait()
        return args

    original = virnet.CallContext.accept_stream

    def accept(ctx: virnet.CallContext, *a: Any, **kw: Any) -> Any:
        stream = original(ctx, *a, **kw)
        transport = ctx.connection.transport
        assert transport is not None
        seen.append(transport.get_write_buffer_limits())
        return stream

    monkeypatch.setattr(virnet.CallContext, "accept_stream", accept)
    server, path = await _echo_server(workdir, echo)
    StreamService().register(server)
    try:
        async with await virnet.connect(f"unix://{path}") as client:
            transport = client.protocol.transport
            assert transport is not None
            await client.call(ECHO, EchoArgs("x", 0, 0))
            assert transport.get_write_buffer_limits() == (0, 0)  # lean after the call
            st = await client.open_stream(SOURCE, StreamArgs(1000, 1, 0))
            assert transport.get_write_buffer_limits() != (0, 0)
            assert seen and seen[-1] != (0, 0)  # the server's end too
            async for _ in st:
                pass
            await st.finish()

            slow = asyncio.ensure_future(client.call(ECHO, EchoArgs("hold", 0, 0)))
            await asyncio.sleep(0.05)  # its reply is awaited while the stream opens
            st = await client.open_stream(SOURCE, StreamArgs(1000, 1, 0))
            assert transport.get_write_buffer_limits() == (0, 0)  # still lean
            release.set()
            await slow
            async for _ in st:
                pass
            await st.finish()
    finally:
        await server.close()
