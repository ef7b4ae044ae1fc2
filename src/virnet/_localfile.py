"""The local end of a transfer: what a download writes into, what an upload reads from.

Download targets, by what the local path is:

- a regular file, or nothing yet: replaced atomically.  The data goes to a temporary
  file beside it, which is fsynced and renamed over the path only when the transfer
  finished cleanly, then the directory is fsynced; an existing file's mode (and, when
  we may, its owner and group) carry over.
- a symbolic link: followed all the way; the file it leads to is replaced as above (a
  dangling link: that file is created) and the link stays a link.
- a directory: the remote file's name inside it, then as above.
- a character or block device, a FIFO, a Unix socket (connected to as a stream
  socket), stdout (``-``): written in place, in order, from the start (stdout: from
  where it stands); never truncated, renamed or replaced, no temporary file.  Holes
  of a sparse download are written as zeros.  A block device smaller than the
  download fails before anything is written.  A FIFO is opened without blocking:
  the open is retried until a reader appears, the event loop keeps running.  At the
  end one fsync, as ``dd conv=fsync`` does; where the kind of file has no such thing
  (a pipe, a socket, a terminal, most character devices) its refusal is ignored.

Upload sources: a regular file or a block device has a size and is read by position;
a FIFO, a character device, a Unix socket or stdin is read in order until EOF, or until
exactly the length asked for (a source that ends before it is an error).  Opening a
FIFO waits, on the event loop, for a writer.  A directory is refused.

Every local failure is a ``LocalFileError``: one line, ``PATH: reason``, naming the path
the caller gave (never a temporary file), without ``[Errno N]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import sys

from ._fileio import BatchWriter, SequentialWriter
from ._units import format_size as format_size  # the one format of sizes in messages
from .errors import VirnetError

# fsync on a descriptor whose kind of file cannot be synced: nothing to do there.
_NO_FSYNC = frozenset({errno.EINVAL, errno.EROFS, errno.ENOTSUP, errno.EOPNOTSUPP})

_FIFO_RETRY_MIN = 0.005  # seconds between attempts to open a FIFO that has no reader
_FIFO_RETRY_MAX = 0.2


class LocalFileError(VirnetError, OSError):
    """A local file, device, FIFO or socket could not be used.  ``filename`` is the
    path as the caller named it, ``strerror`` the reason; ``str()`` is
    ``"PATH: reason"``."""

    def __init__(self, path: str, reason: str, code: int = 0) -> None:
        super().__init__(code, reason, path)

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class LengthError(LocalFileError, ValueError):
    """The length asked for is more than a sized source holds."""


def local_error(path: str, exc: OSError, what: str = "") -> LocalFileError:
    """``exc`` (a failed system call) as a ``LocalFileError`` about ``path``."""
    reason = exc.strerror or str(exc)
    return LocalFileError(path, f"{what}: {reason}" if what else reason, exc.errno or 0)


def kind_name(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"  # pragma: no cover


def _device_size(fd: int) -> int:
    """Bytes from the descriptor's position to the end of a block device."""
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    end = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, pos, os.SEEK_SET)
    return end - pos


