"""Confining client-supplied paths to the daemon's data root.

A path on the wire is relative to the root and ``/``-separated.  Refused with
``VIR_ERR_INVALID_ARG``: absolute paths, ``..`` components, NUL bytes, and any path
that leads out of the root through a symlink.  A symlink inside the root is followed
while it is relative and stays beneath the root; an absolute symlink is never followed
(it is refused like ``..``), whatever it points at.

Every path is resolved from a descriptor of the root, and every later step is relative
to the descriptors found (``confine``): nothing is looked up again by its path, so a
directory swapped for a symlink meanwhile cannot lead an operation outside.  Operations
that act on a name itself (a whole-file upload, DELETE, MKDIR) resolve only its parent
directory and then work on the name inside that descriptor: a final symlink is replaced
or removed, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import weakref
from collections.abc import Callable

from ..errors import ErrorCode, ErrorDomain, RPCError
from . import confine

#: Resolving and opening again when the file found changed before it was opened.
_REOPEN_RETRIES = 8
#: Names tried for a temporary file before giving up.
_TEMP_ATTEMPTS = 100


def path_error(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.INVALID_ARG, domain=ErrorDomain.STORAGE)


def system_error(exc: OSError, what: str) -> RPCError:
    """libvirt's convention for OS errors: VIR_ERR_SYSTEM_ERROR with errno in int1."""
    reason = exc.strerror or str(exc)
    return RPCError(
        f"cannot {what}: {reason}",
        code=ErrorCode.SYSTEM_ERROR,
        domain=ErrorDomain.STORAGE,
        int1=exc.errno or 0,
    )


def exists_error(wire_path: str) -> RPCError:
    return RPCError(
        f"{wire_path!r} already exists",
        code=ErrorCode.OPERATION_INVALID,
        domain=ErrorDomain.STORAGE,
        int1=errno.EEXIST,
    )


def outside_error(wire_path: str) -> RPCError:
    return path_error(
        f"path leads outside the data root: {wire_path!r} (symlinks are followed only "
        "while relative and inside the root)"
    )


