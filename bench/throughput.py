#!/usr/bin/env python
"""Bulk-data throughput of virnet against the raw uvloop pump, side by side in one run.

Usage::

    python bench/throughput.py [--quick] [--json FILE] [--only SUBSTRING ...]

Every scenario moves a fixed volume from a *sender* process to a *receiver* process (two
processes: the machine has 2 cores and one Python process per side is how virnet is
deployed).  The receiver times the transfer from its first received byte to its last and
reports the seconds on stdout; the parent turns that into GB/s (10^9 bytes/s).  All
scenarios are repeated ``--repeat`` times, interleaved round by round, every other round in
reverse order (anchor, framing, ..., ..., framing, anchor, ...), so that a noisy neighbour
hurts all of them alike and a drift within a run (a daemon warming up, memory the machine
is taking back) does not always favour the row that comes first.  The table shows
the median and the ratio to the median of the row's anchor taken in the same run (column
``vs``): the raw uvloop pump over a Unix socket for every scenario that names no other
(``Scenario.anchor_name`` None), the local copy with ``dd`` for the whole-process rows
that write a new file (CLI to a new file, CLI whole-file upload, virsh).  Only such
ratios are comparable between runs.  The whole-process rows time from spawning a process
to its exit instead (below).

Scenarios (each a function ``run(nbytes, workdir) -> Transfer``; add more to
``SCENARIOS``).  A scenario that raises is recorded as failed (in the table and in the
JSON's ``meta.failed``) and the run goes on; one that cannot run here (no libvirtd, no
grpcio) is skipped with its reason (``meta.skipped``).

* ``raw uvloop pump, unix`` -- the anchor: 256 KiB ``transport.write`` calls honouring
  ``pause_writing``/``resume_writing``; the receiver is a ``BufferedProtocol`` that counts
  bytes received into one fixed 256 KiB buffer.
* ``virnet framing, compiled|pure, unix`` -- the same pump, but the sender frames each
  262120-byte block with ``encode_stream_data`` (``writelines`` of header + memoryview) and
  the receiver decodes with ``FrameDecoder`` (``get_buffer``/``buffer_updated``) and counts
  payload bytes.  The twin is chosen in the child with ``VIRNET_NO_EXTENSIONS``.
* ``virnet upload|download, compiled|pure, unix|tcp`` -- the real thing: ``virnet.connect``
  and ``virnet.Server`` with the generic stream procedures of ``_vnstreams.py``.  Upload:
  the client ``send``s one reused immutable 8 MiB ``bytes`` block until the volume is
  sent, then ``finish``es; the server handler counts with ``async for`` and times its
  first chunk to its last.  Download: the handler sends the same way, the client counts
  with ``async for`` and times.  Both children use the same core.
* ``virnet 8 streams down, compiled, unix`` -- 8 concurrent download streams on one
  connection, the same total volume; timed from the first chunk of any stream to the last
  of all.  Derived figures: aggregate vs one stream in the same run, and each stream's
  own rate (its bytes over its own first-to-last chunk) against the mean of the 8.
* ``virnet FILES upload|download via virnetd`` -- ``virnet.transfer.upload``/``download``
  against a real ``Daemon`` whose data root and local files are on /dev/shm (tmpfs: no
  disk, though tmpfs page allocation is in the figures).  Timed end to end by the client:
  open, data, finish (the daemon's fsync on tmpfs is nearly free).
* ``libvirt vol-download|vol-upload (python3-libvirt ...)`` -- the C stack: a
  ``/usr/bin/python3 -c`` child with python3-libvirt (``recvAll``/``sendAll``) against a
  private libvirtd (``tests/_libvirtd.py``, root only) with a dir pool on /dev/shm and one
  raw volume filled with data.  Download is timed first chunk to last by the client;
  upload from the ``upload()`` call to ``finish()``.  libvirtd's CPU comes from /proc.
  libvirtd runs with the glibc malloc thresholds virnetd sets for itself
  (``LibvirtFixture.libvirtd_env``; as installed, its CPU per GiB sent swings threefold
  with its allocator's state, whoever the client); ``--stock-libvirtd`` runs it as
  installed, after one small untimed upload (``LibvirtFixture._warm_up``).
* ``virnet.libvirt vol-download|vol-upload`` -- virnet's own libvirt client (compiled,
  uvloop) against the same libvirtd, timed the same way.
* ``local copy, dd bs=1M into a new file (tmpfs)`` -- the second anchor, a whole process
  like the rows below: ``dd if=SRC of=NEW bs=1M status=none`` on /dev/shm, NEW removed
  before each round; its own ratio is to the pump.
* ``virnet CLI ...`` -- the ``virnet`` command as a user runs it, timed from spawning it to
  its exit (interpreter start-up, connection and teardown included), against a
  ``virnetd`` subprocess started per round (not timed): download to stdout on a private
  null device and upload in place (``--offset 0 --length N``), both against the pump;
  download to a new file and upload of a whole file, both against the local copy.
* ``virsh vol-download|vol-upload`` -- ``virsh`` against the private libvirtd of the libvirt
  rows, whole processes too, against the local copy.  These and the CLI rows are in
  ``_cli_scenarios.py``, with how each is verified (outside the timed window).
* ``grpcio upload|download`` -- grpcio's sync API, raw bytes (no serializers), 256 KiB
  messages, client- resp. server-streaming, over a Unix socket; skipped if grpcio is not
  importable (it is not a dependency of the project: ``pip install grpcio``).
* ``..., tcp`` -- TCP loopback variants of the anchor, of compiled framing and of the
  compiled streams.

FILES, libvirt, grpcio and the whole-process rows move at most ``CAP`` (2 GiB) per
transfer: tmpfs is memory, and they run at well under 1 GB/s.  ``--only`` selects by
substring; the pump and the anchors of the selected rows always run.

All pump senders use the same transport write-buffer limits (high 4 MiB, low 1 MiB), the
top of the recommended 1-4 MiB range; the virnet stream scenarios use virnet's
own limits.  The table shows the ratio of medians and, beside it, the median of the
per-round ratios (each sample over the anchor's sample of the same round), which is less
sensitive to load that changes between rounds.  The verdicts against the issue's targets
are printed last (``TARGETS``): a ratio to the row's anchor, a derived figure, or one
scenario over another of the same run (``Target.versus``: virnet.libvirt against
python3-libvirt), each also as the median of per-round ratios.

JSON (``--json``): ``{"scenarios": [{"name", "value", "unit", "ratio"}], "meta": {...}}``;
``ratio`` is the value over the row's own anchor (``meta.anchor`` names it; None for
derived figures such as "A / B", whose value is already a ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _cli_scenarios import (
    CLI_DOWN_NEW,
    CLI_INPLACE,
    CLI_UP_WHOLE,
    LOCAL_COPY,
    VIRSH_DOWN,
    VIRSH_UP,
    cli_stdout_name,
    local_copy_scenario,
    virnet_cli_scenario,
    virsh_scenario,
)
from _common import (
    Skipped,
    Transfer,
    check_core,
    check_sources_unchanged,
    cpu_seconds,
    machine_info,
    print_table,
    proc_cpu,
    ready_addr,
    run_one,
    run_pair,
    transfer_timeout,
    unix_addr,
    virnet_uri,
)

GiB = 1024**3
MiB = 1024**2
BLOCK = 256 * 1024  # raw pump write size
STREAM_CHUNK = 262120  # virnet's data packet payload (one packet per writelines)
# Fixed here for every pump scenario (anchor and framing alike), so that the ratio shows
# the cost of framing only; virnet's own limits (_protocol.py) may differ.
HIGH_WATER = 4 * MiB
LOW_WATER = 1 * MiB

PROG = 0x20008086
VERS = 1
PROC = 1
SERIAL = 1

# ============================================================================ child side
# Everything below up to "parent side" runs in the sender/receiver processes.


class _Receiver(asyncio.BufferedProtocol):
    """Counts bytes until ``total`` arrived; times first byte to last byte."""

    def __init__(self, total: int, done: asyncio.Future[dict[str, float]]) -> None:
        self.total = total
        self.done = done
        self.count = 0
        self.t0 = 0.0
        self.cpu0 = 0.0
        self.reads = 0  # buffer_updated calls: one per socket read
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _nodelay(transport)

    def _start(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = cpu_seconds()

    def _finish(self) -> None:
        elapsed = time.perf_counter() - self.t0
        cpu = cpu_seconds() - self.cpu0
        if not self.done.done():
            self.done.set_result({"seconds": elapsed, "cpu": cpu, "reads": self.reads})
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(
                RuntimeError(f"connection lost after {self.count} of {self.total} bytes: {exc}")
            )


class RawReceiver(_Receiver):
    """The anchor's receiver: one fixed 256 KiB buffer, bytes only counted."""

    def __init__(self, total: int, done: asyncio.Future[dict[str, float]]) -> None:
        super().__init__(total, done)
        self.buf = memoryview(bytearray(BLOCK))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.reads += 1
        if self.count == 0:
            self._start()
        self.count += nbytes
        if self.count >= self.total:
            self._finish()


