"""The file I/O helpers under every transfer: which descriptors are read and written on
the event loop (never waiting on a device) and which in worker threads, the pooled
page-aligned read buffers, and the bytes that come out either way."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import mmap
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virnet import _fileio, _syscalls

MiB = 1024 * 1024


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) on this machine")
    d = Path(tempfile.mkdtemp(prefix="virnet-fileio-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        if _syscalls.file_system_type(fd) in _syscalls._MEMORY_FILE_SYSTEMS:
            pytest.skip("the temporary directory is on a memory file system here")
    finally:
        os.close(fd)
    return tmp_path


def _fd(path: Path, flags: int = os.O_RDONLY) -> int:
    return os.open(path, flags | os.O_CLOEXEC)


def test_never_waits_tells_memory_from_disks_pipes_and_devices(
    shm_dir: Path, disk_dir: Path
) -> None:
    (shm_dir / "f").write_bytes(b"x")
    (disk_dir / "f").write_bytes(b"x")
    null = shm_dir / "null"
    os.mknod(null, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a private /dev/null
    tty_like = shm_dir / "tty"
    os.mknod(tty_like, 0o600 | stat.S_IFCHR, os.makedev(5, 0))  # never opened
    r, w = os.pipe()
    fds = [_fd(shm_dir / "f"), _fd(disk_dir / "f"), _fd(null, os.O_WRONLY)]
    try:
        assert _syscalls.never_waits(fds[0])  # tmpfs
        assert not _syscalls.never_waits(fds[1])  # a disk
        assert _syscalls.never_waits(fds[2])  # the mem driver's null
        assert not _syscalls.never_waits(w)  # a pipe can fill up
        assert not _syscalls.never_waits(r)
        assert not _syscalls.never_waits(12345)  # not open at all
    finally:
        for fd in (*fds, r, w):
            os.close(fd)


def _no_threads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []

    async def to_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(fn)
        return fn(*args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    return calls


async def _read_all(fd: int, start: int, length: int) -> bytes:
    out = bytearray()
    async for block in _fileio.read_blocks(fd, start, length):
        assert block.readonly  # sent without a copy
        out += block
    return bytes(out)


async def test_reads_from_a_memory_file_system_stay_on_the_loop(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * MiB + 123)
    (shm_dir / "src").write_bytes(data)
    threads = _no_threads(monkeypatch)
    fd = _fd(shm_dir / "src")
    try:
        assert await _read_all(fd, 7, len(data) - 7) == data[7:]
    finally:
        os.close(fd)
    assert threads == []


async def test_uncached_reads_from_a_disk_go_to_threads(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block the page cache does not hold (RWF_NOWAIT says EAGAIN, simulated) is read
    in a worker thread, and the bytes are the same."""
    data = os.urandom(2 * MiB + 5)
    (disk_dir / "src").write_bytes(data)
    threads = _no_threads(monkeypatch)
    real = _fileio._read_into

    def read_into(fd: int, view: memoryview, offset: int | None, flags: int = 0) -> Any:
        if flags:
            view.release()
            raise BlockingIOError("not cached")
        return real(fd, view, offset, flags)

    monkeypatch.setattr(_fileio, "_read_into", read_into)
    fd = _fd(disk_dir / "src")
    try:
        assert await _read_all(fd, 0, len(data)) == data
    finally:
        os.close(fd)
    assert len(threads) == 3  # every block: each one found uncached


