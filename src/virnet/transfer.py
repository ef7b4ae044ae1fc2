"""Client side of FILES UPLOAD and DOWNLOAD: local files (sparse-aware), devices, FIFOs,
sockets, stdin and stdout to and from a virnet daemon, with optional progress callbacks.

What a local path means is decided in ``virnet._localfile`` (see there): a download
into a regular file (or a new path, or through a symlink) replaces it atomically, a
temporary file beside it renamed into place only when the transfer finished cleanly,
so a failed download never leaves a half-written file where the old one was (the
daemon does the same for whole-file uploads); a download into a device, FIFO, socket
or stdout is written in place, in order.  An upload reads a regular file or block
device by position and anything else until EOF (or exactly ``length`` bytes).

Durability: with ``sync=True`` (the default) a download's replacement file is fsynced
before its rename and its directory after, an in-place target once at the end; an
upload asks the daemon for the same on its side.  ``sync=False`` skips all of them,
on both sides (scratch data).

Local failures raise ``virnet._localfile.LocalFileError`` (an ``OSError``), one line
naming the local path; the daemon's refusals raise ``RPCError`` / ``StreamError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from . import _localfile
from ._fileio import IO_BATCH, read_until_eof, segments
from ._localfile import LengthError, LocalFileError, Source
from ._receive import OverLimit, receive_into
from .client import Client
from .constants import STREAM_CHUNK
from .errors import ErrorCode, ErrorDomain, StreamError, VirnetError
from .services import files as f
from .stream import Hole, Stream

#: What ``_send_file`` hands to the stream at a time: whole packets, about ``IO_BATCH``.
_PIECE = max(STREAM_CHUNK, IO_BATCH - IO_BATCH % STREAM_CHUNK)

__all__ = ["LengthError", "LocalFileError", "Progress", "download", "upload"]

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
    sync: bool = True,
    on_size: Callable[[int], None] | None = None,
    on_commit: Callable[[], None] | None = None,
    timeout: float | None = None,
) -> int:
    """Upload ``local`` (``-`` for stdin) to ``remote``; returns the bytes covered.

    With ``sparse``, holes of a local file travel as holes.  ``offset`` / ``length``
    are the protocol's: either one non-zero writes in place into an existing remote
    file, ``length`` bytes of the source exactly (a shorter source is an error and
    the stream is aborted, never finished).  ``on_size(n)`` is called once with the
    bytes that will be sent when that is known beforehand (not for a source read
    until EOF); ``on_commit()`` when all data is sent and the daemon commits it.
    ``sync=False`` lets the daemon skip its fsyncs (``TransferFlags.NO_SYNC``).
    ``timeout`` bounds the wait for the daemon's reply to the opening call."""
    flags = (
        (f.TransferFlags.SPARSE if sparse else 0)
        | (f.TransferFlags.EXCLUSIVE if exclusive else 0)
        | (0 if sync else f.TransferFlags.NO_SYNC)
    )
    args = f.TransferArgs(remote, offset, length, int(flags))
    src = await _localfile.open_source(local)
    try:
        if src.size is not None:
            if length > src.size:
                raise LengthError(
                    src.display,
                    f"length {length} is larger than the {src.kind} ({src.size} bytes)",
                )
            total: int | None = length or src.size
        else:
            total = length or None
        if on_size is not None and total is not None:
            on_size(total)
        stream = await client.open_stream(f.UPLOAD, args, sparse=sparse, timeout=timeout)
        try:
            try:
                if src.size is not None:
                    assert total is not None
                    done = await _send_file(stream, src.fd, total, sparse, progress)
                else:
                    done = await _send_until_eof(stream, src, length, progress)
            except EOFError as exc:
                raise LocalFileError(src.display, str(exc)) from None
            except OSError as exc:
                if isinstance(exc, VirnetError):
                    raise
                raise src.error(exc) from None
            if on_commit is not None:
                on_commit()
            await stream.finish()
        except BaseException:
            await stream.abort()
            raise
        return done
    finally:
        src.close()


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
            # On a plain socket the file's pages go straight into it (sendfile), never
            # through a buffer here; pieces of about IO_BATCH keep the progress moving.
            # Whole packets per piece: 1 MiB pieces ended in a 96-byte packet each.
            end = start + length
            while start < end:
                n = min(_PIECE, end - start)
                await stream.send_file(fd, start, n)
                start += n
                done += n
                if progress:
                    progress(done)
    if progress:
        progress(done)
    return done


async def _send_until_eof(
    stream: Stream, src: Source, length: int, progress: Progress | None
) -> int:
    done = 0
    send = stream.send
    async with contextlib.aclosing(read_until_eof(src.fd, length or None)) as blocks:
        async for block in blocks:
            await send(block)
            done += len(block)
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
    sync: bool = True,
    on_commit: Callable[[], None] | None = None,
    timeout: float | None = None,
) -> int:
    """Download ``remote`` into ``local`` (``-`` for stdout); returns the bytes covered.

    With ``sparse``, holes are recreated in a local file instead of written (in place
    targets get zeros).  ``on_size(n)`` is called with the size the daemon announces,
    ``on_commit()`` when all data arrived and the transfer is being committed (the
    finish handshake, the local fsync and rename).  ``sync=False`` skips the fsyncs;
    ``timeout`` bounds the wait for the daemon's reply to the opening call."""
    args = f.TransferArgs(remote, offset, length, int(f.TransferFlags.SPARSE if sparse else 0))
    target = await _localfile.open_target(local, remote)
    try:
        stream = await client.open_stream(f.DOWNLOAD, args, sparse=sparse, timeout=timeout)
        try:
            size = stream.reply.size
            target.check_size(size)  # before the first byte is written
            if on_size is not None:
                on_size(size)
            writer = target.writer
            done = 0
            try:
                async with contextlib.aclosing(
                    receive_into(stream, writer, limit=size, progress=progress)
                ) as pieces:
                    async for piece in pieces:
                        if isinstance(piece, Hole):
                            await writer.skip(piece.length)
                            done += piece.length
                        else:
                            done += piece
                        if progress:
                            progress(done)
                if on_commit is not None:
                    on_commit()
                await stream.finish()
                await target.commit(sync)
            except OverLimit:
                raise StreamError(
                    f"the daemon sent more than the {size} bytes it announced",
                    code=ErrorCode.INVALID_STREAM,
                    domain=ErrorDomain.STREAMS,
                ) from None
            except OSError as exc:
                if isinstance(exc, VirnetError):
                    raise
                raise target.error(exc) from None
        except BaseException:
            await stream.abort()
            raise
        return done
    finally:
        await target.close()
