"""Consoles served by virnetd: list them, attach to one, resize it.

::

    import virnet, virnet.console

    async with await virnet.connect(uri) as client:
        print(await virnet.console.list(client))
        stream = await virnet.console.open(client, "shell")
        await virnet.console.resize(client, "shell", 40, 120)
        await stream.send(b"uname -a\\n")
        async for chunk in stream:          # history first, then live output
            ...
        await stream.finish()               # detach (the program keeps running)

The stream carries the console's output (the history first, unless ``history=False``)
and takes its input.  It ends with EOF when the program exits or the relayed socket
closes (``finish()`` then), and with a ``StreamError`` when another session takes the
console over.  Detach with ``finish()``; ``abort()`` works too.  See docs/console.md for
driving it with the non-blocking API and event callbacks.
"""

from __future__ import annotations

import builtins

from .client import Client
from .services import console as _c
from .services.console import OpenFlags as OpenFlags
from .stream import Stream

__all__ = ["OpenFlags", "list", "open", "resize"]


async def list(client: Client) -> builtins.list[str]:
    """The names of the daemon's consoles, in its configured order."""
    reply = await client.call(_c.LIST)
    return builtins.list(reply.names)


async def open(
    client: Client, name: str, *, force: bool = False, history: bool = True
) -> Stream:
    """Attach to console ``name``; returns its two-way stream.

    Fails with ``RPCError`` if another session holds the console, unless ``force``
    (that session's stream then ends with an error saying it was taken over).  With
    ``history=False`` only output from now on is sent, not what the console kept."""
    flags = 0
    if force:
        flags |= _c.OpenFlags.FORCE
    if not history:
        flags |= _c.OpenFlags.NO_HISTORY
    return await client.open_stream(_c.OPEN, _c.OpenArgs(name, int(flags)))


async def resize(client: Client, name: str, rows: int, cols: int) -> None:
    """Set the window size of console ``name`` (its pseudo-terminal's; the program gets
    SIGWINCH).  Allowed only on the connection that holds the console's session; a
    console relaying a socket has no window size (``RPCError`` with code NO_SUPPORT)."""
    await client.call(_c.RESIZE, _c.ResizeArgs(name, rows, cols))
