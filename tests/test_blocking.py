"""BlockingPool: blocking calls on worker threads, results handed back in batches."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from virnet._blocking import BlockingPool


async def test_results_and_exceptions_reach_their_callers() -> None:
    pool = BlockingPool(asyncio.get_running_loop(), workers=3)
    try:
        results = await asyncio.gather(*(pool.run(pow, i, 2) for i in range(500)))
        assert results == [i * i for i in range(500)]
        with pytest.raises(FileNotFoundError):
            await pool.run(os.stat, "/nonexistent/virnet-test")
        assert await pool.run(threading.get_ident) != threading.get_ident()
    finally:
        pool.close()


async def test_a_stuck_call_holds_up_only_its_worker() -> None:
    """A file system that hangs (a dead NFS server) takes one worker; the other workers
    keep serving, and the loop itself never waits."""
    release = threading.Event()
    pool = BlockingPool(asyncio.get_running_loop(), workers=2)
    try:
        stuck = pool.run(release.wait, 10)
        quick = await asyncio.wait_for(
            asyncio.gather(*(pool.run(abs, -i) for i in range(200))), 5
        )
        assert quick == list(range(200))
        assert not stuck.done()
        release.set()
        assert await asyncio.wait_for(stuck, 5) is True
    finally:
        release.set()
        pool.close()


async def test_cancelled_caller_is_skipped() -> None:
    release = threading.Event()
    pool = BlockingPool(asyncio.get_running_loop(), workers=1)
    try:
        slow = pool.run(release.wait, 10)
        slow.cancel()
        release.set()
        # The call still runs to its end (threads cannot be interrupted); delivering its
        # result to the cancelled future must not raise, and later calls still work.
        assert await asyncio.wait_for(pool.run(len, "abc"), 5) == 3
        assert slow.cancelled()
    finally:
        pool.close()


async def test_close_refuses_new_calls_and_ends_the_workers() -> None:
    pool = BlockingPool(asyncio.get_running_loop(), workers=2)
    await asyncio.gather(*(pool.run(time.sleep, 0.001) for _ in range(8)))
    threads = list(pool._threads)
    assert threads and all(t.daemon for t in threads)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(len, "x")
    for t in threads:
        t.join(5)
        assert not t.is_alive()


def test_at_least_one_worker() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            BlockingPool(loop, workers=0)
    finally:
        loop.close()