def wire_parts(wire_path: str) -> list[str]:
    """The components of a wire path; refuses NUL, absolute paths and ``..``."""
    if "\0" in wire_path:
        raise path_error("path contains a NUL byte")
    if wire_path.startswith("/"):
        raise path_error(f"absolute path refused: {wire_path!r}")
    parts = [p for p in wire_path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise path_error(f"'..' refused in path: {wire_path!r}")
    return parts


class Root:
    """The daemon's data root, held by a descriptor; opens wire paths beneath it.

    Methods raise ``RPCError`` for refused paths and ``OSError`` for what the file
    system says (callers turn it into ``system_error`` with their own wording).
    ``resolver`` is ``"openat2"`` or ``"walk"`` (the kernel has no ``openat2``).
    """

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.realpath(directory)
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # Closed with the object: a worker thread still resolving holds a reference, so
        # the number is never reused under it.
        weakref.finalize(self, os.close, self.fd)
        self._open: Callable[..., int]
        if confine.openat2_supported():
            self.resolver = "openat2"
            self._open = confine.open_beneath_openat2
        else:
            self.resolver = "walk"
            self._open = confine.open_beneath_walk

    def open(self, wire_path: str, flags: int, *, follow: bool = True) -> int:
        """A descriptor of ``wire_path`` opened with ``flags`` (``O_PATH`` for one that
        only names it), a final symlink followed or not."""
        return self._open_parts(wire_parts(wire_path), wire_path, flags, follow)

    def _open_parts(self, parts: list[str], wire_path: str, flags: int, follow: bool) -> int:
        try:
            return self._open(self.fd, parts, flags, follow=follow)
        except confine.Escape:
            raise outside_error(wire_path) from None

    def stat(self, wire_path: str) -> os.stat_result:
        """``stat`` of what ``wire_path`` leads to (symlinks in the root followed)."""
        fd = self.open(wire_path, os.O_PATH)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def open_directory(self, wire_path: str) -> int:
        """A readable descriptor of a directory (for ``os.scandir``)."""
        return self.open(wire_path, os.O_RDONLY | os.O_DIRECTORY)

    def open_regular(self, wire_path: str, flags: int) -> tuple[int, os.stat_result]:
        """Open a regular file (``O_RDONLY`` or ``O_WRONLY``); anything else is refused
        before it is opened for I/O (a FIFO would block, a device may act on open).
        The descriptor and its ``fstat``."""
        parts = wire_parts(wire_path)
        for _ in range(_REOPEN_RETRIES):
            probe = self._open_parts(parts, wire_path, os.O_PATH, True)
            try:
                seen = os.fstat(probe)
            finally:
                os.close(probe)
            if not stat.S_ISREG(seen.st_mode):
                raise path_error(f"{wire_path!r} is not a regular file")
            # O_NONBLOCK, O_NOCTTY: harmless on a regular file, and if something else
            # was put there since the probe, opening it neither blocks nor adopts a tty.
            fd = self._open_parts(
                parts, wire_path, flags | os.O_NONBLOCK | os.O_NOCTTY, True
            )
            try:
                st = os.fstat(fd)
            except OSError:
                os.close(fd)
                raise
            if (st.st_dev, st.st_ino) == (seen.st_dev, seen.st_ino):
                return fd, st
            os.close(fd)  # replaced since the probe: look again
        raise OSError(errno.EAGAIN, "the file kept being replaced while it was opened")

    def parent(self, wire_path: str, action: str) -> tuple[int, str]:
        """For operations on a name itself: an ``O_PATH`` descriptor of the directory
        holding it (symlinks on the way followed as usual) and the name.  The root
        itself has no such name: ``refusing to {action} the data root``."""
        parts = wire_parts(wire_path)
        if not parts:
            raise path_error(f"refusing to {action} the data root")
        fd = self._open_parts(parts[:-1], wire_path, os.O_PATH | os.O_DIRECTORY, True)
        return fd, parts[-1]

    def replacement(self, wire_path: str, *, exclusive: bool) -> Replacement:
        """Set up a whole-file upload of ``wire_path``: a temporary file beside it, to be
        committed (renamed over it) or discarded.  A symlink at the path is replaced
        itself, never followed.  Raises ``RPCError`` only."""
        try:
            parent, name = self.parent(wire_path, "upload over")
        except OSError as exc:
            raise system_error(exc, f"open the directory of {wire_path!r}") from None
        try:
            try:
                old = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            except OSError as exc:
                raise system_error(exc, f"stat {wire_path!r}") from None
            if old is not None:
                if exclusive:
                    raise exists_error(wire_path)
                if stat.S_ISDIR(old.st_mode):
                    raise path_error(f"{wire_path!r} is a directory")
            # A regular file's mode carries over to its replacement.
            if old is not None and stat.S_ISREG(old.st_mode):
                mode = stat.S_IMODE(old.st_mode)
            else:
                mode = 0o644
            try:
                fd, tmp = create_temp(parent, name)
            except OSError as exc:
                raise system_error(
                    exc, f"create a temporary file for {wire_path!r}"
                ) from None
        except BaseException:
            os.close(parent)
            raise
        rep = Replacement(parent, name, fd, tmp)
        try:
            os.fchmod(fd, mode)
        except OSError as exc:
            rep.release()
            raise system_error(exc, f"write {wire_path!r}") from None
        return rep


def create_temp(parent: int, name: str) -> tuple[int, str]:
    """A new empty file ``.NAME.XXXXXXXX.virnet-part`` in ``parent``, opened for writing
    (mode 0600 until the caller sets the final one)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_TEMP_ATTEMPTS):
        tmp = f".{name}.{os.urandom(4).hex()}.virnet-part"
        try:
            return os.open(tmp, flags, 0o600, dir_fd=parent), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name")


class Replacement:
    """A whole-file upload in progress: its temporary file (``fd``, named ``tmp``) in the
    directory held by ``parent``, to replace ``name`` there.  ``commit`` or
    ``discard``, then ``close`` (or ``release``: both).  The methods may run in different
    threads (a commit still running when a cancelled handler cleans up): a lock keeps
    the descriptors alive until each one is done."""

    def __init__(self, parent: int, name: str, fd: int, tmp: str) -> None:
        self.parent = parent
        self.name = name
        self.fd = fd
        self.tmp = tmp
        self._lock = threading.Lock()
        self._tmp_exists = True
        self._closed = False

    def commit(self, exclusive: bool, *, sync: bool = True) -> None:
        """Put the temporary file in place of ``name``; then, with ``sync``, ``fsync`` the
        directory so the rename is durable.  ``exclusive``: fail with
        ``FileExistsError`` if ``name`` exists (no window where another is overwritten)."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the upload was already released")
            if exclusive:
                os.link(
                    self.tmp, self.name, src_dir_fd=self.parent, dst_dir_fd=self.parent,
                    follow_symlinks=False,
                )
                os.unlink(self.tmp, dir_fd=self.parent)
            else:
                os.replace(self.tmp, self.name, src_dir_fd=self.parent, dst_dir_fd=self.parent)
            self._tmp_exists = False
            if sync:
                fsync_directory(self.parent)

    def discard(self) -> None:
        """Remove the temporary file (if it was not committed)."""
        with self._lock:
            if self._tmp_exists and not self._closed:
                self._tmp_exists = False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tmp, dir_fd=self.parent)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
                os.close(self.parent)

    def release(self) -> None:
        """``discard`` and ``close``: what an upload that did not commit leaves."""
        try:
            self.discard()
        finally:
            self.close()


def fsync_directory(dirfd: int) -> None:
    """``fsync`` the directory named by ``dirfd`` (an ``O_PATH`` descriptor can't be)."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
