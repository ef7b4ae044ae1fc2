"""Handlers of the FILES program (non-stream procedures; UPLOAD/DOWNLOAD live with the
stream machinery).  Blocking file-system work runs in worker threads so one slow disk
operation never stalls the event loop that serves every client (resolving the path
included: it reads the file system too): quick metadata calls in the server's blocking
workers, checksums (whole files) in its long-job workers so they never hold up the quick
ones; in both, clients take turns (``Server.run_blocking``).  Paths are resolved beneath
the root's descriptor and each call then works on the descriptors found (``paths``,
``confine``)."""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any

from ..errors import ErrorCode, ErrorDomain, RPCError
from ..server import CallContext, Server
from ..services import files as f
from .paths import Root, system_error

CHECKSUM_BLOCK = 1024 * 1024


def _kind(mode: int) -> f.Kind:
    if stat.S_ISREG(mode):
        return f.Kind.FILE
    if stat.S_ISDIR(mode):
        return f.Kind.DIRECTORY
    return f.Kind.OTHER


class FilesService:
    def __init__(self, root: Root) -> None:
        self.root = root


    def register(self, server: Server) -> None:
        server.register(f.STAT, self.stat, readonly=True)
        server.register(f.LIST, self.list, readonly=True)
        server.register(f.CHECKSUM, self.checksum, readonly=True)
        server.register(f.DELETE, self.delete)
        server.register(f.MKDIR, self.mkdir)

    async def stat(self, ctx: CallContext, args: f.PathArgs) -> f.StatReply:
        try:
            st = await ctx.run_blocking(self.root.stat, args.path)
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
            fd = self.root.open_directory(args.path)
            try:
                # scandir(fd) reads the directory itself; its entries' stat is relative
                # to it (fstatat), never a path looked up again.
                with os.scandir(fd) as it:
                    for entry in it:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        out.append(f.Entry(entry.name, int(_kind(st.st_mode)), st.st_size))
            finally:
                os.close(fd)
            out.sort(key=lambda e: e.name)
            return out

        try:
            return f.ListReply(await ctx.run_blocking(scan))
        except OSError as exc:
            raise system_error(exc, f"list {args.path!r}") from None

    async def delete(self, ctx: CallContext, args: f.PathArgs) -> None:
        def remove() -> None:
            # The name itself: a symlink is removed, never followed.
            parent, name = self.root.parent(args.path, "delete")
            try:
                try:
                    os.unlink(name, dir_fd=parent)
                except IsADirectoryError:  # Linux: unlink(2) of a directory
                    os.rmdir(name, dir_fd=parent)
            finally:
                os.close(parent)

        try:
            await ctx.run_blocking(remove)
        except OSError as exc:
            raise system_error(exc, f"delete {args.path!r}") from None

    async def mkdir(self, ctx: CallContext, args: f.PathArgs) -> None:
        def make() -> None:
            parent, name = self.root.parent(args.path, "create")
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            finally:
                os.close(parent)

        try:
            await ctx.run_blocking(make)
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
            # Refuses anything but a regular file (a FIFO would wait for a writer).
            fd, _ = self.root.open_regular(args.path, os.O_RDONLY)
            with open(fd, "rb") as fh:
                buf = bytearray(CHECKSUM_BLOCK)
                view = memoryview(buf)
                while n := fh.readinto(buf):
                    h.update(view[:n])
            if algorithm.startswith("shake"):
                return bytes(h.digest(32))
            return bytes(h.digest())

        try:
            value = await ctx.run_blocking(digest, long=True)
        except OSError as exc:
            raise system_error(exc, f"checksum {args.path!r}") from None
        if len(value) > 64:
            raise RPCError(
                f"{algorithm} digest is longer than 64 bytes", code=ErrorCode.INVALID_ARG
            )
        return f.ChecksumReply(value)
