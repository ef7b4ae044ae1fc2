#!/usr/bin/env python
"""Load test: 1,000 clients making small calls while 1,024 streams move data, against a
``virnetd`` subprocess.  Not part of CI (minutes of both cores); run it under the shared
benchmark lock::

    flock /tmp/virnet-bench.lock python bench/load.py [--callers 1000] [--streamers 16]
        [--streams 64] [--stream-mib 4] [--core compiled|pure] [--json FILE]

What runs, all on this machine over one Unix socket:

* ``virnetd`` with its data root in a fresh directory under ``/dev/shm`` (tmpfs: the
  disk is not what is measured), ``max_clients`` raised above the client count and the
  descriptor limit (RLIMIT_NOFILE) raised to its hard limit, for it and for the clients;
* ``--callers`` clients in two processes, each client a loop of one call at a time:
  STAT of a small file, LIST of a directory, keepalive ping, round-robin, every reply
  checked (the STAT size, the LIST entry count, the PONG);
* ``--streamers`` clients in two processes, each with ``--streams`` streams at once, half
  UPLOADs (a per-stream pattern, then CHECKSUM(sha256) of the stored file compared with
  the client's own digest, then DELETE) and half DOWNLOADs of files the parent wrote
  (sha256 of what arrived compared with the file's).

The callers connect first and start calling; the streamers then run their one round;
when the last stream is verified the callers stop.  Reported: calls/s over the stream
phase and over the callers' whole run, call latency p50/p99/max (per call kind too),
aggregate stream throughput (GB/s = 10^9 bytes/s, both directions summed, from the first
stream's start to the last stream's end), the daemon's peak RSS (``VmHWM``) and its
largest descriptor count, and errors, which must be 0: any failed call, stream or check
makes the run exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

SMALL_FILES = 50
CHUNK = 1 << 20


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pattern_block(seed: int, size: int) -> bytes:
    """``size`` bytes unique to ``seed`` (sha256 counter mode, 64 KiB at a time)."""
    out = bytearray()
    block = 0
    while len(out) < size:
        base = hashlib.sha256(b"%d:%d" % (seed, block)).digest() * 2048
        out += base
        block += 1
    return bytes(out[:size])


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


# ----------------------------------------------------------------------------- children


async def caller_child(uri: str, n: int, core: str) -> dict[str, Any]:
    import virnet
    from virnet.services import files as f

    _common.check_core(core)
    clients = []
    for i in range(0, n, 50):  # connect in batches: a listen backlog of 256
        clients += await asyncio.gather(*(virnet.connect(uri) for _ in range(min(50, n - i))))
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    phase = {"t_go": 0.0, "t_stop": 0.0}

    def on_stdin() -> None:
        line = sys.stdin.readline().strip()
        if line == "STOP" or not line:
            phase["t_stop"] = time.perf_counter()
            stop.set()

    lat: dict[str, list[float]] = {"stat": [], "list": [], "ping": []}
    stamps: list[float] = []  # completion times, for the calls/s of the stream phase
    errors: list[str] = []

    async def run(idx: int, client: Any) -> None:
        k = idx
        while not stop.is_set():
            kind = ("stat", "list", "ping")[k % 3]
            t0 = time.perf_counter()
            try:
                if kind == "stat":
                    r = await client.call(f.STAT, f.PathArgs(f"small/f{k % SMALL_FILES}"),
                                          timeout=60)
                    if r.size != 100 + k % SMALL_FILES:
                        raise AssertionError(f"STAT size {r.size}")
                elif kind == "list":
                    r = await client.call(f.LIST, f.PathArgs("small"), timeout=60)
                    if len(r.entries) != SMALL_FILES:
                        raise AssertionError(f"LIST gave {len(r.entries)} entries")
                else:
                    await client.ping(timeout=60)
            except Exception as exc:
                errors.append(f"{kind}: {exc!r}")
                if len(errors) > 100:
                    stop.set()
                continue
            t1 = time.perf_counter()
            lat[kind].append(t1 - t0)
            stamps.append(t1)
            k += 1

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    t_start = time.perf_counter()
    await asyncio.gather(*(run(i, c) for i, c in enumerate(clients)))
    t_end = time.perf_counter()
    await asyncio.gather(*(c.close() for c in clients))
    return {"lat": lat, "stamps": stamps, "t_start": t_start, "t_end": t_end,
            "errors": errors, "clock": time.perf_counter() - time.time()}


async def streamer_child(uri: str, n: int, streams: int, size: int, sources: list[str],
                         digests: list[str], core: str, tag: int) -> dict[str, Any]:
    import virnet
    from virnet.services import files as f

    _common.check_core(core)
    clients = await asyncio.gather(*(virnet.connect(uri) for _ in range(n)))
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # GO
    errors: list[str] = []
    moved = [0]
    spans: list[tuple[float, float]] = []

    async def upload(client: Any, sid: int) -> None:
        path = f"up/{tag}-{sid}"
        data = pattern_block(tag * 100000 + sid, size)
        t0 = time.perf_counter()
        stream = await client.open_stream(
            f.UPLOAD, f.TransferArgs(path, 0, 0, int(f.TransferFlags.NO_SYNC)))
        view = memoryview(data)
        for pos in range(0, size, CHUNK):
            await stream.send(view[pos : pos + CHUNK])
        await stream.finish()
        t1 = time.perf_counter()
        reply = await client.call(f.CHECKSUM, f.ChecksumArgs(path, "sha256"), timeout=120)
        if reply.digest != hashlib.sha256(data).digest():
            raise AssertionError(f"{path}: stored data differs from what was sent")
        await client.call(f.DELETE, f.PathArgs(path), timeout=120)
        moved[0] += size
        spans.append((t0, t1))

    async def download(client: Any, sid: int) -> None:
        which = sid % len(sources)
        t0 = time.perf_counter()
        stream = await client.open_stream(f.DOWNLOAD, f.TransferArgs(sources[which], 0, 0, 0))
        h = hashlib.sha256()
        got = 0
        async for chunk in stream:
            h.update(chunk)
            got += len(chunk)
        await stream.finish()
        t1 = time.perf_counter()
        if got != size or h.hexdigest() != digests[which]:
            raise AssertionError(f"download of {sources[which]}: {got} bytes, digest differs")
        moved[0] += size
        spans.append((t0, t1))

    async def guarded(coro: Any) -> None:
        try:
            await coro
        except Exception as exc:
            errors.append(repr(exc))

    jobs = []
    for ci, client in enumerate(clients):
        for s in range(streams):
            sid = ci * streams + s
            jobs.append(guarded(upload(client, sid) if s % 2 == 0 else download(client, sid)))
    await asyncio.gather(*jobs)
    await asyncio.gather(*(c.close() for c in clients))
    return {"moved": moved[0], "spans": spans, "errors": errors,
            "clock": time.perf_counter() - time.time()}


def child_main(args: argparse.Namespace) -> int:
    raise_nofile()
    from virnet import _loop

    if args.child == "callers":
        result = _loop.run(caller_child(args.uri, args.callers, args.core))
    else:
        spec = json.loads(args.spec)
        result = _loop.run(streamer_child(args.uri, spec["n"], args.streams,
                                          args.stream_mib << 20, spec["sources"],
                                          spec["digests"], args.core, spec["tag"]))
    # A file, not stdout: the result is megabytes (every call's latency and end time).
    Path(args.out).write_text(json.dumps(result))
    print("DONE", flush=True)
    return 0


# ----------------------------------------------------------------------------- parent


class Sampler(threading.Thread):
    """Samples a process's RSS and descriptor count every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int, int, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            try:
                self.samples.append((time.time(), *proc_stats(self.pid)))
            except OSError:
                return


