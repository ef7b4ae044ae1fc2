"""Confinement of FILES paths to virnetd's data root, against a real daemon over a real
Unix socket, on both ways of resolving a path (``openat2(RESOLVE_BENEATH)`` and the
descriptor walk that replaces it on kernels without it).

The centre piece is an attack: a thread swaps ``root/sw`` between a real directory and
symlinks to a directory outside the root (absolute and ``../``) as fast as it can while
clients run every FILES operation through ``sw``.  Nothing outside may be read, listed,
written, created or removed, and every failure must be a clean error reply.  The static
cases (symlink rules, what each operation does with a final symlink) run on both
resolvers too."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import hashlib
import logging
import os
import stat
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import virnet
from _rpcutil import remove_tree, short_tmpdir, sock_uri
from virnet.daemon import confine
from virnet.daemon import paths as daemon_paths
from virnet.daemon.app import Daemon
from virnet.daemon.config import DaemonConfig
from virnet.errors import ConnectionClosedError, ErrorCode, RPCError
from virnet.services import files as f

RESOLVERS = ["openat2", "walk"]

OUT_SECRET = b"the outside secret\n" * 700
OUT_VICTIM = b"outside victim, must stay as it is\n" * 300
IN_SECRET = b"inside secret\n" * 3
IN_VICTIM = b"inside victim\n" * 5
#: Names only the outside directory has: a listing showing one listed outside.
OUTSIDE_ONLY = {"only-outside", "emptydir"}
#: Files ``x0``... in both directories, for DELETE to remove one by one.
DELETABLE = 600


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def snapshot(top: str) -> dict[str, tuple[Any, ...]]:
    """Everything observable about a tree: names, types, modes, sizes, inodes, mtimes and
    the files' content."""
    out: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            digest = (
                hashlib.sha256(read(path)).hexdigest() if stat.S_ISREG(st.st_mode) else None
            )
            out[os.path.relpath(path, top)] = (
                st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns, st.st_nlink, digest
            )
    st = os.lstat(top)
    out["."] = (st.st_mode, st.st_ino, st.st_mtime_ns, st.st_nlink)
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class DaemonLog(logging.Handler):
    """Every record the daemon's ``virnet`` loggers emit."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def problems(self) -> list[str]:
        return [
            self.format(r)
            for r in self.records
            if r.exc_info or r.levelno >= logging.ERROR or "internal error" in r.getMessage()
        ]


@pytest.fixture
def daemon_log() -> Any:
    handler = DaemonLog()
    logger = logging.getLogger("virnet")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class Env:
    def __init__(self, daemon: Daemon, tmp: str, uri: str) -> None:
        self.daemon = daemon
        self.tmp = tmp
        self.root = daemon.root.path
        self.outside = os.path.join(tmp, "outside")
        self.uri = uri

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)


def use_resolver(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make the next ``Root`` resolve with ``name`` (the walk as if the kernel had no
    openat2)."""
    if name == "walk":
        monkeypatch.setattr(confine, "openat2_supported", lambda: False)
    elif not confine.openat2_supported():
        pytest.skip("this kernel has no openat2(2)")


@pytest.fixture(params=RESOLVERS)
async def env(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Env]:
    use_resolver(monkeypatch, request.param)
    tmp = short_tmpdir()
    outside = os.path.join(tmp, "outside")
    os.mkdir(outside)
    write(os.path.join(outside, "secret"), OUT_SECRET)
    write(os.path.join(outside, "victim"), OUT_VICTIM)
    write(os.path.join(outside, "only-outside"), b"only outside\n")
    os.mkdir(os.path.join(outside, "emptydir"))
    daemon = Daemon(DaemonConfig(listen=[sock_uri(tmp)], root=os.path.join(tmp, "root")))
    assert daemon.root.resolver == request.param
    os.mkdir(daemon.root.path + "/inner")
    (uri,) = await daemon.start()
    try:
        yield Env(daemon, tmp, uri)
    finally:
        await daemon.stop()
        remove_tree(tmp)