class FramedReceiver(_Receiver):
    """Receives into virnet's ``FrameDecoder`` and counts STREAM payload bytes."""

    def __init__(self, total: int, done: asyncio.Future[dict[str, float]]) -> None:
        super().__init__(total, done)
        from virnet._impl import FrameDecoder

        self.decoder = FrameDecoder()
        self.get_buffer = self.decoder.get_buffer  # type: ignore[method-assign]

    def buffer_updated(self, nbytes: int) -> None:
        self.reads += 1
        if self.t0 == 0.0:
            self._start()
        for msg in self.decoder.buffer_updated(nbytes):
            if msg.type != 3:
                raise RuntimeError(f"unexpected packet type {msg.type}")
            self.count += len(msg.payload)
        if self.count >= self.total:
            self._finish()


class _Sender(asyncio.Protocol):
    """Writes ``total`` bytes as fast as flow control allows, then closes."""

    block = BLOCK

    def __init__(self, total: int, done: asyncio.Future[dict[str, float]]) -> None:
        self.remaining = total
        self.done = done
        self.paused = False
        self.closing = False
        self.transport: Any = None
        self.view = memoryview(os.urandom(self.block))
        self.cpu0 = 0.0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.cpu0 = cpu_seconds()
        _nodelay(transport)
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        self.pump()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()

    def send(self, n: int) -> None:
        raise NotImplementedError

    def pump(self) -> None:
        block = self.block
        send = self.send
        while not self.paused and self.remaining > 0:
            n = block if self.remaining > block else self.remaining
            send(n)
            self.remaining -= n
        if self.remaining == 0 and not self.closing:
            self.closing = True
            self.transport.close()  # flushes what is buffered first

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.remaining or exc is not None:
                self.done.set_exception(RuntimeError(f"sender lost its connection: {exc}"))
            else:
                self.done.set_result({"cpu": cpu_seconds() - self.cpu0})


class RawSender(_Sender):
    """The anchor's sender: plain 256 KiB ``transport.write`` calls."""

    def send(self, n: int) -> None:
        self.transport.write(self.view if n == BLOCK else self.view[:n])


class FramedSender(_Sender):
    """One virnet STREAM packet (262120-byte payload) per ``writelines`` call."""

    block = STREAM_CHUNK

    def __init__(self, total: int, done: asyncio.Future[dict[str, float]]) -> None:
        super().__init__(total, done)
        from virnet._impl import encode_stream_data

        self.encode = encode_stream_data

    def send(self, n: int) -> None:
        view = self.view if n == STREAM_CHUNK else self.view[:n]
        self.transport.writelines(self.encode(PROG, VERS, PROC, SERIAL, view))


def _nodelay(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _serve_receiver(proto_cls: type[_Receiver], addr: str, total: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, float]] = loop.create_future()

    def factory() -> _Receiver:
        return proto_cls(total, done)

    if addr.startswith("unix:"):
        path = addr[len("unix:") :]
        server = await loop.create_unix_server(factory, path, backlog=1)
        ready = addr
    else:
        host, _, port = addr[len("tcp:") :].rpartition(":")
        server = await loop.create_server(factory, host, int(port), backlog=1)
        h, p = server.sockets[0].getsockname()[:2]
        ready = f"tcp:{h}:{p}"
    print(f"READY {ready}", flush=True)
    try:
        return await done
    finally:
        server.close()


async def _run_sender(proto_cls: type[_Sender], addr: str, total: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, float]] = loop.create_future()

    def factory() -> _Sender:
        return proto_cls(total, done)

    if addr.startswith("unix:"):
        await loop.create_unix_connection(factory, addr[len("unix:") :])
    else:
        host, _, port = addr[len("tcp:") :].rpartition(":")
        await loop.create_connection(factory, host, int(port))
    return await done


#: Child roles: name -> (kind, protocol class).  New scenarios add their roles here.
ROLES: dict[str, tuple[str, type[Any]]] = {
    "raw-recv": ("recv", RawReceiver),
    "raw-send": ("send", RawSender),
    "framed-recv": ("recv", FramedReceiver),
    "framed-send": ("send", FramedSender),
}


# ------------------------------------------------------------------ virnet streams


async def vn_server(addr: str, total: int, opts: Any) -> dict[str, Any]:
    """A ``virnet.Server`` with the SINK/SOURCE/STALL procedures; serves one client."""
    import virnet
    from _vnstreams import BenchService, serve_one_client

    svc = BenchService()
    server = virnet.Server()
    svc.register(server)
    bound = await server.listen(virnet_uri(addr))
    print(f"READY {ready_addr(bound)}", flush=True)
    await serve_one_client(server)
    await server.close()
    return {"records": svc.records, "cpu": svc.cpu}


async def vn_upload(addr: str, total: int, opts: Any) -> dict[str, Any]:
    """One upload stream: ``send`` of one reused 8 MiB block, then ``finish``."""
    import virnet
    from _vnstreams import SINK, Size, data_block, send_bytes

    block = data_block()
    async with await virnet.connect(virnet_uri(addr)) as client:
        stream = await client.open_stream(SINK, Size(total))
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        await send_bytes(stream, total, block)
        await stream.finish()
        return {"seconds": time.perf_counter() - t0, "cpu": cpu_seconds() - cpu0}


async def vn_download(addr: str, total: int, opts: Any) -> dict[str, Any]:
    """One download stream read with ``async for``; first to last chunk."""
    import virnet
    from _vnstreams import SOURCE, Size, count_chunks

    async with await virnet.connect(virnet_uri(addr)) as client:
        stream = await client.open_stream(SOURCE, Size(total))
        cpu0 = cpu_seconds()
        rec = await count_chunks(stream)
        cpu = cpu_seconds() - cpu0
        await stream.finish()
    if rec["bytes"] != total:
        raise RuntimeError(f"received {rec['bytes']} of {total} bytes")
    return {**rec, "cpu": cpu}


