#!/usr/bin/env python
"""Soak test: minutes of mixed traffic against one ``virnetd``, watching it for leaks.
Not part of CI; it keeps both cores busy, so run it under the shared benchmark lock::

    flock /tmp/virnet-bench.lock python bench/soak.py [--minutes 30] [--core compiled|pure]
        [--sample 5] [--warmup 60] [--json FILE]

The daemon runs as a subprocess with its data root under ``/dev/shm``.  Two *worker*
processes run, each on one event loop, for the whole soak:

* 40 clients making small calls (STAT, LIST, CHECKSUM, MKDIR + DELETE, ping), replies
  checked;
* 6 transfer loops: uploads of 64 KiB - 4 MiB (pattern data, then CHECKSUM(sha256)
  compared with the sent data's, then DELETE) and downloads (sha256 compared);
* aborts: a client aborts an upload or a download midway (``stream.abort()``);
* daemon-side errors: an in-place upload sending more than its ``length`` (the daemon
  fails the stream), an EXCLUSIVE upload over an existing file, DOWNLOAD and STAT of
  missing paths, a path escaping the root, each checked to fail the way it should;
* abrupt disconnects: a connection's socket is closed in the middle of an upload or a
  download, and raw connections send garbage (protocol errors) and drop.

A third process type, the *victim*, runs uploads and downloads and is killed with
SIGKILL every ``--kill-every`` seconds mid-stream, then started again (the parent only
ever kills the victims it started, by their PID).

The parent samples the daemon every ``--sample`` seconds: RSS, open descriptors
(``/proc/PID/fd``) and threads.  At the end it stops the load, waits for the daemon to
go idle, and asserts: after the warm-up, the median RSS of the last quarter of the
samples is within ``--rss-tolerance`` (10 %) of the median of the first quarter (RSS
swings with the buffers in flight at each sample; the peak is reported too); the idle
descriptor count at the end equals the idle count before the load (within 2); no
temporary upload file is left in the data root; the daemon's log has no traceback and
no ERROR line; no unexpected error in the workers.  The table of samples and the
verdict are printed (and written with --json).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common
from load import (
    daemon_log_problems,
    pattern_block,
    proc_stats,
    raise_nofile,
    start_daemon,
    stop_daemon,
)

SMALL = 20


# ----------------------------------------------------------------------------- workers


class Worker:
    def __init__(self, uri: str, seconds: float, seed: int, victim: bool) -> None:
        self.uri = uri
        self.path = uri[len("unix://") :]
        self.deadline = time.monotonic() + seconds
        self.rnd = random.Random(seed)
        self.seed = seed
        self.victim = victim
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self.n = 0

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def running(self) -> bool:
        return time.monotonic() < self.deadline and len(self.errors) < 50

    async def loop(self, name: str, body: Any) -> None:
        while self.running():
            try:
                await body()
                self.count(name)
            except Exception as exc:
                self.errors.append(f"{name}: {exc!r}")
                await asyncio.sleep(0.1)

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}/{self.seed}-{self.n}"

    # --------------------------------------------------------- traffic
    async def caller(self) -> None:
        import virnet
        from virnet.services import files as f

        async with await virnet.connect(self.uri) as c:
            k = self.rnd.randrange(1000)

            async def one() -> None:
                nonlocal k
                k += 1
                kind = k % 5
                if kind == 0:
                    r = await c.call(f.STAT, f.PathArgs(f"small/f{k % SMALL}"), timeout=60)
                    assert r.size == 10 + k % SMALL, r
                elif kind == 1:
                    r = await c.call(f.LIST, f.PathArgs("small"), timeout=60)
                    assert len(r.entries) == SMALL, r
                elif kind == 2:
                    r = await c.call(f.CHECKSUM, f.ChecksumArgs("small/f1", "sha256"),
                                     timeout=60)
                    assert r.digest == hashlib.sha256(b"c" * 11).digest()
                elif kind == 3:
                    d = self.name("tmp")
                    await c.call(f.MKDIR, f.PathArgs(d), timeout=60)
                    await c.call(f.DELETE, f.PathArgs(d), timeout=60)
                else:
                    await c.ping(timeout=60)

            while self.running():
                await one()
                self.count("call")

    async def transfer(self) -> None:
        import virnet
        from virnet.services import files as f

        async with await virnet.connect(self.uri) as c:
            size = self.rnd.choice([65536, 300000, 1 << 20, 4 << 20])
            path = self.name("up")
            data = pattern_block(self.rnd.randrange(1 << 30), size)
            s = await c.open_stream(f.UPLOAD, f.TransferArgs(path, 0, 0,
                                                             int(f.TransferFlags.NO_SYNC)))
            view = memoryview(data)
            for pos in range(0, size, 1 << 20):
                await s.send(view[pos : pos + (1 << 20)])
            await s.finish()
            r = await c.call(f.CHECKSUM, f.ChecksumArgs(path, "sha256"), timeout=120)
            assert r.digest == hashlib.sha256(data).digest(), "upload corrupted"
            s = await c.open_stream(f.DOWNLOAD, f.TransferArgs(path, 0, 0, 0))
            h = hashlib.sha256()
            async for chunk in s:
                h.update(chunk)
            await s.finish()
            assert h.digest() == hashlib.sha256(data).digest(), "download corrupted"
            await c.call(f.DELETE, f.PathArgs(path), timeout=120)

    async def aborts(self) -> None:
        import virnet
        from virnet.errors import StreamError
        from virnet.services import files as f

        async with await virnet.connect(self.uri) as c:
            s = await c.open_stream(f.UPLOAD, f.TransferArgs(self.name("ab"), 0, 0, 4))
            await s.send(b"x" * 200000)
            await s.abort("soak abort")
            s = await c.open_stream(f.DOWNLOAD, f.TransferArgs("big", 0, 0, 0))
            await s.recv(65536)
            await s.abort()
            # daemon-side failures, each the error it should be
            s = await c.open_stream(f.UPLOAD, f.TransferArgs("big", 10, 100, 4))
            try:
                await s.send(b"y" * 5000)
                await s.finish()
            except StreamError:
                pass
            else:
                raise AssertionError("an upload past its length was accepted")
            for proc, args in (
                (f.UPLOAD, f.TransferArgs("big", 0, 0, int(f.TransferFlags.EXCLUSIVE))),
                (f.DOWNLOAD, f.TransferArgs("missing", 0, 0, 0)),
            ):
                try:
                    await c.open_stream(proc, args)
                except virnet.RPCError:
                    pass
                else:
                    raise AssertionError(f"{proc!r} {args} did not fail")
            for call, cargs in ((f.STAT, f.PathArgs("missing")), (f.STAT, f.PathArgs("../x")),
                                (f.LIST, f.PathArgs("big"))):
                try:
                    await c.call(call, cargs, timeout=60)
                except virnet.RPCError:
                    pass
                else:
                    raise AssertionError(f"{call!r} {cargs} did not fail")

    async def disconnects(self) -> None:
        import virnet
        from virnet.services import files as f

        c = await virnet.connect(self.uri)
        try:
            if self.rnd.random() < 0.5:
                s = await c.open_stream(f.UPLOAD, f.TransferArgs(self.name("dc"), 0, 0, 4))
                await s.send(b"z" * self.rnd.randrange(1, 3 << 20))
            else:
                s = await c.open_stream(f.DOWNLOAD, f.TransferArgs("big", 0, 0, 0))
                await s.recv(self.rnd.randrange(1, 1 << 20))
        finally:
            transport = c.protocol.transport
            if transport is not None:
                transport.abort()  # the socket closes mid-stream, no goodbye
            await c.close()
        # a raw connection: part of a packet or garbage, then gone
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self.path)
            junk = self.rnd.choice([
                b"\x00\x00\x00\x05", b"\x00\x00\x01\x00" + os.urandom(100),
                os.urandom(self.rnd.randrange(1, 5000)),
                b"\x00\x00\x00\x1c\x20\x00\x81\x00\x00\x00\x00\x01\x00\x00\x00\x03",
            ])
            await loop.sock_sendall(sock, junk)
        except OSError:
            pass
        finally:
            sock.close()

    async def run(self) -> dict[str, Any]:
        if self.victim:
            tasks = [self.loop("transfer", self.transfer) for _ in range(4)]
        else:
            tasks = [self.loop("caller", self.caller) for _ in range(40)]
            tasks += [self.loop("transfer", self.transfer) for _ in range(6)]
            tasks += [self.loop("abort", self.aborts) for _ in range(2)]
            tasks += [self.loop("disconnect", self.disconnects) for _ in range(2)]
        await asyncio.gather(*tasks)
        return {"counts": self.counts, "errors": self.errors}


def child_main(args: argparse.Namespace) -> int:
    raise_nofile()
    from virnet import _loop

    _common.check_core(args.core)
    w = Worker(args.uri, args.seconds, args.seed, args.child == "victim")
    result = _loop.run(w.run())
    Path(args.out).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- parent


def idle_fds(pid: int, settle: float = 15.0) -> int:
    """The daemon's descriptor count once it stops changing (connections closing)."""
    deadline = time.monotonic() + settle
    last = proc_stats(pid)[1]
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = proc_stats(pid)[1]
        if now == last:
            return now
        last = now
    return last


