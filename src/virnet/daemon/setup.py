"""Setting up a transfer in a worker thread without leaking what it made.

Resolving a path and opening or creating a file read the file system, which must never
hang the event loop, so they run in the server's blocking workers (taking turns with
other clients).  A handler can be cancelled while its set-up runs (its client
vanished); the thread cannot be stopped, so it runs to its end and ``undo`` then
releases what it made (a descriptor, a temporary file).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TypeVar

from ..server import ServerConnection

T = TypeVar("T")


async def set_up(
    conn: ServerConnection, setup: Callable[[], T], undo: Callable[[T], None]
) -> T:
    """``setup()`` in one of ``conn``'s server's workers; its result, or ``undo`` of it
    once it is made if the caller was cancelled meanwhile."""
    job = conn.run_blocking(setup)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        job.add_done_callback(functools.partial(_undo_when_done, undo))
        raise


def _undo_when_done(undo: Callable[[T], None], job: asyncio.Future[T]) -> None:
    if not job.cancelled() and job.exception() is None:
        undo(job.result())
