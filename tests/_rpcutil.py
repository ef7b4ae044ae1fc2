"""A small test program and helpers shared by the RPC tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from typing import Annotated

import virnet
from virnet import xdr
from virnet.errors import RPCError

TEST = virnet.Program("TEST", 0x3000_0001, 1)


@xdr.struct
class EchoArgs:
    text: Annotated[str, xdr.string(1024)]
    delay_ms: xdr.UInt
    n: xdr.UInt


@xdr.struct
class Note:
    text: Annotated[str, xdr.string(1024)]


ECHO = TEST.procedure(1, "ECHO", EchoArgs, EchoArgs)
FAIL_RPC = TEST.procedure(2, "FAIL_RPC", None, None)
FAIL_CRASH = TEST.procedure(3, "FAIL_CRASH", None, None)
BLOCK = TEST.procedure(4, "BLOCK", EchoArgs, EchoArgs)
NOTIFY = TEST.procedure(5, "NOTIFY", Note, None)
WRITE = TEST.procedure(6, "WRITE", None, None)
UNREGISTERED = TEST.procedure(99, "UNREGISTERED", None, None)
NOTE_EVENT = TEST.event(1, "NOTE", Note)


class DemoService:
    """Handlers with observable behaviour: concurrency counters and a gate."""

    def __init__(self) -> None:
        self.running = 0
        self.max_running = 0
        self.started: list[int] = []
        self.gate = asyncio.Event()

    def register(self, server: virnet.Server) -> None:
        server.register(ECHO, self.echo, readonly=True)
        server.register(FAIL_RPC, self.fail_rpc, readonly=True)
        server.register(FAIL_CRASH, self.fail_crash, readonly=True)
        server.register(BLOCK, self.block, readonly=True)
        server.register(NOTIFY, self.notify, readonly=True)
        server.register(WRITE, self.write)

    async def echo(self, ctx: virnet.CallContext, args: EchoArgs) -> EchoArgs:
        if args.delay_ms:
            await asyncio.sleep(args.delay_ms / 1000)
        return EchoArgs(args.text[::-1], args.delay_ms, args.n + 1)

    async def fail_rpc(self, ctx: virnet.CallContext, args: None) -> None:
        raise RPCError("custom failure", code=55, domain=18, level=1, str1="a", str2="b",
                       str3="c", int1=7, int2=-8)

    async def fail_crash(self, ctx: virnet.CallContext, args: None) -> None:
        raise KeyError("secret internal detail")

    async def block(self, ctx: virnet.CallContext, args: EchoArgs) -> EchoArgs:
        self.started.append(args.n)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return args

    async def notify(self, ctx: virnet.CallContext, args: Note) -> None:
        ctx.emit_event(NOTE_EVENT, args)

    async def write(self, ctx: virnet.CallContext, args: None) -> None:
        return None


def short_tmpdir() -> str:
    """A temp dir short enough for Unix socket paths (107 bytes)."""
    return tempfile.mkdtemp(prefix="vn-", dir="/tmp")


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def sock_uri(directory: str, name: str = "s.sock") -> str:
    return f"unix://{os.path.join(directory, name)}"
