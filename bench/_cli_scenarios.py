"""Whole-process scenarios of ``throughput.py``: the ``virnet`` CLI, ``virsh`` and ``dd``
timed the way a user meets them.

Each sample is the wall time from spawning the process to its exit, interpreter (or
program) start-up, connection and teardown included: that is what a user waits for.
The peer is started before the clock starts and stopped after it stops:

* ``virnet CLI ...`` -- a ``virnetd --listen unix://SOCK --root DIR`` subprocess per
  scenario and round (ready when it prints its "listening on" line on stderr, stopped by
  its PID with SIGTERM), its data root and the local files on /dev/shm (tmpfs).  The CLI
  is the console script beside ``sys.executable`` (or on ``PATH``) and runs with the
  compiled core.  Four rows: download to stdout with stdout opened on a *private* null
  character device made in the bench's temporary directory (never a system device node;
  where ``mknod`` cannot be used, a pipe drained by a reader thread, and the row's name
  says so); upload in place over an existing remote file of N bytes (``--offset 0
  --length N``); download to a new local file; upload of a whole file to a new remote
  path.  The targets of the last two are removed before each round.
* ``local copy, dd bs=1M into a new file (tmpfs)`` -- the anchor of the new-file rows:
  ``dd if=SRC of=NEW bs=1M status=none`` on the same file system, NEW removed first.
* ``virsh vol-download|vol-upload`` -- ``virsh -c qemu+unix:///system?socket=PATH`` against
  the private libvirtd of the libvirt rows (``LibvirtFixture``), to a new file on tmpfs
  resp. from the source file.

The CLI and virnetd run on cached bytecode, as from an installed package: virnet's
modules are compiled into their ``__pycache__`` once per run before the first CLI sample
(the session may set PYTHONDONTWRITEBYTECODE, which would make every start compile them).

Verification, outside the timed window: a new file's size and the SHA-256 of three
4 MiB samples (start, middle, end) against its source; an upload's remote size and the
same samples.  Files that are written in place (the in-place target, the volume) have
their sample ranges zeroed before the round, so the samples prove that the bytes were
written by this round.  Stdout on the null device is checked by the exit status only.

CPU: the process's own user + system time (``RUSAGE_CHILDREN``; nothing else is reaped
while it runs) and the daemon's from /proc, on the side each one plays; ``dd``'s is shown
as the sender's.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import (
    Skipped,
    Transfer,
    child_env,
    children_cpu,
    proc_cpu,
    transfer_timeout,
    unix_addr,
    virnet_uri,
)

MiB = 1024**2
SAMPLE = 4 * MiB  # bytes hashed at each of the three sampled offsets

CLI_STDOUT_NULL = "virnet CLI download to stdout (private null device)"
CLI_STDOUT_PIPE = "virnet CLI download to stdout (pipe drained by a reader: no private null device)"
CLI_INPLACE = "virnet CLI upload in place (--length N)"
CLI_DOWN_NEW = "virnet CLI download to a new file"
CLI_UP_WHOLE = "virnet CLI upload whole file"
LOCAL_COPY = "local copy, dd bs=1M into a new file (tmpfs)"
VIRSH_DOWN = "virsh vol-download to a new file"
VIRSH_UP = "virsh vol-upload"


# ------------------------------------------------------------------ the stdout sink


def _make_null(path: Path) -> int:
    """Create a private null character device (1, 3) at ``path``, open for writing."""
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(1, 3):
        os.close(fd)
        raise OSError(f"{path} is not the null device")
    return fd


@functools.cache
def null_device_unusable() -> str | None:
    """None if a private null device can be made and opened in the temporary directory
    (the bench's temporary directory is made there too), else why not."""
    d = tempfile.mkdtemp(prefix="virnet-bench-null-")
    try:
        fd = _make_null(Path(d) / "null")
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
    except OSError as exc:
        return str(exc)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return None


def cli_stdout_name() -> str:
    """The stdout row's name, which says which sink it writes to."""
    return CLI_STDOUT_PIPE if null_device_unusable() else CLI_STDOUT_NULL


@contextlib.contextmanager
def stdout_sink(workdir: Path) -> Iterator[tuple[int, Callable[[], int | None]]]:
    """A file descriptor for the child's stdout and a function that tells, after the
    child exited, how many bytes the sink saw (None for the null device: not counted)."""
    if not null_device_unusable():
        path = workdir / "null"
        path.unlink(missing_ok=True)
        fd = _make_null(path)
        try:
            yield fd, lambda: None
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
        return
    rfd, wfd = os.pipe()
    count = [0]
    open_w = [True]

    def drain() -> None:
        while chunk := os.read(rfd, 1 << 20):
            count[0] += len(chunk)

    def close_w() -> None:
        if open_w[0]:
            open_w[0] = False
            os.close(wfd)

    def seen() -> int:
        close_w()  # the child has exited: ours was the last write end, EOF follows
        reader.join()
        return count[0]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield wfd, seen
    finally:
        close_w()
        reader.join(timeout=30)
        os.close(rfd)


# ------------------------------------------------------------------ processes


@functools.cache
def ensure_bytecode() -> str:
    """Compile virnet's modules into their ``__pycache__`` (once per run, untimed), as an
    installed package has them: with PYTHONDONTWRITEBYTECODE set and a source checkout,
    every CLI start would compile virnet anew, which no user's start does.  Says what
    was done (printed once)."""
    import virnet

    pkg = Path(virnet.__file__).resolve().parent
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    r = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(pkg)],
        stdin=subprocess.PIPE,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if r.returncode != 0:
        tail = (r.stdout.strip().splitlines() or r.stderr.strip().splitlines() or ["?"])[-1]
        note = f"could not compile {pkg} ({tail}): CLI starts include compiling virnet"
    else:
        note = f"virnet's bytecode compiled in {pkg}/**/__pycache__ (as installed)"
    print(f"  whole processes: {note}", flush=True)
    return note


