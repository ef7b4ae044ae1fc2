#!/usr/bin/env python
"""Small-call rate and latency of virnet against a minimal RPC on uvloop, in one run.

Usage::

    python bench/latency.py [--quick] [--json FILE] [--only SUBSTRING ...]

Each scenario runs a server process and a client process over a Unix socket, both on
uvloop.  The client measures, in this order on one connection:

1. warm-up calls (replies checked);
2. *sequential*: one call at a time, calls/s;
3. *64 in flight*: 64 workers each calling one after the other, calls/s;
4. *latency, idle*: sequential calls timed one by one (``perf_counter_ns``), p50/p99 in
   microseconds.

Scenarios are repeated ``--repeat`` times, interleaved round by round; the table shows the
median over repetitions and the ratio to the anchor measured in the same run, metric by
metric (sequential vs sequential, 64 in flight vs 64 in flight).  For latencies the ratio
is virnet's value over the anchor's, so above 1 means slower.

* ``anchor`` -- a minimal length-prefixed RPC: 4-byte length, 4-byte serial, 100-byte
  body; the server (``BufferedProtocol``) echoes each request, one ``write`` per read;
  the client matches replies to futures by serial.
* ``virnet, compiled|pure`` -- ``virnet.Server`` with one ECHO procedure (an
  ``@xdr.struct`` of a ``string<1024>`` of 100 bytes and a ``uint``) and a
  ``virnet.connect`` client; the handler (``async def``) returns its argument.  It has
  no ``await``, so the server runs it as the call is read, like a plain function.
* ``virnet, compiled, plain-function handler`` -- the same with ECHO registered as a
  plain function, which the server runs as the call is read (no worker task to wake),
  as the anchor's server answers in its read callback.
* ``virnet, compiled, handler that awaits`` -- the same with a handler that awaits a
  future already done (so it never waits, but has an ``await``): served by a worker
  task, the path of every handler that does wait for something.

* ``virnet, compiled, beside a saturating stream`` -- the same calls on a connection
  that also carries a download stream running flat out: a task in the client process
  reads it with ``async for`` as fast as it can (the server sends one reused 8 MiB block
  again and again, ``_vnstreams.SOURCE``).  The stream's rate while the calls ran is
  reported too.
* ``virnet, compiled, beside a saturating upload`` -- the other direction: a task in the
  client process sends an upload flat out (``_vnstreams.SINK``, read by the server as fast
  as it can), so each call queues behind the client's own stream data.  Not named by the
  issue; held to the same 3x bound.
* ``virnet, compiled, beside a stalled stream`` -- the same calls beside an upload stream
  whose server handler never reads (``_vnstreams.STALL``); the client's sender task fills
  the peer's window first (and its own send queue), then waits.  The bytes the stalled
  stream moved while the calls ran are reported (0 expected).

* ``virnet, compiled, tcp`` and ``..., tcp, beside a saturating stream`` -- the idle and
  saturating-download scenarios over loopback TCP (the server binds port 0); the TCP one
  is compared with TCP idle.  Not named by the issue; held to the same 3x bound, which it
  does not reliably meet yet (``bench/RESULTS.md``).

For these the table also gives the ratio to ``virnet, compiled`` (idle) of the same
run; the targets of the issue (saturating p99 <= 3x idle, stalled p99 <= 1.2x idle, sequential
and 64 in flight >= 0.8x the anchor) are printed last with their verdicts.  A scenario that fails is
recorded as failed (``meta.failed`` in the JSON) and the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import virnet
from _common import (
    check_core,
    check_sources_unchanged,
    machine_info,
    print_table,
    ready_addr,
    run_pair,
    unix_addr,
    virnet_uri,
)
from _vnstreams import SINK, SOURCE, STALL, BenchService, Size, data_block, send_bytes
from virnet import xdr
from virnet.constants import STREAM_CHUNK

INFLIGHT = 64
BODY = b"x" * 100
TEXT = "x" * 100

# ============================================================================ child side

Call = Callable[[int], Awaitable[Any]]


async def measure(
    call: Call, check: Callable[[int, Any], bool], n_seq: int, n_pipe: int, n_lat: int
) -> dict[str, float]:
    """Run the four phases against ``call(i)``; ``check(i, reply)`` validates warm-up."""
    perf = time.perf_counter
    for i in range(min(1000, n_seq)):
        reply = await call(i)
        if not check(i, reply):
            raise RuntimeError(f"bad reply to call {i}: {reply!r}")

    t0 = perf()
    for i in range(n_seq):
        await call(i)
    seq = n_seq / (perf() - t0)

    numbers = iter(range(n_pipe))

    async def worker() -> None:
        for i in numbers:
            await call(i)

    t0 = perf()
    await asyncio.gather(*(worker() for _ in range(INFLIGHT)))
    pipe = n_pipe / (perf() - t0)

    ns = time.perf_counter_ns
    lat = []
    for i in range(n_lat):
        t = ns()
        await call(i)
        lat.append(ns() - t)
    lat.sort()
    nan = float("nan")
    return {
        "seq": seq,
        "pipe": pipe,
        "p50": lat[len(lat) // 2] / 1000 if lat else nan,
        "p99": lat[min(len(lat) - 1, (len(lat) * 99) // 100)] / 1000 if lat else nan,
    }


# ------------------------------------------------------------------ anchor: minimal RPC

_FRAME = struct.Struct(">II")  # length (of serial + body), serial
_LEN = struct.Struct(">I")
_BUF = 256 * 1024


class _Framed(asyncio.BufferedProtocol):
    """Length-prefixed frames received into one 256 KiB buffer (compacted as needed)."""

    def __init__(self) -> None:
        self.buf = bytearray(_BUF)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.transport: Any = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.start == self.end:
            self.start = self.end = 0
        elif _BUF - self.end < 64 * 1024:
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start : self.end]
            self.start, self.end = 0, n
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        buf = self.buf
        start = self.start
        end = self.end
        frames = []
        while end - start >= 4:
            (length,) = _LEN.unpack_from(buf, start)
            if end - start < 4 + length:
                break
            frames.append((start, 4 + length))
            start += 4 + length
        self.on_frames(frames)
        self.start = start

    def on_frames(self, frames: list[tuple[int, int]]) -> None:
        raise NotImplementedError


class EchoServer(_Framed):
    def on_frames(self, frames: list[tuple[int, int]]) -> None:
        if frames:
            first = frames[0][0]
            last = frames[-1][0] + frames[-1][1]
            self.transport.write(self.buf[first:last])  # one write per read


class EchoClient(_Framed):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.get_running_loop()
        self.serial = 0
        self.waiters: dict[int, asyncio.Future[bytes]] = {}

    def call(self, body: bytes) -> asyncio.Future[bytes]:
        self.serial = serial = (self.serial + 1) & 0xFFFFFFFF
        fut = self.loop.create_future()
        self.waiters[serial] = fut
        self.transport.write(_FRAME.pack(4 + len(body), serial) + body)
        return fut

    def on_frames(self, frames: list[tuple[int, int]]) -> None:
        buf = self.buf
        waiters = self.waiters
        for start, size in frames:
            (serial,) = _LEN.unpack_from(buf, start + 4)
            waiters.pop(serial).set_result(bytes(buf[start + 8 : start + size]))


def _unix_path(addr: str) -> str:
    assert addr.startswith("unix:")
    return addr[len("unix:") :]


async def anchor_server(addr: str) -> None:
    loop = asyncio.get_running_loop()
    conns: list[EchoServer] = []
    got: asyncio.Future[None] = loop.create_future()

    def factory() -> EchoServer:
        proto = EchoServer()
        conns.append(proto)
        if not got.done():
            got.set_result(None)
        return proto

    server = await loop.create_unix_server(factory, _unix_path(addr))
    print(f"READY {addr}", flush=True)
    await got
    await conns[0].lost  # serve one client, then exit
    server.close()


async def anchor_client(addr: str, n_seq: int, n_pipe: int, n_lat: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_unix_connection(EchoClient, _unix_path(addr))

    def call(i: int) -> asyncio.Future[bytes]:
        return proto.call(BODY)

    try:
        return await measure(call, lambda i, r: r == BODY, n_seq, n_pipe, n_lat)
    finally:
        proto.transport.close()


# ------------------------------------------------------------------ virnet ECHO


# The ECHO procedure.  virnet is imported at module level (``@xdr.struct`` resolves its
# hints in module globals); a child's core is fixed by its environment before this runs.


@xdr.struct
class Echo:
    text: Annotated[str, xdr.string(1024)]
    n: xdr.UInt


BENCH = virnet.Program("BENCH", 0x30000B00, 1)
ECHO = BENCH.procedure(1, "ECHO", Echo, Echo)


async def virnet_server(addr: str, *, inline: bool = False, awaiting: bool = False) -> None:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)

    async def echo(ctx: Any, args: Any) -> Any:
        return args

    async def echo_awaiting(ctx: Any, args: Any) -> Any:
        await done  # never suspends, but the server cannot know: a worker task serves it
        return args

    def echo_inline(ctx: Any, args: Any) -> Any:
        return args

    server = virnet.Server()
    server.register(ECHO, echo_inline if inline else echo_awaiting if awaiting else echo)
    BenchService().register(server)  # SOURCE (download) and STALL (upload, never read)
    bound = await server.listen(virnet_uri(addr))
    print(f"READY {ready_addr(bound)}", flush=True)
    # Serve one client, then exit.  Polled: the server has no "connection gone" hook.
    while not server.connections:
        await asyncio.sleep(0.01)
    while server.connections:
        await asyncio.sleep(0.1)
    await server.close()


def _echo_ok(i: int, reply: Any) -> bool:
    return bool(reply.text == TEXT and reply.n == 0)


async def _echo_client(addr: str) -> tuple[virnet.Client, Call]:
    client = await virnet.connect(virnet_uri(addr))
    arg = Echo(TEXT, 0)

    def call(i: int) -> Awaitable[Any]:
        return client.call(ECHO, arg)

    return client, call


async def virnet_client(addr: str, n_seq: int, n_pipe: int, n_lat: int) -> dict[str, float]:
    client, call = await _echo_client(addr)
    async with client:
        return await measure(call, _echo_ok, n_seq, n_pipe, n_lat)


STREAM_WARMUP = 64 * 1024 * 1024  # bytes the saturating stream moves before measuring


async def _beside_flowing_stream(
    addr: str,
    counts: tuple[int, int, int],
    procedure: virnet.Procedure,
    move: Callable[[Any], Coroutine[Any, Any, None]],
    moved: Callable[[Any], int],
) -> dict[str, float]:
    """The calls while ``move(stream)`` runs flat out in a task of this process; the
    stream's rate during the calls comes from ``moved(stream)`` (bytes so far)."""
    client, call = await _echo_client(addr)
    async with client:
        stream = await client.open_stream(procedure, Size(0))  # 0: until we abort
        mover = asyncio.create_task(move(stream))
        try:
            while moved(stream) < STREAM_WARMUP:
                if mover.done():
                    mover.result()  # raises what stopped it
                    raise RuntimeError("stream ended early")
                await asyncio.sleep(0.005)
            b0, t0 = moved(stream), time.perf_counter()
            result = await measure(call, _echo_ok, *counts)
            result["stream"] = (moved(stream) - b0) / (time.perf_counter() - t0) / 1e9
            if mover.done():
                mover.result()
                raise RuntimeError("stream ended during the measurement")
        finally:
            mover.cancel()
        await stream.abort()
        return result


