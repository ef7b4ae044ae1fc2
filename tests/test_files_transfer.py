"""FILES UPLOAD and DOWNLOAD (docs/protocol.md) against an in-process ``Daemon`` over a real
Unix socket: whole-file atomic replace, in-place writes with exact lengths, EXCLUSIVE,
downloads with offset/length, sparse transfers both ways, path confinement, read-only
listeners, and the client helpers of ``virnet.transfer``.  Every transfer is checked byte
for byte (sha256) together with what is left on disk: the old file, and no temporary
files.  Both loops (root conftest), both cores (ci/test.sh / VIRNET_NO_EXTENSIONS)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import virnet
from _rpcutil import pattern, remove_tree, short_tmpdir, sock_uri
from virnet import _impl, protocol, transfer, xdr
from virnet.daemon import paths as daemon_paths
from virnet.daemon.app import Daemon
from virnet.daemon.config import DaemonConfig
from virnet.errors import ConnectionClosedError, ErrorCode, RPCError, StreamError
from virnet.services import files as f
from virnet.stream import Hole, StreamState

MiB = 1024 * 1024
SPARSE = int(f.TransferFlags.SPARSE)
EXCLUSIVE = int(f.TransferFlags.EXCLUSIVE)


class Env:
    def __init__(self, daemon: Daemon, tmp: str, uri: str, ro_uri: str) -> None:
        self.daemon = daemon
        self.tmp = tmp
        self.root = daemon.root.path
        self.outside = os.path.join(tmp, "outside")  # beside the root, never served
        self.local = os.path.join(tmp, "local")  # the client's side of the world
        self.uri = uri
        self.ro_uri = ro_uri

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    tmp = short_tmpdir()
    os.mkdir(os.path.join(tmp, "outside"))
    os.mkdir(os.path.join(tmp, "local"))
    daemon = Daemon(
        DaemonConfig(
            listen=[sock_uri(tmp)],
            listen_readonly=[sock_uri(tmp, "ro.sock")],
            root=os.path.join(tmp, "root"),
        )
    )
    uri, ro_uri = await daemon.start()
    try:
        yield Env(daemon, tmp, uri, ro_uri)
    finally:
        await daemon.stop()
        remove_tree(tmp)


# ----------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(MiB):
            h.update(block)
    return h.hexdigest()


def write(path: str, data: bytes, mode: int | None = None) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
    if mode is not None:
        os.chmod(path, mode)


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def open_files() -> set[str]:
    """What this process's descriptors point at (a deleted file reads "NAME (deleted)")."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)"))
        except OSError:  # closed meanwhile (the listing's own descriptor)
            pass
    return out


def upload_temps(directory: str) -> list[str]:
    """The daemon's temporary files (``.NAME.*.virnet-part``) left in ``directory``."""
    return sorted(n for n in os.listdir(directory) if n.endswith(".virnet-part"))


def all_upload_temps(root: str) -> list[str]:
    return [
        os.path.join(d, n)
        for d, _, names in os.walk(root)
        for n in names
        if n.endswith(".virnet-part")
    ]


