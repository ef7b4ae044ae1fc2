"""Fairness and bounded memory between virnetd's clients (not run in CI).

A *victim* client (in this process) makes one FILES STAT every few milliseconds and
times each.  Beside it, in a child process, an *aggressor* does one of:

- ``list``: bursts of 1,000 pipelined LISTs of a directory of 2,000 entries, replies
  read (metadata work queued far beyond what the workers can do at once);
- ``checksum``: bursts of 1,000 pipelined CHECKSUMs of a 4 MiB file (long jobs);
- ``unread``: 1,500 LISTs written on a raw socket whose replies are never read (the
  daemon must pause that client, not grow; its RSS growth is reported).

Each round measures the victim alone and then beside the aggressor, rounds interleaved;
p50/p99 of the victim's STAT per phase, medians over the rounds.  The daemon is a real
``virnetd`` subprocess.

    python bench/fairness.py                       # all aggressors, 3 rounds
    python bench/fairness.py --only list --rounds 5 --core pure
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
from load import percentile, proc_stats, start_daemon, stop_daemon

ENTRIES = 2000
NAME_LENGTH = 100
CHECKSUM_BYTES = 4 * 1024 * 1024
BURST = 1000
UNREAD_CALLS = 1500
VICTIM_INTERVAL = 0.005
AGGRESSORS = ("list", "checksum", "unread")


def make_root(root: Path) -> None:
    big = root / "big"
    big.mkdir(parents=True)
    for i in range(ENTRIES):
        (big / f"{i:06d}".ljust(NAME_LENGTH, "x")).touch()
    (root / "sum.bin").write_bytes(os.urandom(CHECKSUM_BYTES))


# ---------------------------------------------------------------------- aggressor child
async def aggressor(uri: str, kind: str, core: str) -> None:
    _common.check_core(core)
    import virnet
    from virnet.services import files as f

    if kind == "unread":
        await unread_aggressor(uri)
        return
    async with await virnet.connect(uri) as client:
        print("READY", flush=True)
        stop = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
        bursts = 0
        while not stop.done():
            if kind == "list":
                calls = [client.call(f.LIST, f.PathArgs("big"), timeout=300)
                         for _ in range(BURST)]
            else:
                calls = [client.call(f.CHECKSUM, f.ChecksumArgs("sum.bin", "sha256"),
                                     timeout=300) for _ in range(BURST)]
            await asyncio.gather(*calls)
            bursts += 1
        print("RESULT", json.dumps({"bursts": bursts}), flush=True)


async def unread_aggressor(uri: str) -> None:
    from virnet import _impl
    from virnet.constants import FILES_PROGRAM
    from virnet.services import files as f

    payload = f.LIST.encode_args(f.PathArgs("big"))
    data = b"".join(
        b"".join(bytes(b) for b in _impl.encode_message(
            FILES_PROGRAM, 1, f.LIST.number, 0, serial, 0, payload))
        for serial in range(1, UNREAD_CALLS + 1)
    )
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(uri.removeprefix("unix://"))
    sock.sendall(data)
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    # Now read everything: every call must be answered (paused, never dropped).
    got = 0
    buf = bytearray()
    sock.settimeout(120)
    while got < UNREAD_CALLS:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 4:
            (length,) = struct.unpack_from(">I", buf)
            if len(buf) < length:
                break
            got += 1
            del buf[:length]
    sock.close()
    print("RESULT", json.dumps({"answered": got, "sent": UNREAD_CALLS}), flush=True)


# ---------------------------------------------------------------------- victim (parent)
async def victim(uri: str, seconds: float) -> list[float]:
    import virnet
    from virnet.services import files as f

    took: list[float] = []
    async with await virnet.connect(uri) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            await client.call(f.STAT, f.PathArgs("big"), timeout=60)
            took.append(time.perf_counter() - t)
            await asyncio.sleep(VICTIM_INTERVAL)
    return took


def summary(took: list[float]) -> dict[str, float]:
    ordered = sorted(took)
    return {"p50_ms": percentile(ordered, 0.5) * 1e3, "p99_ms": percentile(ordered, 0.99) * 1e3,
            "max_ms": ordered[-1] * 1e3, "calls": len(ordered)}


def run_round(args: argparse.Namespace, workdir: Path, kind: str) -> dict[str, Any]:
    """One round on a daemon of its own, so that the RSS growth counts from an idle
    daemon (warmed up by the victim's first phase)."""
    proc, uri = start_daemon(workdir, workdir / "root", args.core, 1024)
    try:
        return measure(args, uri, proc.pid, kind)
    finally:
        stop_daemon(proc)


def measure(args: argparse.Namespace, uri: str, pid: int, kind: str) -> dict[str, Any]:
    alone = asyncio.run(victim(uri, args.seconds))
    rss_before = proc_stats(pid)[0]
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, "--uri", uri, "--core", args.core],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=_common.child_env(args.core),
    )
    assert child.stdout is not None and child.stdin is not None
    line = child.stdout.readline()
    if not line.startswith("READY"):
        raise RuntimeError(f"aggressor {kind} did not start: {line!r}")
    time.sleep(0.2)  # let the burst reach the daemon
    peak = rss_before
    stop = asyncio.Event()

    async def watch_and_time() -> list[float]:
        async def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, proc_stats(pid)[0])
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch())
        try:
            return await victim(uri, args.seconds)
        finally:
            stop.set()
            await watcher

    beside = asyncio.run(watch_and_time())
    child.stdin.write("stop\n")
    child.stdin.flush()
    out, _ = child.communicate(timeout=300)
    result = next((json.loads(ln.split(" ", 1)[1]) for ln in out.splitlines()
                   if ln.startswith("RESULT")), None)
    return {"alone": summary(alone), "beside": summary(beside),
            "rss_growth_mib": (peak - rss_before) / 2**20, "aggressor": result}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", choices=AGGRESSORS)
    p.add_argument("--uri")
    p.add_argument("--core", choices=("compiled", "pure"), default="compiled")
    p.add_argument("--only", action="append", choices=AGGRESSORS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="victim time per phase")
    p.add_argument("--json", help="write the raw figures here")
    args = p.parse_args()
    if args.child:
        asyncio.run(aggressor(args.uri, args.child, args.core))
        return 0
    _common.check_core(args.core)
    workdir = Path(tempfile.mkdtemp(prefix="vn-fair-"))
    try:
        make_root(workdir / "root")
        figures: dict[str, list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            for kind in args.only or AGGRESSORS:
                res = run_round(args, workdir, kind)
                figures.setdefault(kind, []).append(res)
                print(f"round {r + 1} {kind:8}: alone p50 {res['alone']['p50_ms']:.2f} "
                      f"p99 {res['alone']['p99_ms']:.2f} ms | beside p50 "
                      f"{res['beside']['p50_ms']:.2f} p99 {res['beside']['p99_ms']:.2f} "
                      f"max {res['beside']['max_ms']:.1f} ms | RSS "
                      f"+{res['rss_growth_mib']:.1f} MiB | {res['aggressor']}", flush=True)
        print(f"\nvictim STAT, medians over {args.rounds} rounds ({args.core} core):")
        print("| aggressor | alone p50 | alone p99 | beside p50 | beside p99 | daemon RSS growth |")
        print("|---|---:|---:|---:|---:|---:|")
        for kind, rounds in figures.items():
            def med(phase: str, key: str, rounds: list[dict[str, Any]] = rounds) -> float:
                return statistics.median(x[phase][key] for x in rounds)
            growth = statistics.median(x["rss_growth_mib"] for x in rounds)
            print(f"| {kind} | {med('alone', 'p50_ms'):.2f} ms | {med('alone', 'p99_ms'):.2f} ms"
                  f" | {med('beside', 'p50_ms'):.2f} ms | {med('beside', 'p99_ms'):.2f} ms"
                  f" | +{growth:.1f} MiB |")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