def parent_main(args: argparse.Namespace) -> int:
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="vnsoak-", dir="/tmp"))
    root = Path(tempfile.mkdtemp(prefix="vnsoak-root-", dir="/dev/shm"))
    seconds = args.minutes * 60
    procs: list[subprocess.Popen[bytes]] = []
    daemon = None
    try:
        (root / "small").mkdir()
        for i in range(SMALL):
            (root / "small" / f"f{i}").write_bytes(b"c" * (10 + i))
        for d in ("up", "tmp", "ab", "dc"):
            (root / d).mkdir()
        (root / "big").write_bytes(pattern_block(1, 8 << 20))
        daemon, uri = start_daemon(workdir, root, args.core, 1024)
        time.sleep(1.0)
        fds_before = idle_fds(daemon.pid)
        env = _common.child_env(args.core)

        def spawn(role: str, seed: int, secs: float) -> subprocess.Popen[bytes]:
            out = workdir / f"{role}-{seed}.json"
            cmd = [sys.executable, os.path.abspath(__file__), "--child", role, "--uri", uri,
                   "--core", args.core, "--seconds", str(secs), "--seed", str(seed),
                   "--out", str(out)]
            return subprocess.Popen(cmd, env=env)

        workers = [spawn("worker", i, seconds) for i in (1, 2)]
        procs += workers
        start = time.monotonic()
        samples: list[dict[str, Any]] = []
        victim = spawn("victim", 100, seconds)
        procs.append(victim)
        kills = 0
        next_kill = start + args.kill_every
        next_sample = start
        vseed = 100
        while time.monotonic() - start < seconds:
            now = time.monotonic()
            if now >= next_sample:
                rss, fds, threads = proc_stats(daemon.pid)
                samples.append({"t": round(now - start), "rss_MiB": round(rss / 2**20, 1),
                                "fds": fds, "threads": threads})
                next_sample += args.sample
            if now >= next_kill:
                victim.send_signal(signal.SIGKILL)  # our own child, by its PID
                victim.wait()
                kills += 1
                vseed += 1
                victim = spawn("victim", vseed, seconds - (now - start))
                procs.append(victim)
                next_kill += args.kill_every
            if daemon.poll() is not None:
                raise RuntimeError(f"virnetd died (exit {daemon.returncode})")
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        for w in workers:
            w.wait(timeout=300)
        results = [json.loads((workdir / f"worker-{i}.json").read_text()) for i in (1, 2)]
        time.sleep(2.0)
        fds_after = idle_fds(daemon.pid)
        rss_after, _, threads_after = proc_stats(daemon.pid)
        # Temporary files of uploads that were aborted or cut off must be gone.  A victim
        # killed mid-stream leaves its stream to the daemon, which removes the file at
        # once on connection loss (or after its grace period): give it that long.
        deadline = time.monotonic() + 15
        leftovers = [p.name for p in root.rglob("*.virnet-part")]
        while leftovers and time.monotonic() < deadline:
            time.sleep(1)
            leftovers = [p.name for p in root.rglob("*.virnet-part")]
        rc = stop_daemon(daemon)
        problems = daemon_log_problems(workdir)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if daemon is not None and daemon.poll() is None:
            stop_daemon(daemon)
        shutil.rmtree(root, ignore_errors=True)
    # RSS swings with the buffers in flight at the moment of a sample, so the first and
    # the last quarter after the warm-up are compared by their medians; the peak is shown.
    after_warmup = [s["rss_MiB"] for s in samples if s["t"] >= args.warmup] or [
        samples[-1]["rss_MiB"]]
    q = max(1, len(after_warmup) // 4)
    base = statistics.median(after_warmup[:q])
    end = statistics.median(after_warmup[-q:])
    peak = max(after_warmup)
    counts: dict[str, int] = {}
    errors: list[str] = []
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
        errors += r["errors"]
    checks = {
        "rss_flat": end <= base * (1 + args.rss_tolerance),
        "fds_idle_back": fds_after <= fds_before + 2,
        "no_temp_files": not leftovers,
        "daemon_log_clean": not problems,
        "no_worker_errors": not errors,
        "daemon_exit_0": rc == 0,
    }
    result = {
        "minutes": args.minutes, "core": args.core, "samples": samples,
        "rss_median_first_quarter_MiB": base, "rss_median_last_quarter_MiB": end,
        "rss_peak_after_warmup_MiB": peak,
        "rss_growth_pct": round((end / base - 1) * 100, 1) if base else None,
        "rss_idle_end_MiB": round(rss_after / 2**20, 1), "threads_idle_end": threads_after,
        "fds_idle_before": fds_before, "fds_idle_after": fds_after,
        "victim_kills": kills, "counts": counts, "errors": errors[:20],
        "temp_leftovers": leftovers[:20], "daemon_log_problems": problems[:20],
        "checks": checks, "machine": _common.machine_info(),
    }
    _common.print_table(
        f"virnetd soak, {args.minutes} min, {args.core} core",
        samples, ["t", "rss_MiB", "fds", "threads"],
    )
    summary = {k: v for k, v in result.items() if k not in ("samples", "machine")}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = all(checks.values())
    print("SOAK", "OK" if ok else "FAILED")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--core", choices=["compiled", "pure"], default="compiled")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS counts")
    ap.add_argument("--rss-tolerance", type=float, default=0.10)
    ap.add_argument("--kill-every", type=float, default=20.0,
                    help="seconds between SIGKILLs of the victim client process")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
