"""File helpers shared by the daemon and the client: sparse segments, batched writes,
prefetching reads.  Blocking calls run in worker threads in batches of about 1 MiB, so
the event loop never waits on a disk but pays one thread hop per batch, not per packet."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import mmap
import os
import sys
from collections.abc import AsyncIterator, Iterator

IO_BATCH = 1024 * 1024


def segments(fd: int, start: int, end: int) -> Iterator[tuple[bool, int, int]]:
    """``(is_data, offset, length)`` runs covering ``[start, end)``, found with
    SEEK_DATA/SEEK_HOLE.  Where the file system cannot tell, everything is data."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: a hole to the end
                yield (False, pos, end - pos)
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield (True, pos, end - pos)
                return
            raise
        if data > pos:
            hole_end = min(data, end)
            yield (False, pos, hole_end - pos)
            pos = hole_end
            continue
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        data_end = min(hole, end)
        yield (True, pos, data_end - pos)
        pos = data_end


#: Read buffers one transfer may keep for reuse: enough for everything a stream has in
#: flight at once (its send queue, the transport's buffer, the block being read).
POOL_LIMIT = 12


class BufferPool:
    """Reusable, page-aligned read buffers for one transfer.

    Page-aligned, because where the data lands matters: copying file data out of the page
    cache into a buffer that starts 8-24 bytes past a 64-byte boundary (where malloc puts
    a ``bytearray``'s or a ``bytes``' data) took 4-5x the kernel time of the same copy
    into an aligned buffer on the machines we measured (bench/RESULTS.md); ``mmap`` gives
    page-aligned memory.  Reusable, because fresh memory for every block costs a page
    fault per 4 KiB, which on virtual machines that hand free pages back to the host is
    most of a transfer's time.

    A buffer is handed out again only when nothing else references it: every view of it
    (packets queued on a stream, a transport still writing them) holds a reference to the
    buffer, so its reference count tells when it is free without the stream or the
    transport reporting back.  When all ``limit`` buffers are busy a one-off buffer is
    made, so a reader never waits on the pool.
    """

    def __init__(self, size: int = IO_BATCH, limit: int = POOL_LIMIT) -> None:
        self.size = size
        self.limit = limit
        self._buffers: list[mmap.mmap] = []

    def take(self) -> memoryview:
        """A writable view of a free buffer of ``size`` bytes."""
        buffers = self._buffers
        for i in range(len(buffers)):
            # Two references: the list's and getrefcount's own argument.
            if sys.getrefcount(buffers[i]) == 2:
                return memoryview(buffers[i])
        buf = mmap.mmap(-1, self.size)
        if len(buffers) < self.limit:
            buffers.append(buf)
        return memoryview(buf)


def _read_into(fd: int, view: memoryview, offset: int | None) -> memoryview:
    """Fill ``view`` from ``fd`` (at ``offset``, or at the descriptor's position); the
    part read, read-only, so that a stream sends it without copying."""
    try:
        n = os.readv(fd, [view]) if offset is None else os.preadv(fd, [view], offset)
        return view[:n].toreadonly()
    finally:
        view.release()


async def read_until_eof(fd: int, length: int | None = None) -> AsyncIterator[memoryview]:
    """Read a source with no known size (a pipe, a FIFO, a character device, stdin) in
    order, in ~1 MiB blocks, until EOF or until ``length`` bytes were read.  A source
    that ends before ``length`` raises ``EOFError`` naming how far it got: a short source
    must fail the transfer, never pass as complete.  Blocks are views of pooled buffers:
    valid until the next block is asked for, unless something keeps a view of them (a
    stream does, until the data is written to the socket)."""
    done = 0
    pool = BufferPool()
    while length is None or done < length:
        view = pool.take()
        if length is not None and length - done < len(view):
            view = view[: length - done]
        block = await asyncio.to_thread(_read_into, fd, view, None)
        del view
        if not block:
            if length is not None:
                raise EOFError(f"the source ended after {done} of the {length} bytes asked for")
            return
        done += len(block)
        yield block
        del block


