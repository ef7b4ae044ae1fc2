"""Direct runs (``Stream.recv_into``): stream data spliced from the socket into a file
descriptor by a worker thread, over real sockets.  What must hold: the bytes arrive
whole and in order (queued data first), everything else on the connection (calls,
replies, EOF, holes, other streams) is still handled the ordinary way, a failing target
or a cancelled reader costs the stream and never the connection, and no thread or
descriptor outlives its run.  Both loops (root conftest), both cores (ci/test.sh)."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator

import pytest

import virnet
from _rpcutil import (
    ECHO,
    MODE_HOLES,
    MODE_NORMAL,
    SINK,
    SOURCE,
    DemoService,
    EchoArgs,
    StreamArgs,
    StreamResult,
    StreamService,
    pattern,
    remove_tree,
    short_tmpdir,
    sock_uri,
)
from virnet import _direct, _receive, _streams
from virnet._fileio import BatchWriter, SequentialWriter
from virnet.errors import StreamError
from virnet.stream import Hole, Stream

MiB = 1024 * 1024


class Env:
    def __init__(self, server: virnet.Server, streams: StreamService, uri: str, tmp: str):
        self.server = server
        self.streams = streams
        self.uri = uri
        self.tmp = tmp

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    tmp = short_tmpdir()
    server = virnet.Server(window=1024 * 1024)
    DemoService().register(server)
    streams = StreamService()
    streams.register(server)
    uri = str(await server.listen(sock_uri(tmp)))
    try:
        yield Env(server, streams, uri, tmp)
    finally:
        await server.close(grace=1)
        remove_tree(tmp)
    # every run's thread is gone once its connection is
    for _ in range(200):
        if not run_threads():
            break
        await asyncio.sleep(0.01)
    assert not run_threads()


def run_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == _direct.THREAD_NAME]


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


async def receive_all(stream: Stream, fd: int, offset: int | None = 0) -> int:
    """``recv_into`` until EOF, the ordinary way in between; the bytes covered."""
    done = 0
    while True:
        n = await stream.recv_into(fd, None if offset is None else offset + done)
        if n:
            done += n
            continue
        item = await stream.recv_chunk()
        if isinstance(item, Hole):
            raise AssertionError("no holes expected")
        if not item:
            return done
        if offset is None:
            os.write(fd, item)
        else:
            os.pwrite(fd, item, offset + done)
        done += len(item)


async def test_download_goes_through_direct_runs(env: Env) -> None:
    data = pattern(16 * MiB + 12345, 1)
    target = env.path("out.bin")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(len(data), 1, MODE_NORMAL))
            assert st.can_recv_directly
            assert await receive_all(st, fd) == len(data)
            await st.finish()
            direct = c.protocol.direct
            assert direct.runs >= 1
            assert direct.bytes >= len(data) // 2  # most of it, not a packet or two
            assert st.bytes_received == len(data)
    finally:
        os.close(fd)
    assert read(target) == data


async def test_queued_data_goes_first_into_a_pipe(env: Env) -> None:
    """Data already queued when the run starts reaches a sequential target before the
    data the run splices (a pipe has no offsets to sort it out later)."""
    data = pattern(6 * MiB, 2)
    r, w = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 20):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(len(data), 2, MODE_NORMAL))
            for _ in range(500):
                if st.buffered >= 512 * 1024:
                    break
                await asyncio.sleep(0.01)
            assert st.buffered > 0
            assert await receive_all(st, w, None) == len(data)
            await st.finish()
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    assert bytes(got) == data


async def test_calls_on_the_connection_are_answered_during_a_run(env: Env) -> None:
    data = pattern(24 * MiB, 3)
    target = env.path("out.bin")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(len(data), 3, MODE_NORMAL))
            download = asyncio.ensure_future(receive_all(st, fd))
            for i in range(50):
                reply = await asyncio.wait_for(c.call(ECHO, EchoArgs(f"x{i}", 0, i)), 10)
                assert (reply.text, reply.n) == (f"x{i}"[::-1], i + 1)
            assert await asyncio.wait_for(download, 60) == len(data)
            await st.finish()
    finally:
        os.close(fd)
    assert read(target) == data


async def test_two_streams_on_one_connection(env: Env) -> None:
    """One socket, one reader: the second stream's data ends the first one's run and
    goes the ordinary way; both arrive whole."""
    sizes = (9 * MiB + 5000, 7 * MiB + 333)
    paths = [env.path(f"out{i}.bin") for i in range(2)]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for p in paths]
    try:
        async with await virnet.connect(env.uri) as c:
            streams = [
                await c.open_stream(SOURCE, StreamArgs(n, 10 + i, MODE_NORMAL))
                for i, n in enumerate(sizes)
            ]
            jobs = (receive_all(s, fd) for s, fd in zip(streams, fds, strict=True))
            done = await asyncio.gather(*jobs)
            assert done == list(sizes)
            for s in streams:
                await s.finish()
    finally:
        for fd in fds:
            os.close(fd)
    for i, (p, n) in enumerate(zip(paths, sizes, strict=True)):
        assert read(p) == pattern(n, 10 + i)


async def test_a_failing_target_costs_the_stream_not_the_connection(env: Env) -> None:
    r, w = os.pipe()
    os.close(r)  # writes fail with EPIPE
    try:
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(8 * MiB, 4, MODE_NORMAL))
            with pytest.raises(OSError) as info:
                while True:
                    if not await st.recv_into(w):
                        item = await st.recv_chunk()
                        assert not isinstance(item, Hole) and item, "EOF before the failure"
                        os.write(w, item)
            assert info.value.errno == errno.EPIPE
            await st.abort()
            reply = await asyncio.wait_for(c.call(ECHO, EchoArgs("after", 0, 1)), 10)
            assert reply.text == "retfa"
    finally:
        os.close(w)


async def test_cancelled_reader_then_abort_leaves_the_connection_usable(env: Env) -> None:
    target = env.path("out.bin")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(64 * MiB, 5, MODE_NORMAL))
            task = asyncio.ensure_future(receive_all(st, fd))
            for _ in range(500):
                if c.protocol.direct.bytes >= 2 * MiB:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await st.abort()
            reply = await asyncio.wait_for(c.call(ECHO, EchoArgs("still", 0, 2)), 10)
            assert reply.text == "llits"
            # the connection carries a new stream as before
            again = await c.open_stream(SOURCE, StreamArgs(MiB, 6, MODE_NORMAL))
            assert await again.recv_all(bytearray().extend) == MiB
            await again.finish()
    finally:
        os.close(fd)


async def test_connection_lost_during_a_run(env: Env) -> None:
    target = env.path("out.bin")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        c = await virnet.connect(env.uri)
        try:
            st = await c.open_stream(SOURCE, StreamArgs(256 * MiB, 7, MODE_NORMAL))
            task = asyncio.ensure_future(receive_all(st, fd))
            for _ in range(500):
                if c.protocol.direct.bytes >= MiB:
                    break
                await asyncio.sleep(0.01)
            for conn in list(env.server.connections):
                assert conn.transport is not None
                conn.transport.abort()
            with pytest.raises(StreamError) as info:
                await asyncio.wait_for(task, 10)
            # one clear reason, said once (not "connection lost: connection lost: ...")
            message = str(info.value)
            assert message.startswith("connection lost: "), message
            assert message.count("connection lost") == 1, message
            with pytest.raises(virnet.errors.ConnectionClosedError) as call_info:
                await c.call(ECHO, EchoArgs("gone", 0, 1))
            assert str(call_info.value).count("connection lost") <= 1, call_info.value
        finally:
            await c.close()
    finally:
        os.close(fd)


async def test_limit_bounds_a_run(env: Env) -> None:
    data = pattern(4 * MiB, 8)
    target = env.path("out.bin")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(len(data), 8, MODE_NORMAL))
            n = await st.recv_into(fd, 0, limit=MiB)
            assert 0 < n <= MiB
            assert await receive_all(st, fd, n) == len(data) - n
            await st.finish()
    finally:
        os.close(fd)
    assert read(target) == data


async def test_a_target_that_refuses_splice_is_written_by_copy(env: Env) -> None:
    """splice(2) refuses files opened with O_APPEND (EINVAL): the run copies."""
    data = pattern(5 * MiB + 7, 9)
    target = env.path("out.bin")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    try:
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(len(data), 9, MODE_NORMAL))
            assert await receive_all(st, fd, None) == len(data)
            await st.finish()
            assert c.protocol.direct.bytes > 0
    finally:
        os.close(fd)
    assert read(target) == data


async def test_credit_is_returned_for_data_received_directly(env: Env) -> None:
    """With a window far smaller than the transfer, the sender would stall for ever
    if directly received data were not granted back as CREDIT."""
    data = pattern(12 * MiB, 11)
    target = env.path("out.bin")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        async with await virnet.connect(env.uri, window=512 * 1024) as c:
            st = await c.open_stream(SOURCE, StreamArgs(len(data), 11, MODE_NORMAL))
            assert await asyncio.wait_for(receive_all(st, fd), 60) == len(data)
            await st.finish()
    finally:
        os.close(fd)
    assert read(target) == data


async def test_receive_into_with_holes_and_a_writer(env: Env) -> None:
    """The transfers' loop: runs between holes, the holes handed to the caller."""
    size = 6 * MiB
    target = env.path("out.bin")
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    pieces: list[object] = []
    try:
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(size, 12, MODE_HOLES), sparse=True)
            writer = BatchWriter(fd)
            async for piece in _receive.receive_into(st, writer):
                if isinstance(piece, Hole):
                    await writer.skip(piece.length)
                pieces.append(piece)
            await writer.flush()
            os.ftruncate(fd, writer.pos)
            await st.finish()
    finally:
        os.close(fd)
    holes = [p for p in pieces if isinstance(p, Hole)]
    assert holes == [Hole(1 << 20)]
    data = pattern(size, 12)
    half = size // 2
    assert read(target) == data[:half] + bytes(1 << 20) + data[half:]


