"""A small test program and helpers shared by the RPC tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from typing import Annotated

import virnet
from virnet import xdr
from virnet.errors import RPCError

TEST = virnet.Program("TEST", 0x3000_0001, 1)


@xdr.struct
class EchoArgs:
    text: Annotated[str, xdr.string(1024)]
    delay_ms: xdr.UInt
    n: xdr.UInt


@xdr.struct
class Note:
    text: Annotated[str, xdr.string(1024)]


ECHO = TEST.procedure(1, "ECHO", EchoArgs, EchoArgs)
FAIL_RPC = TEST.procedure(2, "FAIL_RPC", None, None)
FAIL_CRASH = TEST.procedure(3, "FAIL_CRASH", None, None)
BLOCK = TEST.procedure(4, "BLOCK", EchoArgs, EchoArgs)
NOTIFY = TEST.procedure(5, "NOTIFY", Note, None)
WRITE = TEST.procedure(6, "WRITE", None, None)
UNREGISTERED = TEST.procedure(99, "UNREGISTERED", None, None)
NOTE_EVENT = TEST.event(1, "NOTE", Note)


class DemoService:
    """Handlers with observable behaviour: concurrency counters and a gate."""

    def __init__(self) -> None:
        self.running = 0
        self.max_running = 0
        self.started: list[int] = []
        self.gate = asyncio.Event()

    def register(self, server: virnet.Server) -> None:
        server.register(ECHO, self.echo, readonly=True)
        server.register(FAIL_RPC, self.fail_rpc, readonly=True)
        server.register(FAIL_CRASH, self.fail_crash, readonly=True)
        server.register(BLOCK, self.block, readonly=True)
        server.register(NOTIFY, self.notify, readonly=True)
        server.register(WRITE, self.write)

    async def echo(self, ctx: virnet.CallContext, args: EchoArgs) -> EchoArgs:
        if args.delay_ms:
            await asyncio.sleep(args.delay_ms / 1000)
        return EchoArgs(args.text[::-1], args.delay_ms, args.n + 1)

    async def fail_rpc(self, ctx: virnet.CallContext, args: None) -> None:
        raise RPCError("custom failure", code=55, domain=18, level=1, str1="a", str2="b",
                       str3="c", int1=7, int2=-8)

    async def fail_crash(self, ctx: virnet.CallContext, args: None) -> None:
        raise KeyError("secret internal detail")

    async def block(self, ctx: virnet.CallContext, args: EchoArgs) -> EchoArgs:
        self.started.append(args.n)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return args

    async def notify(self, ctx: virnet.CallContext, args: Note) -> None:
        ctx.emit_event(NOTE_EVENT, args)

    async def write(self, ctx: virnet.CallContext, args: None) -> None:
        return None


def short_tmpdir() -> str:
    """A temp dir short enough for Unix socket paths (107 bytes)."""
    return tempfile.mkdtemp(prefix="vn-", dir="/tmp")


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def sock_uri(directory: str, name: str = "s.sock") -> str:
    return f"unix://{os.path.join(directory, name)}"


# ----------------------------------------------------------------------------- streams
from virnet import StreamDirection  # noqa: E402
from virnet.stream import Hole, Stream  # noqa: E402


@xdr.struct
class StreamArgs:
    size: xdr.UHyper  # download: bytes to send; upload: expected bytes (0 = any)
    seed: xdr.UInt
    mode: xdr.UInt  # see MODE_* below


@xdr.struct
class StreamResult:
    size: xdr.UHyper


MODE_NORMAL = 0
MODE_FAIL_EARLY = 1  # refuse before accepting: plain error reply
MODE_FAIL_MIDWAY = 2  # raise after half the data: stream error
MODE_STALL = 3  # accept and never read
MODE_DATA_BEFORE_REPLY = 4  # download: queue data before the reply (handled by ordering)
MODE_HOLES = 5  # sparse download: data, hole, data

SINK = TEST.procedure(10, "SINK", StreamArgs, StreamResult, stream=StreamDirection.UPLOAD)
SOURCE = TEST.procedure(11, "SOURCE", StreamArgs, StreamResult, stream=StreamDirection.DOWNLOAD)
ECHO_STREAM = TEST.procedure(12, "ECHO_STREAM", StreamArgs, None, stream=StreamDirection.BOTH)
SPARSE_SINK = TEST.procedure(
    13, "SPARSE_SINK", StreamArgs, StreamResult, stream=StreamDirection.UPLOAD
)


def pattern(size: int, seed: int) -> bytes:
    """Deterministic, position-dependent bytes (so reordering or loss is detected)."""
    import hashlib

    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048  # 64 KiB
    reps = size // len(block) + 1
    data = bytearray(block * reps)[:size]
    for i in range(0, size, 4096):
        # The block number at the start of each 4 KiB, cut at the end: never longer
        # than asked (a whole 4-byte marker in the last 1-3 bytes made it so).
        marker = (i // 4096 & 0xFFFFFFFF).to_bytes(4, "big")[: size - i]
        data[i : i + len(marker)] = marker
    assert len(data) == size
    return bytes(data)


class StreamService:
    def __init__(self) -> None:
        self.received: dict[int, bytes] = {}
        self.sparse_log: dict[int, list[object]] = {}
        self.streams: list[Stream] = []
        self.results: dict[int, str] = {}

    def register(self, server: virnet.Server) -> None:
        server.register(SINK, self.sink)
        server.register(SOURCE, self.source, readonly=True)
        server.register(ECHO_STREAM, self.echo)
        server.register(SPARSE_SINK, self.sparse_sink)

    async def sink(self, ctx: virnet.CallContext, args: StreamArgs) -> None:
        if args.mode == MODE_FAIL_EARLY:
            raise RPCError("refused before the stream", code=9)
        stream = ctx.accept_stream(StreamResult(args.size))
        self.streams.append(stream)
        if args.mode == MODE_STALL:
            await asyncio.sleep(3600)
        chunks = []
        got = 0
        try:
            async for chunk in stream:
                assert not isinstance(chunk, Hole)
                chunks.append(bytes(chunk))
                got += len(chunk)
                if args.mode == MODE_FAIL_MIDWAY and got >= args.size // 2:
                    raise RPCError("sink failed midway", code=38, int1=5)
            if args.size and got != args.size:
                raise RPCError(f"expected {args.size} bytes, got {got}", code=9)
            self.received[args.seed] = b"".join(chunks)
            self.results[args.seed] = "ok"
        except BaseException as exc:
            self.results[args.seed] = f"error: {exc!r}"
            raise

    async def source(self, ctx: virnet.CallContext, args: StreamArgs) -> None:
        if args.mode == MODE_FAIL_EARLY:
            raise RPCError("refused before the stream", code=9)
        stream = ctx.accept_stream(StreamResult(args.size), sparse=args.mode == MODE_HOLES)
        self.streams.append(stream)
        data = pattern(args.size, args.seed)
        if args.mode == MODE_HOLES:
            half = args.size // 2
            await stream.send(data[:half])
            await stream.send_hole(1 << 20)
            await stream.send(data[half:])
            return
        if args.mode == MODE_FAIL_MIDWAY:
            await stream.send(data[: args.size // 2])
            raise RPCError("source failed midway", code=38)
        await stream.send(data)

    async def echo(self, ctx: virnet.CallContext, args: StreamArgs) -> None:
        stream = ctx.accept_stream()
        self.streams.append(stream)
        async for chunk in stream:
            assert not isinstance(chunk, Hole)
            await stream.send(bytes(chunk))

    async def sparse_sink(self, ctx: virnet.CallContext, args: StreamArgs) -> StreamResult:
        stream = ctx.accept_stream(StreamResult(0), sparse=True)
        log: list[object] = []
        async for item in stream:
            if isinstance(item, Hole):
                log.append(item)
            else:
                log.append(bytes(item))
        self.sparse_log[args.seed] = log
        return StreamResult(0)