async def virnet_client_saturating(
    addr: str, n_seq: int, n_pipe: int, n_lat: int
) -> dict[str, float]:
    """The same calls while a download stream on the same connection runs flat out: a
    task in this process reads it with ``async for`` as fast as it can."""
    consumed = 0

    async def consume(stream: Any) -> None:
        nonlocal consumed
        async for chunk in stream:
            consumed += len(chunk)

    return await _beside_flowing_stream(
        addr, (n_seq, n_pipe, n_lat), SOURCE, consume, lambda stream: consumed
    )


async def virnet_client_uploading(
    addr: str, n_seq: int, n_pipe: int, n_lat: int
) -> dict[str, float]:
    """The same calls while an upload stream on the same connection runs flat out: the
    calls queue behind this process's own stream data (the server's handler reads it as
    fast as it can)."""
    block = data_block()
    return await _beside_flowing_stream(
        addr,
        (n_seq, n_pipe, n_lat),
        SINK,
        lambda stream: send_bytes(stream, 0, block),
        lambda stream: int(stream.bytes_sent),
    )


async def virnet_client_stalled(addr: str, n_seq: int, n_pipe: int, n_lat: int) -> dict[str, float]:
    """The same calls beside an upload stream whose server-side handler never reads:
    the sender fills the peer's window (and its own send queue), then waits."""
    client, call = await _echo_client(addr)
    async with client:
        stream = await client.open_stream(STALL, Size(0))
        writer = asyncio.create_task(send_bytes(stream, 0, data_block()))
        try:
            window = client.protocol.peer_window
            deadline = time.perf_counter() + 10
            # Filled: less credit left than one more packet needs.
            while stream.bytes_sent + STREAM_CHUNK <= window:
                if writer.done():
                    writer.result()
                if time.perf_counter() > deadline:
                    raise RuntimeError(
                        f"stalled stream sent only {stream.bytes_sent} of its {window}-byte window"
                    )
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            sent0 = stream.bytes_sent
            result = await measure(call, _echo_ok, n_seq, n_pipe, n_lat)
            # Bytes the stalled stream moved while the calls ran: 0 if credit holds it.
            result["stalled_sent"] = stream.bytes_sent - sent0
            result["window"] = window
        finally:
            writer.cancel()
        await stream.abort()
        return result


