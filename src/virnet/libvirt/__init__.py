"""A client for the stream-carrying subset of libvirt's REMOTE program.

Talks to a real libvirtd over its Unix socket::

    async with await virnet.libvirt.connect("/run/libvirt/libvirt-sock",
                                            "qemu:///system") as conn:
        print(await conn.get_uri())
        dom = await conn.lookup_domain("test")

The connection runs in legacy mode (libvirt's rules): virnet's HELLO is never sent.
"""

from __future__ import annotations

from types import TracebackType

from ..client import Client
from ..client import connect as _connect
from ..stream import Stream
from . import protocol as rp
from .protocol import Domain, StoragePool, StorageVol, VolInfoReply

DEFAULT_SOCKET = "/run/libvirt/libvirt-sock"


class LibvirtConnection:
    """An open libvirt connection (after AUTH_LIST and CONNECT_OPEN)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def get_uri(self) -> str:
        reply = await self.client.call(rp.CONNECT_GET_URI)
        return str(reply.uri)

    async def supports_feature(self, feature: int) -> bool:
        reply = await self.client.call(
            rp.CONNECT_SUPPORTS_FEATURE, rp.SupportsFeatureArgs(feature)
        )
        return bool(reply.supported)

    async def lookup_domain(self, name: str) -> Domain:
        reply = await self.client.call(rp.DOMAIN_LOOKUP_BY_NAME, rp.NameArgs(name))
        dom: Domain = reply.dom
        return dom

    async def lookup_pool(self, name: str) -> StoragePool:
        reply = await self.client.call(rp.STORAGE_POOL_LOOKUP_BY_NAME, rp.NameArgs(name))
        pool: StoragePool = reply.pool
        return pool

    async def lookup_volume(self, pool: StoragePool, name: str) -> StorageVol:
        reply = await self.client.call(rp.STORAGE_VOL_LOOKUP_BY_NAME, rp.VolLookupArgs(pool, name))
        vol: StorageVol = reply.vol
        return vol

    async def volume_info(self, vol: StorageVol) -> VolInfoReply:
        info: VolInfoReply = await self.client.call(rp.STORAGE_VOL_GET_INFO, rp.VolArgs(vol))
        return info

    async def upload_volume(
        self, vol: StorageVol, offset: int = 0, length: int = 0, *, sparse: bool = False
    ) -> Stream:
        """STORAGE_VOL_UPLOAD: returns the stream to ``send`` into (``send_hole`` too when
        ``sparse``), then ``finish``.  ``length`` 0 means up to the end of the volume."""
        flags = rp.VOL_UPLOAD_SPARSE_STREAM if sparse else 0
        return await self.client.open_stream(
            rp.STORAGE_VOL_UPLOAD, rp.VolTransferArgs(vol, offset, length, flags), sparse=sparse
        )

    async def download_volume(
        self, vol: StorageVol, offset: int = 0, length: int = 0, *, sparse: bool = False
    ) -> Stream:
        """STORAGE_VOL_DOWNLOAD: returns the stream to read until EOF, then ``finish``.
        With ``sparse`` the daemon sends holes, seen as ``Hole`` items."""
        flags = rp.VOL_DOWNLOAD_SPARSE_STREAM if sparse else 0
        return await self.client.open_stream(
            rp.STORAGE_VOL_DOWNLOAD, rp.VolTransferArgs(vol, offset, length, flags),
            sparse=sparse,
        )

    async def screenshot(self, dom: Domain, screen: int = 0) -> tuple[str | None, bytes]:
        """DOMAIN_SCREENSHOT: returns (MIME type, image bytes)."""
        stream = await self.client.open_stream(
            rp.DOMAIN_SCREENSHOT, rp.ScreenshotArgs(dom, screen, 0)
        )
        data = bytearray()
        try:
            await stream.recv_all(data.extend)
            await stream.finish()
        except BaseException:
            await stream.abort()
            raise
        return stream.reply.mime, bytes(data)

    async def open_console(
        self, dom: Domain, dev_name: str | None = None, *, force: bool = False,
        safe: bool = False,
    ) -> Stream:
        """DOMAIN_OPEN_CONSOLE: the domain's console ``dev_name`` (None: the first
        console or serial device) as a two-way stream: ``send`` input, read output until
        EOF, ``finish`` (or ``abort``) to let go.  ``force`` takes the console over from
        another client (whose stream is aborted); ``safe`` opens it only if the driver
        guarantees exclusive access.  libvirtd's refusal raises ``RPCError``."""
        flags = (rp.DOMAIN_CONSOLE_FORCE if force else 0) | (rp.DOMAIN_CONSOLE_SAFE if safe else 0)
        return await self.client.open_stream(
            rp.DOMAIN_OPEN_CONSOLE, rp.OpenConsoleArgs(dom, dev_name, flags)
        )

    async def enable_keepalive(self) -> bool:
        """Ask libvirtd whether it speaks keepalive (which also starts its own timer for
        this client) and, if so, start ours.  Returns whether keepalive is on."""
        if not await self.supports_feature(rp.FEATURE_PROGRAM_KEEPALIVE):
            return False
        self.client.enable_keepalive()
        return True

    async def close(self) -> None:
        """CONNECT_CLOSE, then close the socket."""
        if not self.client.is_closed:
            try:
                await self.client.call(rp.CONNECT_CLOSE, timeout=10)
            finally:
                await self.client.close()

    async def __aenter__(self) -> LibvirtConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def connect(
    socket_path: str = DEFAULT_SOCKET,
    name: str | None = "qemu:///system",
    *,
    flags: int = 0,
    keepalive: bool = True,
    timeout: float = 30.0,
) -> LibvirtConnection:
    """Connect to libvirtd at ``socket_path`` and open the driver URI ``name``.

    Only ``AUTH_NONE`` is supported (what libvirtd offers on a local socket configured
    with ``auth_unix_rw = "none"``); other schemes fail with a clear error.
    """
    client = await _connect(f"unix://{socket_path}", hello=False, timeout=timeout)
    try:
        auth = await client.call(rp.AUTH_LIST, timeout=timeout)
        if auth.types and rp.AUTH_NONE not in auth.types:
            from ..errors import ErrorCode, RPCError

            raise RPCError(
                f"libvirtd requires authentication {auth.types}; only 'none' is supported",
                code=ErrorCode.AUTH_FAILED,
            )
        await client.call(rp.CONNECT_OPEN, rp.ConnectOpenArgs(name, flags), timeout=timeout)
        conn = LibvirtConnection(client)
        if keepalive:
            await conn.enable_keepalive()
        return conn
    except BaseException:
        await client.close()
        raise


__all__ = ["DEFAULT_SOCKET", "LibvirtConnection", "connect", "rp"]
