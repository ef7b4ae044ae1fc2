"""File helpers shared by the daemon and the client: sparse segments, batched writes,
prefetching reads.  Blocking calls run in worker threads in batches of about 1 MiB, so
the event loop never waits on a disk but pays one thread hop per batch, not per packet."""

from __future__ import annotations

import asyncio
import errno
import os
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


async def read_blocks(fd: int, start: int, length: int) -> AsyncIterator[bytes]:
    """Read ``[start, start+length)`` in ~1 MiB blocks, the next one prefetched in a
    thread while the caller handles the current one."""
    pos = start
    end = start + length

    def read(at: int) -> bytes:
        return os.pread(fd, min(IO_BATCH, end - at), at)

    pending = asyncio.ensure_future(asyncio.to_thread(read, pos)) if pos < end else None
    try:
        while pending is not None:
            block = await pending
            pending = None
            if not block:
                raise OSError(errno.EIO, f"file shrank while reading (at offset {pos})")
            pos += len(block)
            if pos < end:
                pending = asyncio.ensure_future(asyncio.to_thread(read, pos))
            yield block
    finally:
        if pending is not None:
            pending.cancel()


class BatchWriter:
    """Collects received chunks and writes them with ``pwritev`` in a thread, ~1 MiB at
    a time; ``skip()`` leaves a hole by moving the position."""

    def __init__(self, fd: int, offset: int = 0) -> None:
        self.fd = fd
        self.pos = offset
        self._batch: list[bytes | memoryview] = []
        self._batch_bytes = 0

    async def write(self, chunk: bytes | memoryview) -> None:
        self._batch.append(chunk)
        self._batch_bytes += len(chunk)
        if self._batch_bytes >= IO_BATCH:
            await self.flush()

    async def skip(self, length: int) -> None:
        await self.flush()
        self.pos += length

    async def flush(self) -> None:
        if not self._batch:
            return
        batch, n, at = self._batch, self._batch_bytes, self.pos
        self._batch = []
        self._batch_bytes = 0
        await asyncio.to_thread(_pwritev_all, self.fd, batch, at)
        self.pos = at + n


def _pwritev_all(fd: int, buffers: list[bytes | memoryview], offset: int) -> None:
    views = [memoryview(b) for b in buffers]
    while views:
        n = os.pwritev(fd, views[: min(len(views), 1024)], offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n and views:
            views[0] = views[0][n:]
