"""The MIGRATION program: both halves of a tunnelled migration (docs/migration.md).

**Source** (PERFORM): the daemon asked to migrate one of its images opens it, connects
to ``dest_uri`` (only where its configuration allows) as a client of the destination,
tells it which image is coming (IDENTIFY), agrees on a staged prefix to skip (RESUME:
STAGED_DIGEST against its own digest of the same prefix), opens PREPARE_TUNNEL's
sparse upload stream and sends the rest, holes as holes, paced by a ``Pacer`` when a
bandwidth is set.  The finish handshake returns only once the destination has committed;
then MOVE deletes the source.  PROGRESS events go to the caller's connection at most
every ``PROGRESS_INTERVAL``.  A job runs in a task of its own, so a caller that
disconnects aborts it (between the start and the finish) without leaving it half done.

**Destination** (PREPARE_TUNNEL): the data goes to the staging directory
(``staging.Staging``), and on a clean finish is truncated to size, fsynced and renamed
over the target within one file system, the directory fsynced.  An ABORT, a failure of
the destination's own storage, or a stream that breaks the protocol discards the staged
data; any other interruption (the source or the link gone, the daemon stopping) keeps it
for ``staging_expiry`` seconds when the source identified the image, so that a PERFORM
with RESUME can continue it.

ABORT by name stops the migration of that name running here, as source or as
destination (and, as source, tells the destination to discard), and returns once both
sides are rolled back; with nothing running it discards staged data of that name.
SET_BANDWIDTH changes a running migration's cap.
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
from dataclasses import dataclass
from typing import Any

from .._core import Mode
from .._fileio import BatchWriter, read_blocks, segments
from .._receive import OverLimit, receive_into
from .._syscalls import never_waits
from .._uri import Address, parse_uri
from ..client import Client, connect
from ..errors import (
    ConnectionClosedError,
    ErrorCode,
    ErrorDomain,
    RPCError,
    VirnetError,
)
from ..server import CallContext, Server, ServerConnection, fail_stream
from ..services import migration as m
from ..stream import Hole, Stream
from .paths import Root, fsync_directory, path_error, system_error
from .ratelimit import Pacer
from .setup import set_up
from .staging import Meta, Staging, block_digest, entry_key, normalise

log = logging.getLogger("virnet.daemon.migration")

#: Seconds between PROGRESS events (at most ~10 per second).
PROGRESS_INTERVAL = 0.1
#: Seconds the source waits for the destination's confirmation of an ABORT or of a
#: stream abort while cleaning up (a cut link must not hold the reply for long).
CLEANUP_TIMEOUT = 5.0
#: Seconds ABORT waits for the job it stopped to be rolled back.
ABORT_WAIT = 30.0
_KNOWN_PERFORM = int(m.MigrationFlags.MOVE | m.MigrationFlags.RESUME)
_IDENT_STATE = "migration.identified"

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _arg_error(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.INVALID_ARG, domain=ErrorDomain.STORAGE)


def _invalid(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.OPERATION_INVALID, domain=ErrorDomain.STORAGE)


def _aborted(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.OPERATION_ABORTED, domain=ErrorDomain.STORAGE)


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
            raise _arg_error(f"invalid destination URI: {exc}") from None
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


@dataclass
class _Identified:
    """What IDENTIFY told a destination on one connection about a coming name."""

    size: int
    identity: bytes
    source_root: bytes
    staged: int
    token: str


class MigrationService:
    def __init__(
        self,
        root: Root,
        *,
        staging_dir: str,
        staging_expiry: float,
        destinations: list[str],
        keepalive_interval: float,
        keepalive_count: int,
        connect_timeout: float,
    ) -> None:
        self.root = root
        self.staging = Staging(root, staging_dir)
        self.expiry = staging_expiry
        self.destinations = Destinations(destinations)
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        self.connect_timeout = connect_timeout
        st = os.fstat(root.fd)
        self.root_id = hashlib.sha256(f"virnet-root:{st.st_dev}:{st.st_ino}".encode()).digest()
        self.outgoing: dict[str, OutgoingJob] = {}
        self.incoming: dict[str, IncomingJob] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False

    def register(self, server: Server) -> None:
        # None of them on read-only listeners: every one changes or moves data.
        server.register(m.PREPARE_TUNNEL, self.prepare_tunnel)
        server.register(m.PERFORM, self.perform)
        server.register(m.ABORT, self.abort)
        server.register(m.IDENTIFY, self.identify)
        server.register(m.STAGED_DIGEST, self.staged_digest)
        server.register(m.SET_BANDWIDTH, self.set_bandwidth)

    # ------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        """Remove expired staged data left by an earlier run; time out the rest."""
        try:
            kept = await asyncio.to_thread(self._startup_sweep)
        except OSError as exc:
            log.warning("cannot clean the migration staging directory: %s", exc)
            return
        for key, left in kept.items():
            self._schedule_expiry(key, left)

    def _startup_sweep(self) -> dict[str, float]:
        try:
            os.stat(self.staging.name, dir_fd=self.root.fd, follow_symlinks=False)
        except FileNotFoundError:
            return {}
        return self.staging.sweep(self.expiry, set())

    async def close(self) -> None:
        """The daemon is stopping: outgoing migrations fail (their staged data stays at
        the destination, resumable), timers stop."""
        self._closing = True
        jobs = list(self.outgoing.values())
        for job in jobs:
            job.abort("failed: the source daemon is stopping", user=False)
        tasks = [job.task for job in jobs if job.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=ABORT_WAIT)
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._background:
            await asyncio.wait(list(self._background), timeout=ABORT_WAIT)
        self.staging.close()

    # ------------------------------------------------------------------ expiry
    def _schedule_expiry(self, key: str, delay: float) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(max(0.0, delay), self._expire, key)

    def _cancel_expiry(self, key: str) -> None:
        handle = self._timers.pop(key, None)
        if handle is not None:
            handle.cancel()

    def _expire(self, key: str) -> None:
        self._timers.pop(key, None)
        if self._closing or any(job.key == key for job in self.incoming.values()):
            return

        def remove() -> float | None:
            age = self.staging.age(key)
            if age is not None and age < self.expiry:
                return self.expiry - age  # written again since: keep it longer
            log.info("staged migration data %s expired", key)
            self.staging.remove(key)
            return None

        async def run() -> None:
            try:
                left = await asyncio.to_thread(remove)
            except OSError as exc:
                log.warning("cannot remove expired staged data %s: %s", key, exc)
                return
            if left is not None and not self._closing:
                self._schedule_expiry(key, left)

        self._spawn(run())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ source
    async def perform(self, ctx: CallContext, args: m.PerformArgs) -> m.PerformReply:
        if args.flags & ~_KNOWN_PERFORM:
            raise _arg_error(f"unsupported flags {args.flags & ~_KNOWN_PERFORM:#x}")
        name = normalise(args.name)
        if self._closing:
            raise _invalid("the daemon is stopping")
        if name in self.outgoing:
            raise _invalid(f"a migration of {name!r} is already running")
        job = OutgoingJob(self, ctx, args, name)
        self.outgoing[name] = job
        task = asyncio.ensure_future(job.run())
        job.task = task

        def done(t: asyncio.Task[m.PerformReply]) -> None:
            if self.outgoing.get(name) is job:
                del self.outgoing[name]
            if not t.cancelled():
                t.exception()  # retrieved: a caller that left never awaits it

        task.add_done_callback(done)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                # The caller's connection is gone (as Ctrl-C on virsh migrate): abort.
                job.abort("aborted: the client that started it disconnected", user=True)
            raise

    async def set_bandwidth(self, ctx: CallContext, args: m.BandwidthArgs) -> None:
        name = normalise(args.name)
        job = self.outgoing.get(name)
        if job is None:
            raise _invalid(f"no migration of {name!r} is running here")
        job.pacer.set_rate(args.bandwidth)

    async def abort(self, ctx: CallContext, args: m.NameArgs) -> None:
        name = normalise(args.name)
        out = self.outgoing.get(name)
        if out is not None:
            if not out.abort("aborted", user=True):
                raise _invalid(f"the migration of {name!r} is committing: too late to abort")
            assert out.task is not None
            await asyncio.wait([out.task], timeout=ABORT_WAIT)
            return
        inc = self.incoming.get(name)
        if inc is not None:
            if not inc.abort():
                raise _invalid(f"the migration of {name!r} is committing: too late to abort")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ABORT_WAIT):
                    await inc.finished.wait()
            return
        key = entry_key(name)
        self._cancel_expiry(key)

        def discard() -> bool:
            try:
                os.stat(self.staging.name, dir_fd=self.root.fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            found = self.staging.read_meta(key) is not None or self.staging.staged_length(key)
            self.staging.remove(key)
            return bool(found)

        try:
            found = await asyncio.to_thread(discard)
        except OSError as exc:
            raise system_error(exc, f"discard the staged data of {name!r}") from None
        if not found:
            raise _invalid(f"no migration of {name!r} is running here")

    # ------------------------------------------------------------------ destination
    def _check_target(self, name: str) -> int:
        """The target's directory exists and the name is not a directory; the mode the
        new file gets (an old regular file's, else 0644).  Raises ``RPCError``."""
        try:
            parent, base = self.root.parent(name, "migrate over")
        except OSError as exc:
            raise system_error(exc, f"open the directory of {name!r}") from None
        try:
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return 0o644
        except OSError as exc:
            raise system_error(exc, f"stat {name!r}") from None
        finally:
            os.close(parent)
        if stat.S_ISDIR(st.st_mode):
            raise path_error(f"{name!r} is a directory")
        return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o644

    def _busy(self, name: str) -> None:
        if name in self.incoming:
            raise _invalid(f"a migration into {name!r} is already running")

    async def identify(self, ctx: CallContext, args: m.IdentifyArgs) -> m.IdentifyReply:
        name = normalise(args.name)
        if args.source_root == self.root_id:
            raise _invalid("the source and the destination are the same data root")
        if len(args.identity) != m.DIGEST_SIZE:
            raise _arg_error(f"an identity has {m.DIGEST_SIZE} bytes")
        self._busy(name)
        key = entry_key(name)

        def look() -> tuple[int, str]:
            self._check_target(name)
            meta = self.staging.read_meta(key)
            if (
                meta is None
                or (meta.name, meta.size, meta.identity, meta.source_root)
                != (name, args.size, args.identity, args.source_root)
            ):
                return 0, ""
            age = self.staging.age(key)
            if age is None or age >= self.expiry:
                return 0, ""
            return min(self.staging.staged_length(key), args.size), meta.token

        try:
            staged, token = await asyncio.to_thread(look)
        except OSError as exc:
            raise system_error(exc, "read the staging directory") from None
        idents: dict[str, _Identified] = ctx.connection.state.setdefault(_IDENT_STATE, {})
        idents[name] = _Identified(args.size, args.identity, args.source_root, staged, token)
        return m.IdentifyReply(staged)

    async def staged_digest(
        self, ctx: CallContext, args: m.StagedDigestArgs
    ) -> m.StagedDigestReply:
        name = normalise(args.name)
        ident = ctx.connection.state.get(_IDENT_STATE, {}).get(name)
        if ident is None or not ident.token or args.length > ident.staged:
            raise _arg_error(
                f"STAGED_DIGEST covers at most what IDENTIFY reported staged for {name!r}"
            )
        self._busy(name)
        key = entry_key(name)

        def digest() -> bytes:
            meta = self.staging.read_meta(key)
            if meta is None or meta.token != ident.token:
                raise _invalid(f"the staged data of {name!r} changed since IDENTIFY")
            fd = self.staging.open_data(key, os.O_RDONLY)
            try:
                return block_digest(fd, args.length)
            finally:
                os.close(fd)

        try:
            value = await asyncio.to_thread(digest)
        except OSError as exc:
            raise system_error(exc, f"read the staged data of {name!r}") from None
        return m.StagedDigestReply(value)

    async def prepare_tunnel(self, ctx: CallContext, args: m.PrepareTunnelArgs) -> None:
        if args.flags & ~int(m.MigrationFlags.RESUME):
            raise _arg_error(f"unsupported flags {args.flags:#x} for PREPARE_TUNNEL")
        name = normalise(args.name)
        self._busy(name)
        resume = bool(args.flags & m.MigrationFlags.RESUME)
        ident: _Identified | None = ctx.connection.state.get(_IDENT_STATE, {}).get(name)
        if ident is not None and ident.size != args.size:
            ident = None
        if resume and (ident is None or not ident.staged):
            raise _arg_error(
                f"RESUME continues the staged data IDENTIFY reported for {name!r} on this "
                "connection, and there is none"
            )
        job = IncomingJob(name, entry_key(name))
        self.incoming[name] = job
        self._cancel_expiry(job.key)
        try:
            await self._receive(ctx, job, args.size, ident, resume)
        finally:
            del self.incoming[name]
            job.finished.set()

    async def _receive(
        self,
        ctx: CallContext,
        job: IncomingJob,
        size: int,
        ident: _Identified | None,
        resume: bool,
    ) -> None:
        staging, key, name = self.staging, job.key, job.name

        def setup() -> tuple[int, int, int]:
            mode = self._check_target(name)
            if resume:
                assert ident is not None
                meta = staging.read_meta(key)
                if meta is None or meta.token != ident.token:
                    raise _invalid(f"the staged data of {name!r} changed since IDENTIFY")
                fd = staging.open_data(key)
                try:
                    os.ftruncate(fd, ident.staged)
                except BaseException:
                    os.close(fd)
                    raise
                return fd, ident.staged, mode
            fd = staging.create_data(key)
            if ident is not None:
                try:
                    staging.write_meta(
                        key,
                        Meta(name, size, ident.identity, ident.source_root, os.urandom(8).hex()),
                    )
                except BaseException:
                    os.close(fd)
                    staging.remove(key)
                    raise
            return fd, 0, mode

        def undo(made: tuple[int, int, int]) -> None:
            os.close(made[0])
            if ident is None:
                staging.remove(key)

        try:
            fd, offset, mode = await set_up(ctx.connection, setup, undo)
        except OSError as exc:
            raise system_error(exc, f"stage {name!r} at the destination") from None
        keep = ident is not None  # a failure may be resumed only if the image is known
        writer = BatchWriter(fd, offset)
        try:
            try:
                if job.aborted:
                    raise _aborted(f"the migration of {name!r} was aborted")
                stream = ctx.accept_stream(sparse=True)
                job.stream = stream
                pieces = receive_into(stream, writer, limit=size - offset)
                try:
                    async for piece in pieces:
                        if isinstance(piece, Hole):
                            await writer.skip(piece.length)
                    await writer.flush()
                except OverLimit:
                    keep = False
                    raise _arg_error(
                        f"the tunnel carries more than the {size} bytes announced"
                    ) from None
                except OSError:
                    keep = False  # our own storage failed (a full disk): nothing to keep
                    raise
                finally:
                    await pieces.aclose()
                if writer.pos != size:
                    keep = False
                    raise _arg_error(
                        f"the tunnel ended after {writer.pos} of the {size} bytes announced"
                    )
                job.committing = True
                await asyncio.to_thread(self._commit, fd, key, name, size, mode)
                keep = False
                log.info("migration into %r committed (%d bytes)", name, size)
            except OSError as exc:
                keep = False
                raise system_error(exc, f"write {name!r} at the destination") from None
        except BaseException as exc:
            if job.aborted:
                keep = False
            if keep:
                try:
                    await writer.flush()
                except (OSError, asyncio.CancelledError):
                    keep = False
            log.info(
                "migration into %r interrupted (%s); staged data %s",
                name, _reason(exc), "kept" if keep else "discarded",
            )
            await asyncio.shield(self._after_failure(key, keep))
            raise
        finally:
            await writer.aclose()
            os.close(fd)

    async def _after_failure(self, key: str, keep: bool) -> None:
        try:
            if keep:
                await asyncio.to_thread(self.staging.touch_meta, key)
            else:
                await asyncio.to_thread(self.staging.remove, key)
        except OSError as exc:
            log.warning("cleaning up staged data %s: %s", key, exc)
        if keep and not self._closing:
            self._schedule_expiry(key, self.expiry)

    def _commit(self, fd: int, key: str, name: str, size: int, mode: int) -> None:
        """Make the staged data the file ``name``: durable first, then renamed into
        place (``renameat`` between two held directories), then the directory."""
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)  # a trailing hole exists only once the size is set
        os.fchmod(fd, mode)
        os.fsync(fd)
        parent, base = self.root.parent(name, "migrate over")
        try:
            try:
                st = os.stat(base, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.EISDIR, f"{name!r} became a directory")
            try:
                os.rename(f"{key}.data", base, src_dir_fd=self.staging.fd, dst_dir_fd=parent)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._commit_by_copy(fd, name, size)
            else:
                fsync_directory(parent)
        finally:
            os.close(parent)
        self.staging.remove(key)

    def _commit_by_copy(self, fd: int, name: str, size: int) -> None:
        """The target is on another file system than the staging directory (a mount
        inside the root): copy into a temporary file beside it, then rename that."""
        rep = self.root.replacement(name, exclusive=False)
        try:
            for is_data, start, length in segments(fd, 0, size):
                if is_data:
                    _copy_range(fd, rep.fd, start, length)
            os.ftruncate(rep.fd, size)
            os.fsync(rep.fd)
            rep.commit(False, sync=True)
        finally:
            rep.release()


