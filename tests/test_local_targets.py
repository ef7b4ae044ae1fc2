"""Local ends of transfers (``virnet.transfer`` / ``virnet._localfile``) against an
in-process ``Daemon`` over a real Unix socket: downloads into private character devices,
FIFOs with real reader threads, symlinks (followed), dangling symlinks, directories,
listening Unix sockets and loop block devices; uploads from FIFOs, character devices,
block devices; the fsync/rename order of a commit; the progress and commit callbacks;
the command line's progress bar.  Both loops (root conftest), both cores."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import virnet
from _rpcutil import pattern, remove_tree, short_tmpdir, sock_uri
from virnet import transfer
from virnet.daemon.app import Daemon
from virnet.daemon.config import DaemonConfig
from virnet.errors import RPCError
from virnet.services import files as f
from virnet.transfer import LengthError, LocalFileError

MiB = 1024 * 1024
NO_SYNC = int(f.TransferFlags.NO_SYNC)


class Env:
    def __init__(self, daemon: Daemon, tmp: str, uri: str) -> None:
        self.daemon = daemon
        self.tmp = tmp
        self.root = daemon.root.path
        self.local = os.path.join(tmp, "local")  # the client's side
        self.uri = uri

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def loc(self, name: str) -> str:
        return os.path.join(self.local, name)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    tmp = short_tmpdir()
    os.mkdir(os.path.join(tmp, "local"))
    daemon = Daemon(DaemonConfig(listen=[sock_uri(tmp)], root=os.path.join(tmp, "root")))
    (uri,) = await daemon.start()
    try:
        yield Env(daemon, tmp, uri)
    finally:
        await daemon.stop()
        remove_tree(tmp)


# ----------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def leftovers(directory: str) -> list[str]:
    """Temporary files (client ``.part``, daemon ``.virnet-part``) left under ``directory``."""
    return [
        os.path.join(d, n) for d, _, names in os.walk(directory) for n in names
        if n.endswith(".part")
    ]


def null_device(directory: str, name: str = "null") -> str:
    """A private character device with the null driver's numbers (1, 3)."""
    path = os.path.join(directory, name)
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def zero_device(directory: str, name: str = "zero") -> str:
    """A private character device with the zero driver's numbers (1, 5)."""
    path = os.path.join(directory, name)
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    return path


def make_sparse(path: str, size: int, blocks: dict[int, bytes]) -> bytes:
    """A sparse file with ``blocks`` of data and holes elsewhere; its full contents."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, block in blocks.items():
            fh.seek(offset)
            fh.write(block)
    if os.stat(path).st_blocks * 512 >= size // 2:
        pytest.skip("the file system under /tmp does not keep files sparse")
    expected = bytearray(size)
    for offset, block in blocks.items():
        expected[offset : offset + len(block)] = block
    return bytes(expected)


class FifoReader(threading.Thread):
    """Opens a FIFO for reading (blocking, like any reader) and collects everything up
    to EOF, or only ``limit`` bytes and then closes it."""

    def __init__(self, path: str, limit: int | None = None) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.limit = limit
        self.data = bytearray()
        self.opened = threading.Event()

    def run(self) -> None:
        with open(self.path, "rb", buffering=0) as fh:
            self.opened.set()
            while self.limit is None or len(self.data) < self.limit:
                block = fh.read(MiB if self.limit is None else self.limit - len(self.data))
                if not block:
                    break
                self.data.extend(block)

    def finish(self) -> bytes:
        self.join(timeout=30)
        if self.is_alive():  # still waiting for a writer: let it go
            with contextlib.suppress(OSError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            self.join(timeout=5)
            raise AssertionError("the FIFO reader never finished")
        return bytes(self.data)


class FifoWriter(threading.Thread):
    """Opens a FIFO for writing (blocking until a reader comes), writes ``data`` and
    closes it."""

    def __init__(self, path: str, data: bytes) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.payload = data
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.path, "wb", buffering=0) as fh:
                view = memoryview(self.payload)
                while view:
                    view = view[fh.write(view[: 256 * 1024]) :]
        except BaseException as exc:  # a reader that went away
            self.error = exc

    def finish(self) -> None:
        self.join(timeout=30)
        if self.is_alive():  # still waiting for a reader: let it go
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
                while os.read(fd, MiB):
                    pass
                os.close(fd)
            self.join(timeout=5)
            raise AssertionError("the FIFO writer never finished")


class SocketCollector(threading.Thread):
    """A listening Unix stream socket; collects what its one client sends up to EOF."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.data = bytearray()

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        finally:
            self.listener.close()
        with conn:
            while block := conn.recv(MiB):
                self.data.extend(block)

    def finish(self) -> bytes:
        self.join(timeout=30)
        assert not self.is_alive(), "the socket's client never closed"
        return bytes(self.data)


