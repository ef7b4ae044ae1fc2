"""Fuzz the client (``virnet.connect`` and its calls and streams) with a hostile server.

    python fuzz/fuzz_client.py [-runs=N] [corpus_dir ...]
    VIRNET_NO_EXTENSIONS=1 python fuzz/fuzz_client.py ...   # the pure-Python twin

A fake server on a Unix socket in this process answers each connection with the
input's bytes; the client is the real one (``ClientProtocol`` on the event loop, with
its streams), so this covers what ``fuzz_core.py`` cannot: the asyncio glue, the
``Stream`` state machine, reply decoding.

Input layout: byte 0: bit 0 the client sends HELLO (else legacy mode), bit 1 the
download is sparse; bytes 1-2 (big-endian): the length of part A; then part A, which
the server sends after the client's first packet (the HELLO reply, or the STAT reply
in legacy mode), then part B, sent once the client's calls have arrived (a STAT, a
DOWNLOAD and a keepalive ping) or ``WAIT_CALLS`` seconds passed; then the server
closes.

The rule: every operation ends (within ``DEADLINE`` seconds of the server's close) with
a result or one of the library's errors (``virnet.errors.VirnetError``), nothing is
logged at ERROR, and no exception reaches the event loop's handler.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import socket
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness

_harness.start(__name__ == "__main__")

with atheris.instrument_imports(include=["virnet"]):
    import virnet
    from virnet._impl import FrameDecoder
    from virnet.errors import VirnetError
    from virnet.services import files

DEADLINE = 5.0
#: Seconds the server waits for the client's calls before it sends part B anyway.
WAIT_CALLS = 0.02


class Findings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.items: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.items.append(self.format(record))


class Harness:
    def __init__(self) -> None:
        self.tmp = _harness.scratch_dir("vnfuzzc")
        self.path = os.path.join(self.tmp, "s.sock")
        self.findings = Findings()
        logging.getLogger().addHandler(self.findings)
        logging.getLogger().setLevel(logging.WARNING)
        logging.lastResort = None
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(
            lambda loop, ctx: self.findings.items.append(
                f"loop exception: {ctx.get('message')}: {ctx.get('exception')!r}"))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.listener.setblocking(False)
        atexit.register(self.close)

    def close(self) -> None:
        self.listener.close()
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def server(self, hello: bool, part_a: bytes, part_b: bytes) -> None:
        loop = self.loop
        conn, _ = await loop.sock_accept(self.listener)
        conn.setblocking(False)
        dec = FrameDecoder()
        seen = 0

        async def until(n: int) -> bool:
            nonlocal seen
            while seen < n:
                try:
                    data = await loop.sock_recv(conn, 1 << 16)
                except OSError:
                    return False
                if not data:
                    return False
                try:
                    seen += len(dec.feed(data))
                except VirnetError:
                    return False
            return True

        try:
            if await until(1):
                await loop.sock_sendall(conn, part_a)
                # The client may be stuck waiting for part A to complete a reply (it
                # need not): part B goes out after a short wait regardless.
                try:
                    async with asyncio.timeout(WAIT_CALLS):
                        await until(4 if hello else 3)
                except TimeoutError:
                    pass
                await loop.sock_sendall(conn, part_b)
        except OSError:
            pass
        finally:
            conn.close()

    async def client(self, hello: bool, sparse: bool) -> None:
        try:
            c = await virnet.connect(f"unix://{self.path}", hello=hello, timeout=None)
        except VirnetError:
            return

        async def stat() -> None:
            await c.call(files.STAT, files.PathArgs("a"))

        async def download() -> None:
            s = await c.open_stream(files.DOWNLOAD, files.TransferArgs("a", 0, 0, 0),
                                    sparse=sparse)
            async for chunk in s:
                if not isinstance(chunk, memoryview):
                    chunk.length  # noqa: B018 - a Hole
            await s.finish()

        async def ping() -> None:
            await c.ping(timeout=None)

        try:
            results = await asyncio.gather(stat(), download(), ping(), return_exceptions=True)
        finally:
            await c.close()
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, VirnetError):
                raise r

    async def one(self, data: bytes) -> None:
        hello = bool(data[0] & 1)
        sparse = bool(data[0] & 2)
        n = int.from_bytes(data[1:3], "big")
        part_a, part_b = data[3 : 3 + n], data[3 + n :]
        server = asyncio.ensure_future(self.server(hello, part_a, part_b))
        try:
            async with asyncio.timeout(DEADLINE):
                await self.client(hello, sparse)
        except TimeoutError:
            raise AssertionError(f"the client hung for {DEADLINE} s after the server closed"
                                 ) from None
        finally:
            server.cancel()
            try:
                await server
            except asyncio.CancelledError:
                pass

    def test_one(self, data: bytes) -> None:
        if len(data) < 3:
            return
        self.loop.run_until_complete(self.one(data))
        if self.findings.items:
            items = self.findings.items[:]
            self.findings.items.clear()
            raise AssertionError("errors logged:\n" + "\n".join(items))


if __name__ == "__main__":
    harness = Harness()
    _harness.fuzz("client", harness.test_one)
