"""The commands that call one procedure or a few: ping, ls, stat, rm, mkdir, checksum,
consoles."""

from __future__ import annotations

import argparse
import asyncio
import errno
import math

from .._units import format_size
from ..client import Client
from ..errors import RPCError
from ..services import files as f
from ._errors import EXIT_OK, CommandError, failing
from ._output import emit_json, iso_time, local_time

_KINDS = {1: "file", 2: "directory", 3: "other"}
#: STAT calls in flight at once while ``ls`` fetches the entries' times.
_LS_CONCURRENCY = 64


def wire_path(path: str) -> str:
    """A CLI path as it goes on the wire: relative to the data root (``/`` and a
    leading ``/`` are the root; the daemon refuses absolute paths)."""
    return path.lstrip("/")


def kind_name(kind: int) -> str:
    return _KINDS.get(kind, f"kind {kind}")


async def cmd_ping(client: Client, args: argparse.Namespace) -> int:
    rtts: list[float] = []
    for i in range(args.count):
        with failing(f"ping {client.address}"):
            rtt = await client.ping(timeout=args.timeout)
        rtts.append(rtt * 1000)
        if not args.quiet and not args.json:
            print(f"pong from {client.address}: seq={i + 1} time={rtts[-1]:.3f} ms", flush=True)
        if i + 1 < args.count:
            await asyncio.sleep(args.interval)
    avg = sum(rtts) / len(rtts)
    mdev = math.sqrt(sum((r - avg) ** 2 for r in rtts) / len(rtts))
    if args.json:
        emit_json({"uri": str(client.address), "count": len(rtts),
                   "rtt_ms": [round(r, 3) for r in rtts], "min_ms": round(min(rtts), 3),
                   "avg_ms": round(avg, 3), "max_ms": round(max(rtts), 3),
                   "mdev_ms": round(mdev, 3)})
    elif not args.quiet and len(rtts) > 1:
        # ping(8)'s closing lines (one ping is one line: nothing to sum up).
        print(f"--- {client.address} ping statistics ---")
        print(f"{len(rtts)} pings, rtt min/avg/max/mdev = {min(rtts):.3f}/{avg:.3f}/"
              f"{max(rtts):.3f}/{mdev:.3f} ms")
    return EXIT_OK


async def _stat(client: Client, wire: str, timeout: float) -> f.StatReply:
    reply: f.StatReply = await client.call(f.STAT, f.PathArgs(wire), timeout=timeout)
    return reply


async def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    wire = wire_path(args.path)
    with failing(f"ls {args.path}", wire):
        try:
            reply = await client.call(f.LIST, f.PathArgs(wire), timeout=args.timeout)
        except RPCError as exc:
            if exc.int1 != errno.ENOTDIR:
                raise
            st = await _stat(client, wire, args.timeout)  # like ls FILE: that file
            rows: list[tuple[str, int, int, int | None]] = [
                (args.path, st.kind, st.size, st.mtime_ns)
            ]
        else:
            names = [e.name for e in reply.entries]
            times = await _entry_times(client, wire, names, args.timeout)
            rows = [(e.name, e.kind, e.size, t) for e, t in zip(reply.entries, times,
                                                               strict=True)]
    if args.json:
        emit_json([{"name": name, "kind": kind_name(kind), "size": size, "mtime_ns": t,
                    "mtime": None if t is None else iso_time(t)}
                   for name, kind, size, t in rows])
        return EXIT_OK
    for name, kind, size, t in rows:
        suffix = "/" if kind == f.Kind.DIRECTORY else ""
        when = "-" if t is None else local_time(t)
        print(f"{kind_name(kind):9} {format_size(size):>10}  {when:19}  {name}{suffix}")
    return EXIT_OK


async def _entry_times(
    client: Client, wire: str, names: list[str], timeout: float
) -> list[int | None]:
    """Each entry's mtime (LIST has none), by concurrent STATs; an entry that vanished
    meanwhile, or a symlink leading outside the root, has none."""
    gate = asyncio.Semaphore(_LS_CONCURRENCY)

    async def one(name: str) -> int | None:
        async with gate:
            try:
                st = await _stat(client, f"{wire}/{name}" if wire else name, timeout)
            except RPCError:
                return None
            return st.mtime_ns

    return list(await asyncio.gather(*(one(n) for n in names)))


async def cmd_stat(client: Client, args: argparse.Namespace) -> int:
    wire = wire_path(args.path)
    with failing(f"stat {args.path}", wire):
        st = await _stat(client, wire, args.timeout)
    if args.json:
        emit_json({"path": args.path, "kind": kind_name(st.kind), "size": st.size,
                   "allocation": st.allocation, "mtime_ns": st.mtime_ns,
                   "mtime": iso_time(st.mtime_ns), "mode": f"{st.mode:04o}"})
        return EXIT_OK
    for key, value in (
        ("path", args.path),
        ("kind", kind_name(st.kind)),
        ("size", f"{st.size} ({format_size(st.size)})"),
        ("allocation", f"{st.allocation} ({format_size(st.allocation)})"),
        ("mtime", local_time(st.mtime_ns, precise=True)),
        ("mode", f"{st.mode:04o}"),
    ):
        print(f"{key + ':':12}{value}")
    return EXIT_OK


async def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    wire = wire_path(args.path)
    with failing(f"rm {args.path}", wire):
        await client.call(f.DELETE, f.PathArgs(wire), timeout=args.timeout)
    return EXIT_OK


async def cmd_mkdir(client: Client, args: argparse.Namespace) -> int:
    wire = wire_path(args.path)
    if not args.parents:
        with failing(f"mkdir {args.path}", wire):
            await client.call(f.MKDIR, f.PathArgs(wire), timeout=args.timeout)
        return EXIT_OK
    parts = [p for p in wire.split("/") if p not in ("", ".")]
    for i in range(1, len(parts) + 1):
        step = "/".join(parts[:i])
        with failing(f"mkdir {args.path}", step):
            try:
                await client.call(f.MKDIR, f.PathArgs(step), timeout=args.timeout)
            except RPCError as exc:
                if exc.int1 != errno.EEXIST:
                    raise
                st = await _stat(client, step, args.timeout)
                if st.kind != f.Kind.DIRECTORY:
                    raise CommandError(f"mkdir {args.path}: {step} exists and is not a "
                                       "directory") from None
    return EXIT_OK


async def cmd_checksum(client: Client, args: argparse.Namespace) -> int:
    wire = wire_path(args.path)
    with failing(f"checksum {args.path}", wire):
        reply = await client.call(f.CHECKSUM, f.ChecksumArgs(wire, args.algorithm),
                                  timeout=args.timeout)
    if args.json:
        emit_json({"path": args.path, "algorithm": args.algorithm,
                   "digest": reply.digest.hex()})
    else:
        print(f"{reply.digest.hex()}  {args.path}")  # as sha256sum prints it
    return EXIT_OK


async def cmd_consoles(client: Client, args: argparse.Namespace) -> int:
    from ..services import console

    with failing("consoles"):
        reply = await client.call(console.LIST, timeout=args.timeout)
    if args.json:
        emit_json(list(reply.names))
    else:
        for name in reply.names:
            print(name)
    return EXIT_OK