class FsyncSpy:
    """Wraps ``os.fsync`` and ``os.replace`` (the real calls still happen) and records,
    in order, what was synced (the path of the descriptor) and what was renamed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, ...]] = []
        self.lock = threading.Lock()
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            try:
                what = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # pragma: no cover
                what = f"fd {fd}"
            with self.lock:
                self.events.append(("fsync", what))
            real_fsync(fd)

        def where(name: Any, dir_fd: int | None) -> str:
            # Relative to a directory descriptor (the daemon's confined renames): name
            # the directory it stands for.
            if dir_fd is None:
                return str(name)
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), str(name))

        def replace(src: Any, dst: Any, **kwargs: Any) -> None:
            with self.lock:
                self.events.append((
                    "replace",
                    where(src, kwargs.get("src_dir_fd")),
                    where(dst, kwargs.get("dst_dir_fd")),
                ))
            real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def mark(self, name: str) -> None:
        with self.lock:
            self.events.append((name,))

    def under(self, directory: str) -> list[tuple[str, ...]]:
        """The events about paths under ``directory`` (the in-process daemon's own calls
        are elsewhere), and the marks."""
        return [e for e in self.events if len(e) == 1 or e[1].startswith(directory)]


async def ping_while(task: asyncio.Task[Any], c: virnet.Client, seconds: float) -> None:
    """The event loop keeps serving while ``task`` waits: round trips succeed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        await asyncio.wait_for(c.ping(), 5)
        assert not task.done(), task
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- character devices


async def test_download_into_a_private_null_device(env: Env) -> None:
    data = pattern(3 * MiB + 7, 1)
    write(env.path("big.bin"), data)
    dev = null_device(env.local)
    rdev = os.stat(dev).st_rdev
    async with await virnet.connect(env.uri) as c:
        assert await transfer.download(c, "big.bin", dev) == len(data)
    st = os.lstat(dev)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev
    assert sorted(os.listdir(env.local)) == ["null"]


async def test_upload_from_a_private_zero_device_with_a_length(env: Env) -> None:
    zero = zero_device(env.local)
    # --length writes in place into an existing remote file (the protocol's rule)
    write(env.path("z.bin"), b"\xff" * (MiB + 10))
    async with await virnet.connect(env.uri) as c:
        assert await transfer.upload(c, zero, "z.bin", length=MiB) == MiB
        assert read(env.path("z.bin")) == bytes(MiB) + b"\xff" * 10
        # a missing remote file cannot be written in place: the daemon says so
        with pytest.raises(RPCError, match="No such file"):
            await transfer.upload(c, zero, "new.bin", length=MiB)
        assert c.protocol.streams == {}
    assert not os.path.exists(env.path("new.bin"))
    assert stat.S_ISCHR(os.lstat(zero).st_mode)


# ----------------------------------------------------------------------------- FIFOs


async def test_download_into_a_fifo_waits_for_its_reader(env: Env) -> None:
    data = pattern(5 * MiB + 3, 2)
    write(env.path("f.bin"), data)
    fifo = env.loc("fifo")
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    async with await virnet.connect(env.uri) as c:
        task = asyncio.ensure_future(transfer.download(c, "f.bin", fifo))
        # no reader yet: the download waits, the loop (keepalive, calls) does not
        await ping_while(task, c, 0.5)
        reader.start()
        assert await asyncio.wait_for(task, 30) == len(data)
    got = reader.finish()
    assert sha(got) == sha(data)  # every byte, in order, then EOF
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(env.local)) == ["fifo"]


async def test_fifo_reader_going_away_fails_the_download_cleanly(env: Env) -> None:
    write(env.path("f.bin"), pattern(8 * MiB, 3))
    fifo = env.loc("fifo")
    os.mkfifo(fifo)
    reader = FifoReader(fifo, limit=1000)
    reader.start()
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(LocalFileError) as info:
            await transfer.download(c, "f.bin", fifo)
        assert str(info.value) == f"{fifo}: Broken pipe"
        assert info.value.errno == errno.EPIPE
        assert c.protocol.streams == {}
        assert await c.ping() >= 0
    assert len(reader.finish()) == 1000
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


async def test_upload_from_a_fifo_waits_for_its_writer_and_sends_everything(
    env: Env,
) -> None:
    data = pattern(4 * MiB + 11, 4)
    fifo = env.loc("fifo")
    os.mkfifo(fifo)
    writer = FifoWriter(fifo, data)
    sizes: list[int] = []
    try:
        async with await virnet.connect(env.uri) as c:
            task = asyncio.ensure_future(
                transfer.upload(c, fifo, "up.bin", on_size=sizes.append)
            )
            await ping_while(task, c, 0.5)  # no writer yet: waiting, not at EOF
            writer.start()
            assert await asyncio.wait_for(task, 30) == len(data)
    finally:
        writer.finish()
    assert sha(read(env.path("up.bin"))) == sha(data)
    assert sizes == []  # a FIFO's size is not known beforehand
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


async def test_upload_from_a_fifo_writer_that_writes_nothing(env: Env) -> None:
    fifo = env.loc("fifo")
    os.mkfifo(fifo)
    writer = FifoWriter(fifo, b"")
    writer.start()
    try:
        async with await virnet.connect(env.uri) as c:
            assert await asyncio.wait_for(transfer.upload(c, fifo, "empty"), 30) == 0
    finally:
        writer.finish()
    assert read(env.path("empty")) == b""


async def test_upload_from_a_fifo_shorter_than_its_length_is_aborted(env: Env) -> None:
    old = b"o" * (3 * MiB)
    write(env.path("target"), old)
    fifo = env.loc("fifo")
    os.mkfifo(fifo)
    sent = pattern(100_000, 5)
    writer = FifoWriter(fifo, sent)
    writer.start()
    commits: list[int] = []
    try:
        async with await virnet.connect(env.uri) as c:
            with pytest.raises(LocalFileError) as info:
                await transfer.upload(
                    c, fifo, "target", length=2 * MiB, on_commit=lambda: commits.append(1)
                )
            assert str(info.value) == (
                f"{fifo}: the source ended after 100000 of the {2 * MiB} bytes asked for"
            )
            assert commits == []  # never finished: aborted
            assert c.protocol.streams == {}
            assert await c.ping() >= 0
    finally:
        writer.finish()
    # In place (the protocol's rule for a length): what arrived may be written, the
    # file is never extended or committed past it; here the file keeps its size and
    # everything past the bytes sent.
    after = read(env.path("target"))
    assert len(after) == len(old)
    assert after[len(sent) :] == old[len(sent) :]
    assert leftovers(env.root) == []


# ----------------------------------------------------------------------------- sparse


async def test_sparse_download_into_a_fifo_and_a_device_writes_zeros_for_holes(
    env: Env,
) -> None:
    blocks = {MiB: pattern(4096, 6), 3 * MiB + 100: pattern(10_000, 7)}
    expected = make_sparse(env.path("sparse.img"), 6 * MiB, blocks)  # trailing hole too
    fifo = env.loc("fifo")
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    reader.start()
    dev = null_device(env.local)
    async with await virnet.connect(env.uri) as c:
        assert await transfer.download(c, "sparse.img", fifo, sparse=True) == len(expected)
        assert await transfer.download(c, "sparse.img", dev, sparse=True) == len(expected)
    assert sha(reader.finish()) == sha(expected)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISCHR(os.lstat(dev).st_mode)


# ----------------------------------------------------------------------------- links, dirs


async def test_download_through_symlinks_replaces_the_file_they_lead_to(env: Env) -> None:
    data = pattern(2 * MiB + 1, 8)
    write(env.path("r.bin"), data)
    os.mkdir(env.loc("real"))
    target = env.loc("real/file")
    write(target, b"old")
    os.chmod(target, 0o640)
    os.chown(target, 1234, 5678)
    inode = os.stat(target).st_ino
    os.symlink("real/file", env.loc("hop"))  # a chain: link -> hop -> real/file
    os.symlink("hop", env.loc("link"))
    async with await virnet.connect(env.uri) as c:
        assert await transfer.download(c, "r.bin", env.loc("link")) == len(data)
    assert os.readlink(env.loc("link")) == "hop" and os.readlink(env.loc("hop")) == "real/file"
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode)
    assert sha(read(target)) == sha(data)
    assert st.st_ino != inode  # replaced, atomically
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert leftovers(env.local) == []


async def test_download_to_a_dangling_symlink_creates_its_file(env: Env) -> None:
    write(env.path("r.bin"), b"fresh")
    os.mkdir(env.loc("d"))
    os.symlink("d/missing", env.loc("dangling"))
    async with await virnet.connect(env.uri) as c:
        await transfer.download(c, "r.bin", env.loc("dangling"))
    assert os.readlink(env.loc("dangling")) == "d/missing"
    assert read(env.loc("d/missing")) == b"fresh"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(env.loc("d/missing")).st_mode) == 0o666 & ~umask