#: Child roles: name -> coroutine function.  Servers take (addr); clients take
#: (addr, n_seq, n_pipe, n_lat) and return the metrics.  New scenarios add roles here.
SERVER_ROLES: dict[str, Callable[[str], Awaitable[None]]] = {
    "anchor-server": anchor_server,
    "virnet-server": virnet_server,
    "virnet-server-inline": functools.partial(virnet_server, inline=True),
    "virnet-server-awaiting": functools.partial(virnet_server, awaiting=True),
}
CLIENT_ROLES: dict[str, Callable[..., Awaitable[dict[str, float]]]] = {
    "anchor-client": anchor_client,
    "virnet-client": virnet_client,
    "virnet-client-saturating": virnet_client_saturating,
    "virnet-client-uploading": virnet_client_uploading,
    "virnet-client-stalled": virnet_client_stalled,
}


def child_main(role: str, addr: str, core: str | None, counts: list[int]) -> None:
    import uvloop

    check_core(core)
    if role in SERVER_ROLES:
        uvloop.run(SERVER_ROLES[role](addr))
    else:
        result = uvloop.run(CLIENT_ROLES[role](addr, *counts))
        print(f"RESULT {json.dumps(result)}", flush=True)


# ============================================================================ parent side

METRICS = [
    # key, label, unit, higher is better ("idle" is appended to latencies measured idle)
    ("seq", "sequential calls", "calls/s", True),
    ("pipe", f"{INFLIGHT} calls in flight", "calls/s", True),
    ("p50", "p50 latency", "us", False),
    ("p99", "p99 latency", "us", False),
    # only beside a saturating stream: the stream's own rate while the calls ran
    ("stream", "stream rate during the calls", "GB/s", True),
    # only beside a stalled stream: what it moved while the calls ran (0 expected)
    ("stalled_sent", "stalled stream bytes sent during the calls", "bytes", False),
]


