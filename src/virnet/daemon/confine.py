"""Opening a path beneath a directory descriptor without ever leaving it.

``open_beneath(dirfd, parts, flags, follow=...)`` is ``openat(dirfd, "/".join(parts),
flags)`` confined to the tree below ``dirfd``: a symlink met on the way is followed only
while it is relative and stays beneath ``dirfd``; an absolute one, or a ``..`` that would
climb above ``dirfd``, raises ``Escape``.  With ``follow=False`` a final symlink is not
followed (``O_NOFOLLOW``: ``O_PATH`` then opens the link itself, other modes fail with
``ELOOP``).

Two implementations with the same rule:

* ``openat2(2)`` with ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`` (Linux 5.6+, through
  ``syscall(2)``): the kernel resolves the whole path atomically.
* a walk, one component at a time, each opened relative to the descriptor of the one
  before (``O_PATH | O_NOFOLLOW``), symlinks read with ``readlinkat`` and their targets
  walked the same way; ``..`` goes back to the descriptor below in the walk's own stack.

Neither ever turns a path back into a string the kernel resolves from ``/``: a directory
swapped for a symlink between two calls is seen by the next ``openat`` relative to the
descriptor already held, never followed out of the tree.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import stat
from collections.abc import Callable, Sequence

#: Symlinks followed while resolving one path (the kernel's limit too).
MAX_SYMLINKS = 40

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
#: ``openat2`` is 437 on every architecture with the unified syscall table.
_SYS_OPENAT2 = 437
_UNIFIED_TABLE = {"x86_64", "aarch64", "i386", "i686", "armv7l", "ppc64le", "s390x", "riscv64"}
#: ``openat2`` fails with EAGAIN if a rename raced with a ``..``; retries before the walk.
_OPENAT2_RETRIES = 8
#: An ``O_NOFOLLOW`` open that saw a symlink which was gone again for ``readlink``.
_RACE_RETRIES = 8

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Escape(Exception):
    """The path leads out of the tree (absolute symlink, or ``..`` above its top)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


@functools.cache
def _syscall() -> Callable[..., int] | None:
    if platform.system() != "Linux" or platform.machine() not in _UNIFIED_TABLE:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


def _openat2(dirfd: int, path: str, flags: int) -> int:
    fn = _syscall()
    if fn is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    raw = os.fsencode(path)
    while True:
        fd = fn(_SYS_OPENAT2, dirfd, raw, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err), path)


@functools.cache
def openat2_supported() -> bool:
    """Whether this kernel (and any seccomp filter in front of it) has ``openat2``."""
    if _syscall() is None:
        return False
    top = os.open("/", _DIR)
    try:
        os.close(_openat2(top, ".", os.O_PATH))
    except OSError:
        return False
    finally:
        os.close(top)
    return True


def open_beneath_openat2(dirfd: int, parts: Sequence[str], flags: int, *, follow: bool) -> int:
    if not follow:
        flags |= os.O_NOFOLLOW
    path = "/".join(parts) or "."
    for _ in range(_OPENAT2_RETRIES):
        try:
            return _openat2(dirfd, path, flags)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise Escape from None
            if exc.errno != errno.EAGAIN:
                raise
    # Renames keep racing with a "..": the walk resolves such a path without retries.
    return open_beneath_walk(dirfd, parts, flags, follow=follow)


def open_beneath_walk(dirfd: int, parts: Sequence[str], flags: int, *, follow: bool) -> int:
    flags |= os.O_CLOEXEC
    pending = [p for p in reversed(parts) if p not in ("", ".")]  # next component last
    stack = [dirfd]  # the directories walked through; stack[0] is not ours to close
    links = 0
    races = 0

    def follow_link(target: str) -> None:
        nonlocal links
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        if not target:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if target.startswith("/"):
            raise Escape
        pending.extend(p for p in reversed(target.split("/")) if p not in ("", "."))

    try:
        while pending:
            name = pending.pop()
            if name == "..":
                if len(stack) == 1:
                    raise Escape
                os.close(stack.pop())
                continue
            top = stack[-1]
            if pending:  # a directory on the way
                try:
                    stack.append(os.open(name, _DIR, dir_fd=top))
                    continue
                except NotADirectoryError:
                    target = _link_target(name, top)
                    if target is None:  # not a symlink (any more?): look again
                        races += 1
                        if races > _RACE_RETRIES:
                            raise
                        pending.append(name)
                        continue
                follow_link(target)
                continue
            # The last component.
            try:
                fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=top)
            except OSError as exc:
                # A symlink (O_NOFOLLOW: ELOOP, or ENOTDIR with O_DIRECTORY)?
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not follow:
                    raise
                target = _link_target(name, top)
                if target is None:
                    if exc.errno == errno.ENOTDIR:
                        raise
                    races += 1  # a symlink a moment ago; look again
                    if races > _RACE_RETRIES:
                        raise
                    pending.append(name)
                    continue
                follow_link(target)
                continue
            if follow and flags & os.O_PATH:
                try:
                    mode = os.fstat(fd).st_mode
                except OSError:
                    os.close(fd)
                    raise
                if stat.S_ISLNK(mode):  # O_PATH | O_NOFOLLOW opened the link itself
                    try:
                        target = os.readlink("", dir_fd=fd)
                    finally:
                        os.close(fd)
                    follow_link(target)
                    continue
            return fd
        # The walk ended on a directory of the stack: the tree's top, or one a
        # symlink's ".." led back to.
        return os.open(".", flags, dir_fd=stack[-1])
    finally:
        for fd in stack[1:]:
            os.close(fd)


def _link_target(name: str, dirfd: int) -> str | None:
    """The target of the symlink ``name`` in ``dirfd``; None if it is not one."""
    try:
        return os.readlink(name, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise
