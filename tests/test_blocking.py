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
    keep serving, its owner's other calls included, and the loop itself never waits."""
    release = threading.Event()
    pool = BlockingPool(asyncio.get_running_loop(), workers=3)
    try:
        stuck = pool.run(release.wait, 10, owner="nfs")
        quick = await asyncio.wait_for(
            asyncio.gather(*(pool.run(abs, -i, owner="nfs") for i in range(200))), 5
        )
        assert quick == list(range(200))
        others = await asyncio.wait_for(
            asyncio.gather(*(pool.run(abs, -i, owner="other") for i in range(200))), 5
        )
        assert others == list(range(200))
        assert not stuck.done()
        release.set()
        assert await asyncio.wait_for(stuck, 5) is True
    finally:
        release.set()
        pool.close()


async def test_one_owner_never_takes_every_worker() -> None:
    """However many calls one owner has running (all stuck, here), a worker stays free
    for the others."""
    release = threading.Event()
    pool = BlockingPool(asyncio.get_running_loop(), workers=4)
    try:
        stuck = [pool.run(release.wait, 10, owner="greedy") for _ in range(10)]
        assert await asyncio.wait_for(pool.run(len, "abc", owner="victim"), 5) == 3
        await asyncio.sleep(0.05)
        assert pool.waiting("greedy") == 10 - 3  # three running: all workers but one
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*stuck), 5) == [True] * 10
    finally:
        release.set()
        pool.close()


async def test_a_paused_owner_starts_nothing_until_resumed() -> None:
    pool = BlockingPool(asyncio.get_running_loop(), workers=2)
    try:
        pool.pause("slow reader")
        held = [pool.run(abs, -i, owner="slow reader") for i in range(20)]
        assert await asyncio.wait_for(pool.run(len, "ab", owner="other"), 5) == 2
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in held)
        assert pool.waiting("slow reader") == 20
        pool.resume("slow reader")
        assert await asyncio.wait_for(asyncio.gather(*held), 5) == list(range(20))
    finally:
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


async def test_owners_take_turns() -> None:
    """One owner's thousand queued calls delay another owner's call by one call per
    busy owner, not by a thousand."""
    gate = threading.Event()
    order: list[str] = []
    pool = BlockingPool(asyncio.get_running_loop(), workers=1)
    try:
        started = threading.Event()

        def block() -> bool:
            started.set()
            return gate.wait(10)

        blocker = pool.run(block, owner="burst")
        assert await asyncio.to_thread(started.wait, 5)
        burst = [pool.run(order.append, f"burst{i}", owner="burst") for i in range(1000)]
        victim = pool.run(order.append, "victim", owner="victim")
        assert pool.waiting("burst") == 1000 and pool.waiting("victim") == 1
        gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, victim, *burst), 10)
        # The blocker ran first; then one burst call (its turn came before the
        # victim queued), then the victim.
        assert order.index("victim") <= 1
        assert [x for x in order if x != "victim"] == [f"burst{i}" for i in range(1000)]
    finally:
        gate.set()
        pool.close()


async def test_cancelled_before_start_never_runs() -> None:
    gate = threading.Event()
    ran: list[int] = []
    pool = BlockingPool(asyncio.get_running_loop(), workers=1)
    try:
        blocker = pool.run(gate.wait, 10)
        queued = [pool.run(ran.append, i, owner="gone") for i in range(50)]
        for fut in queued:
            fut.cancel()
        gate.set()
        await asyncio.wait_for(blocker, 5)
        assert await asyncio.wait_for(pool.run(len, "ab"), 5) == 2
        assert ran == []
        assert pool.waiting("gone") == 0
    finally:
        gate.set()
        pool.close()
