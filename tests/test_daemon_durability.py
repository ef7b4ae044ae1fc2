"""virnetd's side of durability and sparseness: what an upload fsyncs (and skips with
NO_SYNC), holes punched instead of zeros written, and idle upload streams holding no
write buffers.  The calls made are recorded by wrapping ``os`` functions where the
daemon calls them; the bytes and allocation on disk are checked too."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

import virnet
from _rpcutil import remove_tree, short_tmpdir, sock_uri
from virnet import _fileio, _syscalls
from virnet.daemon import transfer
from virnet.daemon.app import Daemon
from virnet.daemon.config import DaemonConfig
from virnet.services import files as f

MiB = 1024 * 1024
SPARSE = int(f.TransferFlags.SPARSE)
NO_SYNC = int(f.TransferFlags.NO_SYNC)


@pytest.fixture
async def daemon() -> AsyncIterator[tuple[Daemon, str]]:
    tmp = short_tmpdir()
    d = Daemon(DaemonConfig(listen=[sock_uri(tmp)], root=os.path.join(tmp, "root")))
    (uri,) = await d.start()
    try:
        yield d, uri
    finally:
        await d.stop()
        remove_tree(tmp)


class FsyncLog:
    """Records what was fsynced (as 'file' or 'dir' by the descriptor's type) and the
    renames in between, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[str] = []
        real_fsync = os.fsync
        real_replace = os.replace

        def fsync(fd: int) -> None:
            import stat

            kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
            self.events.append(f"fsync {kind}")
            real_fsync(fd)

        def replace(*args: Any, **kwargs: Any) -> None:
            self.events.append("rename")
            real_replace(*args, **kwargs)

        # The daemon calls these through ``os``; the wrappers only record and pass on.
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


async def _upload(uri: str, path: str, data: bytes, offset: int = 0, length: int = 0,
                  flags: int = 0) -> None:
    async with await virnet.connect(uri) as c:
        st = await c.open_stream(
            f.UPLOAD, f.TransferArgs(path, offset, length, flags), sparse=bool(flags & SPARSE)
        )
        await st.send(data)
        await st.finish()


async def test_whole_upload_fsyncs_the_file_then_renames_then_fsyncs_the_directory(
    daemon: tuple[Daemon, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, uri = daemon
    log = FsyncLog(monkeypatch)
    await _upload(uri, "a.bin", b"x" * 100_000)
    assert log.events == ["fsync file", "rename", "fsync dir"]
    with open(os.path.join(d.root.path, "a.bin"), "rb") as fh:
        assert fh.read() == b"x" * 100_000


async def test_no_sync_skips_every_fsync_of_an_upload(
    daemon: tuple[Daemon, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, uri = daemon
    log = FsyncLog(monkeypatch)
    await _upload(uri, "a.bin", b"y" * 1000, flags=NO_SYNC)
    assert log.events == ["rename"]
    await _upload(uri, "a.bin", b"z" * 10, offset=5, flags=NO_SYNC)
    assert log.events == ["rename"]  # in place: no fsync either
    with open(os.path.join(d.root.path, "a.bin"), "rb") as fh:
        assert fh.read() == b"y" * 5 + b"z" * 10 + b"y" * 985


async def test_in_place_upload_fsyncs_the_file(
    daemon: tuple[Daemon, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, uri = daemon
    with open(os.path.join(d.root.path, "b.bin"), "wb") as fh:
        fh.write(bytes(1000))
    log = FsyncLog(monkeypatch)
    await _upload(uri, "b.bin", b"q" * 10, offset=10)
    assert log.events == ["fsync file"]


async def test_in_place_sparse_upload_punches_holes(
    daemon: tuple[Daemon, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hole over existing data is deallocated (fallocate PUNCH_HOLE), not written as
    zeros: the image stays sparse, and no zeros go through pwrite."""
    d, uri = daemon
    target = os.path.join(d.root.path, "disk.img")
    with open(target, "wb") as fh:
        fh.write(os.urandom(8 * MiB))
    punched: list[tuple[int, int]] = []
    real_punch = _syscalls.punch_hole

    def punch(fd: int, offset: int, length: int) -> bool:
        punched.append((offset, length))
        return real_punch(fd, offset, length)

    monkeypatch.setattr(transfer, "punch_hole", punch)
    before = os.stat(target).st_blocks * 512
    async with await virnet.connect(uri) as c:
        st = await c.open_stream(
            f.UPLOAD, f.TransferArgs("disk.img", 0, 8 * MiB, SPARSE), sparse=True
        )
        await st.send(b"H" * MiB)
        await st.send_hole(6 * MiB)
        await st.send(b"T" * MiB)
        await st.finish()
    assert punched == [(MiB, 6 * MiB)]
    with open(target, "rb") as back:
        data = back.read()
    assert data == b"H" * MiB + bytes(6 * MiB) + b"T" * MiB
    after = os.stat(target).st_blocks * 512
    if not _syscalls.punch_hole(os.open(target, os.O_RDONLY), 0, 0):  # pragma: no cover
        pytest.skip("this file system cannot punch holes")
    assert after <= before - 5 * MiB, (before, after)


def test_punch_hole_falls_back_when_unsupported(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where fallocate says the file system cannot, the daemon writes zeros instead."""
    path = tmp_path / "f"
    path.write_bytes(b"\xff" * 10_000)
    monkeypatch.setattr(transfer, "punch_hole", lambda fd, off, n: False)
    fd = os.open(path, os.O_RDWR)
    try:
        transfer._punch_hole(fd, 1000, 5000)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\xff" * 1000 + bytes(5000) + b"\xff" * 4000


async def test_idle_upload_streams_hold_no_write_buffers(
    daemon: tuple[Daemon, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open upload that has not sent a byte yet costs no batch buffers."""
    _d, uri = daemon
    writers: list[_fileio.BatchWriter] = []

    class Recording(_fileio.BatchWriter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            writers.append(self)

    monkeypatch.setattr(transfer, "BatchWriter", Recording)
    async with await virnet.connect(uri) as c:
        streams = [
            await c.open_stream(f.UPLOAD, f.TransferArgs(f"idle{i}", 0, 0, 0))
            for i in range(8)
        ]
        await c.call(f.STAT, f.PathArgs(""))  # every UPLOAD handler has started
        assert len(writers) == 8
        assert all(w._buffers is None for w in writers)
        await streams[0].send(b"data")
        await streams[0].finish()
        assert writers[0]._buffers is not None
        for st in streams[1:]:
            await st.abort()
