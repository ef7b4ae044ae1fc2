"""Generic virnet stream procedures for the benchmarks (``throughput.py``, ``latency.py``).

Imported only inside child processes (and by ``latency.py``, which imports virnet at
module level anyway), after the child's environment has fixed the wire core.

* ``SINK`` (upload): the handler accepts the stream and counts what it reads with
  ``async for``; it times its first chunk to its last one.
* ``SOURCE`` (download): the handler sends ``size`` bytes (0: until the client aborts)
  with ``Stream.send`` of one reused, immutable 8 MiB ``bytes`` block (views, no copies).
* ``STALL`` (upload): the handler accepts the stream and never reads it; it returns only
  when the stream ends (the client aborts), so the server can exit promptly.

Each server-side record (bytes, seconds from first to last chunk) goes to
``BenchService.records``; ``BenchService.cpu`` is the server's CPU seconds from the first
stream accepted to the last handler finished.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import virnet
from _common import cpu_seconds
from virnet import StreamDirection, xdr

MiB = 1024 * 1024
BLOCK = 8 * MiB  # what senders pass to one Stream.send (sliced into 262120-byte packets)


@xdr.struct
class Size:
    size: xdr.UHyper  # bytes to move; 0 = no limit (SOURCE sends until the client aborts)


STREAMBENCH = virnet.Program("STREAMBENCH", 0x30000B01, 1)
SINK = STREAMBENCH.procedure(1, "SINK", Size, None, stream=StreamDirection.UPLOAD)
SOURCE = STREAMBENCH.procedure(2, "SOURCE", Size, None, stream=StreamDirection.DOWNLOAD)
STALL = STREAMBENCH.procedure(3, "STALL", Size, None, stream=StreamDirection.UPLOAD)


def data_block() -> bytes:
    """The immutable block every sender reuses."""
    # Random, not bytes(n): a large zeroed allocation maps the kernel's shared zero page,
    # which stays in cache and makes every send look cheaper than real data.
    return os.urandom(BLOCK)


async def send_bytes(stream: Any, total: int, block: bytes) -> None:
    """Send ``total`` bytes (0: forever) as repeated ``block``s; the last one a view."""
    view = memoryview(block)  # read-only: slices of it are sent without copies too
    size = len(block)
    send = stream.send
    if total == 0:
        while True:
            await send(block)
    left = total
    while left >= size:
        await send(block)
        left -= size
    if left:
        await send(view[:left])


async def count_chunks(stream: Any) -> dict[str, float]:
    """Read a stream to EOF with ``async for``; bytes and first-to-last-chunk seconds."""
    perf = time.perf_counter
    n = 0
    t0 = t1 = 0.0
    async for chunk in stream:
        if n == 0:
            t0 = perf()
        n += len(chunk)
        t1 = perf()
    return {"bytes": n, "seconds": t1 - t0, "t0": t0, "t1": t1}


class BenchService:
    def __init__(self) -> None:
        self.block = data_block()
        self.records: list[dict[str, float]] = []
        self.cpu0: float | None = None
        self.cpu1 = 0.0

    def register(self, server: virnet.Server) -> None:
        server.register(SINK, self.sink)
        server.register(SOURCE, self.source)
        server.register(STALL, self.stall)

    @property
    def cpu(self) -> float:
        return self.cpu1 - self.cpu0 if self.cpu0 is not None else 0.0

    def _begin(self) -> None:
        if self.cpu0 is None:
            self.cpu0 = cpu_seconds()

    def _end(self) -> None:
        self.cpu1 = cpu_seconds()

    async def sink(self, ctx: virnet.CallContext, args: Size) -> None:
        stream = ctx.accept_stream()
        self._begin()
        rec = await count_chunks(stream)
        self._end()
        self.records.append({"kind": "sink", **rec})

    async def source(self, ctx: virnet.CallContext, args: Size) -> None:
        stream = ctx.accept_stream()
        self._begin()
        try:
            await send_bytes(stream, args.size, self.block)
        finally:
            self._end()
        self.records.append({"kind": "source", "bytes": stream.bytes_sent})

    async def stall(self, ctx: virnet.CallContext, args: Size) -> None:
        stream = ctx.accept_stream()
        # Never read; wake up only to notice that the client aborted.
        while not stream.closed:
            await asyncio.sleep(0.05)
        self.records.append({"kind": "stall", "bytes": stream.bytes_received})


async def serve_one_client(server: virnet.Server) -> None:
    """Wait for one client to connect and go away (polled: the server has no hook)."""
    while not server.connections:
        await asyncio.sleep(0.01)
    while server.connections:
        await asyncio.sleep(0.05)
