"""Short blocking calls (file-system metadata) off the event loop, results handed back
in batches.

``asyncio.to_thread`` pays, per call, a future chained across threads, a wake-up of the
loop through its self-pipe and a GIL hand-off in each direction: about 140 us per FILES
STAT under load in ``virnet demo`` (7k calls/s, against 31k with ``os.stat`` run inline).
A ``BlockingPool`` queues calls for a few worker threads; a worker takes the next call
without any hand-off while the queue is not empty, and the loop is woken at most once
per batch of finished calls, however many finished meanwhile.

Calls still run in threads, so a file system that hangs (a dead NFS server) blocks only
the workers stuck in it, never the loop; the others go on taking calls.  Long jobs
(checksums, bulk reads and writes) belong in a pool of their own: they would hold a
worker that quick calls are waiting for.

Fairness: every call names its *owner* (the server passes the client's connection).
Each owner has a queue of its own and the workers take one call from each owner in
turn, so a client that queues a thousand calls delays another client's call by at most
one call per busy owner, not by a thousand.  A call whose caller was cancelled before
it started (its client went away) is dropped without running.  An owner can be paused:
its calls stay queued and none starts until it is resumed (the server pauses a client
that does not read its replies, so no more of them are made meanwhile).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

#: Worker threads per pool.  More threads mean more GIL contention for calls that take
#: microseconds; a few keep calls moving while one waits on a slow disk.
WORKERS = 4

_Job = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]
_Done = tuple["asyncio.Future[Any]", BaseException | None, Any]


class BlockingPool:
    """Worker threads for one event loop.  ``await pool.run(fn, *args)`` from the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        workers: int = WORKERS,
        per_owner: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self._loop = loop
        self._max_workers = workers
        #: Calls of one owner running at once: by default all workers but one, so a
        #: worker is always free for somebody else's call however busy one owner is.
        self._per_owner = per_owner if per_owner is not None else max(1, workers - 1)
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._queues: dict[Hashable, deque[_Job]] = {}  # owner -> its calls, in order
        self._turns: deque[Hashable] = deque()  # owners with calls waiting, next first
        self._paused: set[Hashable] = set()  # their calls wait, out of the turns
        self._running: dict[Hashable, int] = {}  # owner -> its calls running now
        self._finished: list[_Done] = []
        self._delivery_scheduled = False
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._closed = False

    def run(
        self, fn: Callable[..., T], *args: Any, owner: Hashable = None
    ) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` behind ``owner``'s earlier calls; the future gets its
        result or exception.  Cancelling the future drops a call not yet started; one
        already running runs to its end (like ``asyncio.to_thread``)."""
        fut: asyncio.Future[T] = self._loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the blocking pool is closed")
            queue = self._queues.get(owner)
            if queue is None:
                queue = self._queues[owner] = deque()
            queue.append((fut, fn, args))
            self._take_turn(owner)
            if self._idle:
                self._has_work.notify()
            elif len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"virnet-blocking-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return fut

    def close(self) -> None:
        """Take no more calls; workers exit once the queue is empty.  Daemon threads: one
        stuck in a system call never holds up the process's exit."""
        with self._lock:
            self._closed = True
            self._has_work.notify_all()

    def pause(self, owner: Hashable) -> None:
        """Start none of ``owner``'s calls (queued or to come) until ``resume``."""
        with self._lock:
            self._paused.add(owner)
            self._take_turn(owner)

    def resume(self, owner: Hashable) -> None:
        with self._lock:
            if owner in self._paused:
                self._paused.discard(owner)
                self._take_turn(owner)
                self._has_work.notify_all()  # it may have many calls waiting

    def waiting(self, owner: Hashable = None) -> int:
        """Calls of ``owner`` queued and not yet started."""
        with self._lock:
            queue = self._queues.get(owner)
            return len(queue) if queue else 0

    # ------------------------------------------------------------------ worker side
    def _take_turn(self, owner: Hashable) -> None:
        """Put ``owner`` in the turns or take it out, as its state now says: in while
        it has calls queued, is not paused and runs fewer than its share (the lock is
        held)."""
        eligible = (
            owner in self._queues
            and owner not in self._paused
            and self._running.get(owner, 0) < self._per_owner
        )
        if eligible != (owner in self._turns):
            if eligible:
                self._turns.append(owner)
            else:
                self._turns.remove(owner)

    def _next_job(self) -> tuple[Hashable, _Job]:
        """The next owner's oldest call, counted as running (the lock is held and some
        owner has its turn)."""
        owner = self._turns.popleft()
        queue = self._queues[owner]
        job = queue.popleft()
        if not queue:
            del self._queues[owner]
        self._running[owner] = self._running.get(owner, 0) + 1
        self._take_turn(owner)  # back at the end: its next call waits for the others
        return owner, job

    def _done(self, owner: Hashable) -> None:
        left = self._running[owner] - 1
        if left:
            self._running[owner] = left
        else:
            del self._running[owner]
        self._take_turn(owner)

    def _work(self) -> None:
        while True:
            with self._lock:
                while True:
                    while not self._turns:
                        if self._closed:
                            return
                        self._idle += 1
                        self._has_work.wait()
                        self._idle -= 1
                    owner, (fut, fn, args) = self._next_job()
                    # Reading the flag from this thread is a benign race: at worst a
                    # call cancelled this instant still runs, as it would have anyway.
                    if not fut.cancelled():
                        break
                    self._done(owner)
            exc: BaseException | None = None
            result: Any = None
            try:
                result = fn(*args)
            except BaseException as err:  # handed to the awaiting task, like to_thread
                exc = err
            with self._lock:
                self._done(owner)
                self._finished.append((fut, exc, result))
                wake = not self._delivery_scheduled
                self._delivery_scheduled = True
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return

    # ------------------------------------------------------------------ loop side
    def _deliver(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
            self._delivery_scheduled = False
        for fut, exc, result in finished:
            if fut.done():  # cancelled while it ran
                continue
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)
