"""Async handlers that never wait, served like plain functions.

A server runs an ``async def`` handler in a worker task: the call is queued, a worker is
woken, and the reply goes out a loop iteration later.  For a handler whose body has no
``await``, ``async for`` or ``async with`` that machinery buys nothing: its coroutine
cannot suspend, so running it to its end at once, as the call is read, gives the same
result (or raises the same exception) with no task switch (a third of a small call's
cost on the server).  Whether a body can suspend is read from its bytecode once, at
registration: only the handler's own code object counts (nested functions do not run
as part of it), and anything not plainly a coroutine function (a ``functools.partial``,
a decorator's wrapper that is not itself ``async def`` ...) keeps the worker path.

What such a handler does not get is a task of its own: ``asyncio.current_task()`` is
None in it and it runs in the connection's context, as plain-function handlers do.
"""

from __future__ import annotations

import dis
import inspect
from collections.abc import Coroutine
from typing import Any, Final

#: Opcodes of a suspension point (await, async for, async with) in CPython 3.11-3.13.
_SUSPENDING: Final = frozenset(
    {"YIELD_VALUE", "SEND", "GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH",
     "END_ASYNC_FOR"}
)


def never_suspends(handler: object) -> bool:
    """``handler`` (a function, bound method or callable object) is an ``async def``
    whose own body has no suspension point."""
    fn: Any = handler
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        fn = type(handler).__call__ if callable(handler) else None
    fn = getattr(fn, "__func__", fn)  # a bound method's function
    code = getattr(fn, "__code__", None)
    if code is None or not code.co_flags & inspect.CO_COROUTINE:
        return False
    return not any(ins.opname in _SUSPENDING for ins in dis.get_instructions(code))


def run_to_end(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that cannot suspend: its result, or what it raised."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()  # pragma: no cover - the bytecode said it could not get here
    raise RuntimeError("a handler without await suspended")
