"""The source's half of a migration: where it may connect (``Destinations``) and one
PERFORM (``OutgoingJob``).

The job opens the image, connects to the destination as its client (only where the
daemon's ``migration_destinations`` allow), tells it which image is coming (IDENTIFY),
agrees on a staged prefix to skip (RESUME: STAGED_DIGEST against its own digest of the
same prefix), opens PREPARE_TUNNEL's sparse upload stream and sends the rest, holes as
holes, paced by a ``Pacer`` when a bandwidth is set.  The finish handshake returns only
once the destination has committed; then MOVE deletes the source.  PROGRESS events go
to the caller's connection at most every ``PROGRESS_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import socket
import stat
import time
from typing import TYPE_CHECKING

from .._core import Mode
from .._fileio import read_blocks, segments
from .._syscalls import never_waits
from .._uri import Address, parse_uri
from ..client import Client, connect
from ..errors import ConnectionClosedError, ErrorCode, ErrorDomain, RPCError, VirnetError
from ..server import CallContext, ServerConnection
from ..services import migration as m
from ..stream import Stream
from .migration_errors import aborted, arg_error, invalid
from .paths import Root, fsync_directory, system_error
from .ratelimit import Pacer
from .setup import set_up
from .staging import block_digest

if TYPE_CHECKING:
    from .migration import MigrationService

log = logging.getLogger("virnet.daemon.migration")

#: Seconds between PROGRESS events (at most ~10 per second).
PROGRESS_INTERVAL = 0.1
#: Seconds the source waits for the destination's confirmation of an ABORT or of a
#: stream abort while cleaning up (a cut link must not hold the reply for long).
CLEANUP_TIMEOUT = 5.0

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class Destinations:
    """Where a source may connect: ``unix`` (any Unix socket), ``loopback`` (127.0.0.0/8
    and ::1), and IP addresses or networks (``10.0.0.7``, ``10.0.0.0/24``, ``fd00::/64``).
    A host name is resolved and the first address allowed is the one connected to."""

    def __init__(self, entries: list[str]) -> None:
        self.unix = False
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            text = entry.strip()
            if text == "unix":
                self.unix = True
            elif text == "loopback":
                self.networks.extend(_LOOPBACK)
            else:
                try:
                    self.networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
                except ValueError:
                    raise ValueError(
                        f"migration_destinations: {entry!r} is not 'unix', 'loopback', "
                        "an IP address or a network"
                    ) from None

    def allows(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    async def resolve(self, uri: str) -> str:
        """The URI to connect to for ``uri``; ``RPCError`` if it is not allowed."""
        try:
            address = parse_uri(uri)
        except ValueError as exc:
            raise arg_error(f"invalid destination URI: {exc}") from None
        if address.scheme == "unix":
            if self.unix:
                return str(address)
            raise _denied(uri)
        loop = asyncio.get_running_loop()
        if self.allows(address.host):
            return str(address)
        try:
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise RPCError(
                f"cannot resolve the destination {address.host!r}: {exc.strerror or exc}",
                code=ErrorCode.OPERATION_FAILED, domain=ErrorDomain.STORAGE,
            ) from None
        for info in infos:
            host = str(info[4][0])
            if self.allows(host):
                return str(Address("tcp", host=host, port=address.port))
        raise _denied(uri)


def _denied(uri: str) -> RPCError:
    return RPCError(
        f"migration to {uri} is not allowed by this daemon's configuration "
        "(migration_destinations)",
        code=ErrorCode.OPERATION_DENIED,
        domain=ErrorDomain.STORAGE,
    )


class OutgoingJob:
    """A migration leaving from here (the source's half): one PERFORM."""

    def __init__(
        self, service: MigrationService, ctx: CallContext, args: m.PerformArgs, name: str
    ) -> None:
        self.service = service
        self.name = name
        self.uri = args.dest_uri
        self.move = bool(args.flags & m.MigrationFlags.MOVE)
        self.resume = bool(args.flags & m.MigrationFlags.RESUME)
        self.pacer = Pacer(args.bandwidth)
        self.caller: ServerConnection = ctx.connection
        self.serial = ctx.serial
        self.task: asyncio.Task[m.PerformReply] | None = None
        self.total = 0
        self.done = 0
        self.committing = False
        self.abort_reason: str | None = None
        self.user_abort = False
        self._offset = 0
        self._last_progress = 0.0

    def abort(self, reason: str, *, user: bool) -> bool:
        """Stop the job (False once it is committing: then it completes)."""
        if self.committing:
            return False
        if self.abort_reason is None and self.task is not None and not self.task.done():
            self.abort_reason = reason
            self.user_abort = user
            self.task.cancel()
        return True

    # ------------------------------------------------------------------ progress
    def _progress(self, force: bool = False) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not force and now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        if self.caller.transport is not None:
            self.caller.emit_event(m.PROGRESS, m.Progress(self.serial, self.done, self.total))

    # ------------------------------------------------------------------ the job
    async def run(self) -> m.PerformReply:
        try:
            return await self._run()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.abort_reason is None or task is None:
                raise
            task.uncancel()  # our own abort(): it ends here, as an error reply
            raise aborted(f"migration of {self.name!r} {self.abort_reason}") from None

    async def _run(self) -> m.PerformReply:
        start = time.perf_counter_ns()
        service, name = self.service, self.name

        def open_source() -> tuple[int, os.stat_result]:
            try:
                fd, st = service.root.open_regular(name, os.O_RDONLY)
            except OSError as exc:
                raise system_error(exc, f"open {name!r}") from None
            if self.move:
                try:
                    _check_same_file(service.root, name, st)
                except BaseException:
                    os.close(fd)
                    raise
            return fd, st

        fd, st = await set_up(self.caller, open_source, lambda opened: os.close(opened[0]))
        self.total = st.st_size
        client: Client | None = None
        stream: Stream | None = None
        try:
            try:
                client = await self._connect()
                stream = await self._open_tunnel(client, fd, st)
                await self._send(stream, fd)
                now = os.fstat(fd)
                if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                    self.user_abort = True  # what was staged is of no use: discard it
                    raise invalid(f"{name!r} changed during the migration")
                self.committing = True
                await stream.finish()
            except (VirnetError, OSError) as exc:
                raise self._failure(exc) from None
        except BaseException:
            await asyncio.shield(self._roll_back(client, stream))
            os.close(fd)
            raise
        try:
            if client is not None:
                await client.close()
            if self.move:
                try:
                    await asyncio.to_thread(_delete_source, service.root, name, st)
                except OSError as exc:
                    raise system_error(
                        exc, f"delete {name!r} after its migration to {self.uri}"
                    ) from None
        finally:
            os.close(fd)
        self.done = self.total
        self._progress(force=True)
        log.info("migrated %r to %s (%d bytes)", name, self.uri, self.total)
        return m.PerformReply(self.total, time.perf_counter_ns() - start)

    def _failure(self, exc: BaseException) -> RPCError:
        where = f"migration of {self.name!r} to {self.uri} failed"
        if isinstance(exc, RPCError):
            text = exc.message or str(exc)
            if text.startswith(f"migration of {self.name!r}"):
                return exc  # already ours
            return RPCError(
                f"{where}: {text}", code=exc.code, domain=exc.domain, int1=exc.int1,
            )
        if isinstance(exc, ConnectionClosedError):
            return RPCError(f"{where}: {exc}", code=ErrorCode.OPERATION_FAILED,
                            domain=ErrorDomain.STORAGE)
        if isinstance(exc, OSError):
            return system_error(exc, f"read {self.name!r} (migrating to {self.uri})")
        return RPCError(f"{where}: {exc}", code=ErrorCode.OPERATION_FAILED,
                        domain=ErrorDomain.STORAGE)

    async def _connect(self) -> Client:
        service = self.service
        target = await service.destinations.resolve(self.uri)
        try:
            client = await connect(
                target,
                keepalive_interval=service.keepalive_interval,
                keepalive_count=service.keepalive_count,
                timeout=service.connect_timeout,
            )
        except ConnectionClosedError as exc:
            raise RPCError(
                f"migration of {self.name!r} failed: destination {exc}",
                code=ErrorCode.OPERATION_FAILED, domain=ErrorDomain.STORAGE,
            ) from None
        if client.mode is not Mode.NATIVE:
            await client.close()
            raise RPCError(
                f"migration of {self.name!r} failed: {self.uri} is not a virnet daemon",
                code=ErrorCode.OPERATION_FAILED, domain=ErrorDomain.STORAGE,
            )
        return client

    async def _open_tunnel(self, client: Client, fd: int, st: os.stat_result) -> Stream:
        service, name = self.service, self.name
        identity = hashlib.sha256(
            service.root_id
            + f"\0{name}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode(
                "utf-8", "surrogateescape"
            )
        ).digest()
        reply = await client.call(
            m.IDENTIFY, m.IdentifyArgs(name, st.st_size, identity, service.root_id)
        )
        offset = 0
        if self.resume and reply.staged:
            theirs, ours = await asyncio.gather(
                client.call(m.STAGED_DIGEST, m.StagedDigestArgs(name, reply.staged)),
                asyncio.to_thread(block_digest, fd, reply.staged),
            )
            if theirs.digest == ours:
                offset = reply.staged
                log.info("resuming the migration of %r to %s at %d of %d bytes",
                         name, self.uri, offset, st.st_size)
            else:
                log.info("staged data of %r at %s differs from the source: starting over",
                         name, self.uri)
        flags = int(m.MigrationFlags.RESUME) if offset else 0
        stream = await client.open_stream(
            m.PREPARE_TUNNEL, m.PrepareTunnelArgs(name, st.st_size, flags), sparse=True
        )
        self.done = offset
        self._offset = offset
        self._progress(force=True)
        return stream

    async def _send(self, stream: Stream, fd: int) -> None:
        offset, size = self._offset, self.total
        if never_waits(fd):
            runs = list(segments(fd, offset, size))
        else:
            runs = await asyncio.to_thread(lambda: list(segments(fd, offset, size)))
        pacer = self.pacer
        send = stream.send
        for is_data, start, length in runs:
            if not is_data:
                await stream.send_hole(length)
                self.done += length
                self._progress()
                continue
            async with contextlib.aclosing(read_blocks(fd, start, length)) as blocks:
                async for block in blocks:
                    if pacer.rate:
                        pos, n = 0, len(block)
                        while pos < n:
                            k = min(pacer.piece, n - pos)
                            await pacer.wait(k)
                            await send(block[pos : pos + k])
                            pos += k
                            self.done += k
                            self._progress()
                    else:
                        await send(block)
                        self.done += len(block)
                        self._progress()
                    del block

    async def _roll_back(self, client: Client | None, stream: Stream | None) -> None:
        """After a failure or an abort: an abort (or a source that changed) tells the
        destination to discard what it staged; in any case the stream is aborted and
        the connection closed, neither waiting long on a peer that is gone."""
        if client is None:
            return
        if self.user_abort and not client.is_closed:
            with contextlib.suppress(VirnetError, OSError, TimeoutError):
                await client.call(m.ABORT, m.NameArgs(self.name), timeout=CLEANUP_TIMEOUT)
        if stream is not None and not stream.closed and not client.is_closed:
            with contextlib.suppress(VirnetError, OSError, TimeoutError):
                async with asyncio.timeout(CLEANUP_TIMEOUT):
                    await stream.abort("migration failed at the source")
        with contextlib.suppress(VirnetError, OSError):
            await client.close(timeout=1.0)


def _check_same_file(root: Root, name: str, st: os.stat_result) -> None:
    """MOVE deletes the name itself: it must be the file opened, not a symlink to it."""
    parent, base = root.parent(name, "move")
    try:
        try:
            own = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            raise system_error(exc, f"stat {name!r}") from None
    finally:
        os.close(parent)
    if stat.S_ISLNK(own.st_mode):
        raise arg_error(f"{name!r} is a symlink: MOVE deletes the image itself, migrate "
                         "the file it leads to")
    if (own.st_dev, own.st_ino) != (st.st_dev, st.st_ino):
        raise invalid(f"{name!r} was replaced while it was opened")


def _delete_source(root: Root, name: str, st: os.stat_result) -> None:
    parent, base = root.parent(name, "delete")
    try:
        own = os.stat(base, dir_fd=parent, follow_symlinks=False)
        if (own.st_dev, own.st_ino) != (st.st_dev, st.st_ino):
            raise OSError(errno.ESTALE, "it was replaced during the migration; kept")
        os.unlink(base, dir_fd=parent)
        fsync_directory(parent)
    finally:
        os.close(parent)

