"""Handlers of the FILES program (non-stream procedures; UPLOAD/DOWNLOAD live with the
stream machinery).  Blocking file-system work runs in worker threads so one slow disk
operation never stalls the event loop that serves every client (resolving the path
included: ``realpath`` reads the file system too): quick metadata calls in a
``BlockingPool`` (results handed back in batches), checksums (whole files) in asyncio's
default executor so they never hold up the quick ones."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

from .._blocking import BlockingPool
from ..errors import ErrorCode, ErrorDomain, RPCError
from ..server import CallContext, Server
from ..services import files as f
from .paths import Root, path_error, system_error

CHECKSUM_BLOCK = 1024 * 1024

T = TypeVar("T")


def _kind(mode: int) -> f.Kind:
    if stat.S_ISREG(mode):
        return f.Kind.FILE
    if stat.S_ISDIR(mode):
        return f.Kind.DIRECTORY
    return f.Kind.OTHER


class FilesService:
    def __init__(self, root: Root) -> None:
        self.root = root
        self._pool: BlockingPool | None = None

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the metadata pool (made on first use, on the serving loop)."""
        if self._pool is None:
            self._pool = BlockingPool(asyncio.get_running_loop())
        return await self._pool.run(fn, *args)

    def close(self) -> None:
        """Let the metadata workers exit (the daemon is stopping)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def register(self, server: Server) -> None:
        server.register(f.STAT, self.stat, readonly=True)
        server.register(f.LIST, self.list, readonly=True)
        server.register(f.CHECKSUM, self.checksum, readonly=True)
        server.register(f.DELETE, self.delete)
        server.register(f.MKDIR, self.mkdir)

    async def stat(self, ctx: CallContext, args: f.PathArgs) -> f.StatReply:
        try:
            st = await self._blocking(lambda: os.stat(self.root.resolve(args.path)))
        except OSError as exc:
            raise system_error(exc, f"stat {args.path!r}") from None
        return f.StatReply(
            int(_kind(st.st_mode)),
            st.st_size,
            st.st_blocks * 512,
            st.st_mtime_ns,
            stat.S_IMODE(st.st_mode),
        )

    async def list(self, ctx: CallContext, args: f.PathArgs) -> f.ListReply:
        def scan() -> list[f.Entry]:
            out = []
            with os.scandir(self.root.resolve(args.path)) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    out.append(f.Entry(entry.name, int(_kind(st.st_mode)), st.st_size))
            out.sort(key=lambda e: e.name)
            return out

        try:
            return f.ListReply(await self._blocking(scan))
        except OSError as exc:
            raise system_error(exc, f"list {args.path!r}") from None

    async def delete(self, ctx: CallContext, args: f.PathArgs) -> None:
        def remove() -> None:
            path = self.root.resolve(args.path, follow_last=False)
            if path == self.root.path:
                raise path_error("refusing to delete the data root")
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)

        try:
            await self._blocking(remove)
        except OSError as exc:
            raise system_error(exc, f"delete {args.path!r}") from None

    async def mkdir(self, ctx: CallContext, args: f.PathArgs) -> None:
        def make() -> None:
            os.mkdir(self.root.resolve(args.path, follow_last=False), 0o755)

        try:
            await self._blocking(make)
        except OSError as exc:
            raise system_error(exc, f"create directory {args.path!r}") from None

    async def checksum(self, ctx: CallContext, args: f.ChecksumArgs) -> f.ChecksumReply:
        algorithm = args.algorithm.lower()
        if algorithm not in hashlib.algorithms_available:
            raise RPCError(
                f"unsupported checksum algorithm {args.algorithm!r}",
                code=ErrorCode.INVALID_ARG,
                domain=ErrorDomain.STORAGE,
            )
        def digest() -> bytes:
            h: Any = hashlib.new(algorithm)
            path = self.root.resolve(args.path)
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise IsADirectoryError(21, "not a regular file")
            os.set_blocking(fd, True)
            with open(fd, "rb") as fh:
                buf = bytearray(CHECKSUM_BLOCK)
                view = memoryview(buf)
                while n := fh.readinto(buf):
                    h.update(view[:n])
            if algorithm.startswith("shake"):
                return bytes(h.digest(32))
            return bytes(h.digest())

        try:
            value = await asyncio.to_thread(digest)
        except OSError as exc:
            raise system_error(exc, f"checksum {args.path!r}") from None
        if len(value) > 64:
            raise RPCError(
                f"{algorithm} digest is longer than 64 bytes", code=ErrorCode.INVALID_ARG
            )
        return f.ChecksumReply(value)
