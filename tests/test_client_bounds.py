"""Per-client bounds in a real virnetd, each tried by an adversary: a client that never
reads its replies, and a client that opens every stream it may and sends nothing.
The daemon's memory is read from /proc while they run; another client's calls are timed
meanwhile; afterwards every reply is still there (paused, never dropped).  On uvloop and
on stock asyncio, with whichever core the run uses."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

import virnet
from _daemon import Virnetd
from _rpcutil import remove_tree, short_tmpdir
from virnet.constants import FILES_PROGRAM
from virnet.services import files as f

MiB = 1024 * 1024
#: Entries in the listed directory, and their names' length: each LIST reply is ~230 KiB.
ENTRIES = 2000
NAME_LENGTH = 100
#: LIST calls the greedy client sends and never reads: ~90 MiB of replies in all, far
#: more than the bound lets the daemon hold.
GREEDY_CALLS = 400
#: How much the daemon may grow while the greedy client waits: the 4 MiB bound, the
#: replies of the jobs running when it was reached, and the allocator's slack.
GREEDY_GROWTH = 32 * MiB
IDLE_STREAMS = 64
IDLE_STREAMS_GROWTH = 8 * MiB

_CALL, _OK = 0, 0
_REPLY = 1


@pytest.fixture(params=["uvloop", "asyncio"])
def daemon(request: pytest.FixtureRequest) -> Iterator[Virnetd]:
    tmp = short_tmpdir()
    root = os.path.join(tmp, "root")
    big = os.path.join(root, "big")
    os.makedirs(big)
    for i in range(ENTRIES):
        name = f"{i:06d}".ljust(NAME_LENGTH, "x")
        os.close(os.open(os.path.join(big, name), os.O_CREAT | os.O_WRONLY, 0o644))
    d = Virnetd(tmp, root, loop=request.param)
    try:
        yield d
    finally:
        d.stop()
        remove_tree(tmp)


def _settled_rss(d: Virnetd) -> int:
    time.sleep(0.3)
    return d.rss()


async def _warm_up(uri: str) -> None:
    async with await virnet.connect(uri) as client:
        for _ in range(3):
            reply = await client.call(f.LIST, f.PathArgs("big"))
            assert len(reply.entries) == ENTRIES
        await client.call(f.STAT, f.PathArgs("big"))


async def _stat_latencies(uri: str, stop: threading.Event) -> list[float]:
    took = []
    async with await virnet.connect(uri) as client:
        while not stop.is_set():
            t = time.perf_counter()
            await client.call(f.STAT, f.PathArgs("big"), timeout=30)
            took.append(time.perf_counter() - t)
            await asyncio.sleep(0.01)
    return took


def _read_replies(sock: socket.socket, count: int) -> dict[int, bytes]:
    """Every packet the daemon sent on the raw socket, until ``count`` replies."""
    replies: dict[int, bytes] = {}
    buf = bytearray()
    sock.settimeout(60)
    while len(replies) < count:
        chunk = sock.recv(1 << 20)
        assert chunk, f"connection closed after {len(replies)} of {count} replies"
        buf += chunk
        while len(buf) >= 4:
            (length,) = struct.unpack_from(">I", buf)
            if len(buf) < length:
                break
            _prog, _vers, _proc, mtype, serial, status = struct.unpack_from(">IIIiIi", buf, 4)
            assert mtype == _REPLY and status == _OK, (mtype, status)
            assert serial not in replies
            replies[serial] = bytes(buf[28:length])
            del buf[:length]
    return replies


def test_unread_replies_pause_the_client_not_the_daemon(daemon: Virnetd) -> None:
    asyncio.run(_warm_up(daemon.uri))
    idle = _settled_rss(daemon)

    payload = f.LIST.encode_args(f.PathArgs("big"))
    calls = b"".join(
        b"".join(bytes(b) for b in virnet._impl.encode_message(
            FILES_PROGRAM, 1, f.LIST.number, _CALL, serial, _OK, payload
        ))
        for serial in range(1, GREEDY_CALLS + 1)
    )
    greedy = socket.socket(socket.AF_UNIX)
    greedy.connect(daemon.sock)
    try:
        greedy.settimeout(10)
        greedy.sendall(calls)  # ~20 KiB: fits the socket buffers; never read
        stop = threading.Event()
        peak = [idle]

        def watch() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], daemon.rss())

        watcher = threading.Thread(target=watch)
        watcher.start()
        timer = threading.Timer(4.0, stop.set)
        timer.start()
        try:
            latencies = asyncio.run(_stat_latencies(daemon.uri, stop))
        finally:
            stop.set()
            timer.cancel()
            watcher.join()
        # The daemon held back instead of making every reply at once.
        assert peak[0] - idle < GREEDY_GROWTH, (
            f"daemon grew by {(peak[0] - idle) / MiB:.1f} MiB beside a client that reads "
            "nothing"
        )
        # Everyone else was served meanwhile.
        assert latencies and max(latencies) < 2.0, max(latencies)

        # Once the client reads, every call is answered: paused, none dropped.
        replies = _read_replies(greedy, GREEDY_CALLS)
    finally:
        greedy.close()
    assert sorted(replies) == list(range(1, GREEDY_CALLS + 1))
    for serial in (1, GREEDY_CALLS // 2, GREEDY_CALLS):
        assert len(f.LIST.decode_ret(replies[serial]).entries) == ENTRIES
    assert "Traceback" not in daemon.stderr


async def _idle_uploads(uri: str, ready: threading.Event, release: threading.Event) -> None:
    async with await virnet.connect(uri) as client:
        streams = [
            await client.open_stream(f.UPLOAD, f.TransferArgs(f"idle{i}.bin", 0, 0, 0))
            for i in range(IDLE_STREAMS)
        ]
        ready.set()
        await asyncio.to_thread(release.wait, 30)
        # They still work after idling: one byte each, committed.
        for s in streams:
            await s.send(b"x")
            await s.finish()


def test_idle_upload_streams_cost_what_they_hold(daemon: Virnetd) -> None:
    async def warm() -> None:
        async with await virnet.connect(daemon.uri) as client:
            s = await client.open_stream(f.UPLOAD, f.TransferArgs("warm.bin", 0, 0, 0))
            await s.send(b"warm")
            await s.finish()

    asyncio.run(warm())
    idle = _settled_rss(daemon)
    ready, release = threading.Event(), threading.Event()
    result: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_idle_uploads(daemon.uri, ready, release))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(30), result
        held = _settled_rss(daemon)
    finally:
        release.set()
        thread.join(60)
    assert not result, result
    assert held - idle < IDLE_STREAMS_GROWTH, (
        f"{IDLE_STREAMS} idle uploads cost {(held - idle) / MiB:.1f} MiB"
    )
    root = os.path.join(os.path.dirname(daemon.sock), "root")
    for i in range(IDLE_STREAMS):
        with open(os.path.join(root, f"idle{i}.bin"), "rb") as fh:
            assert fh.read() == b"x"