def local_temps(directory: str) -> list[str]:
    """The client's temporary download files (``.NAME.*.part``) left in ``directory``."""
    return sorted(n for n in os.listdir(directory) if n.endswith(".part"))


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` (the daemon cleans up asynchronously after a disconnect)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        await asyncio.sleep(0.01)


async def upload(
    c: virnet.Client,
    path: str,
    data: bytes,
    *,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
) -> None:
    st = await c.open_stream(
        f.UPLOAD, f.TransferArgs(path, offset, length, flags), sparse=bool(flags & SPARSE)
    )
    assert st.reply is None
    await st.send(data)
    await st.finish()
    assert st.state is StreamState.FINISHED


async def download(
    c: virnet.Client, path: str, *, offset: int = 0, length: int = 0
) -> tuple[int, bytes]:
    st = await c.open_stream(f.DOWNLOAD, f.TransferArgs(path, offset, length, 0))
    buf = bytearray()
    await st.recv_all(buf.extend)
    await st.finish()
    return st.reply.size, bytes(buf)


async def assert_call_error(
    c: virnet.Client, proc: virnet.Procedure[Any, Any], args: f.TransferArgs, *needles: str
) -> RPCError:
    """The call fails with a plain error reply: no stream is left on the client."""
    with pytest.raises(RPCError) as info:
        await c.open_stream(proc, args, sparse=bool(args.flags & SPARSE))
    assert not isinstance(info.value, StreamError), info.value
    for needle in needles:
        assert needle.lower() in str(info.value).lower(), info.value
    assert c.protocol.streams == {}
    await assert_alive(c)
    return info.value


async def assert_alive(c: virnet.Client) -> None:
    """The connection still serves calls."""
    st = await c.call(f.STAT, f.PathArgs(""))
    assert st.kind == f.Kind.DIRECTORY


# ----------------------------------------------------------------------------- upload


async def test_upload_creates_a_file(env: Env) -> None:
    data = pattern(300_000, 1)
    async with await virnet.connect(env.uri) as c:
        await upload(c, "new.bin", data)
    st = os.lstat(env.path("new.bin"))
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert file_sha(env.path("new.bin")) == sha(data)
    assert upload_temps(env.root) == []


async def test_reupload_replaces_atomically_and_keeps_the_mode(env: Env) -> None:
    target = env.path("f.bin")
    old = pattern(2 * MiB, 2)
    write(target, old, mode=0o640)
    old_inode = os.stat(target).st_ino
    new = pattern(3 * MiB + 11, 3)
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(f.UPLOAD, f.TransferArgs("f.bin", 0, 0, 0))
        # Mid-transfer, the data goes to a temporary file beside the target...
        await st.send(new[: 2 * MiB])
        await eventually(lambda: len(upload_temps(env.root)) == 1)
        (temp,) = upload_temps(env.root)
        assert temp.startswith(".f.bin.")
        await eventually(lambda: os.path.getsize(env.path(temp)) >= MiB)
        # ...and the old file is untouched until the finish.
        assert file_sha(target) == sha(old)
        assert os.stat(target).st_ino == old_inode
        await st.send(new[2 * MiB :])
        await st.finish()
    assert file_sha(target) == sha(new)
    after = os.stat(target)
    assert after.st_ino != old_inode  # renamed over, not rewritten in place
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert upload_temps(env.root) == []


async def test_multi_mib_upload_round_trip(env: Env) -> None:
    data = os.urandom(9 * MiB + 123)
    async with await virnet.connect(env.uri) as c:
        await upload(c, "big.bin", data)
        assert file_sha(env.path("big.bin")) == sha(data)
        size, back = await download(c, "big.bin")
    assert size == len(data)
    assert sha(back) == sha(data)
    assert upload_temps(env.root) == []


async def test_empty_upload(env: Env) -> None:
    write(env.path("was-full"), b"x" * 5000)
    async with await virnet.connect(env.uri) as c:
        await upload(c, "empty", b"")
        await upload(c, "was-full", b"")
        assert await download(c, "empty") == (0, b"")
    assert os.path.getsize(env.path("empty")) == 0
    assert os.path.getsize(env.path("was-full")) == 0
    assert upload_temps(env.root) == []


async def test_upload_into_a_missing_directory_fails_cleanly(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        err = await assert_call_error(
            c, f.UPLOAD, f.TransferArgs("no/such/dir/f", 0, 0, 0), "no such file"
        )
        assert err.code == ErrorCode.SYSTEM_ERROR
        assert err.int1 == errno.ENOENT
    assert not os.path.exists(env.path("no"))
    assert all_upload_temps(env.root) == []


async def test_upload_over_a_directory_or_the_root_is_refused(env: Env) -> None:
    os.mkdir(env.path("dir"))
    async with await virnet.connect(env.uri) as c:
        await assert_call_error(c, f.UPLOAD, f.TransferArgs("dir", 0, 0, 0), "directory")
        await assert_call_error(c, f.UPLOAD, f.TransferArgs("", 0, 0, 0), "root")
        await assert_call_error(c, f.UPLOAD, f.TransferArgs(".", 0, 0, 0), "root")
        await assert_call_error(c, f.UPLOAD, f.TransferArgs("x", 0, 0, 0x80), "flags")
    assert os.path.isdir(env.path("dir"))
    assert all_upload_temps(env.root) == []


# ----------------------------------------------------------------------------- atomicity


async def test_aborted_upload_leaves_the_old_file(env: Env) -> None:
    target = env.path("keep.bin")
    old = pattern(MiB, 4)
    write(target, old, mode=0o600)
    before = os.stat(target)
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(f.UPLOAD, f.TransferArgs("keep.bin", 0, 0, 0))
        assert len(upload_temps(env.root)) == 1  # created before the reply
        await st.send(pattern(3 * MiB, 5))
        await st.abort("changed my mind")
        assert st.state is StreamState.ABORTED
        await eventually(lambda: upload_temps(env.root) == [])
        await assert_alive(c)
    assert file_sha(target) == sha(old)
    after = os.stat(target)
    assert (after.st_ino, after.st_mtime_ns, stat.S_IMODE(after.st_mode)) == (
        before.st_ino,
        before.st_mtime_ns,
        0o600,
    )


async def test_connection_killed_mid_upload_leaves_the_old_file(env: Env) -> None:
    target = env.path("keep.bin")
    old = pattern(MiB, 6)
    write(target, old)
    before = os.stat(target)
    c = await virnet.connect(env.uri)
    try:
        st = await c.open_stream(f.UPLOAD, f.TransferArgs("keep.bin", 0, 0, 0))
        await st.send(pattern(3 * MiB, 7))
        (temp,) = upload_temps(env.root)
        # let the daemon write some of it, then vanish without abort or finish
        await eventually(lambda: os.path.getsize(env.path(temp)) > 0)
        assert c.protocol.transport is not None
        c.protocol.transport.abort()
        await eventually(lambda: upload_temps(env.root) == [])
    finally:
        await c.close()
    assert file_sha(target) == sha(old)
    assert os.stat(target).st_ino == before.st_ino
    assert os.stat(target).st_mtime_ns == before.st_mtime_ns
    # and the daemon serves new clients
    async with await virnet.connect(env.uri) as c2:
        assert await download(c2, "keep.bin") == (len(old), old)


async def test_client_vanishing_while_the_upload_is_set_up_leaves_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon resolves the path and creates its temporary file in a worker thread
    (the file system may be slow, the loop must not wait).  A client that disconnects
    meanwhile cancels the handler; once the thread finishes, its temporary file is
    removed and its descriptor closed: nothing is left behind."""
    target = env.path("keep.bin")
    old = pattern(MiB, 8)
    write(target, old)
    entered, release = threading.Event(), threading.Event()
    made: list[tuple[int, str]] = []
    real_create_temp = daemon_paths.create_temp

    def slow_create_temp(parent: int, name: str) -> tuple[int, str]:
        fd, tmp = real_create_temp(parent, name)
        made.append((fd, env.path(tmp)))
        entered.set()
        release.wait(10)  # a slow file system
        return fd, tmp

    monkeypatch.setattr(daemon_paths, "create_temp", slow_create_temp)
    c = await virnet.connect(env.uri)
    try:
        opening = asyncio.ensure_future(
            c.open_stream(f.UPLOAD, f.TransferArgs("keep.bin", 0, 0, 0))
        )
        assert await asyncio.to_thread(entered.wait, 10)
        assert upload_temps(env.root)  # created, the handler waiting on its thread
        assert c.protocol.transport is not None
        c.protocol.transport.abort()
        with pytest.raises(ConnectionClosedError):
            await opening
        # the loop was never blocked: the daemon still answers others meanwhile
        async with await virnet.connect(env.uri) as c2:
            assert (await c2.call(f.STAT, f.PathArgs("keep.bin"))).size == MiB
        release.set()
        await eventually(lambda: upload_temps(env.root) == [])
    finally:
        release.set()
        await c.close()
    ((_, name),) = made
    assert name not in open_files()  # the clean-up closed its descriptor too
    assert file_sha(target) == sha(old)


async def test_daemon_stopping_mid_upload_leaves_the_old_file(env: Env) -> None:
    target = env.path("keep.bin")
    old = pattern(100_000, 8)
    write(target, old)
    c = await virnet.connect(env.uri)
    try:
        st = await c.open_stream(f.UPLOAD, f.TransferArgs("keep.bin", 0, 0, 0))
        await st.send(pattern(2 * MiB, 9))
        await env.daemon.stop()
        with pytest.raises(StreamError):
            await asyncio.wait_for(st.finish(), 10)
    finally:
        await c.close()
    assert read(target) == old
    assert upload_temps(env.root) == []


async def test_exclusive_race_fails_the_finish_and_keeps_the_racer(env: Env) -> None:
    """The target appears after the stream opened: the commit must not overwrite it."""
    target = env.path("race.bin")
    racer = b"the racer got there first\n" * 100
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(f.UPLOAD, f.TransferArgs("race.bin", 0, 0, EXCLUSIVE))
        await st.send(pattern(2 * MiB, 10))
        write(target, racer)
        with pytest.raises(StreamError, match="already exists") as info:
            await st.finish()
        assert info.value.int1 == errno.EEXIST
        assert st.state is StreamState.FAILED
        await eventually(lambda: upload_temps(env.root) == [])
        await assert_alive(c)
    assert read(target) == racer


async def test_hole_on_a_non_sparse_upload_is_a_stream_error(env: Env) -> None:
    target = env.path("keep.bin")
    old = pattern(50_000, 11)
    write(target, old)
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(f.UPLOAD, f.TransferArgs("keep.bin", 0, 0, 0))
        await st.send(b"some data first")
        with pytest.raises(StreamError, match="sparse"):
            await st.send_hole(4096)
        # force one onto the wire: the daemon fails the stream, not the connection
        payload = xdr.encode(protocol.StreamHole, protocol.StreamHole(4096, 0))
        c.protocol.queue_urgent(_impl.encode_message(*st.key[:3], 6, st.serial, 2, payload))
        with pytest.raises(StreamError, match="Unexpected stream hole"):
            await st.finish()
        await eventually(lambda: upload_temps(env.root) == [])
        await assert_alive(c)
    assert read(target) == old


# ----------------------------------------------------------------------------- EXCLUSIVE


async def test_exclusive_refuses_an_existing_path_before_the_stream(env: Env) -> None:
    write(env.path("there"), b"old")
    os.symlink("nowhere", env.path("dangling"))
    async with await virnet.connect(env.uri) as c:
        for name in ("there", "dangling"):
            err = await assert_call_error(
                c, f.UPLOAD, f.TransferArgs(name, 0, 0, EXCLUSIVE), "exists"
            )
            assert err.int1 == errno.EEXIST
        # EXCLUSIVE is for whole-file uploads only
        await assert_call_error(c, f.UPLOAD, f.TransferArgs("there", 1, 0, EXCLUSIVE))
    assert read(env.path("there")) == b"old"
    assert os.readlink(env.path("dangling")) == "nowhere"
    assert upload_temps(env.root) == []


async def test_exclusive_creates_a_missing_path(env: Env) -> None:
    data = pattern(1_500_000, 12)
    async with await virnet.connect(env.uri) as c:
        await upload(c, "fresh.bin", data, flags=EXCLUSIVE)
        # and a second exclusive upload of the same path is refused
        await assert_call_error(
            c, f.UPLOAD, f.TransferArgs("fresh.bin", 0, 0, EXCLUSIVE), "exists"
        )
    assert file_sha(env.path("fresh.bin")) == sha(data)
    assert stat.S_IMODE(os.stat(env.path("fresh.bin")).st_mode) == 0o644
    assert upload_temps(env.root) == []


# ----------------------------------------------------------------------------- in place


async def test_in_place_write_at_an_offset(env: Env) -> None:
    target = env.path("disk.img")
    old = pattern(MiB, 13)
    write(target, old, mode=0o600)
    inode = os.stat(target).st_ino
    patch = pattern(50_000, 14)
    async with await virnet.connect(env.uri) as c:
        await upload(c, "disk.img", patch, offset=300_000)
    expected = old[:300_000] + patch + old[350_000:]
    assert file_sha(target) == sha(expected)
    st = os.stat(target)
    assert st.st_ino == inode  # written in place, not replaced
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert upload_temps(env.root) == []


async def test_in_place_write_past_the_end_extends(env: Env) -> None:
    target = env.path("grow")
    write(target, b"A" * 1000)
    async with await virnet.connect(env.uri) as c:
        await upload(c, "grow", b"B" * 500, offset=800)
        await upload(c, "grow", b"C" * 10, offset=2000)
    assert read(target) == b"A" * 800 + b"B" * 500 + bytes(700) + b"C" * 10


async def test_in_place_on_a_missing_file_fails(env: Env) -> None:
    async with await virnet.connect(env.uri) as c:
        for offset, length in ((100, 0), (0, 100), (100, 100)):
            err = await assert_call_error(
                c, f.UPLOAD, f.TransferArgs("missing", offset, length, 0), "no such file"
            )
            assert err.int1 == errno.ENOENT
    assert not os.path.lexists(env.path("missing"))


async def test_in_place_length_met_exactly(env: Env) -> None:
    target = env.path("disk.img")
    old = pattern(200_000, 15)
    write(target, old)
    patch = pattern(70_000, 16)
    async with await virnet.connect(env.uri) as c:
        # offset 0 with a length is in place too (only 0/0 replaces the file)
        await upload(c, "disk.img", patch, offset=0, length=len(patch))
        await upload(c, "disk.img", patch[:1000], offset=199_000, length=1000)
    assert read(target) == patch + old[70_000:199_000] + patch[:1000]


async def test_in_place_more_than_length_is_a_stream_error(env: Env) -> None:
    target = env.path("disk.img")
    write(target, bytes(10_000))
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(f.UPLOAD, f.TransferArgs("disk.img", 100, 1000, 0))
        await st.send(b"x" * 1000)
        await st.send(b"one too many")
        with pytest.raises(StreamError, match="1000 bytes") as info:
            await st.finish()
        assert "1000" in str(info.value)
        assert st.state is StreamState.FAILED
        await assert_alive(c)
        # the connection is fine for more transfers too
        await upload(c, "disk.img", b"y" * 10, offset=0, length=10)
        assert (await download(c, "disk.img", length=10)) == (10, b"y" * 10)
    assert os.path.getsize(target) == 10_000  # nothing past the announced range
    assert read(target)[1100:] == bytes(8900)


async def test_in_place_less_than_length_fails_the_finish(env: Env) -> None:
    write(env.path("disk.img"), bytes(10_000))
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(f.UPLOAD, f.TransferArgs("disk.img", 0, 1000, 0))
        await st.send(b"x" * 600)
        with pytest.raises(StreamError, match="600") as info:
            await st.finish()
        assert "1000" in str(info.value)
        await assert_alive(c)


async def test_in_place_on_a_fifo_or_directory_is_refused(env: Env) -> None:
    """Opening a FIFO for writing must neither block the daemon nor succeed."""
    os.mkfifo(env.path("pipe"))
    os.mkdir(env.path("dir"))
    async with await virnet.connect(env.uri) as c:
        for name in ("pipe", "dir"):
            await asyncio.wait_for(
                assert_call_error(c, f.UPLOAD, f.TransferArgs(name, 1, 0, 0)), 10
            )


# ----------------------------------------------------------------------------- download


async def test_download_whole_offset_and_length(env: Env) -> None:
    data = pattern(3 * MiB + 7, 17)
    write(env.path("d.bin"), data)
    n = len(data)
    async with await virnet.connect(env.uri) as c:
        assert await download(c, "d.bin") == (n, data)
        size, got = await download(c, "d.bin", offset=1_000_001)
        assert (size, sha(got)) == (n - 1_000_001, sha(data[1_000_001:]))
        size, got = await download(c, "d.bin", offset=123, length=2 * MiB)
        assert (size, sha(got)) == (2 * MiB, sha(data[123 : 123 + 2 * MiB]))
        assert await download(c, "d.bin", length=n) == (n, data)
        assert await download(c, "d.bin", offset=n - 1, length=1) == (1, data[-1:])
        assert await download(c, "d.bin", offset=n) == (0, b"")  # at the end: nothing
    assert read(env.path("d.bin")) == data


async def test_download_goes_from_the_file_into_the_socket(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a plain socket the daemon sends the file's pages with sendfile (no read into
    a buffer of its own); the bytes are the file's, offsets and odd lengths included."""
    sent = [0]
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        n = real(out_fd, in_fd, offset, count)
        sent[0] += n
        return n

    monkeypatch.setattr(os, "sendfile", counting)
    data = pattern(3 * MiB + 7, 19)
    write(env.path("d.bin"), data)
    async with await virnet.connect(env.uri) as c:
        assert await download(c, "d.bin") == (len(data), data)
        size, got = await download(c, "d.bin", offset=4097, length=MiB + 3)
        assert (size, sha(got)) == (MiB + 3, sha(data[4097 : 4097 + MiB + 3]))
    assert sent[0] > 2 * MiB


async def test_download_when_the_socket_takes_no_file_data_at_once(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where sendfile would wait (the socket is full), the span is read into memory and
    left to the transport: the same bytes, in order with the packets around them."""
    def full(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        raise BlockingIOError(errno.EAGAIN, "full")

    monkeypatch.setattr(os, "sendfile", full)
    data = pattern(2 * MiB + 11, 23)
    write(env.path("d.bin"), data)
    async with await virnet.connect(env.uri) as c:
        assert await download(c, "d.bin") == (len(data), data)
        assert await c.call(f.STAT, f.PathArgs("d.bin"))


async def test_download_where_the_transport_cannot_send_files(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection without a plain socket under it (socket_fd -1) reads the file into
    memory and sends that: same bytes, no sendfile."""
    from virnet import _protocol

    real_made = _protocol.RPCProtocol.connection_made

    def made(self: _protocol.RPCProtocol, transport: Any) -> None:
        real_made(self, transport)
        self.socket_fd = -1

    def refuse(*args: Any) -> int:
        raise AssertionError("sendfile used")

    monkeypatch.setattr(_protocol.RPCProtocol, "connection_made", made)
    monkeypatch.setattr(os, "sendfile", refuse)
    data = pattern(2 * MiB + 5, 31)
    write(env.path("d.bin"), data)
    async with await virnet.connect(env.uri) as c:
        assert await download(c, "d.bin") == (len(data), data)
        size, got = await download(c, "d.bin", offset=3, length=MiB)
        assert (size, got) == (MiB, data[3 : 3 + MiB])


async def test_download_of_a_file_that_shrinks_meanwhile_fails(env: Env) -> None:
    """The file is read as it goes out: if it shrinks, the download fails (the packet
    headers already announced the bytes), never ends short as if complete."""
    data = pattern(64 * MiB, 29)
    write(env.path("d.bin"), data)
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(f.DOWNLOAD, f.TransferArgs("d.bin", 0, 0, 0))
        first = await st.recv()
        assert first
        os.truncate(env.path("d.bin"), 0)
        got = len(first)
        with pytest.raises((StreamError, ConnectionClosedError)):
            while chunk := await st.recv():
                got += len(chunk)
            await st.finish()
        assert got < len(data)


async def test_download_out_of_range_is_an_error_reply(env: Env) -> None:
    write(env.path("d.bin"), b"0123456789")
    async with await virnet.connect(env.uri) as c:
        await assert_call_error(c, f.DOWNLOAD, f.TransferArgs("d.bin", 11, 0, 0), "beyond")
        await assert_call_error(c, f.DOWNLOAD, f.TransferArgs("d.bin", 0, 11, 0), "beyond")
        await assert_call_error(c, f.DOWNLOAD, f.TransferArgs("d.bin", 5, 6, 0), "beyond")
        await assert_call_error(c, f.DOWNLOAD, f.TransferArgs("d.bin", 1 << 62, 1, 0), "beyond")
        await assert_call_error(
            c, f.DOWNLOAD, f.TransferArgs("d.bin", 0, 0, EXCLUSIVE), "flags"
        )
        assert await download(c, "d.bin", offset=5, length=5) == (5, b"56789")


async def test_download_of_a_directory_missing_file_or_fifo_is_refused(env: Env) -> None:
    os.mkdir(env.path("dir"))
    os.mkfifo(env.path("pipe"))
    async with await virnet.connect(env.uri) as c:
        await assert_call_error(c, f.DOWNLOAD, f.TransferArgs("dir", 0, 0, 0), "regular file")
        err = await assert_call_error(
            c, f.DOWNLOAD, f.TransferArgs("missing", 0, 0, 0), "no such file"
        )
        assert err.code == ErrorCode.SYSTEM_ERROR and err.int1 == errno.ENOENT
        # a FIFO with no writer must not block the daemon's event loop
        await asyncio.wait_for(
            assert_call_error(c, f.DOWNLOAD, f.TransferArgs("pipe", 0, 0, 0), "regular file"),
            10,
        )


async def test_transfer_download_to_a_local_path(env: Env) -> None:
    data = pattern(2 * MiB + 5, 18)
    write(env.path("r.bin"), data)
    local = os.path.join(env.local, "copy.bin")
    seen: list[int] = []
    sizes: list[int] = []
    async with await virnet.connect(env.uri) as c:
        done = await transfer.download(
            c, "r.bin", local, progress=seen.append, on_size=sizes.append
        )
        assert done == len(data)
        assert sizes == [len(data)]
        assert seen and seen[-1] == len(data)
        assert file_sha(local) == sha(data)
        # an existing local file is replaced (renamed over) and keeps its mode
        os.chmod(local, 0o600)
        inode = os.stat(local).st_ino
        await transfer.download(c, "r.bin", local, offset=100, length=1000)
        assert read(local) == data[100:1100]
        assert os.stat(local).st_ino != inode
        assert stat.S_IMODE(os.stat(local).st_mode) == 0o600
        # a directory as LOCAL: the remote name inside it
        await transfer.download(c, "r.bin", env.local)
        assert file_sha(os.path.join(env.local, "r.bin")) == sha(data)
    assert local_temps(env.local) == []


async def test_failed_local_download_leaves_no_temp_and_the_old_file(env: Env) -> None:
    local = os.path.join(env.local, "precious")
    write(local, b"do not touch", mode=0o640)
    before = os.stat(local)
    async with await virnet.connect(env.uri) as c:
        with pytest.raises(RPCError, match="No such file"):
            await transfer.download(c, "missing", local)
        with pytest.raises(RPCError, match="beyond"):
            write(env.path("short"), b"abc")
            await transfer.download(c, "short", local, offset=10)
        with pytest.raises(RPCError, match="No such file"):
            await transfer.download(c, "missing", os.path.join(env.local, "new"))
    assert read(local) == b"do not touch"
    after = os.stat(local)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(os.listdir(env.local)) == ["precious"]


async def test_transfer_upload_from_a_local_path(env: Env) -> None:
    data = pattern(3 * MiB + 1, 19)
    local = os.path.join(env.local, "src.bin")
    write(local, data)
    seen: list[int] = []
    async with await virnet.connect(env.uri) as c:
        assert await transfer.upload(c, local, "up.bin", progress=seen.append) == len(data)
        assert seen[-1] == len(data)
        assert file_sha(env.path("up.bin")) == sha(data)
        # in place: the first LENGTH bytes of the local file at the remote OFFSET
        await transfer.upload(c, local, "up.bin", offset=10, length=20)
        with pytest.raises(ValueError, match="larger than the file"):
            await transfer.upload(c, local, "up.bin", length=len(data) + 1)
        with pytest.raises(RPCError, match="exists"):
            await transfer.upload(c, local, "up.bin", exclusive=True)
        await assert_alive(c)
    assert file_sha(env.path("up.bin")) == sha(data[:10] + data[:20] + data[30:])
    assert upload_temps(env.root) == []


# ----------------------------------------------------------------------------- sparse

SPARSE_SIZE = 64 * MiB
SPARSE_BLOCKS = {
    1 * MiB: pattern(4096, 20),
    17 * MiB + 100: pattern(10_000, 21),
    40 * MiB: pattern(65536, 22),
}


def make_sparse(path: str, size: int = SPARSE_SIZE) -> bytes:
    """A sparse file: leading hole, three data blocks, holes between, a trailing hole.
    Returns its full contents."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, block in SPARSE_BLOCKS.items():
            fh.seek(offset)
            fh.write(block)
    if os.stat(path).st_blocks * 512 >= 4 * MiB:
        pytest.skip("the file system under /tmp does not keep files sparse")
    expected = bytearray(size)
    for offset, block in SPARSE_BLOCKS.items():
        expected[offset : offset + len(block)] = block
    return bytes(expected)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


async def test_sparse_download_sends_holes(env: Env) -> None:
    expected = make_sparse(env.path("sparse.img"))
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(
            f.DOWNLOAD, f.TransferArgs("sparse.img", 0, 0, SPARSE), sparse=True
        )
        assert st.reply.size == SPARSE_SIZE
        buf = bytearray()
        holes: list[int] = []
        data_bytes = 0
        async for item in st:
            if isinstance(item, Hole):
                holes.append(item.length)
                buf.extend(bytes(item.length))
            else:
                data_bytes += len(item)
                buf.extend(item)
        await st.finish()
        # leading, two middle and trailing holes; only the data blocks travel as data
        assert len(holes) == 4, holes
        assert st.holes_received == 4
        assert data_bytes < MiB
        assert data_bytes + sum(holes) == SPARSE_SIZE
        assert sha(bytes(buf)) == sha(expected)

        # a range of it: hole, data, hole
        st = await c.open_stream(
            f.DOWNLOAD, f.TransferArgs("sparse.img", MiB // 2, MiB, SPARSE), sparse=True
        )
        items = [i if isinstance(i, Hole) else bytes(i) async for i in st]
        await st.finish()
        assert st.reply.size == MiB
        assert isinstance(items[0], Hole) and isinstance(items[-1], Hole)
        got = b"".join(bytes(i.length) if isinstance(i, Hole) else i for i in items)
        assert got == expected[MiB // 2 : MiB // 2 + MiB]

        # without SPARSE the same file arrives as plain data
        size, plain = await download(c, "sparse.img")
        assert size == SPARSE_SIZE and sha(plain) == sha(expected)


async def test_sparse_download_to_a_local_file_stays_sparse(env: Env) -> None:
    expected = make_sparse(env.path("sparse.img"))
    local = os.path.join(env.local, "sparse.copy")
    async with await virnet.connect(env.uri) as c:
        done = await transfer.download(c, "sparse.img", local, sparse=True)
    assert done == SPARSE_SIZE
    assert os.path.getsize(local) == SPARSE_SIZE  # including the trailing hole
    assert allocated(local) < 2 * MiB
    assert file_sha(local) == sha(expected)
    assert local_temps(env.local) == []


async def test_sparse_upload_makes_a_sparse_remote_file(env: Env) -> None:
    local = os.path.join(env.local, "sparse.img")
    expected = make_sparse(local)
    write(env.path("sparse.up"), b"old contents", mode=0o600)
    async with await virnet.connect(env.uri) as c:
        assert await transfer.upload(c, local, "sparse.up", sparse=True) == SPARSE_SIZE
        await transfer.upload(c, local, "fresh.up", sparse=True)
        st = await c.open_stream(
            f.DOWNLOAD, f.TransferArgs("sparse.up", 0, 0, SPARSE), sparse=True
        )
        holes = [i for i in [i async for i in st] if isinstance(i, Hole)]
        await st.finish()
    for name in ("sparse.up", "fresh.up"):
        remote = env.path(name)
        assert os.path.getsize(remote) == SPARSE_SIZE  # the trailing hole counts
        assert allocated(remote) < 2 * MiB
        assert file_sha(remote) == sha(expected)
    assert stat.S_IMODE(os.stat(env.path("sparse.up")).st_mode) == 0o600
    assert len(holes) == 4
    assert upload_temps(env.root) == []


async def test_sparse_in_place_upload_zeroes_holes_and_extends(env: Env) -> None:
    """In place, a hole over existing data reads as zeros afterwards, and a trailing
    hole past the current end still extends the file to its full size."""
    target = env.path("disk.img")
    old = pattern(100_000, 23)
    write(target, old)
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(
            f.UPLOAD, f.TransferArgs("disk.img", 1000, 0, SPARSE), sparse=True
        )
        await st.send(b"D" * 500)
        await st.send_hole(10_000)
        await st.send(b"E" * 500)
        await st.send_hole(2 * MiB)  # far past the end of the file
        await st.finish()
        assert st.holes_sent == 2
    end = 1000 + 500 + 10_000 + 500 + 2 * MiB
    assert os.path.getsize(target) == end
    expected = old[:1000] + b"D" * 500 + bytes(10_000) + b"E" * 500
    expected += bytes(end - len(expected))
    assert sha(read(target)) == sha(expected)

    # the same with an announced length that the holes make up exactly
    write(target, old)
    async with await virnet.connect(env.uri) as c:
        st = await c.open_stream(
            f.UPLOAD, f.TransferArgs("disk.img", 0, 300_000, SPARSE), sparse=True
        )
        await st.send(b"F" * 100)
        await st.send_hole(299_900)
        await st.finish()
    assert read(target) == b"F" * 100 + bytes(299_900)


# ----------------------------------------------------------------------------- confinement


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "a/b/../../../x", "a\0b"])
async def test_escaping_paths_are_refused(env: Env, path: str) -> None:
    async with await virnet.connect(env.uri) as c:
        for offset in (0, 5):
            err = await assert_call_error(c, f.UPLOAD, f.TransferArgs(path, offset, 0, 0))
            assert err.code == ErrorCode.INVALID_ARG
        err = await assert_call_error(c, f.DOWNLOAD, f.TransferArgs(path, 0, 0, 0))
        assert err.code == ErrorCode.INVALID_ARG
    assert not os.path.exists(os.path.join(env.tmp, "x"))
    assert all_upload_temps(env.tmp) == []


async def test_symlinks_leading_outside_are_refused(env: Env) -> None:
    secret = os.path.join(env.outside, "secret")
    write(secret, b"secret")
    os.symlink(env.outside, env.path("outdir"))
    async with await virnet.connect(env.uri) as c:
        for args in (
            f.TransferArgs("outdir/secret", 0, 0, 0),
            f.TransferArgs("outdir/new", 0, 0, 0),
            f.TransferArgs("outdir/secret", 2, 0, 0),
            f.TransferArgs("outdir/secret", 0, 3, 0),
        ):
            await assert_call_error(c, f.UPLOAD, args, "outside the data root")
        await assert_call_error(
            c, f.DOWNLOAD, f.TransferArgs("outdir/secret", 0, 0, 0), "outside the data root"
        )
    assert read(secret) == b"secret"
    assert sorted(os.listdir(env.outside)) == ["secret"]


async def test_upload_over_a_symlink_replaces_the_link(env: Env) -> None:
    secret = os.path.join(env.outside, "secret")
    write(secret, b"secret", mode=0o600)
    os.symlink(secret, env.path("outfile"))
    os.symlink(env.outside, env.path("outdir"))
    os.symlink(os.path.join(env.outside, "nothing"), env.path("dangling"))
    async with await virnet.connect(env.uri) as c:
        # reading or writing through the link is refused...
        await assert_call_error(
            c, f.DOWNLOAD, f.TransferArgs("outfile", 0, 0, 0), "outside the data root"
        )
        await assert_call_error(
            c, f.UPLOAD, f.TransferArgs("outfile", 1, 0, 0), "outside the data root"
        )
        # ...a whole-file upload replaces the link itself
        for name in ("outfile", "outdir", "dangling"):
            await upload(c, name, name.encode() * 1000)
    for name in ("outfile", "outdir", "dangling"):
        st = os.lstat(env.path(name))
        assert stat.S_ISREG(st.st_mode), name
        assert stat.S_IMODE(st.st_mode) == 0o644, name  # not the mode of the link's target
        assert read(env.path(name)) == name.encode() * 1000
    assert read(secret) == b"secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert sorted(os.listdir(env.outside)) == ["secret"]
    assert upload_temps(env.root) == []


async def test_symlink_inside_the_root_is_followed(env: Env) -> None:
    data = pattern(5000, 24)
    write(env.path("real"), data)
    os.symlink("real", env.path("alias"))
    async with await virnet.connect(env.uri) as c:
        assert await download(c, "alias") == (len(data), data)
        await upload(c, "alias", b"ZZ", offset=10)  # in place: through the link
    assert read(env.path("real")) == data[:10] + b"ZZ" + data[12:]
    assert os.path.islink(env.path("alias"))


# ----------------------------------------------------------------------------- read only


async def test_readonly_listener_downloads_but_never_uploads(env: Env) -> None:
    data = pattern(400_000, 25)
    write(env.path("ro.bin"), data)
    async with await virnet.connect(env.ro_uri) as c:
        assert await download(c, "ro.bin") == (len(data), data)
        for args in (
            f.TransferArgs("ro.bin", 0, 0, 0),
            f.TransferArgs("new.bin", 0, 0, 0),
            f.TransferArgs("ro.bin", 10, 0, 0),
        ):
            err = await assert_call_error(c, f.UPLOAD, args, "read only")
            assert err.code == ErrorCode.OPERATION_DENIED
    assert read(env.path("ro.bin")) == data
    assert not os.path.exists(env.path("new.bin"))
    assert upload_temps(env.root) == []


async def test_checksum_of_a_fifo_is_refused_without_hanging() -> None:
    """Opening a FIFO for a checksum must not wait for a writer (it would hang a worker)."""
    tmp = short_tmpdir()
    try:
        root = os.path.join(tmp, "root")
        os.makedirs(root)
        os.mkfifo(os.path.join(root, "pipe"))
        daemon = Daemon(DaemonConfig(listen=[sock_uri(tmp)], root=root))
        (uri,) = await daemon.start()
        try:
            async with await virnet.connect(uri) as c:
                with pytest.raises(RPCError, match="not a regular file"):
                    await c.call(f.CHECKSUM, f.ChecksumArgs("pipe", "sha256"), timeout=5)
        finally:
            await daemon.stop()
    finally:
        remove_tree(tmp)


async def test_download_drains_the_transport_when_the_socket_fills(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the socket is full, the rest of the packet it filled in waits in the
    transport, the packets after it wait for the drain, and the connection takes no
    more stream data until the transport has written all of it; then they go out
    with sendfile again.  So at most one read per drain, of at most one packet (all
    of a flush's later packets used to be read too).  The bytes stay whole and in
    order through the pause and the resume."""
    from virnet import _fileio, _protocol
    from virnet.constants import STREAM_CHUNK

    reads: list[int] = []
    drains = 0
    real_read = _fileio.FileSpan.read
    real_drain = _protocol.RPCProtocol._drain_for_files

    def counting_read(self: _fileio.FileSpan) -> bytes:
        reads.append(self.length)
        return real_read(self)

    def counting_drain(self: _protocol.RPCProtocol, transport: Any) -> None:
        nonlocal drains
        drains += 1
        real_drain(self, transport)

    monkeypatch.setattr(_fileio.FileSpan, "read", counting_read)
    monkeypatch.setattr(_protocol.RPCProtocol, "_drain_for_files", counting_drain)
    data = pattern(64 * MiB, 33)
    write(env.path("d.bin"), data)
    # A window larger than the socket's buffer, so that credit lets the daemon fill it.
    async with await virnet.connect(env.uri, window=32 * MiB) as c:
        size, got = await download(c, "d.bin")
    assert (size, got) == (len(data), data)
    if reads:  # the socket filled at least once (not on every loop)
        assert drains
    assert len(reads) <= drains, (len(reads), drains)
    assert all(n <= STREAM_CHUNK for n in reads)
    for conn in env.daemon.server.connections:
        assert not conn._draining_files


async def test_file_upload_goes_in_whole_packets(tmp_path: os.PathLike[str]) -> None:
    """A file upload's data packets are all full size but the last: pieces handed to
    the stream used to be 1 MiB, so every MiB ended in a 96-byte packet (a header and
    a round of system calls on both sides for nothing)."""
    from virnet.constants import STREAM_CHUNK

    tmp = short_tmpdir()
    sizes: list[int] = []
    server = virnet.Server()

    async def upload(ctx: virnet.CallContext, args: f.TransferArgs) -> None:
        st = ctx.accept_stream(None)
        while True:
            item = await st.recv_chunk()
            assert not isinstance(item, Hole)
            if not item:
                return
            sizes.append(len(item))

    server.register(f.UPLOAD, upload)
    uri = str(await server.listen(sock_uri(tmp)))
    local = os.path.join(os.fspath(tmp_path), "src.bin")
    total = 5 * 1024 * 1024 + 12345
    with open(local, "wb") as fh:
        fh.write(pattern(total, 9))
    try:
        async with await virnet.connect(uri) as c:
            assert await transfer.upload(c, local, "x.bin") == total
    finally:
        await server.close(grace=1)
        remove_tree(tmp)
    assert sum(sizes) == total
    assert all(n == STREAM_CHUNK for n in sizes[:-1]), sorted(set(sizes))