# ----------------------------------------------------------------------------- the race

RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


class Swapper(threading.Thread):
    """Swaps ``root/sw`` between a real directory and a symlink to ``outside/`` (absolute
    and relative by turns) with ``renameat2(RENAME_EXCHANGE)``: atomic, so ``sw`` always
    exists, and nothing but these three names ever changes."""

    def __init__(self, root: str, outside: str) -> None:
        super().__init__(name="swapper", daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.swaps = 0
        self.error: BaseException | None = None
        os.mkdir(os.path.join(root, "sw"))
        write(os.path.join(root, "sw", "secret"), IN_SECRET)
        write(os.path.join(root, "sw", "victim"), IN_VICTIM)
        for i in range(DELETABLE):
            write(os.path.join(root, "sw", f"x{i}"), b"inside x\n")
            write(os.path.join(outside, f"x{i}"), b"outside x\n")
        os.symlink(outside, os.path.join(root, ".alt-abs"))
        os.symlink(os.path.relpath(outside, root), os.path.join(root, ".alt-rel"))

    def _exchange(self, dirfd: int, a: bytes, b: bytes) -> None:
        if _libc.renameat2(dirfd, a, dirfd, b, RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def run(self) -> None:
        dirfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY)
        try:
            while not self.stop.is_set():
                for alt in (b".alt-abs", b".alt-rel"):
                    self._exchange(dirfd, b"sw", alt)  # sw is the link...
                    self._exchange(dirfd, b"sw", alt)  # ...and the directory again
                    self.swaps += 2
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            os.close(dirfd)

    def __enter__(self) -> Swapper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(5)
        assert not self.is_alive(), "the swapper did not stop"


class Tally:
    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.bad: list[str] = []  # anything but a clean error reply
        self.leaks: list[str] = []  # outside content seen by a client


async def run_for(
    seconds: float, tally: Tally, op: str, call: Callable[[], Awaitable[None]]
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        try:
            await call()
        except ConnectionClosedError as exc:
            tally.bad.append(f"{op}: connection lost: {exc}")
            return
        except RPCError as exc:
            tally.failed[op] += 1
            if exc.code == ErrorCode.INTERNAL_ERROR or "internal error" in str(exc).lower():
                tally.bad.append(f"{op}: {exc}")
        except Exception as exc:
            tally.bad.append(f"{op}: {type(exc).__name__}: {exc}")
        else:
            tally.ok[op] += 1


async def test_swapping_a_directory_for_a_symlink_never_escapes(
    env: Env, daemon_log: DaemonLog
) -> None:
    swapper = Swapper(env.root, env.outside)
    before = snapshot(env.outside)
    out_digest = hashlib.sha256(OUT_SECRET).digest()
    tally = Tally()
    seconds = 2.5

    async def stat(c: virnet.Client) -> None:
        st = await c.call(f.STAT, f.PathArgs("sw/secret"))
        if st.size == len(OUT_SECRET):
            tally.leaks.append("STAT saw the outside secret's size")

    async def listing(c: virnet.Client) -> None:
        names = {e.name for e in (await c.call(f.LIST, f.PathArgs("sw"))).entries}
        if names & OUTSIDE_ONLY:
            tally.leaks.append(f"LIST listed the outside directory: {sorted(names)}")

    async def checksum(c: virnet.Client) -> None:
        digest = (await c.call(f.CHECKSUM, f.ChecksumArgs("sw/secret", "sha256"))).digest
        if digest == out_digest:
            tally.leaks.append("CHECKSUM of the outside secret")
        elif digest != hashlib.sha256(IN_SECRET).digest():
            tally.leaks.append("CHECKSUM of something else")

    async def download(c: virnet.Client) -> None:
        st = await c.open_stream(f.DOWNLOAD, f.TransferArgs("sw/secret", 0, 0, 0))
        buf = bytearray()
        await st.recv_all(buf.extend)
        await st.finish()
        if bytes(buf) != IN_SECRET:
            tally.leaks.append(f"DOWNLOAD got {bytes(buf[:40])!r}...")

    async def upload(c: virnet.Client, offset: int) -> None:
        st = await c.open_stream(f.UPLOAD, f.TransferArgs("sw/victim", offset, 0, 0))
        await st.send(b"WRITTEN THROUGH sw" if offset else IN_VICTIM)
        await st.finish()

    async def delete(c: virnet.Client) -> None:
        await c.call(f.DELETE, f.PathArgs(f"sw/x{tally.ok['DELETE'] % DELETABLE}"))

    async def mkdir(c: virnet.Client) -> None:
        await c.call(f.MKDIR, f.PathArgs(f"sw/d{tally.ok['MKDIR']}"))

    ops: dict[str, Callable[[virnet.Client], Awaitable[None]]] = {
        "STAT": stat,
        "LIST": listing,
        "CHECKSUM": checksum,
        "DOWNLOAD": download,
        "UPLOAD in place": lambda c: upload(c, 1),
        "UPLOAD whole": lambda c: upload(c, 0),
        "DELETE": delete,
        "MKDIR": mkdir,
    }
    clients = [await virnet.connect(env.uri) for _ in ops]
    fds = open_fds()
    try:
        with swapper:
            await asyncio.gather(
                *(
                    run_for(seconds, tally, name, functools.partial(op, c))
                    for (name, op), c in zip(ops.items(), clients, strict=True)
                )
            )
        assert swapper.error is None, swapper.error
        # Give the daemon's clean-up (temporary files...) a moment to finish.
        await asyncio.sleep(0.2)
        leaked_fds = open_fds() - fds
    finally:
        for c in clients:
            await c.close()
    summary = {op: (tally.ok[op], tally.failed[op]) for op in ops}
    print(f"swaps: {swapper.swaps}; (ok, failed) per operation: {summary}")
    assert tally.leaks == [], tally.leaks[:5]
    assert snapshot(env.outside) == before
    assert tally.bad == [], tally.bad[:5]
    assert daemon_log.problems() == [], daemon_log.problems()[:3]
    # The calls really raced: each operation both got through and was refused.
    for op in ops:
        assert tally.ok[op] > 0 and tally.failed[op] > 0, (op, summary)
    assert swapper.swaps > 1000
    assert leaked_fds <= 0, f"{leaked_fds} descriptors more than before"
    # Nothing the daemon made is left over, and it still serves.
    leftovers = [n for n in os.listdir(env.path("sw")) if n.endswith(".virnet-part")]
    assert leftovers == []
    async with await virnet.connect(env.uri) as c:
        assert (await c.call(f.STAT, f.PathArgs("sw/secret"))).size == len(IN_SECRET)
        assert read(env.path("sw/victim"))[:1] in (b"i", b"W")


# ----------------------------------------------------------------------------- the rules


async def call_error(call: Awaitable[Any]) -> RPCError:
    with pytest.raises(RPCError) as info:
        await call
    return info.value


async def download(c: virnet.Client, path: str) -> bytes:
    st = await c.open_stream(f.DOWNLOAD, f.TransferArgs(path, 0, 0, 0))
    buf = bytearray()
    await st.recv_all(buf.extend)
    await st.finish()
    return bytes(buf)


async def upload(c: virnet.Client, path: str, data: bytes, offset: int = 0) -> None:
    st = await c.open_stream(f.UPLOAD, f.TransferArgs(path, offset, 0, 0))
    await st.send(data)
    await st.finish()


def chain(root: str, prefix: str, n: int, end: str) -> str:
    """``n`` symlinks ``prefix0`` -> ``prefix1`` -> ... -> ``end``; the first one's name."""
    for i in range(n):
        os.symlink(f"{prefix}{i + 1}" if i + 1 < n else end, os.path.join(root, f"{prefix}{i}"))
    return f"{prefix}0"


async def test_symlinks_are_followed_only_relative_and_beneath_the_root(env: Env) -> None:
    """The same rule on both resolvers: relative links are followed while they stay
    inside the root (``..`` within it included), absolute ones never (even to a place
    inside), and every refusal or failure is an error reply of the right kind."""
    root = env.root
    os.mkdir(env.path("real"))
    write(env.path("real/file"), b"real file\n")
    os.symlink("real", env.path("rel"))  # a directory, relative: followed
    os.symlink("../real/file", env.path("inner/back"))  # climbs, stays inside
    os.symlink("real/..", env.path("top"))  # the root itself
    os.symlink(".", env.path("real/self"))
    os.symlink(os.path.join(root, "real"), env.path("abs-in"))  # absolute, inside
    os.symlink("../outside", env.path("up"))  # climbs out of the root
    os.symlink("../../outside/secret", env.path("inner/deep"))
    os.symlink("loop-b", env.path("loop-a"))
    os.symlink("loop-a", env.path("loop-b"))
    os.symlink("nowhere", env.path("dangling"))
    forty = chain(root, "c", 40, "real/file")  # the kernel's limit: still followed
    forty_one = chain(root, "d", 41, "real/file")  # one too many
    before = snapshot(env.outside)
    async with await virnet.connect(env.uri) as c:
        # followed
        assert (await c.call(f.STAT, f.PathArgs("rel/file"))).size == 10
        assert await download(c, "inner/back") == b"real file\n"
        assert await download(c, forty) == b"real file\n"
        listing = {e.name for e in (await c.call(f.LIST, f.PathArgs("top"))).entries}
        assert {"real", "inner", "rel"} <= listing
        listing = {e.name for e in (await c.call(f.LIST, f.PathArgs("real/self/self"))).entries}
        assert listing == {"file", "self"}
        digest = (await c.call(f.CHECKSUM, f.ChecksumArgs("rel/self/file", "sha256"))).digest
        assert digest == hashlib.sha256(b"real file\n").digest()
        await upload(c, "rel/new", b"new\n")  # the parent through a link
        await c.call(f.MKDIR, f.PathArgs("rel/newdir"))
        await upload(c, "inner/back", b"EAL", offset=1)  # in place, through the link
        assert read(env.path("real/file")) == b"rEAL file\n"
        # refused: absolute, or out of the root
        for path in ("abs-in/file", "up/secret", "inner/deep", "up", "abs-in"):
            for call in (
                c.call(f.STAT, f.PathArgs(path)),
                c.call(f.LIST, f.PathArgs(path)),
                c.call(f.CHECKSUM, f.ChecksumArgs(path, "sha256")),
                download(c, path),
                upload(c, path, b"x", offset=1),
                upload(c, f"{path}/new", b"x"),
                c.call(f.MKDIR, f.PathArgs(f"{path}/newdir")),
                c.call(f.DELETE, f.PathArgs(f"{path}/secret")),
            ):
                err = await call_error(call)
                assert err.code == ErrorCode.INVALID_ARG, (path, err)
                assert "outside the data root" in str(err), err
        # failures of the file system: SYSTEM_ERROR with the errno
        for path, code in (
            ("loop-a", errno.ELOOP),
            (forty_one, errno.ELOOP),
            ("dangling", errno.ENOENT),
            ("real/file/x", errno.ENOTDIR),
            ("missing/x", errno.ENOENT),
        ):
            for call in (
                c.call(f.STAT, f.PathArgs(path)),
                download(c, path),
                upload(c, path, b"x", offset=1),
            ):
                err = await call_error(call)
                assert (err.code, err.int1) == (ErrorCode.SYSTEM_ERROR, code), (path, err)
        # the name itself: replaced, removed, never followed
        await upload(c, "dangling", b"was a dangling link\n")
        await c.call(f.DELETE, f.PathArgs("up"))
        await c.call(f.DELETE, f.PathArgs("rel"))
        err = await call_error(c.call(f.MKDIR, f.PathArgs("abs-in")))
        assert err.int1 == errno.EEXIST
        for call in (c.call(f.DELETE, f.PathArgs("")), c.call(f.MKDIR, f.PathArgs("."))):
            err = await call_error(call)
            assert err.code == ErrorCode.INVALID_ARG and "data root" in str(err)
    assert read(env.path("real/new")) == b"new\n"
    assert os.path.isdir(env.path("real/newdir"))
    assert not os.path.islink(env.path("dangling"))
    assert not os.path.lexists(env.path("up")) and not os.path.lexists(env.path("rel"))
    assert os.path.isdir(env.path("real"))
    assert snapshot(env.outside) == before


async def test_whole_file_upload_syncs_its_directory(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit renames within the directory descriptor held since setup and then
    fsyncs that directory (``commit(sync=False)`` does not)."""
    os.mkdir(env.path("sub"))
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    sub = os.stat(env.path("sub"))
    async with await virnet.connect(env.uri) as c:
        await upload(c, "sub/f", b"data")
    assert synced == [(sub.st_dev, sub.st_ino)]
    synced.clear()
    rep = env.daemon.root.replacement("sub/g", exclusive=True)
    try:
        os.write(rep.fd, b"g")
        rep.commit(True, sync=False)
    finally:
        rep.release()
    assert synced == []
    assert read(env.path("sub/g")) == b"g"
    assert [n for n in os.listdir(env.path("sub")) if n.endswith(".virnet-part")] == []


async def test_a_client_vanishing_during_setup_releases_the_directory(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-file upload holds its directory's descriptor from setup to the end; if the
    client vanishes while the setup still runs, the clean-up closes it too."""
    os.mkdir(env.path("sub"))
    entered, release = threading.Event(), threading.Event()
    real_create_temp = daemon_paths.create_temp

    def slow_create_temp(parent: int, name: str) -> tuple[int, str]:
        made = real_create_temp(parent, name)
        entered.set()
        release.wait(10)
        return made

    def holding_sub() -> list[str]:
        sub = env.path("sub")
        held = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(sub):
                    held.append(fd)
        return held

    monkeypatch.setattr(daemon_paths, "create_temp", slow_create_temp)
    c = await virnet.connect(env.uri)
    try:
        opening = asyncio.ensure_future(
            c.open_stream(f.UPLOAD, f.TransferArgs("sub/f", 0, 0, 0))
        )
        assert await asyncio.to_thread(entered.wait, 10)
        assert len(holding_sub()) == 2  # the directory and the temporary file
        assert c.protocol.transport is not None
        c.protocol.transport.abort()
        with pytest.raises(ConnectionClosedError):
            await opening
        release.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while holding_sub() or os.listdir(env.path("sub")):
            assert loop.time() < deadline, (holding_sub(), os.listdir(env.path("sub")))
            await asyncio.sleep(0.01)
    finally:
        release.set()
        await c.close()


def test_openat2_that_keeps_racing_falls_back_to_the_walk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """openat2 fails with EAGAIN when a rename races with a "..": after a few retries the
    walk resolves the path (the same rule, no retries needed)."""
    os.mkdir(tmp_path / "a")
    write(str(tmp_path / "a" / "f"), b"f")
    os.symlink("../a/f", tmp_path / "a" / "link")
    calls = []

    def eagain(dirfd: int, path: str, flags: int) -> int:
        calls.append(path)
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(confine, "_openat2", eagain)
    top = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = confine.open_beneath_openat2(top, ["a", "link"], os.O_RDONLY, follow=True)
        try:
            assert os.read(fd, 10) == b"f"
        finally:
            os.close(fd)
        with pytest.raises(confine.Escape):
            confine.open_beneath_openat2(top, ["a", "..", ".."], os.O_PATH, follow=True)
    finally:
        os.close(top)
    assert len(calls) == 2 * confine._OPENAT2_RETRIES