IDLE = "virnet, compiled"
INLINE = "virnet, compiled, plain-function handler"
AWAITING = "virnet, compiled, handler that awaits"
SATURATING = "virnet, compiled, beside a saturating stream"
UPLOADING = "virnet, compiled, beside a saturating upload"
STALLED = "virnet, compiled, beside a stalled stream"
TCP_IDLE = "virnet, compiled, tcp"
TCP_SATURATING = "virnet, compiled, tcp, beside a saturating stream"


@dataclass
class Scenario:
    name: str
    server_role: str
    client_role: str
    core: str | None = None
    anchor: bool = False
    idle: bool = True  # nothing else on the connection
    tcp: bool = False  # loopback TCP instead of a Unix socket (virnet scenarios only)
    idle_ref: str = IDLE  # the idle scenario its latencies are compared with
    samples: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def label(self, base: str) -> str:
        return f"{base} idle" if self.idle and base.endswith("latency") else base

    def run(self, counts: list[int], workdir: Path) -> dict[str, float]:
        result = run_pair(
            __file__,
            self.server_role,
            self.client_role,
            "tcp:127.0.0.1:0" if self.tcp else unix_addr(workdir, "rpc.sock"),
            core=self.core,
            extra=("--counts", ",".join(map(str, counts))),
            results_from=("client",),
            timeout=300,
        )
        return dict(json.loads(result["client"]))