async def test_receive_into_over_its_limit_raises_before_writing(env: Env) -> None:
    r, w = os.pipe()
    try:
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(3 * MiB, 13, MODE_NORMAL))
            writer = SequentialWriter(w, inline=True)
            got = 0
            got_bytes = bytearray()

            def drain() -> None:
                while chunk := os.read(r, 1 << 20):
                    got_bytes.extend(chunk)

            reader = threading.Thread(target=drain)
            reader.start()
            try:
                with pytest.raises(_receive.OverLimit):
                    async for piece in _receive.receive_into(st, writer, limit=2 * MiB):
                        assert isinstance(piece, int)
                        got += piece
                await st.abort()
            finally:
                os.close(w)
                w = -1
                reader.join(10)
            assert got <= 2 * MiB
            assert len(got_bytes) == got
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


async def test_runs_past_the_process_limit_take_the_ordinary_way(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every run slot taken, transfers still complete, through the loop."""
    monkeypatch.setattr(_direct, "_slots", threading.BoundedSemaphore(1))
    assert _direct._slots.acquire(blocking=False)  # the only slot, held
    try:
        data = pattern(3 * MiB, 14)
        target = env.path("out.bin")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            async with await virnet.connect(env.uri) as c:
                st = await c.open_stream(SOURCE, StreamArgs(len(data), 14, MODE_NORMAL))
                assert await receive_all(st, fd) == len(data)
                await st.finish()
                assert c.protocol.direct.runs == 0
        finally:
            os.close(fd)
        assert read(target) == data
    finally:
        _direct._slots.release()


async def test_uploads_to_the_server_use_runs_too(env: Env) -> None:
    """The server side: an upload handler that reads with ``recv_into``."""
    data = pattern(10 * MiB, 15)
    target = env.path("up.bin")
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = virnet.Server()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    runs: list[int] = []

    async def sink(ctx: virnet.CallContext, args: StreamArgs) -> None:
        st = ctx.accept_stream(StreamResult(args.size))
        n = await receive_all(st, fd)
        runs.append(ctx.connection.direct.runs)
        done.set_result(n)

    server.register(SINK, sink)
    uri = str(await server.listen(sock_uri(env.tmp, "up.sock")))
    try:
        async with await virnet.connect(uri) as c:
            st = await c.open_stream(SINK, StreamArgs(len(data), 15, MODE_NORMAL))
            await st.send(data)
            await st.finish()
        assert await done == len(data)
        assert runs[0] >= 1
    finally:
        await server.close(grace=1)
        os.close(fd)
    assert read(target) == data


async def test_bonus_credit_never_trips_the_window_check(env: Env) -> None:
    """A run grants extra credit once; if the reader then goes back to reading
    through memory (and lags), the sender may fill the larger window, which must not
    count as a flow-control violation."""
    data = pattern(24 * MiB, 16)
    target = env.path("out.bin")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        async with await virnet.connect(env.uri) as c:
            st = await c.open_stream(SOURCE, StreamArgs(len(data), 16, MODE_NORMAL))
            n = await st.recv_into(fd, 0, limit=512 * 1024)
            assert n > 0
            core = st._core
            assert core.bonus_granted
            assert core.window == c.protocol.window + _streams.DIRECT_BONUS
            await asyncio.sleep(0.5)  # lag: the sender fills what it was granted
            assert st.buffered > c.protocol.window  # more than the plain window
            rest = bytearray()
            assert await st.recv_all(rest.extend) == len(data) - n
            await st.finish()
    finally:
        os.close(fd)
    assert read(target)[:n] == data[:n]
    assert bytes(rest) == data[n:]


async def test_a_client_stalled_inside_a_packet_costs_only_its_own_run(env: Env) -> None:
    """A peer that sends half a data packet and stops holds its run's thread, nothing
    else: another client is served meanwhile, and when the stalled one goes away the
    thread ends (checked by the fixture)."""
    from virnet._impl import pack_header
    from virnet.constants import STREAM_CHUNK, MessageStatus, MessageType

    target = env.path("up.bin")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    started = asyncio.Event()
    server = virnet.Server()

    async def sink(ctx: virnet.CallContext, args: StreamArgs) -> None:
        st = ctx.accept_stream(StreamResult(args.size))
        started.set()
        await receive_all(st, fd)

    server.register(SINK, sink)
    DemoService().register(server)
    uri = str(await server.listen(sock_uri(env.tmp, "stall.sock")))
    try:
        stalled = await virnet.connect(uri)
        st = await stalled.open_stream(SINK, StreamArgs(0, 1, MODE_NORMAL))
        await st.send(pattern(MiB, 17))  # whole packets first: a run starts
        await asyncio.wait_for(started.wait(), 10)
        for _ in range(300):
            if run_threads():
                break
            await asyncio.sleep(0.01)
        assert run_threads()
        prog, vers, proc, serial = st.key
        header = pack_header(
            prog, vers, proc, int(MessageType.STREAM), serial,
            int(MessageStatus.CONTINUE), STREAM_CHUNK,
        )
        transport = stalled.protocol.transport
        assert transport is not None
        transport.write(bytes(header) + bytes(STREAM_CHUNK // 2))  # half, then nothing
        await asyncio.sleep(0.3)
        async with await virnet.connect(uri) as other:
            for i in range(20):
                reply = await asyncio.wait_for(other.call(ECHO, EchoArgs("ok", 0, i)), 5)
                assert reply.n == i + 1
        transport.abort()  # the stalled peer goes away
        await stalled.close()
        for _ in range(300):
            if not run_threads():
                break
            await asyncio.sleep(0.01)
        assert not run_threads()
    finally:
        await server.close(grace=1)
        os.close(fd)


def _stream_packets(key: tuple[int, int, int, int], payloads: list[bytes]) -> bytes:
    from virnet._impl import pack_header
    from virnet.constants import MessageStatus, MessageType

    prog, vers, proc, serial = key
    out = bytearray()
    for p in payloads:
        out += pack_header(
            prog, vers, proc, int(MessageType.STREAM), serial,
            int(MessageStatus.CONTINUE), len(p),
        )
        out += p
    return bytes(out)


def _big_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), MiB)
    except OSError:
        pytest.skip("cannot grow a pipe to 1 MiB here")
    return r, w


def test_a_run_wakes_the_loop_per_post_step_not_per_packet(tmp_path: os.PathLike[str]) -> None:
    """With data always waiting, a run posts its progress once per ``post_every``
    bytes however many packets carry them (a post per packet made the two threads
    trade the GIL for every packet), even when the loop answers every post at once."""
    key = (0x20008086, 1, 7, 5)
    payloads = [pattern(12 * 1024 - 4, i) for i in range(64)]  # 64 packets, ~768 KiB
    source_r, source_w = _big_pipe()
    os.write(source_w, _stream_packets(key, payloads))
    os.close(source_w)  # EOF after the last packet ends the run
    target = os.path.join(os.fspath(tmp_path), "t.bin")
    sink = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    posts: list[int] = []

    def post() -> None:  # a loop that applies every post at once
        posts.append(run.received)
        run.posted = False

    run = _direct.DirectRun(
        source_r, key, sink, 0, prefix=[], limit=None, max_payload=1 << 20,
        post=post, post_every=192 * 1024,
    )
    try:
        run.run()
    finally:
        os.close(source_r)
        os.close(sink)
    total = sum(map(len, payloads))
    assert run.packets == 64 and run.received == total and run.error is None
    assert read(target) == b"".join(payloads)
    assert 3 <= len(posts) <= 4, posts  # ~768 KiB / 192 KiB, not 64
    assert all(b - a >= 192 * 1024 for a, b in zip([0, *posts[:-1]], posts, strict=True)), posts


def test_a_run_posts_what_it_has_before_it_waits_for_the_socket(
    tmp_path: os.PathLike[str],
) -> None:
    """Below ``post_every`` a run still posts before it blocks on the socket: the peer
    may be waiting for the credit those bytes return (else a small window stalls)."""
    key = (0x20008086, 1, 7, 6)
    first = [pattern(8 * 1024 - 4, 1), pattern(8 * 1024 - 4, 2)]
    later = [pattern(8 * 1024 - 4, 3)]
    source_r, source_w = _big_pipe()
    os.set_blocking(source_r, False)  # as a transport's socket is
    os.write(source_w, _stream_packets(key, first))
    target = os.path.join(os.fspath(tmp_path), "t.bin")
    sink = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    posted = threading.Event()
    posts: list[int] = []

    def post() -> None:
        posts.append(run.received)
        run.posted = False
        posted.set()

    run = _direct.DirectRun(
        source_r, key, sink, 0, prefix=[], limit=None, max_payload=1 << 20,
        post=post, post_every=MiB,
    )
    thread = threading.Thread(target=run.run)
    thread.start()
    try:
        assert posted.wait(10), "no post before the run waited for more data"
        assert posts == [sum(map(len, first))]
        os.write(source_w, _stream_packets(key, later))
    finally:
        os.close(source_w)  # EOF: the run ends
        thread.join(10)
        os.close(source_r)
        os.close(sink)
    assert not thread.is_alive()
    assert run.received == sum(map(len, first + later))
    assert read(target) == b"".join(first + later)
