"""``virnet demo``: start an embedded daemon on a private socket and tour virnet for real.

Everything here goes over a real Unix socket to a real ``Daemon`` (the same class
``virnetd`` runs), in this process: negotiation, keepalive ping, FILES calls, error
replies, a burst of concurrent calls, a file uploaded and downloaded again through
data streams (with the rate and a checksum check), and the wire core's framing rate.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from typing import Any

from . import _impl, transfer
from .client import connect
from .daemon.app import Daemon
from .daemon.config import DaemonConfig
from .errors import RPCError
from .services import files as f


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


async def _transfers(client: Any, tmp: str, total: int, say: Any) -> None:
    """Upload a generated file through a stream, download it again, compare checksums."""
    local = os.path.join(tmp, "disk.img")
    block = hashlib.sha256(b"virnet").digest() * (1 << 15)  # 1 MiB
    digest = hashlib.sha256()
    with open(local, "wb") as fh:
        left = total
        while left:
            piece = block[: min(left, len(block))]
            fh.write(piece)
            digest.update(piece)
            left -= len(piece)
    start = time.perf_counter()
    await transfer.upload(client, local, "images/disk.img")
    up = time.perf_counter() - start
    say(f"upload of {total / 2**20:.0f} MiB through one stream: {total / up / 1e9:.2f} GB/s")
    remote = await client.call(f.CHECKSUM, f.ChecksumArgs("images/disk.img", "sha256"))
    back = os.path.join(tmp, "disk.back")
    start = time.perf_counter()
    await transfer.download(client, "images/disk.img", back)
    down = time.perf_counter() - start
    say(f"download of {total / 2**20:.0f} MiB through one stream: {total / down / 1e9:.2f} GB/s")
    with open(back, "rb") as fh:
        local_back = hashlib.file_digest(fh, "sha256").digest()
    if not remote.digest == local_back == digest.digest():
        raise RuntimeError("checksum mismatch after the round trip")
    say("  sha256 matches on both ends")
    os.unlink(local)
    os.unlink(back)


def wire_rate(total: int) -> float:
    """Frame ``total`` bytes into 262120-byte packets and decode them again; GB/s."""
    block = bytes(range(256)) * 4096  # 1 MiB
    decoder = _impl.FrameDecoder()
    got = 0
    start = time.perf_counter()
    sent = 0
    while sent < total:
        for buf in _impl.encode_stream_data(1, 1, 4, 1, block):
            view = memoryview(buf)
            while view:
                target = decoder.get_buffer(len(view))
                n = min(len(target), len(view))
                target[:n] = view[:n]
                view = view[n:]
                for msg in decoder.buffer_updated(n):
                    got += len(msg.payload)
        sent += len(block)
    elapsed = time.perf_counter() - start
    assert got == sent
    return sent / elapsed / 1e9


async def run_demo(size: str = "256M", *, quiet: bool = False) -> int:
    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    total = parse_size(size)
    # tmpfs when there is one, so the tour measures virnet rather than the disk
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="virnet-demo-", dir=base) as tmp:
        sock = os.path.join(tmp, "virnetd.sock")
        root = os.path.join(tmp, "data")
        daemon = Daemon(DaemonConfig(listen=[f"unix://{sock}"], root=root))
        (uri,) = await daemon.start()
        say(f"embedded virnetd listening on {uri}, data root {root}")
        say(f"wire core: {'compiled (Cython)' if _impl.compiled else 'pure Python'}")
        try:
            async with await connect(uri) as client:
                say(f"connected: {client.mode.value} mode, features {client.features:#x}")
                rtt = await client.ping()
                say(f"keepalive ping: {rtt * 1e6:.0f} us round trip")
                await client.call(f.MKDIR, f.PathArgs("images"))
                with open(os.path.join(root, "images", "hello.txt"), "wb") as fh:
                    fh.write(b"hello from virnet\n" * 1000)
                listing = await client.call(f.LIST, f.PathArgs("images"))
                for e in listing.entries:
                    say(f"  ls images: {e.name} ({e.size} bytes)")
                digest = await client.call(
                    f.CHECKSUM, f.ChecksumArgs("images/hello.txt", "sha256")
                )
                say(f"  sha256 images/hello.txt = {digest.digest.hex()}")
                try:
                    await client.call(f.STAT, f.PathArgs("../etc/passwd"))
                except RPCError as exc:
                    say(f"  confinement works: {exc.message} (code {exc.code})")
                n = 5000
                start = time.perf_counter()
                await asyncio.gather(
                    *(client.call(f.STAT, f.PathArgs("images/hello.txt")) for _ in range(n))
                )
                elapsed = time.perf_counter() - start
                say(f"{n} concurrent STAT calls on one connection: {n / elapsed:,.0f} calls/s")
                await client.call(f.DELETE, f.PathArgs("images/hello.txt"))
                await _transfers(client, tmp, total, say)
                await client.call(f.DELETE, f.PathArgs("images/disk.img"))
                await client.call(f.DELETE, f.PathArgs("images"))
        finally:
            await daemon.stop()
        rate = await asyncio.to_thread(wire_rate, total)
        say(f"wire core framing + decoding of {total / 2**20:.0f} MiB: {rate:.2f} GB/s")
    return 0