async def read_blocks(fd: int, start: int, length: int) -> AsyncIterator[memoryview]:
    """Read ``[start, start+length)`` in ~1 MiB blocks, the next one prefetched in a
    thread while the caller handles the current one.  Blocks are read-only views of
    pooled buffers (see ``BufferPool``)."""
    pos = start
    end = start + length
    pool = BufferPool()

    def read(at: int) -> asyncio.Future[memoryview]:
        view = pool.take()
        if end - at < len(view):
            view = view[: end - at]
        return asyncio.ensure_future(asyncio.to_thread(_read_into, fd, view, at))

    pending = read(pos) if pos < end else None
    try:
        while pending is not None:
            block = await pending
            pending = None
            if not block:
                raise OSError(errno.EIO, f"file shrank while reading (at offset {pos})")
            pos += len(block)
            if pos < end:
                pending = read(pos)
            yield block
            del block
    finally:
        if pending is not None:
            pending.cancel()


class BatchWriter:
    """Writes received chunks to a file in ~1 MiB batches from a worker thread.

    Chunks are copied into one of two batch buffers, so the receive buffers they came in
    are free again at once (holding them until the disk write would exhaust the
    decoder's buffer pool), and one batch is written while the next one fills: the disk
    and the socket work at the same time.  ``skip()`` leaves a hole by moving the
    position.  ``aclose()`` must be awaited before the file descriptor is closed.
    """

    def __init__(self, fd: int, offset: int = 0) -> None:
        self.fd = fd
        self.pos = offset  # file offset of the first byte of the batch being filled
        # Made on the first write: an upload stream that is open but idle holds nothing.
        self._buffers: tuple[bytearray, bytearray] | None = None
        self._current = 0
        self._fill = 0
        self._pending: asyncio.Future[None] | None = None

    @property
    def end(self) -> int:
        """File offset just past everything written or queued so far."""
        return self.pos + self._fill

    async def write(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        if self._buffers is None:
            self._buffers = (bytearray(IO_BATCH), bytearray(IO_BATCH))
        while view:
            n = min(len(view), IO_BATCH - self._fill)
            self._buffers[self._current][self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == IO_BATCH:
                await self._submit()

    async def skip(self, length: int) -> None:
        await self.flush()
        self.pos += length

    async def _submit(self) -> None:
        await self._wait_pending()
        assert self._buffers is not None  # something was written
        data = memoryview(self._buffers[self._current])[: self._fill]
        self._pending = asyncio.ensure_future(
            asyncio.to_thread(self._write_batch, data, self.pos)
        )
        self.pos += self._fill
        self._fill = 0
        self._current ^= 1  # that buffer's previous write finished in _wait_pending

    def _write_batch(self, data: memoryview, offset: int) -> None:
        _pwrite_all(self.fd, data, offset)

    async def _wait_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def flush(self) -> None:
        """Write everything queued; raises the first write error."""
        if self._fill:
            await self._submit()
        await self._wait_pending()

    async def aclose(self) -> None:
        """Wait for a write still in flight (errors are dropped: the caller is already
        failing), so the descriptor is never closed under a worker thread."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)


class SequentialWriter(BatchWriter):
    """Like ``BatchWriter`` for targets that are written in order and cannot seek: a
    pipe, a FIFO, a character or block device opened for streaming, a socket, stdout.
    Batches go out with ``write()`` at the current position of the descriptor; a hole
    is written as zeros (a pipe has no holes, and a device's old contents must not show
    through)."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, 0)

    async def skip(self, length: int) -> None:
        zeros = memoryview(_ZEROS)
        while length > 0:
            n = min(length, len(zeros))
            await self.write(zeros[:n])
            length -= n

    def _write_batch(self, data: memoryview, offset: int) -> None:
        _write_all(self.fd, data)


_ZEROS = bytes(IO_BATCH)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: ctypes.CDLL | None = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` of a file so that it reads as zeros and
    takes no space (fallocate PUNCH_HOLE, size kept).  False where the file system or
    the platform cannot (the caller then writes zeros); other errors raise."""
    global _libc
    if length <= 0:
        return True
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        offset += n
        data = data[n:]
