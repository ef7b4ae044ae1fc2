"""The MIGRATION program: both halves of a tunnelled migration (docs/migration.md).

**Source** (PERFORM): the daemon asked to migrate one of its images runs an
``OutgoingJob`` (``migration_source``): it connects to ``dest_uri`` (only where its
configuration allows) as a client of the destination and sends the image through
PREPARE_TUNNEL's sparse upload stream; MOVE deletes the source once the destination has
committed.  A job runs in a task of its own, so a caller that disconnects aborts it
(between the start and the finish) without leaving it half done.

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
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

from .._fileio import BatchWriter, segments
from .._receive import OverLimit, receive_into
from ..server import CallContext, Server, fail_stream
from ..services import migration as m
from ..stream import Hole, Stream
from .migration_errors import aborted, arg_error, failure_reason, invalid
from .migration_source import Destinations, OutgoingJob
from .paths import Root, fsync_directory, path_error, system_error
from .setup import set_up
from .staging import Meta, Staging, block_digest, entry_key, normalise

log = logging.getLogger("virnet.daemon.migration")

#: Seconds ABORT waits for the job it stopped to be rolled back.
ABORT_WAIT = 30.0
_KNOWN_PERFORM = int(m.MigrationFlags.MOVE | m.MigrationFlags.RESUME)
_IDENT_STATE = "migration.identified"


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
            raise arg_error(f"unsupported flags {args.flags & ~_KNOWN_PERFORM:#x}")
        name = normalise(args.name)
        if self._closing:
            raise invalid("the daemon is stopping")
        if name in self.outgoing:
            raise invalid(f"a migration of {name!r} is already running")
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
            raise invalid(f"no migration of {name!r} is running here")
        job.pacer.set_rate(args.bandwidth)

    async def abort(self, ctx: CallContext, args: m.NameArgs) -> None:
        name = normalise(args.name)
        out = self.outgoing.get(name)
        if out is not None:
            if not out.abort("aborted", user=True):
                raise invalid(f"the migration of {name!r} is committing: too late to abort")
            assert out.task is not None
            await asyncio.wait([out.task], timeout=ABORT_WAIT)
            return
        inc = self.incoming.get(name)
        if inc is not None:
            if not inc.abort():
                raise invalid(f"the migration of {name!r} is committing: too late to abort")
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
            raise invalid(f"no migration of {name!r} is running here")

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
            raise invalid(f"a migration into {name!r} is already running")

    async def identify(self, ctx: CallContext, args: m.IdentifyArgs) -> m.IdentifyReply:
        name = normalise(args.name)
        if args.source_root == self.root_id:
            raise invalid("the source and the destination are the same data root")
        if len(args.identity) != m.DIGEST_SIZE:
            raise arg_error(f"an identity has {m.DIGEST_SIZE} bytes")
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
            raise arg_error(
                f"STAGED_DIGEST covers at most what IDENTIFY reported staged for {name!r}"
            )
        self._busy(name)
        key = entry_key(name)

        def digest() -> bytes:
            meta = self.staging.read_meta(key)
            if meta is None or meta.token != ident.token:
                raise invalid(f"the staged data of {name!r} changed since IDENTIFY")
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
            raise arg_error(f"unsupported flags {args.flags:#x} for PREPARE_TUNNEL")
        name = normalise(args.name)
        self._busy(name)
        resume = bool(args.flags & m.MigrationFlags.RESUME)
        ident: _Identified | None = ctx.connection.state.get(_IDENT_STATE, {}).get(name)
        if ident is not None and ident.size != args.size:
            ident = None
        if resume and (ident is None or not ident.staged):
            raise arg_error(
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
                    raise invalid(f"the staged data of {name!r} changed since IDENTIFY")
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
                    raise aborted(f"the migration of {name!r} was aborted")
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
                    raise arg_error(
                        f"the tunnel carries more than the {size} bytes announced"
                    ) from None
                except OSError:
                    keep = False  # our own storage failed (a full disk): nothing to keep
                    raise
                finally:
                    await pieces.aclose()
                if writer.pos != size:
                    keep = False
                    raise arg_error(
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
                name, failure_reason(exc), "kept" if keep else "discarded",
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
            fail_stream(self.stream, aborted(f"the migration of {self.name!r} was aborted"))
        return True
