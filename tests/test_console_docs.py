"""The examples in docs/console.md, run as written against a real daemon, so they
cannot rot: the non-blocking one with event callbacks, and the plain asyncio one."""

from __future__ import annotations

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
        consoles={"cat": "cat", "shell": "env 'PS1=shell$ ' /bin/sh -i"},
    ))
    (address,) = await daemon.start()
    try:
        yield address
    finally:
        await daemon.stop()
        remove_tree(tmp)


async def test_callbacks_example(uri: str) -> None:
    type_and_collect = example("callbacks")["type_and_collect"]
    keys = b"".join(b"line %d\n" % i for i in range(200))  # more than one write's worth
    out = await type_and_collect(uri, "cat", keys, b"line 199\r\n")
    # All of it went through (the terminal echoes the lines as they are typed).
    assert out.startswith(b"".join(b"line %d\r\n" % i for i in range(200)))
    # Detached, not killed: a second run works on the same program.
    out = await type_and_collect(uri, "cat", b"again\n", b"again\r\nagain\r\n")
    assert out.endswith(b"again\r\nagain\r\n")


async def test_asyncio_example(uri: str) -> None:
    run_commands = example("asyncio")["run_commands"]
    out = await run_commands(uri, "shell", ["x=$((3*7))", "echo result=$x"], b"shell$ ")
    assert b"result=21\r\n" in out