async def test_a_new_file_gets_the_umask_mode_without_touching_the_umask(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(env.path("r.bin"), b"new")
    real = os.umask
    calls: list[int] = []

    def umask(mask: int) -> int:  # setting it to read it races with other threads
        calls.append(mask)
        return real(mask)

    old = real(0o027)
    try:
        monkeypatch.setattr(os, "umask", umask)
        async with await virnet.connect(env.uri) as c:
            await transfer.download(c, "r.bin", env.loc("new"))
    finally:
        real(old)
    assert calls == []
    assert stat.S_IMODE(os.stat(env.loc("new")).st_mode) == 0o640
    assert read(env.loc("new")) == b"new"


async def test_download_into_a_directory_or_a_link_to_one(env: Env) -> None:
    write(env.path("r.bin"), b"named after the remote")
    os.mkdir(env.loc("dir"))
    os.symlink("dir", env.loc("dirlink"))
    async with await virnet.connect(env.uri) as c:
        await transfer.download(c, "r.bin", env.loc("dir"))
        assert read(env.loc("dir/r.bin")) == b"named after the remote"
        write(env.path("s.bin"), b"via the link")
        await transfer.download(c, "s.bin", env.loc("dirlink") + "/")
        # DIR/NAME is itself a FIFO: written in place like any FIFO
        os.mkfifo(env.loc("dir/t.bin"))
        reader = FifoReader(env.loc("dir/t.bin"))
        reader.start()
        write(env.path("t.bin"), b"into the fifo")
        await transfer.download(c, "t.bin", env.loc("dir"))
        assert reader.finish() == b"into the fifo"
        with pytest.raises(LocalFileError, match="not a directory"):
            await transfer.download(c, "r.bin", env.loc("nodir") + "/")
    assert read(env.loc("dir/s.bin")) == b"via the link"
    assert os.path.islink(env.loc("dirlink"))
    assert stat.S_ISFIFO(os.lstat(env.loc("dir/t.bin")).st_mode)
    assert not os.path.exists(env.loc("nodir"))


async def test_download_target_errors_name_the_local_path(env: Env) -> None:
    write(env.path("r.bin"), b"x")
    async with await virnet.connect(env.uri) as c:
        missing_dir = env.loc("no/such/file")
        with pytest.raises(LocalFileError) as info:
            await transfer.download(c, "r.bin", missing_dir)
        assert str(info.value) == (
            f"{missing_dir}: cannot create a file in {env.loc('no/such')}: "
            "No such file or directory"
        )
        os.symlink("loop", env.loc("loop"))
        with pytest.raises(LocalFileError, match="symbolic links"):
            await transfer.download(c, "r.bin", env.loc("loop"))
        assert c.protocol.streams == {}
    assert "[Errno" not in str(info.value)


# ----------------------------------------------------------------------------- sockets


async def test_download_into_a_listening_unix_socket(env: Env) -> None:
    data = pattern(3 * MiB + 5, 9)
    write(env.path("r.bin"), data)
    path = env.loc("collector.sock")
    collector = SocketCollector(path)
    collector.start()
    async with await virnet.connect(env.uri) as c:
        assert await transfer.download(c, "r.bin", path) == len(data)
    assert sha(collector.finish()) == sha(data)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


async def test_download_into_a_socket_nobody_listens_on(env: Env) -> None:
    write(env.path("r.bin"), b"x")
    path = env.loc("dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nothing listens
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(LocalFileError) as info:
            await transfer.download(c, "r.bin", path)
    assert str(info.value) == f"{path}: cannot connect: Connection refused"


# ----------------------------------------------------------------------------- sources


async def test_upload_sources_that_are_refused(env: Env) -> None:
    os.mkdir(env.loc("dir"))
    write(env.loc("small"), b"12345")
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(LocalFileError) as info:
            await transfer.upload(c, env.loc("dir"), "x")
        assert str(info.value) == f"{env.loc('dir')}: is a directory"
        with pytest.raises(LocalFileError) as info:
            await transfer.upload(c, env.loc("nothing"), "x")
        assert str(info.value) == f"{env.loc('nothing')}: No such file or directory"
        with pytest.raises(LengthError) as linfo:
            await transfer.upload(c, env.loc("small"), "x", length=6)
        assert isinstance(linfo.value, ValueError)
        assert str(linfo.value) == f"{env.loc('small')}: length 6 is larger than the file (5 bytes)"
        assert c.protocol.streams == {}
    assert os.listdir(env.root) == []


# ----------------------------------------------------------------------------- block devices


@pytest.fixture
def loop_device(env: Env) -> Iterator[str]:
    """A 2 MiB loop block device over a file of 0xAA bytes, detached afterwards."""
    losetup = shutil.which("losetup")
    if losetup is None:
        pytest.skip("losetup is not installed")
    backing = os.path.join(env.tmp, "backing.img")
    write(backing, b"\xaa" * (2 * MiB))
    res = subprocess.run(
        [losetup, "--find", "--show", backing], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run([losetup, "-d", dev], check=False)


def read_device(dev: str) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


async def test_block_device_too_small_fails_before_writing(env: Env, loop_device: str) -> None:
    write(env.path("big.img"), pattern(3 * MiB, 10))
    before = read_device(loop_device)
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(LocalFileError) as info:
            await transfer.download(c, "big.img", loop_device)
        assert str(info.value) == f"{loop_device}: device is 2.0 MiB, the download is 3.0 MiB"
        assert c.protocol.streams == {}
        # one byte too many: the sizes in bytes
        write(env.path("just.img"), b"\x01" * (2 * MiB + 1))
        with pytest.raises(LocalFileError, match=r"device is 2097152 bytes, the download is "
                                                 r"2097153 bytes"):
            await transfer.download(c, "just.img", loop_device)
    assert read_device(loop_device) == before


async def test_block_device_download_in_place_and_upload(
    env: Env, loop_device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(MiB + MiB // 2 + 3, 12)
    write(env.path("fits.img"), data)
    spy = FsyncSpy(monkeypatch)
    async with await virnet.connect(env.uri) as c:
        assert await transfer.download(
            c, "fits.img", loop_device, on_commit=lambda: spy.mark("commit")
        ) == len(data)
        synced = [e for e in spy.events if e[0] == "fsync"]
        # the device, once, after all data (dd conv=fsync); nothing renamed
        assert spy.events.index(("commit",)) < spy.events.index(("fsync", loop_device))
        assert synced == [("fsync", loop_device)]
        assert not [e for e in spy.events if e[0] == "replace"]
        content = read_device(loop_device)
        assert content == data + b"\xaa" * (2 * MiB - len(data))
        # as a source it has a size: all of the device
        sizes: list[int] = []
        assert await transfer.upload(c, loop_device, "dev.img", on_size=sizes.append) == 2 * MiB
        assert sizes == [2 * MiB]
    assert read(env.path("dev.img")) == content
    assert stat.S_ISBLK(os.lstat(loop_device).st_mode)


async def test_sparse_download_into_a_block_device_zeroes_the_holes(
    env: Env, loop_device: str
) -> None:
    blocks = {4096: pattern(4096, 13), MiB + 100: pattern(5000, 14)}
    expected = make_sparse(env.path("sparse.img"), 2 * MiB - 4096, blocks)
    async with await virnet.connect(env.uri) as c:
        await transfer.download(c, "sparse.img", loop_device, sparse=True)
    # the device's old 0xAA bytes do not show through the holes
    assert read_device(loop_device) == expected + b"\xaa" * 4096


# ----------------------------------------------------------------------------- durability


async def test_download_fsyncs_before_the_rename_and_the_directory_after(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(env.path("r.bin"), pattern(MiB, 15))
    target = env.loc("out.bin")
    write(target, b"old")
    spy = FsyncSpy(monkeypatch)
    async with await virnet.connect(env.uri) as c:
        await transfer.download(c, "r.bin", target, on_commit=lambda: spy.mark("commit"))
    events = spy.under(env.local)
    assert len(events) == 4, events
    commit, (op1, tmp), replace, (op3, directory) = events
    assert commit == ("commit",)
    assert op1 == "fsync" and os.path.dirname(tmp) == env.local and tmp != target
    assert os.path.basename(tmp).startswith(".out.bin.") and tmp.endswith(".part")
    assert replace == ("replace", tmp, target)  # the file synced is the one renamed
    assert (op3, directory) == ("fsync", env.local)
    assert read(target) == pattern(MiB, 15)


async def test_download_no_sync_skips_every_fsync(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(env.path("r.bin"), pattern(MiB, 16))
    fifo = env.loc("fifo")
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    reader.start()
    spy = FsyncSpy(monkeypatch)
    async with await virnet.connect(env.uri) as c:
        await transfer.download(c, "r.bin", env.loc("out.bin"), sync=False)
        await transfer.download(c, "r.bin", fifo, sync=False)
    assert reader.finish() == pattern(MiB, 16)
    assert [e[0] for e in spy.under(env.local)] == ["replace"]
    assert read(env.loc("out.bin")) == pattern(MiB, 16)


async def test_in_place_targets_ignore_an_unsupported_fsync(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(env.path("r.bin"), b"data")
    fifo = env.loc("fifo")
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    reader.start()
    dev = null_device(env.local)
    spy = FsyncSpy(monkeypatch)  # the real fsync: EINVAL on a FIFO and on this device
    async with await virnet.connect(env.uri) as c:
        await transfer.download(c, "r.bin", fifo)
        await transfer.download(c, "r.bin", dev)
    assert reader.finish() == b"data"
    assert [e[0] for e in spy.under(env.local)] == ["fsync", "fsync"]
    fd = os.open(dev, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            os.fsync(fd)  # the real call, unwrapped after the test: refused
    finally:
        os.close(fd)
    assert info.value.errno in (errno.EINVAL, errno.EROFS)


async def test_a_failing_fsync_fails_the_download_and_keeps_the_old_file(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(env.path("r.bin"), pattern(MiB, 17))
    target = env.loc("keep")
    write(target, b"old contents")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken_fsync)
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(LocalFileError) as info:
            await transfer.download(c, "r.bin", target)
    assert str(info.value) == f"{target}: Input/output error"
    assert read(target) == b"old contents"
    assert os.listdir(env.local) == ["keep"]


async def test_upload_no_sync_sets_the_flag(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    write(env.loc("src"), b"payload")
    async with await virnet.connect(env.uri) as c:
        flags: list[int] = []
        real_open = c.open_stream

        async def open_stream(proc: Any, args: Any, **kwargs: Any) -> Any:
            flags.append(args.flags)
            return await real_open(proc, args, **kwargs)

        monkeypatch.setattr(c, "open_stream", open_stream)
        await transfer.upload(c, env.loc("src"), "a")
        await transfer.upload(c, env.loc("src"), "b", sync=False)
        await transfer.upload(c, env.loc("src"), "c", sync=False, sparse=True)
    assert [fl & NO_SYNC for fl in flags] == [0, NO_SYNC, NO_SYNC]
    assert flags[2] & int(f.TransferFlags.SPARSE)
    assert read(env.path("b")) == read(env.path("c")) == b"payload"


# ----------------------------------------------------------------------------- progress


async def test_download_progress_then_commit_then_rename(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(3 * MiB + 1, 18)
    write(env.path("r.bin"), data)
    spy = FsyncSpy(monkeypatch)
    seen: list[int] = []
    async with await virnet.connect(env.uri) as c:
        await transfer.download(
            c, "r.bin", env.loc("out"), progress=seen.append,
            on_size=lambda n: spy.mark(f"size {n}"),
            on_commit=lambda: spy.mark(f"commit {seen[-1]}"),
        )
    marks = [e[0] for e in spy.under(env.local)]
    assert marks[0] == f"size {len(data)}"
    assert marks[1] == f"commit {len(data)}"  # every byte counted before the commit
    assert marks[2:] == ["fsync", "replace", "fsync"]
    assert seen == sorted(seen) and seen[-1] == len(data)


async def test_upload_progress_then_commit_then_the_daemons_rename(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(2 * MiB + 9, 19)
    write(env.loc("src"), data)
    spy = FsyncSpy(monkeypatch)  # sees the in-process daemon's rename too
    seen: list[int] = []
    async with await virnet.connect(env.uri) as c:
        done = await transfer.upload(
            c, env.loc("src"), "up", progress=seen.append,
            on_size=lambda n: spy.mark(f"size {n}"),
            on_commit=lambda: spy.mark(f"commit {seen[-1]}"),
        )
        spy.mark("returned")
    assert done == len(data)
    events = [e for e in spy.under(env.root) if e[0] != "fsync"]
    assert [e[0] for e in events] == [f"size {len(data)}", f"commit {len(data)}", "replace",
                                      "returned"]
    assert events[2][2] == env.path("up")


def test_progress_bar_commit_state_and_final_rate() -> None:
    from rich.console import Console

    from virnet._progressbar import ProgressBar, format_rate

    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False, color_system=None)
    with ProgressBar("upload x", console=console) as bar:
        bar.update(MiB)  # total unknown (a pipe)
        bar.committing()
        assert "committing upload x ..." in out.getvalue()
        bar.finish(3 * MiB, 0.5)
    text = out.getvalue()
    final = text.splitlines()[-1]
    assert final.startswith("upload x ")  # the description is back
    assert "3.0/3.0 MiB" in final
    assert " 6.0 MiB/s " in final
    assert format_rate(3 * MiB / 0.5) == "6.0 MiB/s"  # what the summary line prints (IEC)


def test_progress_bar_on_a_terminal_shows_the_commit_at_once() -> None:
    from rich.console import Console

    from virnet._progressbar import ProgressBar

    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system=None)
    with ProgressBar("download x", console=console) as bar:
        bar.total(10)
        bar.update(10)
        bar.committing()
        # redrawn in place (no extra line), without waiting for the next refresh
        assert "committing download x" in out.getvalue()
        assert "committing download x ..." not in out.getvalue()
        bar.finish(10, 1.0)