SCENARIOS: list[Scenario] = [
    Scenario("anchor: length-prefixed RPC, uvloop", "anchor-server", "anchor-client", anchor=True),
    Scenario(IDLE, "virnet-server", "virnet-client", core="compiled"),
    Scenario(INLINE, "virnet-server-inline", "virnet-client", core="compiled"),
    Scenario(AWAITING, "virnet-server-awaiting", "virnet-client", core="compiled"),
    Scenario("virnet, pure", "virnet-server", "virnet-client", core="pure"),
    Scenario(SATURATING, "virnet-server", "virnet-client-saturating", core="compiled", idle=False),
    Scenario(UPLOADING, "virnet-server", "virnet-client-uploading", core="compiled", idle=False),
    Scenario(STALLED, "virnet-server", "virnet-client-stalled", core="compiled", idle=False),
    Scenario(TCP_IDLE, "virnet-server", "virnet-client", core="compiled", tcp=True),
    Scenario(
        TCP_SATURATING,
        "virnet-server",
        "virnet-client-saturating",
        core="compiled",
        idle=False,
        tcp=True,
        idle_ref=TCP_IDLE,
    ),
]

#: Targets (from the issue): (scenario, metric key, compared with, op, goal).  "idle" is
#: the same metric of IDLE in the same run, "anchor" the anchor's.
TARGETS: list[tuple[str, str, str, str, float]] = [
    (SATURATING, "p99", "idle", "<=", 3.0),
    (UPLOADING, "p99", "idle", "<=", 3.0),  # ours: the issue names the download case
    (STALLED, "p99", "idle", "<=", 1.2),
    (IDLE, "seq", "anchor", ">=", 0.80),
    (IDLE, "pipe", "anchor", ">=", 0.80),
    # the same server with ECHO as a plain function, answered as its call is read
    (INLINE, "seq", "anchor", ">=", 0.80),
    (INLINE, "pipe", "anchor", ">=", 0.80),
    # a handler with an await: served by a worker task (the general async path)
    (AWAITING, "seq", "anchor", ">=", 0.80),
    (AWAITING, "pipe", "anchor", ">=", 0.80),
    # ours, over loopback TCP against TCP idle: not met yet (bench/RESULTS.md says why)
    (TCP_SATURATING, "p99", "idle", "<=", 3.0),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls and 2 repetitions")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--repeat", type=int, help="repetitions per scenario (default by mode)")
    ap.add_argument("--only", action="append", help="run scenarios whose name contains this")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--core", choices=["compiled", "pure"], help=argparse.SUPPRESS)
    ap.add_argument("--counts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    counts = [5_000, 20_000, 5_000] if args.quick else [20_000, 100_000, 20_000]
    if args.counts:
        counts = [int(c) for c in args.counts.split(",")]
    if args.child:
        child_main(args.child, args.addr, args.core, counts)
        return 0

    repeat = args.repeat or (2 if args.quick else 5)
    chosen = {
        s.name for s in SCENARIOS if not args.only or any(o in s.name for o in args.only)
    }
    # A "beside" scenario is reported as a ratio to its idle reference: keep that too.
    chosen |= {s.idle_ref for s in SCENARIOS if s.name in chosen and not s.idle}
    scenarios = [s for s in SCENARIOS if s.anchor or s.name in chosen]
    info = machine_info()
    print(
        f"latency: {counts[0]} sequential, {counts[1]} with {INFLIGHT} in flight, "
        f"{counts[2]} timed calls; {repeat} repetitions; {info}",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="virnet-bench-") as tmp:
        for rep in range(repeat):
            for sc in scenarios:
                try:
                    m = sc.run(counts, Path(tmp))
                except Exception as exc:  # recorded as failed, the run goes on
                    sc.failures.append(f"{type(exc).__name__}: {exc}")
                    print(
                        f"  [{rep + 1}/{repeat}] {sc.name}: FAILED: {sc.failures[-1]}", flush=True
                    )
                    continue
                sc.samples.append(m)
                more = ""
                if "stream" in m:
                    more = f", stream {m['stream']:.2f} GB/s"
                if "stalled_sent" in m:
                    more = f", stalled stream sent {m['stalled_sent']:.0f} bytes meanwhile"
                print(
                    f"  [{rep + 1}/{repeat}] {sc.name}: seq {m['seq']:,.0f}/s, "
                    f"{INFLIGHT} in flight {m['pipe']:,.0f}/s, "
                    f"p50 {m['p50']:.0f} us, p99 {m['p99']:.0f} us{more}",
                    flush=True,
                )
    wall = time.perf_counter() - started
    consistent = check_sources_unchanged(info)

    def median_of(sc: Scenario | None, key: str) -> float | None:
        if sc is None:
            return None
        values = [m[key] for m in sc.samples if key in m]
        return statistics.median(values) if values else None

    by_name = {s.name: s for s in scenarios}
    anchor = next((s for s in scenarios if s.anchor), None)
    results: list[dict[str, Any]] = []
    rows = []
    for sc in scenarios:
        if not sc.samples:
            rows.append(
                {
                    "scenario": sc.name,
                    "metric": "-",
                    "median": "FAILED: " + (sc.failures[-1][:60] if sc.failures else "?"),
                    "min..max": "-",
                    "ratio to anchor": "-",
                    "ratio to idle virnet": "-",
                }
            )
            continue
        for key, base, unit, _ in METRICS:
            values = [m[key] for m in sc.samples if key in m]
            if not values:
                continue
            med = statistics.median(values)
            ref = median_of(anchor, key)
            ratio = med / ref if ref else None
            iref = median_of(by_name.get(sc.idle_ref), key) if not sc.idle else None
            iratio = med / iref if iref else None
            label = sc.label(base)
            name = f"{sc.name}: {label}"
            results.append({"name": name, "value": round(med, 2), "unit": unit, "ratio": ratio})
            fmt = ",.0f" if unit != "GB/s" else ".2f"
            failed = f" ({len(sc.failures)} failed)" if sc.failures else ""
            rows.append(
                {
                    "scenario": sc.name + failed,
                    "metric": label,
                    "median": f"{med:{fmt}} {unit}",
                    "min..max": f"{min(values):{fmt}}..{max(values):{fmt}}",
                    "ratio to anchor": f"{ratio:.2f}" if ratio is not None else "-",
                    "ratio to idle virnet": f"{iratio:.2f}" if iratio is not None else "-",
                }
            )
    print_table(
        f"small calls, {repeat} repetitions, wall {wall:.0f} s "
        "(latency ratios: value / reference, above 1 is slower; 'idle virnet' is "
        f"'{IDLE}' in this run, '{TCP_IDLE}' for the tcp ones)",
        rows,
        ["scenario", "metric", "median", "min..max", "ratio to anchor", "ratio to idle virnet"],
    )
    target_rows = []
    for name, key, ref_name, op, goal in TARGETS:
        sc_t = by_name.get(name)
        value = median_of(sc_t, key)
        idle_t = by_name.get(sc_t.idle_ref) if sc_t is not None else None
        ref = median_of(idle_t if ref_name == "idle" else anchor, key)
        label = f"{name}: {key} / {ref_name} {op} {goal:g}"
        if value is None or not ref:
            target_rows.append({"target": label, "measured": "-", "verdict": "not measured"})
            continue
        ratio = value / ref
        met = ratio >= goal if op == ">=" else ratio <= goal
        gap = abs(ratio - goal)
        verdict = "met" if met else f"missed by {gap:.2f} ({gap / goal * 100:.0f} %)"
        target_rows.append({"target": label, "measured": f"{ratio:.2f}", "verdict": verdict})
        if ref_name == "idle":
            results.append(
                {
                    "name": f"{name}: {key} vs idle",
                    "value": round(ratio, 3),
                    "unit": "x",
                    "ratio": None,
                }
            )
    print_table("targets (ratios within this run)", target_rows, ["target", "measured", "verdict"])
    if args.json:
        doc = {
            "scenarios": results,
            "meta": {
                "counts": {"sequential": counts[0], "in_flight": counts[1], "timed": counts[2]},
                "inflight": INFLIGHT,
                "repeat": repeat,
                "wall_s": wall,
                "sources_unchanged": consistent,
                "machine": info,
                "samples": {s.name: s.samples for s in scenarios},
                "failed": {s.name: s.failures for s in scenarios if s.failures},
                "targets": target_rows,
            },
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
