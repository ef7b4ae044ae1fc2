"""File helpers shared by the daemon and the client: sparse segments, batched writes,
prefetching reads.  Blocking calls run in worker threads in batches of about 1 MiB, so
the event loop never waits on a disk but pays one thread hop per batch, not per packet."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import sys
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from ._syscalls import never_waits

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


class FileSource:
    """A file that stream packets are sent from without passing through our memory
    (``FileSpan``).  It holds a descriptor of its own (a duplicate), closed when the
    last span referring to it is gone: spans may still be queued, or being written,
    after the code that queued them has closed its own descriptor."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)

    def __del__(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class FileSpan:
    """``length`` bytes of a ``FileSource`` from ``offset``, queued on a stream in place
    of a buffer.  The connection writes it with ``sendfile`` (the kernel moves the
    file's pages into the socket: no read into a buffer, no second copy) where the
    socket can take it at once, and reads it into memory otherwise."""

    __slots__ = ("length", "offset", "source")

    def __init__(self, source: FileSource, offset: int, length: int) -> None:
        self.source = source
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def split(self, n: int) -> tuple[FileSpan, FileSpan]:
        """The first ``n`` bytes and the rest."""
        return (
            FileSpan(self.source, self.offset, n),
            FileSpan(self.source, self.offset + n, self.length - n),
        )

    def read(self) -> bytes:
        """The span's bytes, read now; ``OSError`` (EIO) if the file has fewer."""
        data = os.pread(self.source.fd, self.length, self.offset)
        if len(data) != self.length:
            raise OSError(errno.EIO, f"file shrank while sending (at offset {self.offset})")
        return data


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


def _read_into(fd: int, view: memoryview, offset: int | None, flags: int = 0) -> memoryview:
    """Fill ``view`` from ``fd`` (at ``offset``, or at the descriptor's position); the
    part read, read-only, so that a stream sends it without copying."""
    try:
        n = os.readv(fd, [view]) if offset is None else os.preadv(fd, [view], offset, flags)
        return view[:n].toreadonly()
    finally:
        view.release()


#: preadv2's "only if it needs no disk I/O" flag: page-cached data is read on the event
#: loop, the rest in a thread.  Not every file system has it (tmpfs does not; there
#: every read is inline anyway).
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


async def _settle(job: asyncio.Future[Any]) -> None:
    """Wait for a read already handed to a thread, even while being cancelled: the
    thread cannot be stopped and reads into the caller's descriptor, which the caller
    closes (and the process may reuse) as soon as the reader is closed.  A
    cancellation that arrives meanwhile is passed on once the read is over."""
    cancelled = False
    while not job.done():
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:  # its error no longer matters: the caller has stopped
            break
    if not job.cancelled():
        job.exception()  # retrieved: no "exception was never retrieved" warning
    if cancelled:
        raise asyncio.CancelledError


def _in_thread(fd: int, view: memoryview, at: int | None) -> asyncio.Future[memoryview]:
    return asyncio.ensure_future(asyncio.to_thread(_read_into, fd, view, at))


async def read_until_eof(fd: int, length: int | None = None) -> AsyncGenerator[memoryview, None]:
    """Read a source with no known size (a pipe, a FIFO, a character device, stdin) in
    order, in ~1 MiB blocks, until EOF or until ``length`` bytes were read.  A source
    that ends before ``length`` raises ``EOFError`` naming how far it got: a short source
    must fail the transfer, never pass as complete.  Blocks are views of pooled buffers:
    valid until the next block is asked for, unless something keeps a view of them (a
    stream does, until the data is written to the socket).

    Close the iterator (``contextlib.aclosing``) before closing ``fd``: closing waits
    for a read still running in a thread."""
    done = 0
    pool = BufferPool()
    inline = never_waits(fd)  # /dev/zero and its kind: no thread hop per block
    job: asyncio.Future[memoryview] | None = None
    try:
        while length is None or done < length:
            view = pool.take()
            if length is not None and length - done < len(view):
                view = view[: length - done]
            if inline:
                block = _read_into(fd, view, None)
                await asyncio.sleep(0)  # let the stream's flush run between blocks
            else:
                job = _in_thread(fd, view, None)
                block = await asyncio.shield(job)
                job = None
            del view
            if not block:
                if length is not None:
                    raise EOFError(
                        f"the source ended after {done} of the {length} bytes asked for"
                    )
                return
            done += len(block)
            yield block
            del block
    finally:
        if job is not None:
            await _settle(job)


async def read_blocks(fd: int, start: int, length: int) -> AsyncGenerator[memoryview, None]:
    """Read ``[start, start+length)`` in ~1 MiB blocks.  Blocks are read-only views of
    pooled buffers (see ``BufferPool``).

    Where a read cannot wait on a device (a memory file system: ``never_waits``) it runs
    on the event loop: a thread hop per block costs more than the copy, and on a busy
    machine the worker then waits for the GIL behind the loop.  Elsewhere a block that
    is in the page cache is read inline too (``RWF_NOWAIT``), and one that is not is
    read in a worker thread, the next block prefetched while the caller sends this one.

    Close the iterator (``contextlib.aclosing``) before closing ``fd``: closing waits
    for a read still running in a thread (the prefetch included).
    """
    pos = start
    end = start + length
    pool = BufferPool()
    inline = never_waits(fd)
    nowait = _NOWAIT if not inline else 0

    def in_thread(at: int) -> asyncio.Future[memoryview]:
        view = pool.take()
        return _in_thread(fd, view[: end - at] if end - at < len(view) else view, at)

    def view_at(at: int) -> memoryview:
        view = pool.take()
        return view[: end - at] if end - at < len(view) else view

    pending: asyncio.Future[memoryview] | None = None  # a read handed to a thread
    try:
        while pos < end:
            block: memoryview | None = None
            if pending is None and not inline and nowait:
                try:
                    block = _read_into(fd, view_at(pos), pos, nowait)
                except BlockingIOError:  # not cached: read it (and the next) in threads
                    pass
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    nowait = 0  # this file system cannot tell: threads from now on
            elif pending is None and inline:
                block = _read_into(fd, view_at(pos), pos)
            if block is None:
                if pending is None:
                    pending = in_thread(pos)
                block = await asyncio.shield(pending)
                pending = None
            if not block:
                raise OSError(errno.EIO, f"file shrank while reading (at offset {pos})")
            pos += len(block)
            if pos < end and not inline and not nowait:
                pending = in_thread(pos)
            yield block
            del block
    finally:
        if pending is not None:
            await _settle(pending)


class BatchWriter:
    """Writes received chunks to a file in ~1 MiB batches from a worker thread, or, where
    a write cannot wait on a device (``never_waits``: memory file systems, /dev/null
    and its kind), each chunk at once on the event loop without a copy.

    In batches, chunks are copied into one of two batch buffers, so the receive buffers they came in
    are free again at once (holding them until the disk write would exhaust the
    decoder's buffer pool), and one batch is written while the next one fills: the disk
    and the socket work at the same time.  ``skip()`` leaves a hole by moving the
    position.  ``aclose()`` must be awaited before the file descriptor is closed.
    """

    def __init__(self, fd: int, offset: int = 0, *, inline: bool | None = None) -> None:
        self.fd = fd
        self.pos = offset  # file offset of the first byte of the batch being filled
        self.inline = never_waits(fd) if inline is None else inline
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
        if self.inline:
            self._write_batch(view, self.pos)
            self.pos += len(view)
            return
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

    #: Where bytes written past everything queued go: a file offset (positional
    #: writes), or None for the descriptor's own position (``SequentialWriter``).
    #: Valid once ``flush`` has returned.
    @property
    def direct_offset(self) -> int | None:
        return self.pos

    def advance(self, n: int) -> None:
        """``n`` bytes were written at ``direct_offset`` by someone else (a direct
        run, ``Stream.recv_into``): later writes go after them."""
        self.pos += n

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

    def __init__(self, fd: int, *, inline: bool | None = None) -> None:
        super().__init__(fd, 0, inline=inline)

    @property
    def direct_offset(self) -> int | None:
        return None

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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        offset += n
        data = data[n:]
