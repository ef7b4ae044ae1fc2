#!/usr/bin/env python
"""Bulk-data throughput of virnet against the raw uvloop pump, side by side in one run.

Usage::

    python bench/throughput.py [--quick] [--json FILE] [--only SUBSTRING ...]

Every scenario moves a fixed volume from a *sender* process to a *receiver* process (two
processes: the machine has 2 cores and one Python process per side is how virnet is
deployed).  The receiver times the transfer from its first received byte to its last and
reports the seconds on stdout; the parent turns that into GB/s (10^9 bytes/s).  All
scenarios are repeated ``--repeat`` times, interleaved round by round (anchor, framing, ...,
anchor, framing, ...), so that a noisy neighbour hurts all of them alike.  The table shows
the median and the ratio to the median of the anchor, the raw uvloop pump over a Unix
socket, taken in the same run.  Only such ratios are comparable between runs.

Scenarios (each a function ``run(nbytes, workdir) -> seconds``; add more to ``SCENARIOS``):

* ``raw uvloop pump, unix`` -- the anchor: 256 KiB ``transport.write`` calls honouring
  ``pause_writing``/``resume_writing``; the receiver is a ``BufferedProtocol`` that counts
  bytes received into one fixed 256 KiB buffer.
* ``virnet framing, compiled|pure, unix`` -- the same pump, but the sender frames each
  262120-byte block with ``encode_stream_data`` (``writelines`` of header + memoryview) and
  the receiver decodes with ``FrameDecoder`` (``get_buffer``/``buffer_updated``) and counts
  payload bytes.  The twin is chosen in the child with ``VIRNET_NO_EXTENSIONS``.
* ``..., tcp`` -- TCP loopback variants of the anchor and of compiled framing.

All pump senders use the same transport write-buffer limits (high 4 MiB, low 1 MiB), the
top of the 1-4 MiB range anchors.md recommends.

Extension point: later scenarios (real virnet upload/download streams, 8 concurrent
streams, libvirt's ``vol-upload``/``vol-download``, grpcio) are more ``Scenario`` entries
whose ``run`` starts the two processes and returns the seconds for ``nbytes``; the child
roles they need go into ``ROLES``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    check_core,
    check_sources_unchanged,
    cpu_seconds,
    machine_info,
    print_table,
    run_pair,
    unix_addr,
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


def child_main(role: str, addr: str, total: int, core: str | None) -> None:
    import uvloop

    check_core(core)
    kind, cls = ROLES[role]
    run = _serve_receiver if kind == "recv" else _run_sender
    result = uvloop.run(run(cls, addr, total))
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
        timeout=60 + nbytes / 20e6,  # generous: 20 MB/s is far below anything expected
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


@dataclass
class Transfer:
    """What one run of a scenario reports: wall seconds for the volume, and optionally
    the CPU seconds per side (``{"recv": s, "send": s}``) spent during it."""

    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)
    reads: int | None = None  # socket reads on the receiving side, if known


@dataclass
class Scenario:
    name: str
    run: Callable[[int, Path], Transfer]  # moves nbytes in its own processes
    anchor: bool = False
    samples: list[float] = field(default_factory=list)  # GB/s per repetition
    cpu: dict[str, list[float]] = field(default_factory=dict)  # side -> CPU s per GiB
    read_sizes: list[float] = field(default_factory=list)  # mean KiB per receiver read


SCENARIOS: list[Scenario] = [
    Scenario("raw uvloop pump, unix", pump_scenario("raw-recv", "raw-send"), anchor=True),
    Scenario(
        "virnet framing, compiled, unix",
        pump_scenario("framed-recv", "framed-send", core="compiled"),
    ),
    Scenario(
        "virnet framing, pure, unix",
        pump_scenario("framed-recv", "framed-send", core="pure"),
    ),
    Scenario("raw uvloop pump, tcp", pump_scenario("raw-recv", "raw-send", tcp=True)),
    Scenario(
        "virnet framing, compiled, tcp",
        pump_scenario("framed-recv", "framed-send", tcp=True, core="compiled"),
    ),
    # Extension points (add when they exist; never list placeholders):
    #   "virnet upload, compiled|pure", "virnet download, compiled|pure",
    #   "virnet 8 concurrent streams", "virnet upload/download, tcp",
    #   "libvirt vol-upload / vol-download" (python3-libvirt + libvirtd), "grpcio streaming".
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="512 MiB x 2 instead of 4 GiB x 5")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--bytes", type=int, help="volume per transfer (default by mode)")
    ap.add_argument("--repeat", type=int, help="repetitions per scenario (default by mode)")
    ap.add_argument("--only", action="append", help="run scenarios whose name contains this")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--core", choices=["compiled", "pure"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        child_main(args.child, args.addr, args.bytes, args.core)
        return 0

    nbytes = args.bytes or (512 * MiB if args.quick else 4 * GiB)
    repeat = args.repeat or (2 if args.quick else 5)
    scenarios = [
        s for s in SCENARIOS if s.anchor or not args.only or any(o in s.name for o in args.only)
    ]
    info = machine_info()
    print(
        f"throughput: {nbytes / MiB:.0f} MiB per transfer, {repeat} repetitions, "
        f"{len(scenarios)} scenarios; {info}",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="virnet-bench-") as tmp:
        for rep in range(repeat):
            for sc in scenarios:
                t = sc.run(nbytes, Path(tmp))
                sc.samples.append(nbytes / t.seconds / 1e9)
                for side, secs in t.cpu.items():
                    sc.cpu.setdefault(side, []).append(secs / (nbytes / GiB))
                if t.reads:
                    sc.read_sizes.append(nbytes / t.reads / 1024)
                cpu = ", ".join(f"{k} CPU {v[-1]:.2f} s/GiB" for k, v in sc.cpu.items())
                print(
                    f"  [{rep + 1}/{repeat}] {sc.name}: {sc.samples[-1]:.2f} GB/s ({cpu})",
                    flush=True,
                )
    wall = time.perf_counter() - started
    consistent = check_sources_unchanged(info)

    anchor = next((s for s in scenarios if s.anchor), None)
    anchor_median = statistics.median(anchor.samples) if anchor else None
    results = []
    rows = []

    def cpu_median(sc: Scenario, side: str) -> str:
        values = sc.cpu.get(side)
        return f"{statistics.median(values):.3f}" if values else "-"

    for sc in scenarios:
        med = statistics.median(sc.samples)
        ratio = med / anchor_median if anchor_median else None
        results.append({"name": sc.name, "value": round(med, 4), "unit": "GB/s", "ratio": ratio})
        rows.append(
            {
                "scenario": sc.name,
                "GB/s (median)": f"{med:.2f}",
                "min..max": f"{min(sc.samples):.2f}..{max(sc.samples):.2f}",
                "ratio to anchor": f"{ratio:.2f}" if ratio is not None else "-",
                "recv CPU s/GiB": cpu_median(sc, "recv"),
                "send CPU s/GiB": cpu_median(sc, "send"),
                "KiB/read": (f"{statistics.median(sc.read_sizes):.0f}" if sc.read_sizes else "-"),
            }
        )
    print_table(
        f"throughput, {nbytes / MiB:.0f} MiB x {repeat}, wall {wall:.0f} s "
        "(CPU: median user+sys seconds per GiB moved, per side; KiB/read: receiver's mean "
        "bytes per socket read)",
        rows,
        [
            "scenario",
            "GB/s (median)",
            "min..max",
            "ratio to anchor",
            "recv CPU s/GiB",
            "send CPU s/GiB",
            "KiB/read",
        ],
    )
    if args.json:
        doc = {
            "scenarios": results,
            "meta": {
                "bytes": nbytes,
                "repeat": repeat,
                "wall_s": wall,
                "sources_unchanged": consistent,
                "machine": info,
                "samples": {s.name: s.samples for s in scenarios},
                "cpu_s_per_GiB": {s.name: s.cpu for s in scenarios},
                "recv_KiB_per_read": {s.name: s.read_sizes for s in scenarios},
            },
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