def _console_script(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's script, run unresolved
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise Skipped(f"no {name} console script beside {sys.executable} or on PATH")
    return found


def run_whole(cmd: list[str], *, stdout: int | None = None, env: dict[str, str] | None = None,
              timeout: float) -> tuple[float, float]:
    """Run ``cmd`` to its exit: (wall seconds from spawn to exit, its CPU seconds).
    stdin is a pipe closed at once (EOF), stdout ``stdout`` or a pipe, stderr a pipe
    whose tail is in the error if it fails."""
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # only the process started here, by its own handle
            proc.kill()
            proc.wait()
    seconds = time.perf_counter() - t0
    cpu = children_cpu() - cpu0
    shown = " ".join([Path(cmd[0]).name, *cmd[1:]])
    if proc.returncode != 0:
        tail = (err.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"{shown} failed ({proc.returncode}): {tail}")
    if out:
        raise RuntimeError(f"{shown} wrote {len(out)} unexpected bytes on stdout")
    return seconds, cpu


class Virnetd:
    """A ``virnetd`` subprocess on a Unix socket, ready once it said "listening on"."""

    def __init__(self, root: Path, workdir: Path) -> None:
        self.uri = virnet_uri(unix_addr(workdir, "virnetd.sock"))
        self.lines: collections.deque[str] = collections.deque(maxlen=20)
        self._ready: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [_console_script("virnetd"), "--listen", self.uri, "--root", str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env("compiled"),
            text=True,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        try:
            self._wait_listening(timeout=30)
        except BaseException:
            self.stop()
            raise

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # keeps the pipe from ever filling up
            self.lines.append(line.rstrip())
            if "listening on" in line:
                self._ready.put(line)
        self._ready.put(None)

    def _wait_listening(self, timeout: float) -> None:
        try:
            line = self._ready.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"virnetd not listening after {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"virnetd exited: {' | '.join(self.lines) or '(no output)'}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Stop exactly this virnetd, by its PID: SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def __enter__(self) -> Virnetd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------ verification


def _sample_ranges(size: int) -> list[tuple[int, int]]:
    if size <= 3 * SAMPLE:
        return [(0, size)]
    return [(0, SAMPLE), ((size - SAMPLE) // 2, SAMPLE), (size - SAMPLE, SAMPLE)]


def _sample_digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, length in _sample_ranges(size):
            h.update(os.pread(fd, length, start))
    finally:
        os.close(fd)
    return h.hexdigest()


def verify_copy(copy: Path, source: Path, size: int) -> None:
    """``copy`` has ``size`` bytes and the same sampled bytes as ``source``."""
    got = copy.stat().st_size
    if got != size:
        raise RuntimeError(f"{copy.name}: {got} bytes, want {size}")
    if _sample_digest(copy, size) != _sample_digest(source, size):
        raise RuntimeError(f"{copy.name}: sampled bytes differ from {source.name}")


def zero_samples(path: Path, size: int) -> None:
    """Zero the sampled ranges of a file that is about to be overwritten in place."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for start, length in _sample_ranges(size):
            os.pwrite(fd, bytes(length), start)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ scenarios


def _cli(uri: str, *args: str) -> list[str]:
    return [_console_script("virnet"), "-c", uri, *args]


def virnet_cli_scenario(kind: str, files: Any) -> Callable[[int, Path], Transfer]:
    """The ``virnet`` CLI against a fresh ``virnetd``.  ``kind``: "stdout", "inplace",
    "down-new" or "up-whole"; ``files`` is throughput's ``FilesFixture`` (src.bin and
    root/down.bin of N bytes on tmpfs)."""

    def run(nbytes: int, workdir: Path) -> Transfer:
        ensure_bytecode()
        d: Path = files.prepare(nbytes)
        root, src = d / "root", d / "src.bin"
        if kind == "stdout":
            target = None
        elif kind == "inplace":
            target = root / "up-inplace.bin"
            if not target.exists() or target.stat().st_size != nbytes:
                shutil.copyfile(src, target)  # an existing, fully allocated remote file
            zero_samples(target, nbytes)
        elif kind == "down-new":
            target = d / "cli-new.bin"
        else:
            target = root / "up-whole.bin"
        if kind in ("down-new", "up-whole"):
            assert target is not None
            target.unlink(missing_ok=True)
        env = child_env("compiled")
        timeout = transfer_timeout(nbytes)
        with Virnetd(root, workdir) as daemon:
            cpu0 = proc_cpu(daemon.pid)
            if kind == "stdout":
                with stdout_sink(workdir) as (fd, seen):
                    seconds, cpu = run_whole(
                        _cli(daemon.uri, "download", "down.bin", "-"),
                        stdout=fd, env=env, timeout=timeout,
                    )
                    got = seen()
                if got is not None and got != nbytes:
                    raise RuntimeError(f"stdout got {got} of {nbytes} bytes")
            elif kind == "down-new":
                seconds, cpu = run_whole(
                    _cli(daemon.uri, "download", "down.bin", str(target)), env=env,
                    timeout=timeout,
                )
            else:
                assert target is not None
                extra = ("--offset", "0", "--length", str(nbytes)) if kind == "inplace" else ()
                seconds, cpu = run_whole(
                    _cli(daemon.uri, "upload", str(src), target.name, *extra),
                    env=env, timeout=timeout,
                )
            daemon_cpu = proc_cpu(daemon.pid) - cpu0
        if kind == "down-new":
            assert target is not None
            verify_copy(target, root / "down.bin", nbytes)
            target.unlink()  # tmpfs is memory
        elif kind in ("inplace", "up-whole"):
            assert target is not None
            verify_copy(target, src, nbytes)
            if kind == "up-whole":
                target.unlink()
        if kind in ("stdout", "down-new"):
            return Transfer(seconds, {"recv": cpu, "send": daemon_cpu})
        return Transfer(seconds, {"recv": daemon_cpu, "send": cpu})

    return run


def local_copy_scenario(files: Any) -> Callable[[int, Path], Transfer]:
    """``dd if=SRC of=NEW bs=1M`` on tmpfs, NEW removed before: the new-file anchor."""

    def run(nbytes: int, workdir: Path) -> Transfer:
        d: Path = files.prepare(nbytes)
        dd = shutil.which("dd")
        if dd is None:
            raise Skipped("dd is not installed")
        src, new = d / "src.bin", d / "dd-new.bin"
        new.unlink(missing_ok=True)
        seconds, cpu = run_whole(
            [dd, f"if={src}", f"of={new}", "bs=1M", "status=none"],
            timeout=transfer_timeout(nbytes),
        )
        verify_copy(new, src, nbytes)
        new.unlink()
        return Transfer(seconds, {"send": cpu})

    return run


def virsh_scenario(mode: str, libvirt: Any, files: Any) -> Callable[[int, Path], Transfer]:
    """``virsh vol-download`` to a new file on tmpfs, or ``vol-upload`` from the source
    file, against throughput's ``LibvirtFixture`` (its private libvirtd)."""

    def run(nbytes: int, workdir: Path) -> Transfer:
        daemon = libvirt.ensure(nbytes)  # Skipped without root or libvirtd
        virsh = shutil.which("virsh")
        if virsh is None:
            raise Skipped("virsh is not installed")
        d: Path = files.prepare(nbytes)
        vol: Path = libvirt.vol_path
        if mode == "download":
            local = d / "virsh-new.bin"
            local.unlink(missing_ok=True)
        else:
            local = d / "src.bin"
            zero_samples(vol, nbytes)
        env = dict(os.environ, LC_ALL="C")
        env.pop("LIBVIRT_DEFAULT_URI", None)
        env.pop("VIRSH_DEFAULT_CONNECT_URI", None)
        cpu0 = proc_cpu(daemon.pid)
        seconds, cpu = run_whole(
            [virsh, "-q", "-c", daemon.qemu_uri, f"vol-{mode}", "--pool", libvirt.pool,
             libvirt.VOL, str(local)],
            env=env, timeout=transfer_timeout(nbytes),
        )
        daemon_cpu = proc_cpu(daemon.pid) - cpu0
        if mode == "download":
            verify_copy(local, vol, nbytes)
            local.unlink()
            return Transfer(seconds, {"recv": cpu, "send": daemon_cpu})
        verify_copy(vol, local, nbytes)
        return Transfer(seconds, {"recv": daemon_cpu, "send": cpu})

    return run