N_STREAMS = 8


async def vn_download_n(addr: str, total: int, opts: Any) -> dict[str, Any]:
    """N_STREAMS concurrent download streams on one connection, ``total`` bytes in all."""
    import virnet
    from _vnstreams import SOURCE, Size, count_chunks

    each = total // N_STREAMS
    sizes = [each] * (N_STREAMS - 1) + [total - each * (N_STREAMS - 1)]
    async with await virnet.connect(virnet_uri(addr)) as client:
        streams = await asyncio.gather(*(client.open_stream(SOURCE, Size(n)) for n in sizes))
        cpu0 = cpu_seconds()
        recs = await asyncio.gather(*(count_chunks(s) for s in streams))
        cpu = cpu_seconds() - cpu0
        await asyncio.gather(*(s.finish() for s in streams))
    got = sum(r["bytes"] for r in recs)
    if got != total:
        raise RuntimeError(f"received {got} of {total} bytes")
    t0 = min(r["t0"] for r in recs)
    t1 = max(r["t1"] for r in recs)
    return {
        "seconds": t1 - t0,
        "cpu": cpu,
        "rates": [r["bytes"] / r["seconds"] / 1e9 for r in recs],  # each stream's own GB/s
        "spans": [[r["t0"] - t0, r["t1"] - t0] for r in recs],
    }


# ------------------------------------------------------------------ FILES via virnetd


async def virnetd_server(addr: str, total: int, opts: Any) -> dict[str, Any]:
    """A real ``Daemon`` (FILES + transfers) with its data root on tmpfs."""
    from _vnstreams import serve_one_client
    from virnet.daemon.app import Daemon
    from virnet.daemon.config import DaemonConfig

    daemon = Daemon(DaemonConfig(listen=[virnet_uri(addr)], root=opts.root))
    await daemon.start()
    print(f"READY {addr}", flush=True)
    cpu0 = cpu_seconds()  # idle until the client comes: costs nothing
    await serve_one_client(daemon.server)
    cpu = cpu_seconds() - cpu0
    await daemon.stop()
    return {"cpu": cpu}


async def files_upload(addr: str, total: int, opts: Any) -> dict[str, Any]:
    import virnet
    from virnet.transfer import upload

    async with await virnet.connect(virnet_uri(addr)) as client:
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        n = await upload(client, opts.local, "up.bin")
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
    if n != total:
        raise RuntimeError(f"uploaded {n} of {total} bytes")
    return {"seconds": seconds, "cpu": cpu}


async def files_download(addr: str, total: int, opts: Any) -> dict[str, Any]:
    import virnet
    from virnet.transfer import download

    async with await virnet.connect(virnet_uri(addr)) as client:
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        n = await download(client, "down.bin", opts.local)
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
    os.unlink(opts.local)  # tmpfs is memory
    if n != total:
        raise RuntimeError(f"downloaded {n} of {total} bytes")
    return {"seconds": seconds, "cpu": cpu}


# ------------------------------------------------------------------ virnet.libvirt


async def vl_download(addr: str, total: int, opts: Any) -> dict[str, Any]:
    """virnet's libvirt client: STORAGE_VOL_DOWNLOAD from a real libvirtd."""
    import virnet.libvirt as vl
    from _vnstreams import count_chunks

    conn = await vl.connect(addr[len("unix:") :], "qemu:///system")
    async with conn:
        pool = await conn.lookup_pool(opts.pool)
        vol = await conn.lookup_volume(pool, opts.vol)
        cpu0 = cpu_seconds()
        stream = await conn.download_volume(vol, 0, total)
        rec = await count_chunks(stream)
        await stream.finish()
        cpu = cpu_seconds() - cpu0
    if rec["bytes"] != total:
        raise RuntimeError(f"received {rec['bytes']} of {total} bytes")
    return {**rec, "cpu": cpu}


async def vl_upload(addr: str, total: int, opts: Any) -> dict[str, Any]:
    """virnet's libvirt client: STORAGE_VOL_UPLOAD; timed from the call to the finish."""
    import virnet.libvirt as vl
    from _vnstreams import data_block, send_bytes

    block = data_block()
    conn = await vl.connect(addr[len("unix:") :], "qemu:///system")
    async with conn:
        pool = await conn.lookup_pool(opts.pool)
        vol = await conn.lookup_volume(pool, opts.vol)
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        stream = await conn.upload_volume(vol, 0, total)
        await send_bytes(stream, total, block)
        await stream.finish()
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
    return {"seconds": seconds, "cpu": cpu}


# ------------------------------------------------------------------ grpcio

GRPC_MSG = 256 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * MiB),
    ("grpc.max_send_message_length", 8 * MiB),
]


