"""FILES UPLOAD and DOWNLOAD (the wire contract is in docs/protocol.md).

UPLOAD with offset 0 and length 0 replaces the whole file atomically: data goes to a
temporary file beside the target, which is renamed over it only after the client's
finish; abort, error or disconnect removes the temporary file and the old file stays
as it was.  Any other offset/length writes in place into an existing file, and a
non-zero length must be met exactly (more is a stream error as soon as it arrives, less
fails the finish).  SPARSE re-creates holes by seeking; EXCLUSIVE fails if the path
exists (checked before the stream opens, and again at commit time without a race).
Paths resolve beneath the data root's descriptor and everything after works on the
descriptors found (``paths``): the temporary file is created in, and renamed within, the
directory descriptor held from setup to commit or discard.

DOWNLOAD replies with the number of bytes the stream will cover and sends them; with
SPARSE, holes found by SEEK_DATA/SEEK_HOLE travel as STREAM_HOLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os

from .._fileio import IO_BATCH, BatchWriter, segments
from .._receive import OverLimit, receive_into
from .._syscalls import punch_hole
from ..errors import ErrorCode, ErrorDomain, RPCError
from ..server import CallContext, Server
from ..services import files as f
from ..stream import Hole
from .paths import Replacement, Root, exists_error, system_error
from .setup import set_up

_KNOWN_FLAGS = int(
    f.TransferFlags.SPARSE | f.TransferFlags.EXCLUSIVE | f.TransferFlags.NO_SYNC
)


def _arg_error(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.INVALID_ARG, domain=ErrorDomain.STORAGE)


class TransferService:
    def __init__(self, root: Root) -> None:
        self.root = root

    def register(self, server: Server) -> None:
        server.register(f.UPLOAD, self.upload)
        server.register(f.DOWNLOAD, self.download, readonly=True)

    # ------------------------------------------------------------------ upload
    async def upload(self, ctx: CallContext, args: f.TransferArgs) -> None:
        if args.flags & ~_KNOWN_FLAGS:
            raise _arg_error(f"unsupported flags {args.flags & ~_KNOWN_FLAGS:#x}")
        sparse = bool(args.flags & f.TransferFlags.SPARSE)
        exclusive = bool(args.flags & f.TransferFlags.EXCLUSIVE)
        # Durable by default: the data and (for a replacement) the directory entry are
        # on disk before the reply says the upload is done.  NO_SYNC is for scratch data.
        sync = not args.flags & f.TransferFlags.NO_SYNC
        if args.offset == 0 and args.length == 0:
            await self._replace(ctx, args.path, sparse, exclusive, sync)
        else:
            if exclusive:
                raise _arg_error("EXCLUSIVE applies to whole-file uploads only")
            await self._in_place(ctx, args, sparse, sync)

    async def _replace(
        self, ctx: CallContext, wire_path: str, sparse: bool, excl: bool, sync: bool
    ) -> None:
        def prepare() -> Replacement:
            return self.root.replacement(wire_path, exclusive=excl)

        rep = await set_up(ctx.connection, prepare, Replacement.release)
        fd = rep.fd
        committed = False
        writer = BatchWriter(fd)
        try:
            stream = ctx.accept_stream(sparse=sparse)
            async with contextlib.aclosing(receive_into(stream, writer)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, Hole):
                        await writer.skip(piece.length)
            await writer.flush()
            size = writer.pos
            await asyncio.to_thread(_finish_file, fd, size, sync)
            # In a thread: replacing (or unlinking) a large file frees all its pages
            # inside the system call, ~0.1 s per 2 GiB on tmpfs, more on some disks.
            try:
                await asyncio.to_thread(functools.partial(rep.commit, excl, sync=sync))
            except FileExistsError:
                raise exists_error(wire_path) from None
            committed = True
        except OSError as exc:
            raise system_error(exc, f"write {wire_path!r}") from None
        finally:
            await writer.aclose()
            if committed:
                rep.close()
            else:
                # In a thread, discard and close together: even if this wait is
                # cancelled, the job still closes the directory after using it.
                await asyncio.to_thread(rep.release)

    async def _in_place(
        self, ctx: CallContext, args: f.TransferArgs, sparse: bool, sync: bool
    ) -> None:
        def open_target() -> int:
            # Through a symlink in the root, to the file it leads to; anything but a
            # regular file is refused.
            fd, _ = _open_regular(self.root, args.path, os.O_WRONLY, "open {!r} for writing")
            return fd

        fd = await set_up(ctx.connection, open_target, os.close)
        writer = BatchWriter(fd, args.offset)
        try:
            stream = ctx.accept_stream(sparse=sparse)
            want = args.length
            got = 0
            pieces = receive_into(stream, writer, limit=want or None)
            try:
                async for piece in pieces:
                    if isinstance(piece, Hole):
                        n = piece.length
                        await writer.flush()
                        await asyncio.to_thread(_punch_hole, fd, writer.pos, n)
                        await writer.skip(n)
                    else:
                        n = piece
                    got += n
            except OverLimit as exc:
                raise RPCError(
                    str(exc), code=ErrorCode.INVALID_ARG, domain=ErrorDomain.STREAMS
                ) from None
            finally:
                await pieces.aclose()
            await writer.flush()
            if want and got < want:
                raise RPCError(
                    f"stream ended after {got} of the {want} bytes announced",
                    code=ErrorCode.INVALID_ARG,
                    domain=ErrorDomain.STREAMS,
                )
            await asyncio.to_thread(_extend_and_sync, fd, writer.pos, sync)
        except OSError as exc:
            raise system_error(exc, f"write {args.path!r}") from None
        finally:
            await writer.aclose()
            os.close(fd)

    # ------------------------------------------------------------------ download
    async def download(self, ctx: CallContext, args: f.TransferArgs) -> None:
        if args.flags & ~int(f.TransferFlags.SPARSE):
            raise _arg_error(f"unsupported flags {args.flags:#x} for download")
        sparse = bool(args.flags & f.TransferFlags.SPARSE)

        def open_source() -> tuple[int, int]:
            return _open_regular(self.root, args.path, os.O_RDONLY, "open {!r}")

        fd, file_size = await set_up(
            ctx.connection, open_source, lambda opened: os.close(opened[0])
        )
        try:
            if args.offset > file_size:
                raise _arg_error(f"offset {args.offset} is beyond the end ({file_size} bytes)")
            end = file_size if args.length == 0 else args.offset + args.length
            if end > file_size:
                raise _arg_error(
                    f"{args.length} bytes from offset {args.offset} go beyond the end "
                    f"({file_size} bytes)"
                )
            size = end - args.offset
            stream = ctx.accept_stream(f.DownloadReply(size), sparse=sparse)
            if sparse:
                runs = await asyncio.to_thread(lambda: list(segments(fd, args.offset, end)))
            else:
                runs = [(True, args.offset, size)]
            for is_data, start, length in runs:
                if not is_data:
                    await stream.send_hole(length)
                    continue
                # On a plain socket the file's pages go from the page cache into the
                # socket (sendfile): no read into a buffer here, no second copy.
                await stream.send_file(fd, start, length)
        except OSError as exc:
            raise system_error(exc, f"read {args.path!r}") from None
        finally:
            os.close(fd)


def _open_regular(root: Root, wire_path: str, mode: int, what: str) -> tuple[int, int]:
    """Open ``wire_path`` (a regular file, anything else is refused) with ``mode``; the
    descriptor and the file's size.  Every failure is an ``RPCError``."""
    try:
        fd, st = root.open_regular(wire_path, mode)
    except OSError as exc:
        raise system_error(exc, what.format(wire_path)) from None
    return fd, st.st_size


def _finish_file(fd: int, size: int, sync: bool) -> None:
    # A trailing hole only exists once the file is extended to its full size.
    if os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)
    if sync:
        os.fsync(fd)


def _extend_and_sync(fd: int, end: int, sync: bool) -> None:
    # In place, a trailing hole past the old end extends the file (never shrinks it).
    if os.fstat(fd).st_size < end:
        os.ftruncate(fd, end)
    if sync:
        os.fsync(fd)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """In-place sparse writes: make the range that overlaps the existing file read as
    zeros, by deallocating it where the file system can (so a sparse image stays
    sparse), else by writing zeros.  Past the end nothing is needed: the gap reads as
    zeros once the file is extended (by later data, or by ``_extend_and_sync``)."""
    size = os.fstat(fd).st_size
    n = min(length, size - offset)
    if n <= 0 or punch_hole(fd, offset, n):
        return
    zeros = bytes(min(n, IO_BATCH))
    while n > 0:
        k = min(n, len(zeros))
        os.pwrite(fd, zeros[:k], offset)
        offset += k
        n -= k
