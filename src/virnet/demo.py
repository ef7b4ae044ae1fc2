"""``virnet demo``: a tour of virnet on two daemons it starts in a temporary directory.

Two real ``virnetd`` processes (the same program an administrator runs), a *source*
with a shell console and a *destination*, each with its own socket and data root in
one temporary directory (on tmpfs when there is one, so the tour measures virnet rather
than a disk).  The tour goes over their sockets as any client would:

1. files: upload, download, a sparse file with its holes kept, checksums on both ends;
2. a console: a short scripted shell session on the daemon's pseudo-terminal, then a
   second attach that replays the console's history;
3. a migration of the uploaded image from the source daemon to the destination, with
   the progress bar ``virnet migrate`` shows;
4. the wire core's framing rate, in this process.

Each data step prints its rate beside the rate of a local copy of the same bytes on the
same file system (a hole-aware ``copy_file_range`` and an fsync, like the daemon's
commit), so the figures say what the protocol costs.  Afterwards the daemons are
stopped and the directory removed; with ``keep=True`` they go on running and the tour
ends with commands to try and how to stop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _impl, transfer
from . import console as _console
from ._units import format_rate, format_size
from .client import Client, connect
from .errors import ConnectionClosedError, RPCError
from .services import files as f
from .services import migration as mig

MiB = 1 << 20
#: The shell on the source daemon's console, with a prompt the script waits for.
PROMPT = "demo$ "
SHELL = f"env 'PS1={PROMPT}' /bin/sh -i"
START_TIMEOUT = 20.0  # seconds for a daemon to answer on its socket
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before SIGKILL


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# ---------------------------------------------------------------------------- daemons


@dataclass
class DemoDaemon:
    """One ``virnetd`` subprocess of the tour."""

    role: str
    directory: str
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> str:
        return os.path.join(self.directory, f"{self.role}.sock")

    @property
    def uri(self) -> str:
        return f"unix://{self.socket}"

    @property
    def root(self) -> str:
        return os.path.join(self.directory, self.role)

    @property
    def log(self) -> str:
        return os.path.join(self.directory, f"{self.role}.log")

    @classmethod
    def spawn(cls, role: str, directory: str, *extra: str) -> DemoDaemon:
        sock = os.path.join(directory, f"{role}.sock")
        env = dict(os.environ)
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "JOURNAL_STREAM"):
            env.pop(var, None)
        with open(os.path.join(directory, f"{role}.log"), "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "virnet.daemon", "--listen", f"unix://{sock}",
                 "--root", os.path.join(directory, role), *extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=directory,
                # Its own session: a ^C on the demo's terminal is the demo's to handle,
                # and with --keep the daemon outlives the terminal's demo.
                start_new_session=True,
            )
        return cls(role, directory, proc)

    async def connect(self) -> Client:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the {self.role} daemon exited with status {self.proc.returncode}: "
                    f"{self.last_log_line()}"
                )
            try:
                return await connect(self.uri)
            except (OSError, ConnectionClosedError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    def last_log_line(self) -> str:
        with contextlib.suppress(OSError), open(self.log, errors="replace") as fh:
            lines = fh.read().splitlines()
            return lines[-1] if lines else "(no output)"
        return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; reaped either way."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -------------------------------------------------------------------------- local copy


def make_file(path: str, size: int, data_every: int = 0) -> None:
    """``size`` bytes of non-repeating-looking data; with ``data_every``, only 1 MiB in
    each ``data_every`` bytes is data and the rest holes."""
    block = hashlib.sha256(b"virnet").digest() * (MiB // 32)
    with open(path, "wb") as fh:
        pos = 0
        while pos < size:
            n = min(MiB, size - pos)
            fh.seek(pos)
            fh.write(pos.to_bytes(8, "big") + block[8:n])
            pos += data_every or n
        fh.truncate(size)


def local_copy(src: str, dst: str) -> float:
    """The seconds it takes to copy ``src`` to ``dst`` as fast as this machine copies a
    file (in the kernel, holes kept, fsynced); the best of two runs, since the first
    one after a large transfer may pay for the memory the file system reclaims."""
    return min(_copy(src, dst), _copy(src, dst))


def _copy(src: str, dst: str) -> float:
    start = time.perf_counter()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fi.fileno(), pos, os.SEEK_HOLE)
            while pos < end:
                try:
                    n = os.copy_file_range(fi.fileno(), fo.fileno(), end - pos, pos, pos)
                except OSError:  # not between these file systems: read and write
                    n = os.pwrite(fo.fileno(), os.pread(fi.fileno(), min(MiB, end - pos),
                                                        pos), pos)
                if n <= 0:
                    break
                pos += n
        fo.truncate(size)
        os.fsync(fo.fileno())
    elapsed = time.perf_counter() - start
    os.unlink(dst)
    return elapsed


def sha256(path: str) -> bytes:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").digest()


def _versus(size: int, elapsed: float, local: float) -> str:
    """``RATE (local copy: RATE, N %)``."""
    rate, base = size / max(elapsed, 1e-9), size / max(local, 1e-9)
    return f"{format_rate(rate)} (local copy of the same bytes: {format_rate(base)}, " \
           f"{100 * rate / base:.0f} %)"


# ------------------------------------------------------------------------------- steps

Say = Callable[[str], None]


async def _files(client: Client, src: DemoDaemon, tmp: str, size: int, say: Say) -> None:
    say(f"\n1. files, over the {src.role} daemon's socket")
    local = os.path.join(tmp, "disk.img")
    make_file(local, size)
    start = time.perf_counter()
    await client.call(f.MKDIR, f.PathArgs("images"))
    await transfer.upload(client, local, "images/disk.img")
    up = time.perf_counter() - start
    base = local_copy(local, os.path.join(tmp, "copy"))
    say(f"   upload   disk.img -> images/disk.img  {format_size(size)}: "
        f"{_versus(size, up, base)}")

    back = os.path.join(tmp, "disk.back")
    start = time.perf_counter()
    await transfer.download(client, "images/disk.img", back)
    down = time.perf_counter() - start
    base = local_copy(os.path.join(src.root, "images", "disk.img"), os.path.join(tmp, "copy"))
    say(f"   download images/disk.img -> disk.back {format_size(size)}: "
        f"{_versus(size, down, base)}")

    start = time.perf_counter()
    remote = await client.call(f.CHECKSUM, f.ChecksumArgs("images/disk.img", "sha256"))
    on_daemon = time.perf_counter() - start
    start = time.perf_counter()
    mine, theirs = sha256(local), sha256(back)
    here = (time.perf_counter() - start) / 2
    if not remote.digest == mine == theirs:
        raise RuntimeError("checksum mismatch after the round trip")
    say(f"   checksum images/disk.img on the daemon: {remote.digest.hex()[:16]}..., the "
        f"same as both local files ({format_rate(size / max(on_daemon, 1e-9))} there, "
        f"{format_rate(size / max(here, 1e-9))} here)")
    os.unlink(back)

    sparse = os.path.join(tmp, "sparse.img")
    make_file(sparse, size * 4, data_every=16 * MiB)  # 1 MiB of data in each 16
    start = time.perf_counter()
    await transfer.upload(client, sparse, "images/sparse.img", sparse=True)
    up = time.perf_counter() - start
    base = local_copy(sparse, os.path.join(tmp, "copy"))
    st = await client.call(f.STAT, f.PathArgs("images/sparse.img"))
    say(f"   upload --sparse sparse.img: {format_size(st.size)}, of which "
        f"{format_size(st.allocation)} allocated on the daemon (holes sent as holes): "
        f"{_versus(st.size, up, base)}")
    back = os.path.join(tmp, "sparse.back")
    await transfer.download(client, "images/sparse.img", back, sparse=True)
    if sha256(back) != sha256(sparse):
        raise RuntimeError("the sparse file came back different")
    allocated = os.stat(back).st_blocks * 512
    say(f"   download --sparse: the same bytes back, {format_size(allocated)} allocated here")
    for path in (local, sparse, back):
        os.unlink(path)
    listing = await client.call(f.LIST, f.PathArgs("images"))
    say("   ls images: " + ", ".join(f"{e.name} ({format_size(e.size)})"
                                     for e in listing.entries))
    try:
        await client.call(f.STAT, f.PathArgs("../etc/passwd"))
    except RPCError as exc:
        say(f"   stat ../etc/passwd is refused: {exc.message}")


async def _read_until(stream: Any, output: bytearray, marker: bytes, quiet: float) -> None:
    """Read into ``output`` until ``marker`` appears in what was read and then nothing
    more comes for ``quiet`` seconds."""
    start = len(output)
    while True:
        try:
            chunk = await asyncio.wait_for(stream.recv(), quiet)
        except TimeoutError:
            if marker in output[start:]:
                return
            continue
        if not chunk:
            raise EOFError("the console's program exited")
        output.extend(chunk)


async def _console_session(client: Client, say: Say) -> None:
    say("\n2. a console: a shell on the daemon's pseudo-terminal")
    names = await _console.list(client)
    say(f"   consoles: {', '.join(names)}")
    commands = ["echo hello from $(uname -s) on $(tty)", "stty size", "expr 6 \\* 7"]
    async with asyncio.timeout(20):
        stream = await _console.open(client, "shell", history=False)
        await _console.resize(client, "shell", 30, 100)  # "stty size" shows it
        output = bytearray()
        for command in commands:
            await stream.send(command.encode() + b"\n")
            await _read_until(stream, output, PROMPT.encode(), 0.05)
        await stream.finish()  # detach: the shell keeps running
        say(f"   typed {len(commands)} commands and detached; attaching again replays "
            "the console's history:")
        stream = await _console.open(client, "shell")
        history = bytearray()
        await _read_until(stream, history, commands[-1].encode(), 0.2)
        await stream.finish()
    for line in history.decode(errors="replace").replace("\r", "").splitlines():
        if line.strip():
            say(f"   | {line}")


async def _migration(client: Client, src: DemoDaemon, dst: DemoDaemon, show_bar: bool,
                     say: Say) -> None:
    say(f"\n3. a migration: the {src.role} daemon sends images/disk.img to the "
        f"{dst.role} daemon")
    async with await dst.connect() as other:
        await other.call(f.MKDIR, f.PathArgs("images"))  # where the image goes
    serial = client.protocol.allocate_serial()
    bar: Any = None
    if show_bar:
        from ._progressbar import ProgressBar

        bar = ProgressBar("migrate images/disk.img")

    def on_progress(ev: Any) -> None:
        if bar is not None and ev.job_serial == serial:
            bar.total(ev.total)
            bar.update(ev.transferred)
            if ev.transferred == ev.total:
                bar.committing()  # the destination syncs and renames it into place

    unsubscribe = client.subscribe(mig.PROGRESS, on_progress)
    payload = mig.PERFORM.encode_args(mig.PerformArgs("images/disk.img", dst.uri, 0, 0))
    start = time.perf_counter()
    try:
        with bar if bar is not None else contextlib.nullcontext():
            data = await client.call_raw(mig.MIGRATION.number, mig.MIGRATION.version,
                                         mig.PERFORM.number, payload, serial=serial)
            reply = mig.PERFORM.decode_ret(data)
            elapsed = reply.elapsed_ns / 1e9 if reply.elapsed_ns else \
                time.perf_counter() - start
            if bar is not None:
                bar.finish(reply.bytes, elapsed)
    finally:
        unsubscribe()
    base = local_copy(os.path.join(src.root, "images", "disk.img"),
                      os.path.join(dst.root, "images", ".demo-copy"))
    say(f"   migrated {format_size(reply.bytes)} in {elapsed:.2f} s: "
        f"{_versus(reply.bytes, elapsed, base)}")
    async with await dst.connect() as other:
        there = await other.call(f.CHECKSUM, f.ChecksumArgs("images/disk.img", "sha256"))
    here = await client.call(f.CHECKSUM, f.ChecksumArgs("images/disk.img", "sha256"))
    if there.digest != here.digest:
        raise RuntimeError("the migrated image differs from its source")
    say(f"   the {dst.role} daemon has committed it; sha256 equal on both daemons")


def wire_rate(total: int) -> float:
    """Frame ``total`` bytes into 262120-byte packets and decode them again; GB/s."""
    block = bytes(range(256)) * 4096  # 1 MiB
    decoder = _impl.FrameDecoder()
    got = 0
    start = time.perf_counter()
    sent = 0
    while sent < total:
        for buf in _impl.encode_stream_data(1, 1, 4, 1, block):
            view = memoryview(buf)
            while view:
                target = decoder.get_buffer(len(view))
                n = min(len(target), len(view))
                target[:n] = view[:n]
                view = view[n:]
                for msg in decoder.buffer_updated(n):
                    got += len(msg.payload)
        sent += len(block)
    elapsed = time.perf_counter() - start
    assert got == sent
    return sent / elapsed / 1e9


# -------------------------------------------------------------------------------- tour


def _tempdir() -> str:
    # tmpfs when there is one, so the tour measures virnet rather than the disk
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
    return tempfile.mkdtemp(prefix="virnet-demo-", dir=base)


def _write_stop_script(tmp: str, daemons: list[DemoDaemon]) -> str:
    path = os.path.join(tmp, "stop")
    pids = " ".join(str(d.proc.pid) for d in daemons)
    with open(path, "w") as fh:
        fh.write(
            "#!/bin/sh\n"
            "# Stops the daemons `virnet demo --keep` left running and removes their "
            "directory.\n"
            f"kill {pids} 2>/dev/null\n"
            "i=0\n"
            f"while [ $i -lt 100 ] && kill -0 {pids} 2>/dev/null; do "
            "sleep 0.1; i=$((i + 1)); done\n"
            f"rm -rf {shlex.quote(tmp)}\n"
        )
    os.chmod(path, 0o755)
    return path


def _next_steps(tmp: str, src: DemoDaemon, dst: DemoDaemon, say: Say) -> None:
    stop = _write_stop_script(tmp, [src, dst])
    s, d = shlex.quote(src.uri), shlex.quote(dst.uri)
    say(f"\nThe daemons keep running (--keep), in {tmp}:")
    for daemon in (src, dst):
        say(f"  {daemon.role:12} {daemon.uri}  pid {daemon.proc.pid}, data root "
            f"{daemon.root}, log {daemon.log}")
    say("Try:")
    say(f"  virnet -c {s} ls images")
    say(f"  virnet -c {s} console shell    # ^] detaches")
    say(f"  virnet -c {s} migrate images/sparse.img {d}")
    say(f"  virnet -c {d} checksum images/sparse.img")
    say("Stop them and remove the directory:")
    say(f"  {shlex.quote(stop)}        # kill {src.proc.pid} {dst.proc.pid}, then "
        f"rm -rf {shlex.quote(tmp)}")


async def run_demo(size: str = "256M", *, quiet: bool = False, keep: bool = False) -> int:
    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    total = parse_size(size)
    if total < MiB:
        raise ValueError(f"demo size {size!r}: at least 1M")
    began = time.perf_counter()
    tmp = _tempdir()
    daemons: list[DemoDaemon] = []
    kept = False
    try:
        say(f"virnet demo in {tmp}")
        src = DemoDaemon.spawn("source", tmp, "--console", f"shell={SHELL}")
        daemons.append(src)
        dst = DemoDaemon.spawn("destination", tmp)
        daemons.append(dst)
        async with await src.connect() as client:
            await (await dst.connect()).close()
            for d in daemons:
                say(f"{d.role} virnetd: pid {d.proc.pid}, listening on {d.uri}, data "
                    f"root {d.root}")
            rtt = await client.ping()
            say(f"connected: {client.mode.value} mode, keepalive ping {rtt * 1e6:.0f} us")
            await _files(client, src, tmp, total, say)
            await _console_session(client, say)
            await _migration(client, src, dst, not quiet, say)
        say("\n4. the wire core, in this process")
        say(f"   wire core: {'compiled (Cython)' if _impl.compiled else 'pure Python'}")
        rate = await asyncio.to_thread(wire_rate, total)
        say(f"   wire core framing + decoding of {total / MiB:.0f} MiB: {rate:.2f} GB/s")
        say(f"\ntour done in {time.perf_counter() - began:.1f} s")
        if keep:
            # Even with quiet: without these lines the daemons could not be found.
            _next_steps(tmp, src, dst, lambda text: print(text, flush=True))
            kept = True
    finally:
        if not kept:
            for d in daemons:
                d.stop()
            shutil.rmtree(tmp, ignore_errors=True)
            if daemons:
                say(f"stopped the daemons and removed {tmp}")
    return 0
