"""Helpers of the MIGRATION tests: daemons (in-process and subprocess), PERFORM with its
PROGRESS events, files with data and holes, and what a destination left behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import virnet
from virnet.daemon.app import Daemon
from virnet.daemon.config import DaemonConfig
from virnet.services import migration as m

MiB = 1024 * 1024
MOVE = int(m.MigrationFlags.MOVE)
RESUME = int(m.MigrationFlags.RESUME)
STAGING = ".virnet-staging"


_ZEROS = bytes(MiB)


def file_sha(path: str) -> str:
    """sha256 of a file's content; holes are hashed as the zeros they read as, without
    reading them (a 1 GiB hole read from disk took seconds here)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                data = size
            while pos < min(data, size):
                n = min(MiB, data - pos)
                h.update(_ZEROS[:n])
                pos += n
            if pos >= size:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            fh.seek(pos)
            while pos < end:
                block = fh.read(min(MiB, end - pos))
                h.update(block)
                pos += len(block)
    return h.hexdigest()


def make_image(path: str, size: int, data_runs: list[tuple[int, int]] | None = None,
               seed: int = 0) -> str:
    """A file of ``size`` bytes: random data in ``data_runs`` ((offset, length) pairs),
    holes elsewhere; all data when ``data_runs`` is None.  Returns its sha256."""
    rnd = hashlib.sha256(seed.to_bytes(4, "big")).digest()
    block = (rnd * (MiB // len(rnd)))
    with open(path, "wb") as fh:
        runs = [(0, size)] if data_runs is None else data_runs
        for offset, length in runs:
            fh.seek(offset)
            done = 0
            while done < length:
                n = min(MiB, length - done)
                # Position-dependent, so misplaced blocks show in the digest.
                head = (offset + done).to_bytes(8, "big")
                fh.write((head + block[8:])[:n])
                done += n
        fh.truncate(size)
    return file_sha(path)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def staged_files(root: str) -> list[str]:
    d = os.path.join(root, STAGING)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def visible(root: str) -> list[str]:
    """Names in the root a user sees (the staging directory excluded), temp files too."""
    return sorted(n for n in os.listdir(root) if n != STAGING)


@dataclass
class Run:
    reply: Any = None
    error: BaseException | None = None
    events: list[tuple[float, Any]] = field(default_factory=list)
    serial: int = 0

    @property
    def first(self) -> Any:
        return self.events[0][1]

    @property
    def last(self) -> Any:
        return self.events[-1][1]


async def perform(
    c: virnet.Client,
    name: str,
    dest: str,
    *,
    bandwidth: int = 0,
    flags: int = 0,
    run: Run | None = None,
    raise_error: bool = True,
) -> Run:
    """PERFORM on ``c`` with its PROGRESS events (time-stamped) collected in ``run``."""
    run = run if run is not None else Run()
    serial = c.protocol.allocate_serial()
    run.serial = serial
    loop = asyncio.get_running_loop()

    def on_event(ev: Any) -> None:
        if ev.job_serial == serial:
            run.events.append((loop.time(), ev))

    unsubscribe = c.subscribe(m.PROGRESS, on_event)
    prog = m.MIGRATION
    try:
        data = await c.call_raw(
            prog.number, prog.version, m.PERFORM.number,
            m.PERFORM.encode_args(m.PerformArgs(name, dest, bandwidth, flags)),
            serial=serial,
        )
        run.reply = m.PERFORM.decode_ret(data)
    except virnet.RPCError as exc:
        run.error = exc
        if raise_error:
            raise
    finally:
        unsubscribe()
    return run


async def eventually(check: Callable[[], bool], timeout: float = 10.0,
                     what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or check}")
        await asyncio.sleep(0.01)


class Daemons:
    """In-process daemons on Unix sockets under one short directory; ``stop_all``."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.daemons: list[Daemon] = []

    async def start(self, label: str, *, root: str | None = None, readonly: bool = False,
                    **config: Any) -> tuple[Daemon, str]:
        listen = [f"unix://{self.tmp}/{label}.sock"]
        ro = [f"unix://{self.tmp}/{label}-ro.sock"] if readonly else []
        d = Daemon(DaemonConfig(listen=listen, listen_readonly=ro,
                                root=root or os.path.join(self.tmp, label), **config))
        uris = await d.start()
        self.daemons.append(d)
        return d, uris[0]

    async def stop(self, d: Daemon) -> None:
        if d in self.daemons:
            self.daemons.remove(d)
            await d.stop()

    async def stop_all(self) -> None:
        while self.daemons:
            await self.daemons.pop().stop()


# ----------------------------------------------------------------------------- processes


class DaemonProcess:
    """A ``virnetd`` subprocess (``python -m virnet.daemon``) with a TOML config; its
    stderr is collected by a thread.  ``prefix`` runs it inside something (for example
    ``ip netns exec NS``).  ``stop`` (SIGTERM, then SIGKILL) and ``kill`` (SIGKILL) act
    on exactly this process."""

    def __init__(self, config: dict[str, Any], directory: str, label: str,
                 prefix: tuple[str, ...] = ()) -> None:
        self.config_path = os.path.join(directory, f"{label}.toml")
        with open(self.config_path, "w") as fh:
            for key, value in config.items():
                fh.write(f"{key} = {_toml(value)}\n")
        self.config = config
        self.label = label
        cmd = [*prefix, sys.executable, "-m", "virnet.daemon", "--config", self.config_path]
        env = dict(os.environ)
        env.pop("VIRNET_DEFAULT_URI", None)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, errors="replace", env=env,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_ready(self, timeout: float = 20.0) -> None:
        want = len(self.config.get("listen", [])) + len(self.config.get("listen_readonly", []))
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum("listening on" in line for line in self.lines) < want:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"virnetd {self.label} did not start:\n"
                                         + "".join(self.lines))
                self._cond.wait(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return self.proc.returncode


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)
