"""A stream's data into a file: direct runs where they can be had, batches otherwise.

``receive_into`` is the receive loop of every file transfer (the client's download,
the daemon's upload, a migration's destination).  It asks the stream for a direct run
(``Stream.recv_into``: a worker thread splices the packets from the socket into the
file) and, between runs or where there are none (TLS, a reader that fell behind), takes
items the ordinary way and writes them through the transfer's ``BatchWriter``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from ._fileio import BatchWriter
from ._streams import Hole
from .stream import Stream


class OverLimit(ValueError):
    """The stream carries more than the ``limit`` bytes it may."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"stream carries more than the {limit} bytes announced")
        self.limit = limit


async def receive_into(
    stream: Stream,
    writer: BatchWriter,
    *,
    limit: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> AsyncGenerator[int | Hole, None]:
    """Receive ``stream`` up to EOF into ``writer``'s file.  Yields each piece as it is
    done: an ``int`` for data bytes now written (or queued on ``writer``), a ``Hole``
    for the caller to apply (skip, punch), in stream order.  ``limit`` bounds data and
    holes together (``OverLimit`` before anything past it is written);
    ``progress(n)`` is called with the bytes covered so far while a direct run goes
    on (between yields)."""
    covered = 0
    try_direct = stream.can_recv_directly
    while True:
        if try_direct:
            await writer.flush()  # a direct run writes after what is queued
            room = None if limit is None else limit - covered
            report = None if progress is None else _offset_by(progress, covered)
            n = await stream.recv_into(
                writer.fd, writer.direct_offset, limit=room, progress=report
            )
            if n:
                writer.advance(n)
                covered += n
                yield n
                continue
        item = await stream.recv_chunk()
        if isinstance(item, Hole):
            n = item.length
        else:
            n = len(item)
            if not n:
                return  # EOF
        if limit is not None and covered + n > limit:
            raise OverLimit(limit)
        covered += n
        if isinstance(item, Hole):
            yield item
        else:
            await writer.write(item)
            yield n
        # After a run was refused, try again once what was queued has been read: a
        # run starts only then, and each try flushes the writer's batch.
        try_direct = stream.can_recv_directly and not stream.buffered


def _offset_by(progress: Callable[[int], object], base: int) -> Callable[[int], object]:
    return lambda n: progress(base + n)