def _umask() -> int:
    """The process's umask, read without changing it: setting it to read it back would
    open a window in which files made by other threads get the wrong mode."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # no /proc: the old way, with the narrowest window mode
    os.umask(mask)
    return mask


def _fsync_if_supported(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_FSYNC:
            raise


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- targets


class Target:
    """Where a download goes.  ``writer`` takes the stream's data and holes;
    ``check_size()`` before the first byte, ``commit()`` after the last one,
    ``close()`` always (it removes what an uncommitted transfer left)."""

    display: str
    kind: str
    writer: BatchWriter

    def check_size(self, size: int) -> None:
        """Raise if ``size`` bytes cannot go there (a block device too small)."""

    async def commit(self, sync: bool) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def error(self, exc: OSError) -> LocalFileError:
        return exc if isinstance(exc, LocalFileError) else local_error(self.display, exc)


class _Replacement(Target):
    """A regular file replaced atomically by a temporary file beside it."""

    def __init__(self, display: str, path: str, old: os.stat_result | None) -> None:
        self.display = display
        self.kind = "regular file"
        self.path = path
        self.parent = os.path.dirname(path)
        import tempfile  # here, not at import: it pulls in shutil, random and more

        try:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(path)}.", suffix=".part", dir=self.parent
            )
        except OSError as exc:
            raise local_error(display, exc, f"cannot create a file in {self.parent}") from None
        self.fd = fd
        self.tmp = tmp
        self.committed = False
        self._job: asyncio.Future[None] | None = None
        try:
            if old is None:
                mode = 0o666 & ~_umask()  # what open() would have given a new file
            else:
                mode = stat.S_IMODE(old.st_mode)
                _copy_owner(fd, old)
            os.fchmod(fd, mode)  # after the owner: chown may clear set-id bits
        except OSError as exc:
            self._discard()
            raise local_error(display, exc) from None
        self.writer = BatchWriter(fd)

    async def commit(self, sync: bool) -> None:
        await self.writer.flush()
        # In a thread: fsync takes as long as the disk needs, and replacing a large file
        # frees its pages inside the system call.
        self._job = asyncio.ensure_future(asyncio.to_thread(self._put_in_place, sync))
        await asyncio.shield(self._job)
        if sync:
            self._job = asyncio.ensure_future(asyncio.to_thread(_fsync_directory, self.parent))
            await asyncio.shield(self._job)

    def _put_in_place(self, sync: bool) -> None:
        size = self.writer.pos
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)  # a trailing hole
        if sync:
            os.fsync(self.fd)
        os.replace(self.tmp, self.path)
        self.committed = True

    async def close(self) -> None:
        await self.writer.aclose()
        job, self._job = self._job, None
        if job is not None:  # never close the descriptor under a worker thread
            with contextlib.suppress(BaseException):
                await asyncio.shield(job)
        if self.fd >= 0:
            self._discard()

    def _discard(self) -> None:
        fd, self.fd = self.fd, -1
        os.close(fd)
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


def _copy_owner(fd: int, old: os.stat_result) -> None:
    """Best effort: the replacement gets the old file's owner and group, or at least
    its group (a member of the group may set it), or stays ours."""
    new = os.fstat(fd)
    if (new.st_uid, new.st_gid) == (old.st_uid, old.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        with contextlib.suppress(PermissionError):
            os.fchown(fd, -1, old.st_gid)


class _InPlace(Target):
    """A device, FIFO, socket or stdout: written in order where it stands."""

    def __init__(
        self,
        display: str,
        fd: int,
        kind: str,
        *,
        capacity: int | None = None,
        sock: socket.socket | None = None,
        owned: bool = True,
    ) -> None:
        self.display = display
        self.fd = fd
        self.kind = kind
        self.capacity = capacity
        self.sock = sock
        self.owned = owned
        self.writer = SequentialWriter(fd)
        self._closed = False

    def check_size(self, size: int) -> None:
        if self.capacity is not None and size > self.capacity:
            have, need = format_size(self.capacity), format_size(size)
            if have == need:
                have, need = f"{self.capacity} bytes", f"{size} bytes"
            raise LocalFileError(
                self.display, f"device is {have}, the download is {need}", errno.ENOSPC
            )

    async def commit(self, sync: bool) -> None:
        await self.writer.flush()
        if sync:
            await asyncio.to_thread(_fsync_if_supported, self.fd)
        if self.sock is not None:
            self.sock.shutdown(socket.SHUT_WR)  # the reader sees the end

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.writer.aclose()
        if self.sock is not None:
            self.sock.close()
        elif self.owned:
            os.close(self.fd)


async def open_target(local: str, remote: str) -> Target:
    """The download target for the local path ``local`` (``-``: stdout); a directory
    gets the last component of ``remote`` inside it."""
    if local == "-":
        return _stdout_target()
    display = local
    path = os.path.abspath(local)
    if os.path.isdir(path):
        name = os.path.basename(remote.rstrip("/")) or "download"
        path = os.path.join(path, name)
        display = os.path.join(local, name)
    elif local.endswith("/"):
        raise LocalFileError(local, "not a directory", errno.ENOTDIR)
    # Symbolic links are followed all the way (a dangling one: to where it leads), so
    # the file they lead to is what gets replaced, never the link.
    real = os.path.realpath(path)
    try:
        st: os.stat_result | None = os.stat(real)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise local_error(display, exc) from None
    if st is None or stat.S_ISREG(st.st_mode):
        return _Replacement(display, real, st)
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise LocalFileError(display, "is a directory", errno.EISDIR)
    if stat.S_ISSOCK(mode):
        sock = await _connect(display, real)
        return _InPlace(display, sock.fileno(), "socket", sock=sock)
    if stat.S_ISFIFO(mode):
        fd = await _open_fifo_for_writing(display, real)
        return _InPlace(display, fd, "FIFO")
    flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if stat.S_ISBLK(mode):
        # O_EXCL on a block device: refused while it is mounted or held by the kernel.
        flags |= os.O_EXCL
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise LocalFileError(
                display, "device is in use (mounted, or held by the system)", errno.EBUSY
            ) from None
        raise local_error(display, exc) from None
    try:
        return _in_place_from_fd(display, fd, owned=True, expect=stat.S_IFMT(mode))
    except BaseException:
        os.close(fd)
        raise


def _in_place_from_fd(display: str, fd: int, *, owned: bool, expect: int = 0) -> _InPlace:
    try:
        st = os.fstat(fd)
        if expect and stat.S_IFMT(st.st_mode) != expect:
            raise LocalFileError(display, "changed while it was opened")
        os.set_blocking(fd, True)  # the writer's worker thread writes in full
        capacity = _device_size(fd) if stat.S_ISBLK(st.st_mode) else None
    except LocalFileError:
        raise
    except OSError as exc:
        raise local_error(display, exc) from None
    return _InPlace(display, fd, kind_name(st.st_mode), capacity=capacity, owned=owned)


def _stdout_target() -> _InPlace:
    if sys.stdout is not None:
        sys.stdout.flush()  # whatever was printed comes before the data
    return _in_place_from_fd("stdout", 1, owned=False)


async def _connect(display: str, path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        sock.setblocking(True)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EPROTOTYPE:
            raise LocalFileError(display, "not a stream socket", exc.errno) from None
        raise local_error(display, exc, "cannot connect") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_fifo_for_writing(display: str, path: str) -> int:
    """Open a FIFO for writing once it has a reader.  Without O_NONBLOCK open() would
    block until then, in a thread that could not be stopped; with it, open() fails
    with ENXIO while there is no reader, so it is retried from the event loop."""
    delay = _FIFO_RETRY_MIN
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise local_error(display, exc) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, _FIFO_RETRY_MAX)
            continue
        try:
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd


# ----------------------------------------------------------------------------- sources


class Source:
    """What an upload reads.  ``size`` is None for a source read until EOF."""

    def __init__(
        self,
        display: str,
        fd: int,
        kind: str,
        size: int | None,
        *,
        sock: socket.socket | None = None,
        owned: bool = True,
    ) -> None:
        self.display = display
        self.fd = fd
        self.kind = kind
        self.size = size
        self.sock = sock
        self.owned = owned

    def error(self, exc: OSError) -> LocalFileError:
        return exc if isinstance(exc, LocalFileError) else local_error(self.display, exc)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        elif self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


async def open_source(local: str) -> Source:
    """The upload source for the local path ``local`` (``-``: stdin)."""
    if local == "-":
        try:
            st = os.fstat(0)
        except OSError as exc:
            raise local_error("stdin", exc) from None
        return Source("stdin", 0, kind_name(st.st_mode), None, owned=False)
    try:
        st = os.stat(local)
    except OSError as exc:
        raise local_error(local, exc) from None
    if stat.S_ISSOCK(st.st_mode):
        sock = await _connect(local, local)
        return Source(local, sock.fileno(), "socket", None, sock=sock)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer here (see below).
        fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise local_error(local, exc) from None
    try:
        st = os.fstat(fd)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            raise LocalFileError(local, "is a directory", errno.EISDIR)
        if stat.S_ISREG(mode):
            return Source(local, fd, "file", st.st_size)
        if stat.S_ISBLK(mode):
            return Source(local, fd, "block device", _device_size(fd))
        if stat.S_ISFIFO(mode):
            # Like a blocking open, wait for a writer: the FIFO becomes readable when
            # one has written, or has come and gone (EOF).  Read before that, it
            # would look like an empty source.
            await _wait_readable(fd)
        os.set_blocking(fd, True)
        return Source(local, fd, kind_name(mode), None)
    except LocalFileError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise local_error(local, exc) from None
    except BaseException:
        os.close(fd)
        raise


async def _wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