def _copy_range(src: int, dst: int, start: int, length: int) -> None:
    """Copy ``[start, start+length)`` to the same offsets: ``copy_file_range`` where
    the kernel copies between these two file systems, else read and write."""
    pos, end = start, start + length
    fast = True
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while pos < end:
        want = min(end - pos, len(buf))
        if fast:
            try:
                n = os.copy_file_range(src, dst, want, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                fast = False
                continue
        else:
            n = os.preadv(src, [view[:want]], pos)
            done = 0
            while done < n:
                done += os.pwrite(dst, view[done:n], pos + done)
        if n == 0:
            raise OSError(errno.EIO, "the staged data shrank while it was copied")
        pos += n


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled: the daemon is stopping"
    return str(exc) or type(exc).__name__


class IncomingJob:
    """A migration arriving here (the destination's half)."""

    def __init__(self, name: str, key: str) -> None:
        self.name = name
        self.key = key
        self.stream: Stream | None = None
        self.aborted = False
        self.committing = False
        self.finished = asyncio.Event()

    def abort(self) -> bool:
        if self.committing:
            return False
        self.aborted = True
        if self.stream is not None:
            fail_stream(self.stream, _aborted(f"the migration of {self.name!r} was aborted"))
        return True


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
            raise _aborted(f"migration of {self.name!r} {self.abort_reason}") from None

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
                    raise _invalid(f"{name!r} changed during the migration")
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
        raise _arg_error(f"{name!r} is a symlink: MOVE deletes the image itself, migrate "
                         "the file it leads to")
    if (own.st_dev, own.st_ino) != (st.st_dev, st.st_ino):
        raise _invalid(f"{name!r} was replaced while it was opened")


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

