#!/usr/bin/env python
"""MIGRATION throughput: an image moved between two ``virnetd`` processes, against a
local copy of the same file and against the raw TCP pump, side by side in one run.

Usage::

    flock /tmp/virnet-bench.lock python bench/migration.py [--size 2G] [--rounds 3]
        [--json FILE] [--quick] [--resume]

Both daemons' data roots are on the same tmpfs (/dev/shm), so what is measured is the
migration path itself (read, tunnel, write, fsync, rename), not a disk.  Rows, each
round in this order, interleaved (so a noisy neighbour hurts all of them alike):

* ``local copy, dd bs=1M into a new file (tmpfs)`` -- the anchor of the Unix row:
  ``dd if=IMG of=NEW bs=1M status=none`` on the same tmpfs; timed from spawning dd to
  its exit.  Before every row the copies the rows before made are removed, so each
  one writes into the same amount of free memory.
* ``migration, unix, tmpfs roots`` -- PERFORM on the source daemon with the destination's
  Unix socket as ``dest_uri``; timed by this process from the call to the reply (the
  destination's fsync and rename included).  The destination's copy is removed before
  each round (not timed) and its content checked after the last (not timed).
* ``raw uvloop pump, tcp`` -- ``throughput.py``'s TCP loopback pump (two processes,
  256 KiB writes), the anchor of the TCP row.
* ``migration, tcp loopback, tmpfs roots`` -- the same PERFORM with the destination's
  ``tcp://127.0.0.1:PORT``.

With ``--resume``, once after the rounds: a migration to a third daemon killed (SIGKILL)
once 3/4 of the image went, that daemon started again on its root, and a PERFORM with
RESUME timed (the digests of the staged prefix on both sides included): the bytes it
started from and its seconds.

Figures are GB/s (10^9 bytes/s) medians over the rounds; ``ratio`` is the row's median
over its anchor's median taken in the same run.  The CPU seconds per GiB of each
daemon (from /proc) are printed too.  JSON: ``{"scenarios": [{"name", "value", "unit",
"ratio"}], "meta": {...}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import virnet
from _common import Skipped, machine_info, proc_cpu
from virnet.services import migration as m

GiB = 1 << 30
MiB = 1 << 20
DD = "local copy, dd bs=1M into a new file (tmpfs)"
MIG_UNIX = "migration, unix, tmpfs roots"
PUMP_TCP = "raw uvloop pump, tcp"
MIG_TCP = "migration, tcp loopback, tmpfs roots"
ANCHOR = {MIG_UNIX: DD, MIG_TCP: PUMP_TCP}


class Daemon:
    """A ``virnetd`` subprocess on a Unix socket and TCP 127.0.0.1 (port chosen by the
    kernel, read from its "listening on" lines)."""

    def __init__(self, workdir: Path, label: str) -> None:
        self.root = workdir / label
        self.sock = workdir / f"{label}.sock"
        cmd = [sys.executable, "-m", "virnet.daemon", "--root", str(self.root),
               "--listen", f"unix://{self.sock}", "--listen", "tcp://127.0.0.1:0",
               "--log-level", "info"]  # info: its "listening on" lines give the TCP port
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.uris: list[str] = []
        self.log: list[str] = []
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 20
        while len(self.uris) < 2:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"virnetd {label} did not start: {''.join(self.log)}")
            self.log.append(line)
            if "listening on " in line:
                self.uris.append(line.split("listening on ", 1)[1].strip())
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def unix(self) -> str:
        return next(u for u in self.uris if u.startswith("unix:"))

    @property
    def tcp(self) -> str:
        return next(u for u in self.uris if u.startswith("tcp:"))

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(timeout=5)


def fill(path: Path, size: int) -> str:
    """A file of ``size`` bytes of data (no holes); its sha256."""
    h = hashlib.sha256()
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as fh:
        done = 0
        while done < size:
            n = min(MiB, size - done)
            block[:8] = done.to_bytes(8, "big")
            fh.write(block[:n])
            h.update(block[:n])
            done += n
    return h.hexdigest()


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def run_dd(src: Path, new: Path) -> float:
    dd = shutil.which("dd")
    if dd is None:
        raise Skipped("dd is not installed")
    new.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run([dd, f"if={src}", f"of={new}", "bs=1M", "status=none"], check=True)
    seconds = time.perf_counter() - start
    new.unlink()
    return seconds


async def perform(source: str, dest: str) -> tuple[float, int]:
    async with await virnet.connect(source) as c:
        start = time.perf_counter()
        reply = await c.call(m.PERFORM, m.PerformArgs("img", dest, 0, 0))
        return time.perf_counter() - start, reply.elapsed_ns


def run_migration(a: Daemon, b: Daemon, dest: str, size: int) -> tuple[float, dict[str, float]]:
    (b.root / "img").unlink(missing_ok=True)
    cpu_a, cpu_b = a.cpu(), b.cpu()
    seconds, _ = asyncio.run(perform(a.unix, dest))
    cpu = {"source": a.cpu() - cpu_a, "destination": b.cpu() - cpu_b}
    if os.path.getsize(b.root / "img") != size:
        raise RuntimeError("the migrated image has the wrong size")
    return seconds, cpu


async def cut_and_resume(a: Daemon, workdir: Path, size: int) -> dict[str, float]:
    """A migration to a fresh daemon killed (SIGKILL) once 3/4 of the image went, the
    daemon started again on its root, then PERFORM with RESUME: how much was staged and
    how long the resume took (its digests of the staged prefix included)."""
    c = Daemon(workdir, "c")
    try:
        async with await virnet.connect(a.unix) as client:
            seen: list[int] = []
            client.subscribe(m.PROGRESS, lambda ev: seen.append(ev.transferred))
            call = asyncio.ensure_future(client.call(m.PERFORM, m.PerformArgs(
                "img", c.unix, 0, 0)))
            while not call.done() and (not seen or seen[-1] < size * 3 // 4):
                await asyncio.sleep(0.002)
            c.proc.kill()
            cut_at = seen[-1] if seen else 0
            try:
                await call
                raise RuntimeError("the migration finished before it could be cut")
            except virnet.RPCError:
                pass
            c.stop()
            c = Daemon(workdir, "c")
            seen.clear()
            start = time.perf_counter()
            await client.call(m.PERFORM, m.PerformArgs("img", c.unix, 0,
                                                       int(m.MigrationFlags.RESUME)))
            seconds = time.perf_counter() - start
        return {"cut_at": cut_at, "resumed_from": seen[0], "seconds": seconds}
    finally:
        c.stop()


def run_pump_tcp(size: int, workdir: Path) -> float:
    import throughput

    return float(throughput.run_pump("raw-recv", "raw-send", size, workdir, tcp=True).seconds)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2G", help="image size (default 2G)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="512 MiB, 3 rounds")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--resume", action="store_true",
                   help="also cut a migration at 3/4 (destination killed) and resume it")
    p.add_argument("--only", action="append", default=[],
                   help="rows whose name contains this (their anchors always run)")
    args = p.parse_args()
    size = 512 * MiB if args.quick else parse_size(args.size)
    rows = [DD, MIG_UNIX, PUMP_TCP, MIG_TCP]
    if args.only:
        wanted = {r for r in rows if any(o in r for o in args.only)}
        wanted |= {ANCHOR[r] for r in wanted if r in ANCHOR}
        rows = [r for r in rows if r in wanted]
    samples: dict[str, list[float]] = {r: [] for r in rows}
    cpus: dict[str, list[dict[str, float]]] = {r: [] for r in rows}
    resume: dict[str, float] = {}
    workdir = Path(tempfile.mkdtemp(prefix="vn-bench-mig-", dir="/dev/shm"))
    daemons: list[Daemon] = []
    try:
        a = Daemon(workdir, "a")
        daemons.append(a)
        b = Daemon(workdir, "b")
        daemons.append(b)
        print(f"image: {size / GiB:.2f} GiB on {workdir} (tmpfs); {args.rounds} rounds",
              flush=True)
        digest = fill(a.root / "img", size)
        for rnd in range(args.rounds):
            for row in rows:
                # Every row starts with the same free memory: the copies of the rows
                # before are removed first (a tmpfs file written into pages just freed
                # is much faster here than one that needs fresh pages from the host).
                (b.root / "img").unlink(missing_ok=True)
                (a.root / "dd-new").unlink(missing_ok=True)
                cpu: dict[str, float] = {}
                if row == DD:
                    seconds = run_dd(a.root / "img", a.root / "dd-new")
                elif row == MIG_UNIX:
                    seconds, cpu = run_migration(a, b, b.unix, size)
                elif row == MIG_TCP:
                    seconds, cpu = run_migration(a, b, b.tcp, size)
                else:
                    seconds = run_pump_tcp(size, workdir)
                samples[row].append(size / seconds / 1e9)
                cpus[row].append(cpu)
                extra = "".join(f" {k} {v / (size / GiB):.2f} CPU s/GiB"
                                for k, v in cpu.items())
                print(f"round {rnd + 1} {row}: {size / seconds / 1e9:.2f} GB/s "
                      f"({seconds:.3f} s){extra}", flush=True)
        if (MIG_UNIX in rows or MIG_TCP in rows) and sha(b.root / "img") != digest:
            raise RuntimeError("the migrated image differs from the source")
        if args.resume:
            (b.root / "img").unlink(missing_ok=True)
            resume = asyncio.run(cut_and_resume(a, workdir, size))
            if sha(workdir / "c" / "img") != digest:
                raise RuntimeError("the resumed image differs from the source")
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {r: statistics.median(v) for r, v in samples.items()}
    scenarios: list[dict[str, Any]] = []
    print(f"\n{'scenario':45} {'GB/s':>6} {'range':>13} {'vs':>6}  anchor")
    for row in rows:
        anchor = ANCHOR.get(row)
        ratio = medians[row] / medians[anchor] if anchor in medians else None
        lo, hi = min(samples[row]), max(samples[row])
        vs = f"{ratio:.2f}" if ratio is not None else "-"
        print(f"{row:45} {medians[row]:6.2f} {lo:6.2f}..{hi:<6.2f} {vs:>6}  {anchor or ''}")
        scenarios.append({"name": row, "value": round(medians[row], 3), "unit": "GB/s",
                          "ratio": None if ratio is None else round(ratio, 3)})
    if resume:
        rest = size - resume["resumed_from"]
        print(f"\nresume: cut at {resume['cut_at'] / GiB:.2f} GiB (destination killed), "
              f"resumed from {resume['resumed_from'] / GiB:.2f} GiB, moved the remaining "
              f"{rest / GiB:.2f} GiB in {resume['seconds']:.2f} s (digests of the staged "
              "prefix included)")
        scenarios.append({"name": "migration resumed after a cut at 3/4, unix",
                          "value": round(resume["seconds"], 3), "unit": "s", "ratio": None})
    if MIG_UNIX in medians and DD in medians:
        ratio = medians[MIG_UNIX] / medians[DD]
        verdict = "met" if ratio >= 0.8 else "missed"
        print(f"\ntarget: migration over unix >= 0.8x the local copy: {ratio:.2f}x {verdict}")
    if args.json:
        meta = {"size": size, "rounds": args.rounds, "samples": samples, "cpu": cpus,
                "resume": resume, "machine": machine_info()}
        with open(args.json, "w") as fh:
            json.dump({"scenarios": scenarios, "meta": meta}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
