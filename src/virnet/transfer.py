"""Client side of FILES UPLOAD and DOWNLOAD: local files (sparse-aware) to and from a
virnet daemon, with an optional progress callback.

A download to a local path is written to a temporary file beside it and renamed into
place only when the transfer finished cleanly, so a failed download never leaves a
half-written file where the old one was (the daemon does the same for uploads).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from ._fileio import BatchWriter, read_blocks, segments
from .client import Client
from .services import files as f
from .stream import Hole, Stream

Progress = Callable[[int], None]  # called with the bytes covered so far


async def upload(
    client: Client,
    local: str,
    remote: str,
    *,
    sparse: bool = False,
    offset: int = 0,
    length: int = 0,
    exclusive: bool = False,
    progress: Progress | None = None,
) -> int:
    """Upload the local file ``local`` (``-`` for stdin) to ``remote``; returns the bytes
    covered.  With ``sparse``, holes of the local file travel as holes."""
    flags = (f.TransferFlags.SPARSE if sparse else 0) | (
        f.TransferFlags.EXCLUSIVE if exclusive else 0
    )
    args = f.TransferArgs(remote, offset, length, int(flags))
    if local == "-":
        stream = await client.open_stream(f.UPLOAD, args, sparse=sparse)
        try:
            done = 0
            read = sys.stdin.buffer.read
            while block := read(1 << 20):
                await stream.send(block)
                done += len(block)
                if progress:
                    progress(done)
            await stream.finish()
        except BaseException:
            await stream.abort()
            raise
        return done
    fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if length and length > size:
            raise ValueError(f"{local}: --length {length} is larger than the file ({size} bytes)")
        total = length or size
        stream = await client.open_stream(f.UPLOAD, args, sparse=sparse)
        try:
            done = await _send_file(stream, fd, total, sparse, progress)
            await stream.finish()
        except BaseException:
            await stream.abort()
            raise
        return done
    finally:
        os.close(fd)


async def _send_file(
    stream: Stream, fd: int, total: int, sparse: bool, progress: Progress | None
) -> int:
    runs = list(segments(fd, 0, total)) if sparse else [(True, 0, total)]
    done = 0
    for is_data, start, length in runs:
        if not is_data:
            await stream.send_hole(length)
            done += length
        else:
            async for block in read_blocks(fd, start, length):
                await stream.send(block)
                done += len(block)
                if progress:
                    progress(done)
    if progress:
        progress(done)
    return done


async def download(
    client: Client,
    remote: str,
    local: str,
    *,
    sparse: bool = False,
    offset: int = 0,
    length: int = 0,
    progress: Progress | None = None,
    on_size: Callable[[int], None] | None = None,
) -> int:
    """Download ``remote`` into ``local`` (``-`` for stdout); returns the bytes covered.
    With ``sparse``, holes are recreated in the local file instead of written."""
    args = f.TransferArgs(remote, offset, length, int(f.TransferFlags.SPARSE if sparse else 0))
    if local == "-":
        stream = await client.open_stream(f.DOWNLOAD, args, sparse=sparse)
        if on_size:
            on_size(stream.reply.size)
        return await _receive(stream, sys.stdout.buffer, None, progress)
    target = os.path.abspath(local)
    if os.path.isdir(target):
        target = os.path.join(target, os.path.basename(remote.rstrip("/")) or "download")
    parent = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".part", dir=parent)
    committed = False
    writer = BatchWriter(fd)
    try:
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)  # keep an existing file's mode
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # what open() would have given a new file
        os.fchmod(fd, mode)
        stream = await client.open_stream(f.DOWNLOAD, args, sparse=sparse)
        if on_size:
            on_size(stream.reply.size)
        done = await _receive(stream, None, writer, progress)
        await writer.flush()
        if os.fstat(fd).st_size != writer.pos:
            os.ftruncate(fd, writer.pos)  # a trailing hole
        os.replace(tmp, target)
        committed = True
        return done
    finally:
        await writer.aclose()
        os.close(fd)
        if not committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


async def _receive(
    stream: Stream, out: BinaryIO | None, writer: BatchWriter | None, progress: Progress | None
) -> int:
    done = 0
    try:
        async for item in stream:
            if isinstance(item, Hole):
                if writer is not None:
                    await writer.skip(item.length)
                else:
                    assert out is not None
                    left = item.length
                    while left:
                        n = min(left, 1 << 20)
                        out.write(bytes(n))
                        left -= n
                done += item.length
            else:
                if writer is not None:
                    await writer.write(item)
                else:
                    assert out is not None
                    out.write(item)
                done += len(item)
            if progress:
                progress(done)
        await stream.finish()
    except BaseException:
        await stream.abort()
        raise
    if out is not None:
        out.flush()
    return done