async def test_cached_reads_from_a_disk_stay_on_the_loop(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _fileio._NOWAIT:  # pragma: no cover - old kernels and platforms
        pytest.skip("no RWF_NOWAIT here")
    data = os.urandom(2 * MiB)
    (disk_dir / "src").write_bytes(data)  # just written: in the page cache
    threads = _no_threads(monkeypatch)
    fd = _fd(disk_dir / "src")
    try:
        try:
            os.preadv(fd, [bytearray(1)], 0, _fileio._NOWAIT)
        except OSError:
            pytest.skip("this file system has no RWF_NOWAIT reads")
        assert await _read_all(fd, 0, len(data)) == data
    finally:
        os.close(fd)
    assert threads == []


async def test_writes_to_memory_are_inline_and_to_disks_batched_in_threads(
    shm_dir: Path, disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [os.urandom(n) for n in (100, 262120, 5 * MiB, 1)]
    expected = hashlib.sha256(b"".join(chunks[:2]) + bytes(4096) + b"".join(chunks[2:]))
    for directory, inline in ((shm_dir, True), (disk_dir, False)):
        threads = _no_threads(monkeypatch)
        fd = _fd(directory / "dst", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            writer = _fileio.BatchWriter(fd)
            assert writer.inline is inline
            for i, chunk in enumerate(chunks):
                await writer.write(chunk)
                if i == 1:
                    await writer.skip(4096)
            await writer.flush()
            os.ftruncate(fd, writer.pos)
        finally:
            os.close(fd)
        assert hashlib.sha256((directory / "dst").read_bytes()).digest() == expected.digest()
        assert (threads == []) is inline, (directory, threads)


async def test_sequential_writer_to_a_private_null_device_is_inline(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    null = shm_dir / "null"
    os.mknod(null, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    threads = _no_threads(monkeypatch)
    fd = _fd(null, os.O_WRONLY)
    try:
        writer = _fileio.SequentialWriter(fd)
        await writer.write(os.urandom(3 * MiB))
        await writer.skip(2 * MiB)
        await writer.flush()
    finally:
        os.close(fd)
    assert threads == [] and writer.pos == 5 * MiB
    assert stat.S_ISCHR(os.stat(null).st_mode)


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def test_pool_buffers_are_page_aligned_and_reused_only_when_unreferenced() -> None:
    pool = _fileio.BufferPool(size=MiB, limit=2)
    a = pool.take()
    assert len(a) == MiB and not a.readonly
    assert isinstance(a.obj, mmap.mmap)
    assert _address(a.obj) % mmap.PAGESIZE == 0
    first = id(a.obj)  # no reference kept: a reference is what marks a buffer busy
    held = a[10:20].toreadonly()  # a packet still queued on a stream
    a.release()
    b = pool.take()
    assert id(b.obj) != first  # still referenced through the view: not handed out
    b.release()
    del held
    c = pool.take()
    assert id(c.obj) == first  # nothing references it any more: reused, front first
    c.release()


def test_pool_past_its_limit_makes_one_off_buffers() -> None:
    pool = _fileio.BufferPool(size=4096, limit=2)
    views = [pool.take() for _ in range(4)]
    assert len({id(v.obj) for v in views}) == 4
    assert len(pool._buffers) == 2


async def test_read_until_eof_reads_a_private_zero_device_inline(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zero = shm_dir / "zero"
    os.mknod(zero, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    threads = _no_threads(monkeypatch)
    fd = _fd(zero)
    try:
        got = 0
        async for block in _fileio.read_until_eof(fd, 3 * MiB + 7):
            assert not any(block)
            got += len(block)
    finally:
        os.close(fd)
    assert got == 3 * MiB + 7 and threads == []


async def test_read_until_eof_from_a_pipe_uses_threads_and_fails_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads = _no_threads(monkeypatch)
    r, w = os.pipe()
    os.write(w, b"abc")
    os.close(w)
    try:
        with pytest.raises(EOFError, match="after 3 of the 10 bytes"):
            async for _ in _fileio.read_until_eof(r, 10):
                pass
    finally:
        os.close(r)
    assert threads  # a pipe can wait: never read on the loop
    await asyncio.sleep(0)


class _SlowThreadReads:
    """Every read goes to a thread and takes a while; counts the reads in flight, so a
    test can tell whether a reader was closed while its thread still used the fd."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import threading
        import time

        self.lock = threading.Lock()
        self.in_flight = 0
        real = _fileio._read_into

        def slow(fd: int, view: memoryview, offset: int | None, flags: int = 0) -> memoryview:
            with self.lock:
                self.in_flight += 1
            try:
                time.sleep(0.05)
                return real(fd, view, offset, flags)
            finally:
                with self.lock:
                    self.in_flight -= 1

        monkeypatch.setattr(_fileio, "_read_into", slow)
        monkeypatch.setattr(_fileio, "never_waits", lambda fd: False)
        monkeypatch.setattr(_fileio, "_NOWAIT", 0)


async def test_closing_a_reader_waits_for_its_prefetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller closes the descriptor right after closing the reader: no thread may
    still be reading it then (the number could already belong to another file)."""
    (tmp_path / "src").write_bytes(os.urandom(8 * MiB))
    reads = _SlowThreadReads(monkeypatch)
    fd = _fd(tmp_path / "src")
    try:
        blocks = _fileio.read_blocks(fd, 0, 8 * MiB)
        first = await blocks.__anext__()  # the next block is now being prefetched
        assert len(first) > 0
        await blocks.aclose()
        assert reads.in_flight == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("reader", ["read_blocks", "read_until_eof"])
async def test_a_cancelled_reader_finishes_its_thread_read_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    (tmp_path / "src").write_bytes(os.urandom(8 * MiB))
    reads = _SlowThreadReads(monkeypatch)
    fd = _fd(tmp_path / "src")
    started = asyncio.Event()

    async def consume() -> None:
        import contextlib

        gen = (
            _fileio.read_blocks(fd, 0, 8 * MiB)
            if reader == "read_blocks"
            else _fileio.read_until_eof(fd, 8 * MiB)
        )
        async with contextlib.aclosing(gen) as blocks:
            async for _ in blocks:
                started.set()

    try:
        task = asyncio.ensure_future(consume())
        await started.wait()
        await asyncio.sleep(0.01)  # inside the next thread read
        assert reads.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert reads.in_flight == 0
    finally:
        os.close(fd)
