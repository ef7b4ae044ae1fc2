#!/usr/bin/env python
"""Keystroke-to-echo latency of a virnetd console, idle and beside a saturating transfer.

Usage (on the shared machine, under the benchmark lock)::

    flock /tmp/virnet-bench.lock python bench/console_latency.py [--quick] [--json FILE]

One ``virnetd`` subprocess (uvloop, the compiled core unless ``--core pure``) serves a
data root on tmpfs and the console ``echo``: ``cat`` on a pseudo-terminal switched to raw
mode (``stty raw -echo``), so every byte typed goes through cat and back and nothing else
answers.  The measuring client (this process, uvloop) attaches with
``virnet.console.open`` and times round trips one at a time: one byte sent on the
console's stream (``try_send``, the connection marked interactive, as ``virnet
console`` does for a keystroke), ``perf_counter_ns`` until that byte comes back.

Scenarios:

* ``idle`` -- nothing else runs.
* ``beside a download, other connection`` -- a child process downloads a 512 MiB file
  from the tmpfs root again and again, flat out (FILES DOWNLOAD, read with
  ``recv_chunk`` and dropped), on a connection of its own to the same daemon.
* ``beside a download, same connection`` -- the same download loop as a task of this
  process, on the connection that carries the console.

For each: p50 and p99 in microseconds, the ratio of p99 to idle p99 (the target: at most
3), and the download rate during the round trips.  Prints a table and writes JSON
``{"scenarios": [{"name", "value", "unit", "ratio"}, ...]}`` (``--json FILE``, else to
stdout after the table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import virnet
import virnet.console
from virnet import _loop
from virnet.services import files as f

FILE_SIZE = 512 * 1024 * 1024
ECHO_COMMAND = "sh -c 'stty raw -echo && echo ready && exec cat'"
TARGET_RATIO = 3.0


def _virnetd() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "virnetd")
    return here if os.path.exists(here) else (shutil.which("virnetd") or "virnetd")


def _tmpfs_dir() -> str:
    for base in ("/dev/shm", "/run", "/tmp"):
        if os.path.isdir(base) and os.access(base, os.W_OK):
            with open("/proc/mounts") as fh:
                if any(line.split()[1] == base and line.split()[2] == "tmpfs" for line in fh):
                    return tempfile.mkdtemp(prefix="vn-bench-", dir=base)
    raise SystemExit("no writable tmpfs for the data root")


# ----------------------------------------------------------------------------- download


async def download_forever(client: virnet.Client, counter: list[int]) -> None:
    while True:
        stream = await client.open_stream(f.DOWNLOAD, f.TransferArgs("big.bin", 0, 0, 0))
        while True:
            chunk = await stream.recv_chunk()
            if not len(chunk):
                break
            counter[0] += len(chunk)
        await stream.finish()


async def child_download(uri: str) -> None:
    client = await virnet.connect(uri)
    counter = [0]
    task = asyncio.create_task(download_forever(client, counter))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("DOWNLOADING", flush=True)
    t0 = time.perf_counter()
    await stop.wait()
    elapsed = time.perf_counter() - t0
    task.cancel()
    print(f"RESULT {counter[0]} {elapsed}", flush=True)
    await client.close(timeout=1)


# ----------------------------------------------------------------------------- measuring


async def round_trips(client: virnet.Client, stream: Any, n: int) -> list[float]:
    """``n`` keystrokes one at a time; microseconds each."""
    ns = time.perf_counter_ns
    out = []
    for i in range(n):
        key = bytes([0x61 + i % 26])
        t0 = ns()
        stream.try_send(key)
        client.protocol.note_interactive()
        got = await stream.recv(1)
        dt = ns() - t0
        if got != key:
            raise RuntimeError(f"echo {got!r} for {key!r}")
        out.append(dt / 1000)
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def measure(uri: str, n: int, warmup: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    async with await virnet.connect(uri) as client:
        stream = await virnet.console.open(client, "echo", force=True)
        seen = b""
        async with asyncio.timeout(20):  # cat runs on the raw terminal from here on
            while b"ready\n" not in seen:
                seen += await stream.recv()
        await round_trips(client, stream, warmup)

        lat = await round_trips(client, stream, n)
        results.append({"name": "idle", "lat": lat, "rate": None})

        # Another connection, another process, downloading flat out.
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child-download", uri],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line.startswith("DOWNLOADING"):
                raise RuntimeError(f"download child: {line!r}")
            await asyncio.sleep(0.5)  # let it reach full speed
            t0 = time.perf_counter()
            lat = await round_trips(client, stream, n)
            elapsed = time.perf_counter() - t0
            child.send_signal(signal.SIGTERM)
            out, _ = child.communicate(timeout=30)
            moved, child_elapsed = (float(x) for x in out.split()[-2:])
            results.append({
                "name": "beside a download, other connection", "lat": lat,
                "rate": moved / child_elapsed, "seconds": elapsed,
            })
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()

        # The same connection carries the download.
        counter = [0]
        task = asyncio.create_task(download_forever(client, counter))
        await asyncio.sleep(0.5)
        start_bytes = counter[0]
        t0 = time.perf_counter()
        lat = await round_trips(client, stream, n)
        elapsed = time.perf_counter() - t0
        moved = counter[0] - start_bytes
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        results.append({
            "name": "beside a download, same connection", "lat": lat,
            "rate": moved / elapsed, "seconds": elapsed,
        })
        await stream.abort()
    return results


async def run(core: str, n: int, warmup: int) -> list[dict[str, Any]]:
    root = _tmpfs_dir()
    sockdir = tempfile.mkdtemp(prefix="vn-bench-", dir="/tmp")
    uri = f"unix://{sockdir}/d.sock"
    try:
        with open(os.path.join(root, "big.bin"), "wb") as fh:
            block = os.urandom(1024 * 1024)
            for _ in range(FILE_SIZE // len(block)):
                fh.write(block)
        env = dict(os.environ)
        env.pop("VIRNET_NO_EXTENSIONS", None)
        if core == "pure":
            env["VIRNET_NO_EXTENSIONS"] = "1"
        daemon = subprocess.Popen(
            [_virnetd(), "--listen", uri, "--root", root, "--console", f"echo={ECHO_COMMAND}",
             "--log-level", "warning"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(f"{sockdir}/d.sock"):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("virnetd did not start")
                await asyncio.sleep(0.05)
            return await measure(uri, n, warmup)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            for pipe in (daemon.stdin, daemon.stdout, daemon.stderr):
                if pipe is not None:
                    pipe.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer round trips")
    p.add_argument("--core", choices=["compiled", "pure"], default="compiled")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--child-download", metavar="URI", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_download:
        _loop.run(child_download(args.child_download))
        return 0
    if args.core == "compiled" and not virnet.compiled:
        raise SystemExit("the compiled core is missing (or VIRNET_NO_EXTENSIONS is set)")
    n, warmup = (500, 100) if args.quick else (3000, 300)
    results = _loop.run(run(args.core, n, warmup))

    idle_p99 = pct(results[0]["lat"], 0.99)
    rows = []
    scenarios = []
    for r in results:
        p50, p99 = statistics.median(r["lat"]), pct(r["lat"], 0.99)
        ratio = p99 / idle_p99
        rate = f"{r['rate'] / 1e9:.2f} GB/s" if r["rate"] else "-"
        rows.append((r["name"], f"{p50:.0f}", f"{p99:.0f}", f"{ratio:.2f}x", rate))
        scenarios.append({"name": f"console echo p50, {r['name']}", "value": round(p50, 1),
                          "unit": "us", "ratio": round(p50 / statistics.median(
                              results[0]["lat"]), 3)})
        scenarios.append({"name": f"console echo p99, {r['name']}", "value": round(p99, 1),
                          "unit": "us", "ratio": round(ratio, 3)})
        if r["rate"]:
            scenarios.append({"name": f"download rate, {r['name']}",
                              "value": round(r["rate"] / 1e9, 3), "unit": "GB/s",
                              "ratio": None})
    widths = [max(len(str(row[i])) for row in [*rows, ("scenario", "p50 us", "p99 us",
              "p99/idle", "download")]) for i in range(5)]
    header = ("scenario", "p50 us", "p99 us", "p99/idle", "download")
    print(f"console keystroke round trip through cat ({args.core} core, uvloop, "
          f"{len(results[0]['lat'])} samples each)")
    for row in (header, *rows):
        print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                        for i, (v, w) in enumerate(zip(row, widths, strict=True))))
    verdicts = []
    for r in results[1:]:
        ratio = pct(r["lat"], 0.99) / idle_p99
        ok = ratio <= TARGET_RATIO
        verdicts.append(ok)
        print(f"target p99 <= {TARGET_RATIO:g}x idle, {r['name']}: {ratio:.2f}x "
              f"{'PASS' if ok else 'FAIL'}")
    doc = {"scenarios": scenarios, "meta": {"core": args.core, "samples": n,
                                            "targets_met": all(verdicts)}}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    else:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
