#!/usr/bin/env python
"""Where a call's time goes beside a saturating download: a diagnostic, not a target.

Usage::

    python bench/latency_legs.py [--calls N] [--idle] [--rounds R]

A server process and a client process (uvloop, Unix socket, compiled core) run the
``latency.py`` ECHO call one at a time while the client also reads a ``SOURCE`` download
flat out on the same connection (``--idle``: without the stream).  Both processes stamp
each call with ``time.perf_counter_ns`` (CLOCK_MONOTONIC, shared by the processes of one
machine) at five points, by wrapping virnet's own methods in the child only:

* ``sent``      the client queued the CALL (``ClientProtocol.send_call``)
* ``arrived``   the server decoded it (``ServerConnection.on_call``)
* ``handled``   the handler started
* ``written``   the flush that carried the REPLY started (``RPCProtocol._flush``)
* ``received``  the client decoded the REPLY (``ClientProtocol.on_reply``)
* ``returned``  ``await client.call(...)`` returned

and the table gives p50/p90/p99 of each leg in microseconds, plus the bytes the server's
transport still held when the reply was queued.  The wrappers cost a few microseconds per
call, so the totals run a little above ``latency.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

LEGS = [
    ("sent", "arrived", "client -> server (call in flight)"),
    ("arrived", "handled", "server: decoded -> handler runs"),
    ("handled", "written", "server: handler -> reply flushed"),
    ("written", "received", "server -> client (behind stream data)"),
    ("received", "returned", "client: decoded -> caller resumes"),
    ("sent", "returned", "total"),
]
WARMUP_CALLS = 500
STREAM_WARMUP = 64 * 1024 * 1024


def _socket_outq(transport: Any) -> int:
    """Bytes written to the socket that the peer has not read yet (SIOCOUTQ; for a Unix
    socket the kernel counts its buffers' overhead too)."""
    sock = transport.get_extra_info("socket")
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def _stamps(records: dict[int, dict[str, float]], serial: int) -> dict[str, float]:
    return records.setdefault(serial, {})


async def server_main(path: str, out: str) -> None:
    import virnet
    from _vnstreams import BenchService
    from latency import ECHO
    from virnet._protocol import RPCProtocol
    from virnet.server import ServerConnection

    ns = time.perf_counter_ns
    records: dict[int, dict[str, float]] = {}
    queued: list[int] = []
    on_call = ServerConnection.on_call
    send_reply = ServerConnection.send_reply
    flush = RPCProtocol._flush

    def stamped_on_call(self: Any, msg: Any) -> None:
        _stamps(records, msg.serial)["arrived"] = ns()
        on_call(self, msg)

    def stamped_send_reply(self: Any, prog: int, vers: int, proc: int, serial: int,
                           status: int, payload: Any) -> None:
        rec = _stamps(records, serial)
        rec["transport_bytes"] = self.transport.get_write_buffer_size()
        rec["socket_bytes"] = _socket_outq(self.transport)
        queued.append(serial)
        send_reply(self, prog, vers, proc, serial, status, payload)

    def stamped_flush(self: Any) -> None:
        started = ns()
        carried = list(queued) if queued else None
        flush(self)
        if carried and not self._urgent:
            for serial in carried:
                records[serial]["written"] = started
            queued.clear()

    ServerConnection.on_call = stamped_on_call  # type: ignore[method-assign]
    ServerConnection.send_reply = stamped_send_reply  # type: ignore[method-assign]
    RPCProtocol._flush = stamped_flush  # type: ignore[method-assign]

    async def echo(ctx: Any, args: Any) -> Any:
        _stamps(records, ctx.serial)["handled"] = ns()
        return args

    server = virnet.Server()
    server.register(ECHO, echo)
    BenchService().register(server)
    await server.listen(f"unix://{path}")
    print("READY", flush=True)
    while not server.connections:
        await asyncio.sleep(0.01)
    while server.connections:
        await asyncio.sleep(0.05)
    await server.close()
    Path(out).write_text(json.dumps(records))


async def client_main(path: str, out: str, calls: int, idle: bool) -> None:
    import virnet
    from _vnstreams import SOURCE, Size
    from latency import ECHO, TEXT, Echo
    from virnet.client import ClientProtocol

    ns = time.perf_counter_ns
    records: dict[int, dict[str, float]] = {}
    last_serial = 0
    send_call = ClientProtocol.send_call
    on_reply = ClientProtocol.on_reply

    def stamped_send_call(self: Any, *args: Any, **kwargs: Any) -> int:
        nonlocal last_serial
        sent = ns()
        serial: int = send_call(self, *args, **kwargs)
        _stamps(records, serial)["sent"] = sent
        last_serial = serial
        return serial

    def stamped_on_reply(self: Any, serial: int, status: int, payload: Any) -> None:
        _stamps(records, serial)["received"] = ns()
        on_reply(self, serial, status, payload)

    ClientProtocol.send_call = stamped_send_call  # type: ignore[method-assign]
    ClientProtocol.on_reply = stamped_on_reply  # type: ignore[method-assign]

    client = await virnet.connect(f"unix://{path}")
    arg = Echo(TEXT, 0)
    got = 0
    async with client:
        reader = None
        if not idle:
            stream = await client.open_stream(SOURCE, Size(0))

            async def consume() -> None:
                nonlocal got
                async for chunk in stream:
                    got += len(chunk)

            reader = asyncio.create_task(consume())
            while got < STREAM_WARMUP:
                await asyncio.sleep(0.005)
        for _ in range(WARMUP_CALLS):
            await client.call(ECHO, arg)
        timed: list[int] = []
        b0, t0 = got, time.perf_counter()
        for _ in range(calls):
            await client.call(ECHO, arg)
            returned = ns()
            records[last_serial]["returned"] = returned
            timed.append(last_serial)
        rate = (got - b0) / (time.perf_counter() - t0) / 1e9
        if reader is not None:
            reader.cancel()
            await stream.abort()
    Path(out).write_text(json.dumps({"rate": rate, "records": {s: records[s] for s in timed}}))


def run_round(calls: int, idle: bool, workdir: Path) -> tuple[float, list[dict[str, float]]]:
    sock = workdir / "legs.sock"
    if sock.exists():
        sock.unlink()
    s_out, c_out = workdir / "server.json", workdir / "client.json"
    env = dict(os.environ)
    env.pop("VIRNET_NO_EXTENSIONS", None)
    me = os.path.abspath(__file__)
    server = subprocess.Popen(
        [sys.executable, me, "--child", "server", str(sock), str(s_out)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "READY":
            raise RuntimeError("server did not start")
        child = [sys.executable, me, "--child", "client", str(sock), str(c_out), str(calls)]
        if idle:
            child.append("--idle")
        subprocess.run(child, check=True, env=env)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    srv = {int(k): v for k, v in json.loads(s_out.read_text()).items()}
    cli = json.loads(c_out.read_text())
    merged = []
    for key, rec in cli["records"].items():
        both = {**srv.get(int(key), {}), **rec}
        if all(p in both for p in ("sent", "arrived", "handled", "written", "received")):
            merged.append(both)
    return cli["rate"], merged


def percentile(values: list[float], q: int) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, len(values) * q // 100)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--idle", action="store_true", help="no stream beside the calls")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import uvloop

        import virnet

        if not virnet.compiled:
            raise SystemExit("compiled core missing: run pip install -e .")
        role, *rest = args.child
        if role == "server":
            uvloop.run(server_main(rest[0], rest[1]))
        else:
            uvloop.run(client_main(rest[0], rest[1], int(rest[2]), args.idle))
        return 0

    with tempfile.TemporaryDirectory(prefix="vnlegs") as tmp:
        for r in range(args.rounds):
            rate, recs = run_round(args.calls, args.idle, Path(tmp))
            what = "idle" if args.idle else f"stream {rate:.2f} GB/s during the calls"
            print(f"round {r + 1}: {len(recs)} calls, {what}")
            print(f"  {'leg':40s} {'p50':>6s} {'p90':>6s} {'p99':>6s}  (us)")
            for start, end, name in LEGS:
                vals = [(rec[end] - rec[start]) / 1000 for rec in recs]
                print(f"  {name:40s} " + " ".join(
                    f"{percentile(vals, q):6.0f}" for q in (50, 90, 99)))
            for key, name in (("transport_bytes", "server transport buffer at reply (KiB)"),
                              ("socket_bytes", "server socket, unread at reply (KiB)")):
                kib = [rec.get(key, 0) / 1024 for rec in recs]
                print(f"  {name:40s} " + " ".join(
                    f"{percentile(kib, q):6.0f}" for q in (50, 90, 99)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
