"""The examples in docs/console.md, run as written against a real daemon, so they
cannot rot: the non-blocking one with event callbacks, and the plain asyncio one."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from _rpcutil import remove_tree, short_tmpdir, sock_uri
from virnet.daemon.app import Daemon
from virnet.daemon.config import DaemonConfig

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "console.md")


def example(tag: str) -> dict[str, Any]:
    with open(DOC) as fh:
        text = fh.read()
    blocks = re.findall(r"```python\n(# example: (\w+)\n.*?)```", text, re.S)
    found = {name: code for code, name in blocks}
    assert tag in found, f"no '# example: {tag}' block in docs/console.md"
    namespace: dict[str, Any] = {"__name__": f"console_doc_{tag}"}
    exec(compile(found[tag], f"docs/console.md ({tag})", "exec"), namespace)
    return namespace


@pytest.fixture
async def uri() -> AsyncIterator[str]:
    tmp = short_tmpdir()
    daemon = Daemon(DaemonConfig(
        listen=[sock_uri(tmp)], root=os.path.join(tmp, "root"),
        consoles={
            # cat on a raw terminal: no echo, no line discipline, bytes back as sent.
            "raw": "sh -c 'stty raw -echo && echo ready && exec cat'",
            "shell": "env 'PS1=shell$ ' /bin/sh -i",
        },
    ))
    (address,) = await daemon.start()
    history = daemon.consoles.consoles["raw"].history
    async with asyncio.timeout(10):
        while b"ready" not in history.replay():
            await asyncio.sleep(0.01)
    try:
        yield address
    finally:
        await daemon.stop()
        remove_tree(tmp)


async def test_callbacks_example(uri: str) -> None:
    type_and_collect = example("callbacks")["type_and_collect"]
    keys = b"".join(b"line %d\n" % i for i in range(2000))  # more than fits at once
    out = await type_and_collect(uri, "raw", keys, b"line 1999\n")
    assert out == keys
    # Detached, not killed: a second run works on the same program.
    out = await type_and_collect(uri, "raw", b"again\n", b"again\n")
    assert out == b"again\n"


async def test_asyncio_example(uri: str) -> None:
    run_commands = example("asyncio")["run_commands"]
    out = await run_commands(uri, "shell", ["x=$((3*7))", "echo result=$x"], b"shell$ ")
    assert b"result=21\r\n" in out
