"""A console flooding output (``yes`` on a pseudo-terminal) in a real ``virnetd``
subprocess: the daemon's memory stays bounded (the history plus in-flight buffers)
whether nobody is attached, a session reads flat out, or a session stops reading; and
another client's calls stay prompt throughout."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator

import pytest

import virnet
import virnet.console
from virnet.services import files as f

MiB = 1024 * 1024
#: What the daemon may grow by beyond its size before the flood (history, read buffers,
#: one session's stream queue and send window, allocator slack).
GROWTH_LIMIT = 16 * MiB
#: A STAT on another connection, worst case while the console floods.
CALL_LIMIT = 0.25


def _executable(name: str) -> str:
    candidate = os.path.join(sysconfig.get_path("scripts"), name)
    if os.path.isfile(candidate):
        return candidate
    found = shutil.which(name)
    assert found, name
    return found


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
async def flood() -> AsyncIterator[tuple[str, int]]:
    tmp = tempfile.mkdtemp(prefix="vn-", dir="/tmp")
    uri = f"unix://{tmp}/d.sock"
    proc = subprocess.Popen(
        [_executable("virnetd"), "--listen", uri, "--root", f"{tmp}/root",
         "--console", "flood=yes", "--console", "quiet=cat"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(f"{tmp}/d.sock"):
            assert proc.poll() is None and time.monotonic() < deadline, "virnetd did not start"
            await asyncio.sleep(0.05)
        yield uri, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        shutil.rmtree(tmp, ignore_errors=True)
        assert "Traceback" not in err, err


async def timed_stats(client: virnet.Client, seconds: float) -> list[float]:
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        await client.call(f.STAT, f.PathArgs(""))
        times.append(time.perf_counter() - t0)
        await asyncio.sleep(0.005)
    return times


async def test_flood_bounded_memory_and_prompt_calls(flood: tuple[str, int]) -> None:
    uri, pid = flood
    async with await virnet.connect(uri) as other, await virnet.connect(uri) as viewer:
        await other.call(f.STAT, f.PathArgs(""))
        await asyncio.sleep(0.5)
        base = rss(pid)
        peak = base
        worst: dict[str, float] = {}

        # 1. Nobody attached: the output goes into the history, flat out.
        times = await timed_stats(other, 2.0)
        worst["detached"] = max(times)
        peak = max(peak, rss(pid))

        # 2. A session reading as fast as it can.
        stream = await virnet.console.open(viewer, "flood")
        got = 0

        async def drain() -> None:
            nonlocal got
            async for chunk in stream:
                assert not isinstance(chunk, virnet.Hole)  # a console is never sparse
                got += len(chunk)

        reader = asyncio.create_task(drain())
        times = await timed_stats(other, 2.0)
        worst["reading"] = max(times)
        peak = max(peak, rss(pid))
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert got > 1 * MiB, got  # it really flowed
        assert stream.buffered <= 5 * MiB  # the client holds at most about a window

        # 3. The same session stops reading: the program is held back, not buffered.
        times = await timed_stats(other, 2.0)
        worst["stalled"] = max(times)
        peak = max(peak, rss(pid))
        held = stream.bytes_received
        await asyncio.sleep(0.5)
        assert stream.bytes_received - held < 1 * MiB  # nothing more can arrive
        await stream.abort()

        # The flood goes on with nobody attached again, and another console is fine.
        times = await timed_stats(other, 1.0)
        worst["after"] = max(times)
        peak = max(peak, rss(pid))
        quiet = await virnet.console.open(other, "quiet")
        await quiet.send(b"still here\n")
        seen = b""
        async with asyncio.timeout(10):
            while b"still here\r\nstill here\r\n" not in seen:
                seen += await quiet.recv()
        await quiet.finish()

    assert peak - base <= GROWTH_LIMIT, f"grew by {(peak - base) / MiB:.1f} MiB"
    for phase, value in worst.items():
        assert value <= CALL_LIMIT, f"a STAT took {value * 1000:.0f} ms ({phase})"