def grpc_server(addr: str, total: int, opts: Any) -> dict[str, Any]:
    """grpcio (sync API, thread pool), raw bytes (no serializers): Upload is
    client-streaming, Download server-streaming, 256 KiB messages."""
    import struct
    import threading
    from concurrent import futures

    import grpc

    done = threading.Event()
    result: dict[str, Any] = {}

    def upload(request_iterator: Any, context: Any) -> bytes:
        perf = time.perf_counter
        n = 0
        t0 = t1 = 0.0
        cpu0 = cpu_seconds()
        for msg in request_iterator:
            if n == 0:
                t0 = perf()
            n += len(msg)
            t1 = perf()
        result.update(bytes=n, seconds=t1 - t0, cpu=cpu_seconds() - cpu0)
        done.set()
        return b""

    def download(request: bytes, context: Any) -> Any:
        (size,) = struct.unpack(">Q", request)
        block = os.urandom(GRPC_MSG)
        cpu0 = cpu_seconds()
        try:
            left = size
            while left > 0:
                k = min(left, GRPC_MSG)
                yield block if k == GRPC_MSG else block[:k]
                left -= k
        finally:
            result.update(cpu=cpu_seconds() - cpu0)
            done.set()

    handler = grpc.method_handlers_generic_handler(
        "bench.Bench",
        {
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "Download": grpc.unary_stream_rpc_method_handler(download),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(addr)  # "unix:/path"
    server.start()
    print(f"READY {addr}", flush=True)
    if not done.wait(timeout=600):
        raise RuntimeError("no grpc call came")
    server.stop(grace=5).wait()
    return result


def _grpc_channel(addr: str) -> Any:
    import grpc

    channel = grpc.insecure_channel(addr, options=GRPC_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel


def grpc_upload(addr: str, total: int, opts: Any) -> dict[str, Any]:
    channel = _grpc_channel(addr)
    call = channel.stream_unary("/bench.Bench/Upload")
    block = os.urandom(GRPC_MSG)

    def messages() -> Any:
        left = total
        while left > 0:
            k = min(left, GRPC_MSG)
            yield block if k == GRPC_MSG else block[:k]
            left -= k

    cpu0 = cpu_seconds()
    call(messages())
    cpu = cpu_seconds() - cpu0
    channel.close()
    return {"cpu": cpu}


def grpc_download(addr: str, total: int, opts: Any) -> dict[str, Any]:
    import struct

    channel = _grpc_channel(addr)
    call = channel.unary_stream("/bench.Bench/Download")
    perf = time.perf_counter
    n = 0
    t0 = t1 = 0.0
    cpu0 = cpu_seconds()
    for msg in call(struct.pack(">Q", total)):
        if n == 0:
            t0 = perf()
        n += len(msg)
        t1 = perf()
    cpu = cpu_seconds() - cpu0
    channel.close()
    if n != total:
        raise RuntimeError(f"received {n} of {total} bytes")
    return {"seconds": t1 - t0, "cpu": cpu}


#: Child roles run as coroutines on uvloop: name -> async f(addr, total, opts) -> result.
ASYNC_ROLES: dict[str, Callable[..., Any]] = {
    "vn-server": vn_server,
    "vn-upload": vn_upload,
    "vn-download": vn_download,
    "vn-download-n": vn_download_n,
    "virnetd": virnetd_server,
    "files-upload": files_upload,
    "files-download": files_download,
    "vl-download": vl_download,
    "vl-upload": vl_upload,
}
#: Child roles that are plain functions (grpcio brings its own threads).
SYNC_ROLES: dict[str, Callable[..., dict[str, Any]]] = {
    "grpc-server": grpc_server,
    "grpc-upload": grpc_upload,
    "grpc-download": grpc_download,
}


def child_main(args: argparse.Namespace) -> None:
    import uvloop

    role, addr, total = args.child, args.addr, args.bytes
    check_core(args.core)
    if role in ROLES:
        kind, cls = ROLES[role]
        run = _serve_receiver if kind == "recv" else _run_sender
        result: Any = uvloop.run(run(cls, addr, total))
    elif role in ASYNC_ROLES:
        result = uvloop.run(ASYNC_ROLES[role](addr, total, args))
    else:
        result = SYNC_ROLES[role](addr, total, args)
    print(f"RESULT {json.dumps(result)}", flush=True)


# ============================================================================ parent side


def run_pump(
    recv_role: str,
    send_role: str,
    nbytes: int,
    workdir: Path,
    *,
    tcp: bool = False,
    core: str | None = None,
) -> Transfer:
    """Start a receiver and a sender process; the receiver's seconds for nbytes, and the
    CPU seconds each side spent during the transfer."""
    addr = "tcp:127.0.0.1:0" if tcp else unix_addr(workdir, "pump.sock")
    result = run_pair(
        __file__,
        recv_role,
        send_role,
        addr,
        core=core,
        extra=("--bytes", str(nbytes)),
        results_from=("server", "client"),
        timeout=transfer_timeout(nbytes),
    )
    recv = json.loads(result["server"])
    send = json.loads(result["client"])
    return Transfer(
        recv["seconds"], {"recv": recv["cpu"], "send": send["cpu"]}, reads=recv["reads"]
    )


def pump_scenario(
    recv_role: str, send_role: str, *, tcp: bool = False, core: str | None = None
) -> Callable[[int, Path], Transfer]:
    def run(nbytes: int, workdir: Path) -> Transfer:
        return run_pump(recv_role, send_role, nbytes, workdir, tcp=tcp, core=core)

    return run


def stream_scenario(
    direction: str, *, core: str, tcp: bool = False
) -> Callable[[int, Path], Transfer]:
    """virnet client + ``virnet.Server`` with the bench's SINK/SOURCE procedures.
    ``direction``: "up", "down" or "down-n" (N_STREAMS concurrent downloads)."""
    client_role = {"up": "vn-upload", "down": "vn-download", "down-n": "vn-download-n"}[direction]

    def run(nbytes: int, workdir: Path) -> Transfer:
        addr = "tcp:127.0.0.1:0" if tcp else unix_addr(workdir, "vn.sock")
        res = run_pair(
            __file__,
            "vn-server",
            client_role,
            addr,
            core=core,
            extra=("--bytes", str(nbytes)),
            results_from=("server", "client"),
            timeout=transfer_timeout(nbytes),
        )
        srv = json.loads(res["server"])
        cli = json.loads(res["client"])
        if direction == "up":
            rec = srv["records"][0]
            if rec["bytes"] != nbytes:
                raise RuntimeError(f"server received {rec['bytes']} of {nbytes} bytes")
            return Transfer(rec["seconds"], {"recv": srv["cpu"], "send": cli["cpu"]})
        extra: dict[str, Any] = {}
        if direction == "down-n":
            rates = cli["rates"]
            mean = statistics.fmean(rates)
            extra = {
                "worst stream vs mean, %": max(abs(r - mean) / mean * 100 for r in rates),
                "stream rates GB/s": rates,
                "stream spans s": cli["spans"],
            }
        return Transfer(cli["seconds"], {"recv": cli["cpu"], "send": srv["cpu"]}, extra=extra)

    return run


class FilesFixture:
    """Source files for the FILES scenarios on /dev/shm (tmpfs: no disk in the figures)."""

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.size = 0

    def prepare(self, size: int) -> Path:
        if self.dir is None:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.dir = Path(tempfile.mkdtemp(prefix="virnet-bench-files-", dir=shm))
            (self.dir / "root").mkdir()
        if self.size != size:
            _fill_file(self.dir / "src.bin", size)
            _fill_file(self.dir / "root" / "down.bin", size)
            self.size = size
        return self.dir

    def cleanup(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _fill_file(path: Path, size: int, *, truncate: bool = True) -> None:
    block = os.urandom(8 * MiB)
    with open(path, "r+b" if not truncate else "wb") as fh:
        left = size
        while left > 0:
            k = min(left, len(block))
            fh.write(block if k == len(block) else block[:k])
            left -= k


FILES = FilesFixture()


def files_scenario(direction: str) -> Callable[[int, Path], Transfer]:
    """virnet.transfer.upload/download against a real ``Daemon``: end-to-end wall time of
    the client call (open, data, finish; the daemon's fsync on tmpfs is nearly free)."""

    def run(nbytes: int, workdir: Path) -> Transfer:
        d = FILES.prepare(nbytes)
        local = d / ("src.bin" if direction == "up" else "dst.bin")
        res = run_pair(
            __file__,
            "virnetd",
            "files-upload" if direction == "up" else "files-download",
            unix_addr(workdir, "vnd.sock"),
            core="compiled",
            extra=("--bytes", str(nbytes), "--root", str(d / "root"), "--local", str(local)),
            results_from=("server", "client"),
            timeout=transfer_timeout(nbytes),
        )
        srv = json.loads(res["server"])
        cli = json.loads(res["client"])
        if direction == "up":
            (d / "root" / "up.bin").unlink(missing_ok=True)
            return Transfer(cli["seconds"], {"recv": srv["cpu"], "send": cli["cpu"]})
        return Transfer(cli["seconds"], {"recv": cli["cpu"], "send": srv["cpu"]})

    return run


# ------------------------------------------------------------------ libvirt

_LIBVIRT_SCRIPT = r"""
import json, os, resource, sys, time
import libvirt

uri, pool_name, vol_name, total, mode = sys.argv[1:6]
total = int(total)

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

conn = libvirt.open(uri)
vol = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(vol_name)
stream = conn.newStream(0)
perf = time.perf_counter
if mode == "download":
    st = {"n": 0, "t0": 0.0, "t1": 0.0}

    def sink(s, buf, o):
        if o["n"] == 0:
            o["t0"] = perf()
        o["n"] += len(buf)
        o["t1"] = perf()
        return len(buf)

    cpu0 = cpu()
    vol.download(stream, 0, total, 0)
    stream.recvAll(sink, st)
    stream.finish()
    c = cpu() - cpu0
    if st["n"] != total:
        raise SystemExit("received %d of %d bytes" % (st["n"], total))
    out = {"seconds": st["t1"] - st["t0"], "cpu": c}
else:
    blocks = {}  # one immutable block per size asked for (262120 bytes each time)
    st = {"left": total}

    def source(s, nbytes, o):
        k = min(nbytes, o["left"])
        o["left"] -= k
        block = blocks.get(k)
        if block is None:
            block = blocks[k] = os.urandom(k)
        return block

    cpu0 = cpu()
    t0 = perf()
    vol.upload(stream, 0, total, 0)
    stream.sendAll(source, st)
    stream.finish()
    out = {"seconds": perf() - t0, "cpu": cpu() - cpu0}
conn.close()
print("RESULT " + json.dumps(out), flush=True)
"""


WARM_UP_BYTES = 64 * MiB  # LibvirtFixture's untimed first upload


class LibvirtFixture:
    """A private libvirtd (tests/_libvirtd.py) with a dir pool on /dev/shm and one raw
    volume, started on first use and kept for the whole run."""

    VOL = "bench.img"

    def __init__(self) -> None:
        #: Run libvirtd as installed (``--stock-libvirtd``) instead of with the glibc
        #: malloc thresholds virnetd sets for itself (``libvirtd_env``).
        self.stock = False
        self.reason: str | None = None
        self.pylibvirt_reason: str | None = None
        self.daemon: Any = None
        self.pool = ""
        self.pool_dir: Path | None = None
        self.vol_path: Path | None = None  # the volume's file in the pool's directory
        self.size = 0

    def ensure(self, size: int, *, pylibvirt: bool = False) -> Any:
        if self.daemon is None and self.reason is None:
            self._start()
        if self.reason is not None:
            raise Skipped(self.reason)
        if pylibvirt:
            if self.pylibvirt_reason is None:
                from _libvirtd import SYSTEM_PYTHON, system_python_has_libvirt

                if not system_python_has_libvirt():
                    self.pylibvirt_reason = f"python3-libvirt not importable by {SYSTEM_PYTHON}"
                else:
                    self.pylibvirt_reason = ""
            if self.pylibvirt_reason:
                raise Skipped(self.pylibvirt_reason)
        if self.size != size:
            assert self.pool_dir is not None
            if self.size:
                self.daemon.virsh("vol-delete", self.VOL, "--pool", self.pool)
            path = self.daemon.create_raw_volume(self.pool, self.VOL, str(size))
            _fill_file(Path(path), size, truncate=False)  # data, not one big hole
            self.vol_path = Path(path)
            self.size = size
            if self.stock:
                self._warm_up()
        return self.daemon

    def libvirtd_env(self) -> dict[str, str]:
        """libvirtd's environment on top of ours: glibc's mmap and trim thresholds fixed
        at the values ``virnetd`` gives itself (``virnet.daemon.__main__.tune_malloc``),
        unless ``stock``.  As installed, libvirtd serves downloads in one of two states
        whoever the client: ~393k fresh pages faulted in per GiB sent at 1.3-2.2 s of
        CPU per GiB, or next to none at 0.5-0.8 s; which one a row meets depends on what
        libvirtd did before (see ``_warm_up``) and can change within a run, so the rows
        compared libvirtd's allocator more than the clients.  With both thresholds fixed
        it faults ~1 page per GiB from the first transfer.  (Either one alone is worse:
        setting one turns glibc's adjustment of the other off.)  The same daemon serves
        both clients either way."""
        if self.stock:
            return {}
        from virnet.daemon.__main__ import MMAP_THRESHOLD, TRIM_THRESHOLD

        return {
            "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
        }

    def _warm_up(self) -> None:
        """With ``--stock-libvirtd``: one small untimed upload (``virnet.libvirt``,
        64 MiB at offset 0) before any row is timed.  A fresh libvirtd starts in its
        slow state (``libvirtd_env``); after an upload it was in the fast one in every
        quiet run of the bench, but not always (with the test suite running beside it,
        after none of three uploads by hand, one from each client and one from virsh),
        and a run can fall back to the slow state later.  Without this the first rows
        of a stock run measured the start-up state, and which client met it depended on
        the order."""
        try:
            run_one(
                __file__,
                "vl-upload",
                f"unix:{self.daemon.socket_path}",
                core="compiled",
                extra=("--bytes", str(min(self.size, WARM_UP_BYTES)), "--pool", self.pool,
                       "--vol", self.VOL),
                timeout=transfer_timeout(WARM_UP_BYTES),
            )
        except Exception as exc:  # only a warm-up: the rows still run, colder
            print(f"  libvirtd warm-up failed: {str(exc).splitlines()[0]}", flush=True)

    def _start(self) -> None:
        tests = str(Path(__file__).resolve().parent.parent / "tests")
        if tests not in sys.path:
            sys.path.insert(0, tests)
        try:
            from _libvirtd import LibvirtDaemon, libvirtd_available
        except ImportError as exc:
            self.reason = f"tests/_libvirtd.py not importable: {exc}"
            return
        reason = libvirtd_available()
        if reason:
            self.reason = reason
            return
        try:
            daemon = LibvirtDaemon(env=self.libvirtd_env()).start()
        except Exception as exc:
            self.reason = f"libvirtd did not start: {str(exc).splitlines()[0]}"
            return
        self.daemon = daemon
        try:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.pool_dir = Path(tempfile.mkdtemp(prefix="virnet-bench-pool-", dir=shm))
            self.pool, _ = daemon.create_dir_pool(target=self.pool_dir)
        except Exception as exc:
            self.reason = f"cannot create a dir pool: {str(exc).splitlines()[0]}"
            self.cleanup()

    def cleanup(self) -> None:
        if self.daemon is not None:
            try:
                if self.size:
                    self.daemon.virsh("vol-delete", self.VOL, "--pool", self.pool)
            except Exception:
                pass
            self.daemon.cleanup()  # stops exactly this libvirtd, by its pid
            self.daemon = None
        if self.pool_dir is not None:
            shutil.rmtree(self.pool_dir, ignore_errors=True)
            self.pool_dir = None


LIBVIRT = LibvirtFixture()


def pylibvirt_scenario(mode: str) -> Callable[[int, Path], Transfer]:
    """python3-libvirt (the C stack) under /usr/bin/python3 against libvirtd."""

    def run(nbytes: int, workdir: Path) -> Transfer:
        daemon = LIBVIRT.ensure(nbytes, pylibvirt=True)
        from _libvirtd import SYSTEM_PYTHON

        cpu0 = proc_cpu(daemon.pid)
        r = subprocess.run(
            [
                SYSTEM_PYTHON,
                "-c",
                _LIBVIRT_SCRIPT,
                daemon.qemu_uri,
                LIBVIRT.pool,
                LIBVIRT.VOL,
                str(nbytes),
                mode,
            ],
            capture_output=True,
            text=True,
            timeout=transfer_timeout(nbytes),
            check=False,
        )
        daemon_cpu = proc_cpu(daemon.pid) - cpu0
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"python3-libvirt {mode} failed ({r.returncode}): {tail}")
        out = next(
            json.loads(ln[len("RESULT ") :])
            for ln in r.stdout.splitlines()
            if ln.startswith("RESULT ")
        )
        sides = {"recv": out["cpu"], "send": daemon_cpu}
        if mode == "upload":
            sides = {"recv": daemon_cpu, "send": out["cpu"]}
        return Transfer(out["seconds"], sides)

    return run


def vl_scenario(mode: str) -> Callable[[int, Path], Transfer]:
    """virnet.libvirt (compiled, uvloop) against the same libvirtd."""

    def run(nbytes: int, workdir: Path) -> Transfer:
        daemon = LIBVIRT.ensure(nbytes)
        cpu0 = proc_cpu(daemon.pid)
        out = json.loads(
            run_one(
                __file__,
                "vl-download" if mode == "download" else "vl-upload",
                f"unix:{daemon.socket_path}",
                core="compiled",
                extra=("--bytes", str(nbytes), "--pool", LIBVIRT.pool, "--vol", LIBVIRT.VOL),
                timeout=transfer_timeout(nbytes),
            )
        )
        daemon_cpu = proc_cpu(daemon.pid) - cpu0
        sides = {"recv": out["cpu"], "send": daemon_cpu}
        if mode == "upload":
            sides = {"recv": daemon_cpu, "send": out["cpu"]}
        return Transfer(out["seconds"], sides)

    return run


def grpc_scenario(direction: str) -> Callable[[int, Path], Transfer]:
    def run(nbytes: int, workdir: Path) -> Transfer:
        if importlib.util.find_spec("grpc") is None:
            raise Skipped("grpcio is not installed (pip install grpcio)")
        res = run_pair(
            __file__,
            "grpc-server",
            "grpc-upload" if direction == "up" else "grpc-download",
            unix_addr(workdir, "grpc.sock"),
            core=None,
            extra=("--bytes", str(nbytes)),
            results_from=("server", "client"),
            timeout=transfer_timeout(nbytes),
        )
        srv = json.loads(res["server"])
        cli = json.loads(res["client"])
        if direction == "up":
            if srv["bytes"] != nbytes:
                raise RuntimeError(f"server received {srv['bytes']} of {nbytes} bytes")
            return Transfer(srv["seconds"], {"recv": srv["cpu"], "send": cli["cpu"]})
        return Transfer(cli["seconds"], {"recv": cli["cpu"], "send": srv["cpu"]})

    return run


@dataclass
class Scenario:
    name: str
    run: Callable[[int, Path], Transfer]  # moves nbytes in its own processes
    anchor: bool = False  # others may be compared against it (anchor_name)
    anchor_name: str | None = None  # the scenario this one is compared against (None: PUMP)
    cap: int | None = None  # at most this volume per transfer (tmpfs, slow peers)
    samples: list[float] = field(default_factory=list)  # GB/s per repetition
    rounds: list[int] = field(default_factory=list)  # the round of each sample
    cpu: dict[str, list[float]] = field(default_factory=dict)  # side -> CPU s per GiB
    read_sizes: list[float] = field(default_factory=list)  # mean KiB per receiver read
    extras: dict[str, list[Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: str | None = None


CAP = 2 * GiB  # libvirt, FILES, grpcio, whole processes: 2 GiB (and tmpfs is memory)
PUMP = "raw uvloop pump, unix"  # the anchor of every scenario that names no other one
ONE_DOWN = "virnet download, compiled, unix"
N_DOWN = f"virnet {N_STREAMS} streams down, compiled, unix"
PY_DOWN = "libvirt vol-download (python3-libvirt recvAll)"
PY_UP = "libvirt vol-upload (python3-libvirt sendAll)"
VL_DOWN = "virnet.libvirt vol-download, compiled"
VL_UP = "virnet.libvirt vol-upload, compiled"
LIBVIRT_ROWS = frozenset({PY_DOWN, PY_UP, VL_DOWN, VL_UP, VIRSH_DOWN, VIRSH_UP})
CLI_STDOUT = cli_stdout_name()  # says whether stdout is the private null device or a pipe
#: Short names of the anchors in the table's "vs" column.
ANCHOR_LABELS = {PUMP: "pump", LOCAL_COPY: "local copy"}

SCENARIOS: list[Scenario] = [
    Scenario(PUMP, pump_scenario("raw-recv", "raw-send"), anchor=True),
    Scenario(
        "virnet framing, compiled, unix",
        pump_scenario("framed-recv", "framed-send", core="compiled"),
    ),
    Scenario(
        "virnet framing, pure, unix",
        pump_scenario("framed-recv", "framed-send", core="pure"),
    ),
    Scenario("virnet upload, compiled, unix", stream_scenario("up", core="compiled")),
    Scenario(ONE_DOWN, stream_scenario("down", core="compiled")),
    Scenario("virnet upload, pure, unix", stream_scenario("up", core="pure")),
    Scenario("virnet download, pure, unix", stream_scenario("down", core="pure")),
    Scenario(N_DOWN, stream_scenario("down-n", core="compiled")),
    Scenario("raw uvloop pump, tcp", pump_scenario("raw-recv", "raw-send", tcp=True)),
    Scenario(
        "virnet framing, compiled, tcp",
        pump_scenario("framed-recv", "framed-send", tcp=True, core="compiled"),
    ),
    Scenario("virnet upload, compiled, tcp", stream_scenario("up", core="compiled", tcp=True)),
    Scenario("virnet download, compiled, tcp", stream_scenario("down", core="compiled", tcp=True)),
    Scenario("virnet FILES upload via virnetd, compiled, unix", files_scenario("up"), cap=CAP),
    Scenario("virnet FILES download via virnetd, compiled, unix", files_scenario("down"), cap=CAP),
    Scenario(PY_DOWN, pylibvirt_scenario("download"), cap=CAP),
    Scenario(PY_UP, pylibvirt_scenario("upload"), cap=CAP),
    Scenario(VL_DOWN, vl_scenario("download"), cap=CAP),
    Scenario(VL_UP, vl_scenario("upload"), cap=CAP),
    # Whole processes (_cli_scenarios.py): spawn to exit, start-up included.
    Scenario(LOCAL_COPY, local_copy_scenario(FILES), anchor=True, cap=CAP),
    Scenario(CLI_STDOUT, virnet_cli_scenario("stdout", FILES), cap=CAP),
    Scenario(CLI_INPLACE, virnet_cli_scenario("inplace", FILES), cap=CAP),
    Scenario(
        CLI_DOWN_NEW, virnet_cli_scenario("down-new", FILES), anchor_name=LOCAL_COPY, cap=CAP
    ),
    Scenario(
        CLI_UP_WHOLE, virnet_cli_scenario("up-whole", FILES), anchor_name=LOCAL_COPY, cap=CAP
    ),
    Scenario(
        VIRSH_DOWN, virsh_scenario("download", LIBVIRT, FILES), anchor_name=LOCAL_COPY, cap=CAP
    ),
    Scenario(VIRSH_UP, virsh_scenario("upload", LIBVIRT, FILES), anchor_name=LOCAL_COPY, cap=CAP),
    Scenario("grpcio upload (client-streaming), 256 KiB msgs, unix", grpc_scenario("up"), cap=CAP),
    Scenario(
        "grpcio download (server-streaming), 256 KiB msgs, unix", grpc_scenario("down"), cap=CAP
    ),
]

@dataclass(frozen=True)
class Target:
    """A goal of the issue: ``name``'s figure ``op`` ``goal``.  The figure is the ratio to
    the scenario's own anchor (``figure="ratio"``), a derived figure's value
    (``figure="value"``), or, with ``versus``, scenario ``name``'s median over scenario
    ``versus``'s median in the same run (and the median of their per-round ratios)."""

    name: str
    op: str
    goal: float
    figure: str = "ratio"
    versus: str | None = None

    @property
    def key(self) -> str:
        """Where the figure is found: the scenario's name, or the derived "A / B" one."""
        return self.name if self.versus is None else versus_name(self.name, self.versus)


def versus_name(a: str, b: str) -> str:
    return f"{a} / {b}"


#: Targets (from the issue); every ratio is between scenarios of the same run.
TARGETS: list[Target] = [
    Target("virnet upload, compiled, unix", ">=", 0.70),
    Target(ONE_DOWN, ">=", 0.70),
    Target("virnet upload, pure, unix", ">=", 0.35),
    Target("virnet download, pure, unix", ">=", 0.35),
    Target(f"{N_DOWN}: aggregate vs one stream", ">=", 0.90, figure="value"),
    Target(f"{N_DOWN}: worst stream vs mean", "<=", 20.0, figure="value"),
    Target(CLI_STDOUT, ">=", 0.70),
    Target(CLI_INPLACE, ">=", 0.60),
    Target(CLI_DOWN_NEW, ">=", 0.80),
    Target(CLI_UP_WHOLE, ">=", 0.80),
    Target(VL_UP, ">=", 1.0, versus=PY_UP),
    Target(VL_DOWN, ">=", 1.0, versus=PY_DOWN),
]


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def paired_ratios(sc: Scenario, ref: Scenario) -> list[float]:
    """``sc``'s sample over ``ref``'s sample of the same round, for every round both
    have: less sensitive than a ratio of medians to load that changes between rounds."""
    by_round = dict(zip(ref.rounds, ref.samples, strict=True))
    return [v / by_round[r] for r, v in zip(sc.rounds, sc.samples, strict=True) if r in by_round]


def _verdict(value: float | None, op: str, goal: float) -> str:
    if value is None:
        return "not measured"
    met = value >= goal if op == ">=" else value <= goal
    gap = abs(value - goal)
    return "met" if met else f"missed by {gap:.3f} ({gap / goal * 100:.1f} %)"


def check_targets(
    targets: list[Target],
    found: dict[str, dict[str, Any]],
    paired: dict[str, float],
    anchors: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Rows of target, measured value, met or missed (and by how much); the verdict is
    on the ratio of medians, the median of per-round ratios is shown beside it.
    ``found``: the JSON's scenario entries by name (derived "A / B" figures among them,
    see ``versus_figures``); ``paired``: medians of per-round ratios by the same names;
    ``anchors``: scenario -> its anchor's short name, for the target's text."""
    rows = []
    for t in targets:
        entry = found.get(t.key)
        value = pvalue = None
        if entry is not None:
            by_ratio = t.figure == "ratio" and t.versus is None  # else the entry is the figure
            value = entry["ratio"] if by_ratio else entry["value"]
            # A plain scenario's paired figure is its ratio to its anchor: no use for
            # a target on its GB/s.
            if by_ratio or entry["unit"] != "GB/s":
                pvalue = paired.get(t.key)
        if t.versus is not None:
            text = f"{t.key} {t.op} {t.goal:g}"
        elif t.figure == "ratio":
            vs = (anchors or {}).get(t.name, "anchor")
            text = f"{t.name}: ratio to {vs} {t.op} {t.goal:g}"
        else:
            text = f"{t.name}: {t.figure} {t.op} {t.goal:g}"
        rows.append(
            {
                "target": text,
                "measured": "-" if value is None else f"{value:.2f}",
                "verdict": _verdict(value, t.op, t.goal),
                "paired": "-" if pvalue is None else f"{pvalue:.2f}",
                "paired verdict": "-" if pvalue is None else _verdict(pvalue, t.op, t.goal),
            }
        )
    return rows


def versus_figures(
    targets: list[Target], by_name: dict[str, Scenario]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The "A / B" figures the targets ask for, where both scenarios have samples: JSON
    entries (ratio of medians, unit "x") and medians of the per-round ratios."""
    entries: list[dict[str, Any]] = []
    paired: dict[str, float] = {}
    for t in targets:
        if t.versus is None:
            continue
        a, b = by_name.get(t.name), by_name.get(t.versus)
        if a is None or b is None or not a.samples or not b.samples:
            continue
        value = statistics.median(a.samples) / statistics.median(b.samples)
        entries.append({"name": t.key, "value": round(value, 4), "unit": "x", "ratio": None})
        per_round = paired_ratios(a, b)
        if per_round:
            paired[t.key] = statistics.median(per_round)
    return entries, paired


def select(only: list[str] | None) -> list[Scenario]:
    """The scenarios whose name contains one of ``only`` (all without it), plus the
    anchors they are compared against and the pump, in ``SCENARIOS`` order."""
    chosen = [s for s in SCENARIOS if not only or any(o in s.name for o in only)]
    needed = {PUMP} | {s.anchor_name for s in chosen if s.anchor_name is not None}
    return [s for s in SCENARIOS if s in chosen or s.name in needed]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="512 MiB x 2 instead of 4 GiB x 5")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--bytes", type=int, help="volume per transfer (default by mode)")
    ap.add_argument("--repeat", type=int, help="repetitions per scenario (default by mode)")
    ap.add_argument("--only", action="append", help="run scenarios whose name contains this")
    ap.add_argument("--stock-libvirtd", action="store_true",
                    help="run the private libvirtd with glibc's default malloc tuning (by "
                         "default it gets virnetd's: see LibvirtFixture.libvirtd_env)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--core", choices=["compiled", "pure"], help=argparse.SUPPRESS)
    for opt in ("--root", "--local", "--pool", "--vol"):
        ap.add_argument(opt, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        child_main(args)
        return 0

    nbytes = args.bytes or (512 * MiB if args.quick else 4 * GiB)
    repeat = args.repeat or (2 if args.quick else 5)
    scenarios = select(args.only)
    info = machine_info()
    LIBVIRT.stock = args.stock_libvirtd
    if any(s.name in LIBVIRT_ROWS for s in scenarios):
        tuning = LIBVIRT.libvirtd_env()
        print("libvirtd (private): " + (
            " ".join(f"{k}={v}" for k, v in tuning.items()) + " (virnetd's malloc tuning)"
            if tuning else "glibc's default malloc tuning (--stock-libvirtd)"), flush=True)
    print(
        f"throughput: {nbytes / MiB:.0f} MiB per transfer (at most {CAP / MiB:.0f} MiB for "
        f"FILES, libvirt, grpcio, whole processes), {repeat} repetitions, "
        f"{len(scenarios)} scenarios; {info}",
        flush=True,
    )
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="virnet-bench-") as tmp:
            for rep in range(repeat):
                for sc in scenarios if rep % 2 == 0 else scenarios[::-1]:
                    if sc.skipped is not None:
                        continue
                    vol = min(nbytes, sc.cap) if sc.cap else nbytes
                    try:
                        t = sc.run(vol, Path(tmp))
                    except Skipped as exc:
                        sc.skipped = str(exc)
                        print(f"  {sc.name}: skipped: {exc}", flush=True)
                        continue
                    except Exception as exc:  # recorded as failed, the run goes on
                        sc.failures.append(f"{type(exc).__name__}: {exc}")
                        print(
                            f"  [{rep + 1}/{repeat}] {sc.name}: FAILED: {sc.failures[-1]}",
                            flush=True,
                        )
                        continue
                    sc.samples.append(vol / t.seconds / 1e9)
                    sc.rounds.append(rep)
                    for side, secs in t.cpu.items():
                        sc.cpu.setdefault(side, []).append(secs / (vol / GiB))
                    if t.reads:
                        sc.read_sizes.append(vol / t.reads / 1024)
                    for key, value in t.extra.items():
                        sc.extras.setdefault(key, []).append(value)
                    cpu = ", ".join(f"{k} CPU {v[-1]:.2f} s/GiB" for k, v in sc.cpu.items())
                    print(
                        f"  [{rep + 1}/{repeat}] {sc.name}: {sc.samples[-1]:.2f} GB/s ({cpu})",
                        flush=True,
                    )
    finally:
        LIBVIRT.cleanup()
        FILES.cleanup()
    wall = time.perf_counter() - started
    consistent = check_sources_unchanged(info)

    by_name = {s.name: s for s in scenarios}

    def anchor_of(sc: Scenario) -> Scenario | None:
        ref = by_name.get(sc.anchor_name or PUMP)
        return ref if ref is not None and ref.samples else None

    anchor_label = {
        s.name: ANCHOR_LABELS.get(s.anchor_name or PUMP, s.anchor_name or PUMP)
        for s in SCENARIOS
    }
    results: list[dict[str, Any]] = []
    paired: dict[str, float] = {}  # name -> median of per-round ratios
    rows = []

    def cpu_median(sc: Scenario, side: str) -> str:
        values = sc.cpu.get(side)
        return f"{statistics.median(values):.3f}" if values else "-"

    for sc in scenarios:
        vol = min(nbytes, sc.cap) if sc.cap else nbytes
        if not sc.samples:
            why = f"skipped: {sc.skipped}" if sc.skipped else f"FAILED: {sc.failures[-1]}"
            rows.append(
                {
                    "scenario": sc.name,
                    "MiB": f"{vol / MiB:.0f}",
                    "GB/s (median)": _short(why),
                    "min..max": "-",
                    "vs": anchor_label[sc.name],
                    "ratio": "-",
                    "paired ratio": "-",
                    "recv CPU s/GiB": "-",
                    "send CPU s/GiB": "-",
                    "KiB/read": "-",
                }
            )
            continue
        med = statistics.median(sc.samples)
        anchor = anchor_of(sc)
        ratio = med / statistics.median(anchor.samples) if anchor is not None else None
        results.append({"name": sc.name, "value": round(med, 4), "unit": "GB/s", "ratio": ratio})
        pr = paired_ratios(sc, anchor) if anchor is not None else []
        if pr:
            paired[sc.name] = statistics.median(pr)
        failed = f" ({len(sc.failures)} failed)" if sc.failures else ""
        rows.append(
            {
                "scenario": sc.name + failed,
                "MiB": f"{vol / MiB:.0f}",
                "GB/s (median)": f"{med:.2f}",
                "min..max": f"{min(sc.samples):.2f}..{max(sc.samples):.2f}",
                "vs": anchor_label[sc.name],
                "ratio": f"{ratio:.2f}" if ratio is not None else "-",
                "paired ratio": f"{paired[sc.name]:.2f}" if sc.name in paired else "-",
                "recv CPU s/GiB": cpu_median(sc, "recv"),
                "send CPU s/GiB": cpu_median(sc, "send"),
                "KiB/read": (f"{statistics.median(sc.read_sizes):.0f}" if sc.read_sizes else "-"),
            }
        )
    columns = [
        "scenario",
        "MiB",
        "GB/s (median)",
        "min..max",
        "vs",
        "ratio",
        "paired ratio",
        "recv CPU s/GiB",
        "send CPU s/GiB",
        "KiB/read",
    ]
    print_table(
        f"throughput, {nbytes / MiB:.0f} MiB x {repeat}, wall {wall:.0f} s "
        "(ratio: of medians, to the anchor in column vs; paired: median of per-round ratios; "
        "CPU: median user+sys "
        "seconds per GiB moved, per side; KiB/read: receiver's mean bytes per socket read)",
        rows,
        columns,
    )

    # Derived figures of the concurrent streams, against one stream in the same run.
    multi = by_name.get(N_DOWN)
    one = by_name.get(ONE_DOWN)
    derived_rows = []
    if multi is not None and multi.samples:
        if one is not None and one.samples:
            agg = statistics.median(multi.samples) / statistics.median(one.samples)
            per_round = paired_ratios(multi, one)
            paired[f"{N_DOWN}: aggregate vs one stream"] = statistics.median(per_round)
            results.append(
                {
                    "name": f"{N_DOWN}: aggregate vs one stream",
                    "value": round(agg, 4),
                    "unit": "x",
                    "ratio": None,
                }
            )
            derived_rows.append(
                {
                    "figure": f"{N_DOWN}: aggregate vs one stream (ratio of medians; "
                    "per round: same-round ratios)",
                    "value": f"{agg:.2f}x",
                    "per round": ", ".join(f"{r:.2f}" for r in per_round),
                }
            )
        devs = multi.extras.get("worst stream vs mean, %", [])
        if devs:
            worst = statistics.median(devs)
            results.append(
                {
                    "name": f"{N_DOWN}: worst stream vs mean",
                    "value": round(worst, 2),
                    "unit": "%",
                    "ratio": None,
                }
            )
            derived_rows.append(
                {
                    "figure": f"{N_DOWN}: worst stream's rate vs the mean of {N_STREAMS} (median)",
                    "value": f"{worst:.1f} %",
                    "per round": ", ".join(f"{d:.1f}" for d in devs),
                }
            )
            last = multi.extras["stream rates GB/s"][-1]
            derived_rows.append(
                {
                    "figure": f"{N_DOWN}: per-stream GB/s, last round",
                    "value": f"mean {statistics.fmean(last):.3f}",
                    "per round": ", ".join(f"{r:.3f}" for r in last),
                }
            )
    if derived_rows:
        print_table(
            f"{N_STREAMS} concurrent download streams on one connection",
            derived_rows,
            ["figure", "value", "per round"],
        )
    vs_entries, vs_paired = versus_figures(TARGETS, by_name)
    results += vs_entries
    paired.update(vs_paired)
    found = {r["name"]: r for r in results}
    target_rows = check_targets(TARGETS, found, paired, anchor_label)
    print_table(
        "targets (ratios within this run)",
        target_rows,
        ["target", "measured", "verdict", "paired", "paired verdict"],
    )
    if args.json:
        doc = {
            "scenarios": results,
            "meta": {
                "bytes": nbytes,
                "cap_bytes": CAP,
                "repeat": repeat,
                "wall_s": wall,
                "sources_unchanged": consistent,
                "libvirtd_env": LIBVIRT.libvirtd_env(),
                "machine": info,
                "samples": {s.name: s.samples for s in scenarios},
                "rounds": {s.name: s.rounds for s in scenarios},
                "paired_ratio": paired,
                "anchor": {s.name: s.anchor_name or PUMP for s in scenarios},
                "cpu_s_per_GiB": {s.name: s.cpu for s in scenarios},
                "recv_KiB_per_read": {s.name: s.read_sizes for s in scenarios},
                "extras": {s.name: s.extras for s in scenarios if s.extras},
                "failed": {s.name: s.failures for s in scenarios if s.failures},
                "skipped": {s.name: s.skipped for s in scenarios if s.skipped},
                "targets": target_rows,
            },
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