def proc_stats(pid: int) -> tuple[int, int, int]:
    """(RSS bytes, open descriptors, threads) of ``pid``."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds, threads


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def start_daemon(workdir: Path, root: Path, core: str, max_clients: int
                 ) -> tuple[subprocess.Popen[bytes], str]:
    sock = workdir / "d.sock"
    conf = workdir / "virnetd.toml"
    conf.write_text(
        f'listen = ["unix://{sock}"]\nroot = "{root}"\nlog_level = "warning"\n'
        f"max_clients = {max_clients}\nmax_streams = 64\n"
    )
    log = open(workdir / "virnetd.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen(
        [sys.executable, "-m", "virnet.daemon", "--config", str(conf)],
        stdout=log, stderr=log, env=_common.child_env(core),
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"virnetd did not start: {(workdir / 'virnetd.log').read_text()}")
        time.sleep(0.05)
    return proc, f"unix://{sock}"


def stop_daemon(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def daemon_log_problems(workdir: Path) -> list[str]:
    text = (workdir / "virnetd.log").read_text(errors="replace")
    return [ln for ln in text.splitlines() if "Traceback" in ln or " ERROR " in ln
            or "CRITICAL" in ln]


def spawn(args: argparse.Namespace, role: str, uri: str, extra: list[str]
          ) -> subprocess.Popen[str]:
    out = tempfile.mktemp(prefix=f"vnload-{role}-", suffix=".json", dir=args.workdir)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", role, "--uri", uri,
           "--core", args.core, "--streams", str(args.streams),
           "--stream-mib", str(args.stream_mib), *extra, "--out", out]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=_common.child_env(args.core))


def expect_ready(p: subprocess.Popen[str], what: str) -> None:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "READY":
        raise RuntimeError(f"{what} did not get ready: {line!r}")


def result_of(p: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = p.communicate(timeout=timeout)
    if p.returncode != 0 or "DONE" not in out:
        raise RuntimeError(f"child exited {p.returncode} without a result")
    return json.loads(Path(p.args[-1]).read_text())  # type: ignore[index, no-any-return]


def parent_main(args: argparse.Namespace) -> int:
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="vnload-", dir="/tmp"))
    args.workdir = str(workdir)
    root = Path(tempfile.mkdtemp(prefix="vnload-root-", dir="/dev/shm"))
    children: list[subprocess.Popen[str]] = []
    daemon = None
    try:
        size = args.stream_mib << 20
        (root / "small").mkdir()
        for i in range(SMALL_FILES):
            (root / "small" / f"f{i}").write_bytes(b"s" * (100 + i))
        (root / "up").mkdir()
        (root / "src").mkdir()
        sources, digests = [], []
        for i in range(8):
            data = pattern_block(900000 + i, size)
            (root / "src" / f"s{i}").write_bytes(data)
            sources.append(f"src/s{i}")
            digests.append(hashlib.sha256(data).hexdigest())
        daemon, uri = start_daemon(workdir, root, args.core,
                                   args.callers + args.streamers + 64)
        sampler = Sampler(daemon.pid)
        sampler.start()
        per = [args.callers // 2, args.callers - args.callers // 2]
        callers = [spawn(args, "callers", uri, ["--callers", str(n)]) for n in per if n]
        children += callers
        for p in callers:
            expect_ready(p, "callers")
        half = [args.streamers // 2, args.streamers - args.streamers // 2]
        streamers = [
            spawn(args, "streams", uri, ["--spec", json.dumps(
                {"n": n, "sources": sources, "digests": digests, "tag": i})])
            for i, n in enumerate(half) if n
        ]
        children += streamers
        for p in streamers:
            expect_ready(p, "streamers")
        time.sleep(args.warmup)
        t_go = time.time()
        for p in streamers:
            assert p.stdin is not None
            p.stdin.write("GO\n")
            p.stdin.flush()
        sresults = [result_of(p, 1800) for p in streamers]
        t_streams_done = time.time()
        time.sleep(args.cooldown)
        for p in callers:
            assert p.stdin is not None
            p.stdin.write("STOP\n")
            p.stdin.flush()
        cresults = [result_of(p, 300) for p in callers]
        sampler.stopped.set()
        sampler.join()
        peak_rss = vm_hwm(daemon.pid)
        rc = stop_daemon(daemon)
        problems = daemon_log_problems(workdir)
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait()
        if daemon is not None and daemon.poll() is None:
            stop_daemon(daemon)
        shutil.rmtree(root, ignore_errors=True)
    # ---- figures
    lat_all: dict[str, list[float]] = {"stat": [], "list": [], "ping": []}
    errors: list[str] = []
    stamps: list[float] = []
    caller_span = 0.0
    for r in cresults:
        for k, v in r["lat"].items():
            lat_all[k] += v
        errors += r["errors"]
        # perf_counter stamps to wall clock, via the offset each child measured
        stamps += [s - r["clock"] for s in r["stamps"]]
        caller_span = max(caller_span, r["t_end"] - r["t_start"])
    moved = sum(r["moved"] for r in sresults)
    spans = [(a - r["clock"], b - r["clock"]) for r in sresults for a, b in r["spans"]]
    for r in sresults:
        errors += r["errors"]
    s0 = min(a for a, _ in spans) if spans else t_go
    s1 = max(b for _, b in spans) if spans else t_streams_done
    in_phase = sum(1 for s in stamps if s0 <= s <= s1)
    everything = sorted(v for vs in lat_all.values() for v in vs)
    result = {
        "callers": args.callers, "streamers": args.streamers, "streams": len(spans),
        "streams_expected": args.streamers * args.streams, "stream_bytes": moved,
        "stream_seconds": round(s1 - s0, 3),
        "stream_GBps": round(moved / (s1 - s0) / 1e9, 3) if spans else 0,
        "calls_total": len(stamps), "calls_per_s_overall": round(len(stamps) / caller_span),
        "calls_during_streams": in_phase,
        "calls_per_s_during_streams": round(in_phase / (s1 - s0)) if spans else 0,
        "call_p50_ms": round(percentile(everything, 0.50) * 1e3, 2),
        "call_p99_ms": round(percentile(everything, 0.99) * 1e3, 2),
        "call_max_ms": round(everything[-1] * 1e3, 1) if everything else None,
        "per_kind_p50_p99_ms": {
            k: [round(percentile(sorted(v), 0.5) * 1e3, 2),
                round(percentile(sorted(v), 0.99) * 1e3, 2), len(v)]
            for k, v in lat_all.items()
        },
        "daemon_peak_rss_MiB": round(peak_rss / 2**20, 1),
        "daemon_max_fds": max((s[2] for s in sampler.samples), default=0),
        "daemon_max_threads": max((s[3] for s in sampler.samples), default=0),
        "daemon_exit": rc, "daemon_log_problems": problems[:20],
        "errors": len(errors), "error_samples": errors[:10], "core": args.core,
        "machine": _common.machine_info(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = (not errors and not problems and rc == 0
          and len(spans) == args.streamers * args.streams)
    print("LOAD", "OK" if ok else "FAILED")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--callers", type=int, default=1000)
    ap.add_argument("--streamers", type=int, default=16)
    ap.add_argument("--streams", type=int, default=64, help="per streaming client")
    ap.add_argument("--stream-mib", type=int, default=4, help="MiB per stream")
    ap.add_argument("--core", choices=["compiled", "pure"], default="compiled")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of calls alone")
    ap.add_argument("--cooldown", type=float, default=2.0)
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
