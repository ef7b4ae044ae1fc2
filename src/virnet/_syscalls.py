"""Linux system calls the standard library lacks, through ctypes: punching holes into a
file, and asking which kind of file system holds a file (to tell memory from disks)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
#: statfs(2) magic numbers of file systems that keep their data in memory: reading or
#: writing them never waits on a device (barring swap).
_MEMORY_FILE_SYSTEMS = frozenset({0x01021994, 0x858458F6})  # tmpfs (also /dev/shm), ramfs
#: Character devices of the "mem" driver (major 1): null, zero, full, random, urandom...
#: Their reads and writes never block.
_MEM_DEVICE_MAJOR = 1

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
        _libc = libc
    return _libc


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` of a file so that it reads as zeros and
    takes no space (fallocate PUNCH_HOLE, size kept).  False where the file system or
    the platform cannot (the caller then writes zeros); other errors raise."""
    if length <= 0:
        return True
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _c().fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def file_system_type(fd: int) -> int | None:
    """The statfs ``f_type`` of the file system holding ``fd``, or None if unknown."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _c().fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def never_waits(fd: int) -> bool:
    """True where reading or writing ``fd`` cannot wait on a device or a peer, so doing
    it on the event loop costs only the copy: regular files on memory file systems
    (tmpfs, ramfs) and the "mem" character devices (/dev/null and its kind).  Pipes,
    sockets, terminals, disks and network file systems can all wait."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    if stat.S_ISCHR(st.st_mode):
        return os.major(st.st_rdev) == _MEM_DEVICE_MAJOR
    if not stat.S_ISREG(st.st_mode):
        return False
    return file_system_type(fd) in _MEMORY_FILE_SYSTEMS
