"""MIGRATION failures with real processes: the destination killed, the source killed,
the destination hung (SIGSTOP: found by keepalive), its disk full (a small private
tmpfs).  After each, both sides' visible files are as they were, the error names what
happened, and where the failure left staged data a RESUME finishes by moving the rest.
Every daemon here is a ``virnetd`` subprocess stopped (or killed) by its PID."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import virnet
from _migration import (
    RESUME,
    DaemonProcess,
    MiB,
    Run,
    eventually,
    file_sha,
    make_image,
    perform,
    staged_files,
    visible,
)
from _rpcutil import remove_tree, short_tmpdir
from virnet.errors import ConnectionClosedError, ErrorCode, RPCError

KEEPALIVE = {"keepalive_interval": 0.5, "keepalive_count": 2}  # dead after ~1.5 s


class Procs:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.procs: list[DaemonProcess] = []

    def start(self, label: str, root: str | None = None, **config: Any) -> DaemonProcess:
        cfg = {"listen": [f"unix://{self.tmp}/{label}.sock"],
               "root": root or os.path.join(self.tmp, label), **KEEPALIVE, **config}
        d = DaemonProcess(cfg, self.tmp, label)
        self.procs.append(d)
        d.wait_ready()
        return d

    def stop_all(self) -> None:
        for d in self.procs:
            if d.proc.poll() is None:
                os.kill(d.proc.pid, signal.SIGCONT)  # one a test left stopped
            d.stop()


@pytest.fixture
async def procs() -> AsyncIterator[Procs]:
    tmp = short_tmpdir()
    p = Procs(tmp)
    try:
        yield p
    finally:
        p.stop_all()
        remove_tree(tmp)


def uri(d: DaemonProcess) -> str:
    return str(d.config["listen"][0])


def root(d: DaemonProcess) -> str:
    return str(d.config["root"])


async def start_migration(
    c: virnet.Client, dest: str, rate: int, at_least: int
) -> tuple[asyncio.Future[Run], Run]:
    run = Run()
    job = asyncio.ensure_future(perform(c, "img", dest, bandwidth=rate, run=run,
                                        raise_error=False))
    await eventually(lambda: (bool(run.events) and run.events[-1][1].transferred >= at_least)
                     or job.done())
    assert not job.done(), run.error
    return job, run


async def test_destination_killed_then_resumed(procs: Procs) -> None:
    a = procs.start("a")
    b = procs.start("b")
    digest = make_image(os.path.join(root(a), "img"), 48 * MiB)
    async with await virnet.connect(uri(a)) as c:
        job, run = await start_migration(c, uri(b), 16 * MiB, 24 * MiB)
        loop = asyncio.get_running_loop()
        b.kill()
        killed = loop.time()
        await job
        assert loop.time() - killed < 2.0
        assert isinstance(run.error, RPCError)
        text = str(run.error)
        assert "img" in text and uri(b) in text and "connection" in text, text
        assert visible(root(b)) == []
        assert len(staged_files(root(b))) == 2  # kept on disk for a resume
        assert file_sha(os.path.join(root(a), "img")) == digest
        b2 = procs.start("b")
        resumed = await perform(c, "img", uri(b2), flags=RESUME)
    assert resumed.first.transferred >= 20 * MiB
    assert file_sha(os.path.join(root(b2), "img")) == digest
    assert staged_files(root(b2)) == []


async def test_source_killed_leaves_the_destination_clean(procs: Procs) -> None:
    a = procs.start("a")
    b = procs.start("b")
    digest = make_image(os.path.join(root(a), "img"), 32 * MiB)
    c = await virnet.connect(uri(a))
    try:
        job, _ = await start_migration(c, uri(b), 8 * MiB, 8 * MiB)
        a.kill()
        with pytest.raises(ConnectionClosedError):
            await job  # the caller saw its connection go
    finally:
        await c.close()
    # The destination noticed at once (the socket closed) and kept what it had.
    await eventually(lambda: len(staged_files(root(b))) == 2)
    assert visible(root(b)) == []
    assert file_sha(os.path.join(root(a), "img")) == digest
    a2 = procs.start("a")
    async with await virnet.connect(uri(a2)) as c2:
        resumed = await perform(c2, "img", uri(b), flags=RESUME)
    assert resumed.first.transferred >= 7 * MiB
    assert file_sha(os.path.join(root(b), "img")) == digest


async def test_hung_destination_is_found_by_keepalive(procs: Procs) -> None:
    a = procs.start("a")
    b = procs.start("b")
    digest = make_image(os.path.join(root(a), "img"), 32 * MiB)
    async with await virnet.connect(uri(a)) as c:
        job, run = await start_migration(c, uri(b), 8 * MiB, 4 * MiB)
        loop = asyncio.get_running_loop()
        os.kill(b.proc.pid, signal.SIGSTOP)
        stopped = loop.time()
        try:
            await job
            waited = loop.time() - stopped
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
    # interval 0.5 s x (count 2 + 1), and a tick more at most (plus the stream's
    # window, which the source may still fill before it stops writing).
    assert 1.0 <= waited < 3.5, waited
    assert run.error is not None and "keepalive" in str(run.error), run.error
    assert file_sha(os.path.join(root(a), "img")) == digest
    # Resumed, the destination saw its side fail too and kept the staged data.
    await eventually(lambda: "img" not in visible(root(b)) and len(staged_files(root(b))) == 2)
    async with await virnet.connect(uri(a)) as c:
        resumed = await perform(c, "img", uri(b), flags=RESUME)
    assert resumed.first.transferred > 0
    assert file_sha(os.path.join(root(b), "img")) == digest


@pytest.fixture
def small_fs() -> Iterator[str]:
    """A private 16 MiB tmpfs (root only), unmounted afterwards."""
    tmp = short_tmpdir()
    mnt = os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", mnt],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        remove_tree(tmp)
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
        remove_tree(tmp)


async def test_destination_disk_full_fails_cleanly(procs: Procs, small_fs: str) -> None:
    a = procs.start("a")
    b = procs.start("b", root=os.path.join(small_fs, "root"))
    make_image(os.path.join(root(b), "img"), 4 * MiB, seed=3)
    old = file_sha(os.path.join(root(b), "img"))
    digest = make_image(os.path.join(root(a), "img"), 40 * MiB)
    async with await virnet.connect(uri(a)) as c:
        run = await perform(c, "img", uri(b), raise_error=False)
    assert isinstance(run.error, RPCError)
    assert "no space left on device" in str(run.error).lower(), run.error
    assert "destination" in str(run.error)
    assert run.error.code == ErrorCode.SYSTEM_ERROR
    # The partial data is gone (it is what filled the disk), the old file untouched.
    await eventually(lambda: staged_files(root(b)) == [])
    assert visible(root(b)) == ["img"]
    assert file_sha(os.path.join(root(b), "img")) == old
    assert file_sha(os.path.join(root(a), "img")) == digest
    st = os.statvfs(root(b))
    assert st.f_bavail * st.f_frsize > 10 * MiB  # the space is free again


async def test_daemon_stopping_fails_its_outgoing_migration(procs: Procs) -> None:
    a = procs.start("a")
    b = procs.start("b")
    digest = make_image(os.path.join(root(a), "img"), 32 * MiB)
    c = await virnet.connect(uri(a))
    try:
        job, run = await start_migration(c, uri(b), 8 * MiB, 4 * MiB)
        a.proc.send_signal(signal.SIGTERM)
        await job
        assert isinstance(run.error, RPCError), run.error
        assert "stopping" in str(run.error)
        assert run.error.code == ErrorCode.OPERATION_ABORTED
    finally:
        await c.close()
    assert a.proc.wait(timeout=10) == 0
    await eventually(lambda: len(staged_files(root(b))) == 2)  # a failure: resumable
    assert visible(root(b)) == []
    assert file_sha(os.path.join(root(a), "img")) == digest
    assert "Traceback" not in a.stderr + b.stderr



async def test_target_on_another_file_system_is_copied_then_renamed(procs: Procs) -> None:
    """A mount inside the destination's root: the staged data cannot be renamed there
    (EXDEV), so it is copied into a temporary file beside the target, renamed over it."""
    a = procs.start("a")
    b = procs.start("b")
    sub = os.path.join(root(b), "sub")
    os.mkdir(sub)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", sub],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        os.mkdir(os.path.join(root(a), "sub"))
        digest = make_image(os.path.join(root(a), "sub", "img"), 24 * MiB,
                            [(0, 4 * MiB), (16 * MiB, 2 * MiB)])
        async with await virnet.connect(uri(a)) as c:
            run = await perform(c, "sub/img", uri(b))
        assert run.reply.bytes == 24 * MiB
        assert file_sha(os.path.join(sub, "img")) == digest
        assert os.listdir(sub) == ["img"]  # no temporary file left
        assert os.stat(os.path.join(sub, "img")).st_blocks * 512 <= 7 * MiB  # still sparse
        assert staged_files(root(b)) == []
    finally:
        subprocess.run(["umount", "-l", sub], check=False)
