"""Where a destination keeps incoming migrations: a hidden directory inside the root.

Layout: ``ROOT/.virnet-staging/`` (mode 0700, the name configurable), one entry per
destination name, keyed by the sha256 of the normalised name (``KEY.data`` and
``KEY.meta``)::

    .virnet-staging/
        3f1c...e0.data   the bytes received so far, holes kept as holes
        3f1c...e0.meta   JSON: name, size, identity and source root (hex), token

Inside the root, because the commit is a ``renameat`` from here to the target's
directory, which works only within one file system.  FILES never sees it: the root the
daemon serves (``HiddenRoot``) refuses every path whose first component is the staging
name, and LIST of the root leaves it out.  (A symlink that an administrator puts into
the root pointing into it would still lead there: FILES itself cannot create one.)

An entry is in use while its migration runs (the service keeps a registry); otherwise it
is *interrupted* and kept for ``expiry`` seconds after its last write (the data file's
or the meta file's modification time, whichever is later), then removed, by a timer
while the daemon runs and by a sweep at start-up.  Files here that are not a complete
pair are removed by that sweep too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

from ..server import CallContext
from ..services import files as f
from .files import FilesService
from .paths import Root, path_error, wire_parts

log = logging.getLogger("virnet.daemon.migration")

STAGING_NAME = ".virnet-staging"
#: Bytes per block of the staged-prefix digest.
DIGEST_BLOCK = 1024 * 1024
_ZERO_BLOCK_DIGEST = hashlib.sha256(bytes(DIGEST_BLOCK)).digest()


class HiddenRoot(Root):
    """The data root as FILES sees it: the staging directory does not exist for it."""

    def __init__(self, directory: str, hidden: str = STAGING_NAME) -> None:
        super().__init__(directory)
        self.hidden = hidden

    def check(self, wire_path: str) -> None:
        parts = wire_parts(wire_path)
        if parts and parts[0] == self.hidden:
            raise path_error(f"{wire_path!r}: {self.hidden} is reserved by the daemon")

    def open(self, wire_path: str, flags: int, *, follow: bool = True) -> int:
        self.check(wire_path)
        return super().open(wire_path, flags, follow=follow)

    def open_regular(self, wire_path: str, flags: int) -> tuple[int, os.stat_result]:
        self.check(wire_path)
        return super().open_regular(wire_path, flags)

    def parent(self, wire_path: str, action: str) -> tuple[int, str]:
        self.check(wire_path)
        return super().parent(wire_path, action)

    def is_root(self, wire_path: str) -> bool:
        """Whether ``wire_path`` leads to the root directory itself."""
        try:
            st = self.stat(wire_path)
        except OSError:
            return False
        root = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino)


def normalise(wire_path: str) -> str:
    """The canonical form of a wire path (refusals as for FILES)."""
    parts = wire_parts(wire_path)
    if not parts:
        raise path_error("refusing to migrate the data root")
    return "/".join(parts)


def entry_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:40]


@dataclass
class Meta:
    name: str
    size: int
    identity: bytes
    source_root: bytes
    token: str  # changes whenever the entry is started afresh

    def dump(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "size": self.size,
                "identity": self.identity.hex(),
                "source_root": self.source_root.hex(),
                "token": self.token,
            }
        ).encode()

    @classmethod
    def load(cls, data: bytes) -> Meta:
        raw: dict[str, Any] = json.loads(data)
        return cls(
            str(raw["name"]),
            int(raw["size"]),
            bytes.fromhex(raw["identity"]),
            bytes.fromhex(raw["source_root"]),
            str(raw["token"]),
        )


class Staging:
    """The staging directory of one root.  Every method blocks (file-system calls):
    the service runs them in worker threads."""

    def __init__(self, root: Root, name: str = STAGING_NAME) -> None:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"the staging directory must be a plain name, not {name!r}")
        self.root = root
        self.name = name
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        """An ``O_PATH`` descriptor of the directory, made (0700) on first use.  Never
        through a symlink: someone else's directory is refused."""
        if self._fd is None:
            flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(self.name, flags, dir_fd=self.root.fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.name, 0o700, dir_fd=self.root.fd)
                fd = os.open(self.name, flags, dir_fd=self.root.fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(
                        exc.errno, f"{self.name} in the data root is not a directory"
                    ) from None
                raise
            self._fd = fd
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def path(self) -> str:
        return os.path.join(self.root.path, self.name)

    # ------------------------------------------------------------------ entries
    def read_meta(self, key: str) -> Meta | None:
        try:
            fd = os.open(f"{key}.meta", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self.fd)
        except FileNotFoundError:
            return None
        try:
            data = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        try:
            return Meta.load(data)
        except (ValueError, KeyError, TypeError):
            return None

    def write_meta(self, key: str, meta: Meta) -> None:
        """Atomically (a temporary file renamed over it)."""
        tmp = f"{key}.meta.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.fd)
        try:
            os.write(fd, meta.dump())
        finally:
            os.close(fd)
        os.replace(tmp, f"{key}.meta", src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def touch_meta(self, key: str) -> None:
        """Restart the entry's expiry clock (it was interrupted now)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(f"{key}.meta", dir_fd=self.fd, follow_symlinks=False)

    def staged_length(self, key: str) -> int:
        """Bytes of the entry's data file, rounded down to whole digest blocks (a write
        cut short by a crash may have left a partial block at the end)."""
        try:
            st = os.stat(f"{key}.data", dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if not stat.S_ISREG(st.st_mode):
            return 0
        return st.st_size - st.st_size % DIGEST_BLOCK

    def create_data(self, key: str) -> int:
        """A new, empty data file for ``key`` (any old one removed), open read-write."""
        self.remove(key)
        return os.open(
            f"{key}.data",
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self.fd,
        )

    def open_data(self, key: str, mode: int = os.O_RDWR) -> int:
        fd = os.open(f"{key}.data", mode | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "staged data is not a regular file")
        return fd

    def remove(self, key: str) -> None:
        for suffix in (".data", ".meta", ".meta.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{key}{suffix}", dir_fd=self.fd)

    def remove_meta(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{key}.meta", dir_fd=self.fd)

    def age(self, key: str) -> float | None:
        """Seconds since the entry was last written, or None if it is incomplete."""
        times = []
        for suffix in (".data", ".meta"):
            try:
                st = os.stat(f"{key}{suffix}", dir_fd=self.fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            times.append(st.st_mtime)
        return max(0.0, time.time() - max(times))

    def keys(self) -> set[str]:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        return {n.split(".", 1)[0] for n in names}

    def sweep(self, expiry: float, busy: set[str]) -> dict[str, float]:
        """Remove expired and incomplete entries (not those in ``busy``); the seconds
        left of those kept."""
        kept: dict[str, float] = {}
        for key in self.keys():
            if key in busy:
                continue
            age = self.age(key)
            if age is None or age >= expiry or self.read_meta(key) is None:
                what = "incomplete" if age is None or age < expiry else "expired"
                log.info("removing %s staged migration data %s", what, key)
                self.remove(key)
            else:
                kept[key] = expiry - age
        return kept


def block_digest(fd: int, length: int) -> bytes:
    """The digest both sides compute over the first ``length`` bytes of an image: sha256
    of the sequence of sha256s of its 1 MiB blocks (the last one may be shorter).  A
    block that lies wholly in a hole is not read: its digest is that of zeros, which is
    what it reads as.  The same content gives the same digest however its holes are laid
    out, and a sparse image costs only its data."""
    outer = hashlib.sha256()
    buf = bytearray(DIGEST_BLOCK)
    view = memoryview(buf)
    pos = 0
    while pos < length:
        n = min(DIGEST_BLOCK, length - pos)
        if _in_hole(fd, pos, n):
            outer.update(_ZERO_BLOCK_DIGEST if n == DIGEST_BLOCK else _zero_digest(n))
        else:
            got = 0
            while got < n:
                k = os.preadv(fd, [view[got:n]], pos + got)
                if k == 0:  # past the end of the file: reads as zeros, as a hole
                    view[got:n] = bytes(n - got)
                    break
                got += k
            outer.update(hashlib.sha256(view[:n]).digest())
        pos += n
    return outer.digest()


def _zero_digest(n: int) -> bytes:
    return hashlib.sha256(bytes(n)).digest()


def _in_hole(fd: int, pos: int, n: int) -> bool:
    try:
        data = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as exc:
        # ENXIO: no data after pos.  EINVAL/EOPNOTSUPP: the file system cannot tell.
        return exc.errno == errno.ENXIO
    return data >= pos + n



class HidingFilesService(FilesService):
    """FILES with the staging directory left out of LIST of the root (every other
    procedure already refuses it through ``HiddenRoot``)."""

    root: HiddenRoot

    async def list(self, ctx: CallContext, args: f.PathArgs) -> f.ListReply:
        reply = await super().list(ctx, args)
        hidden = self.root.hidden
        if any(e.name == hidden for e in reply.entries) and await asyncio.to_thread(
            self.root.is_root, args.path
        ):
            reply.entries = [e for e in reply.entries if e.name != hidden]
        return reply
