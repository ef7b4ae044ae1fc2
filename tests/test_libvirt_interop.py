"""Interop with a real libvirtd (Debian's packages), started privately by a fixture.

Skipped with a clear reason only where libvirtd cannot be installed or run (not root, no
packages); CI sets VIRNET_REQUIRE_LIBVIRT=1, which turns that skip into a failure.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

import virnet
import virnet.libvirt
from _libvirtd import LibvirtDaemon, libvirtd_available
from virnet.errors import ErrorCode, RPCError
from virnet.libvirt import protocol as rp
from virnet.stream import Hole, StreamState

pytestmark = pytest.mark.libvirt


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[LibvirtDaemon]:
    reason = libvirtd_available()
    if reason:
        if os.environ.get("VIRNET_REQUIRE_LIBVIRT"):
            pytest.fail(f"libvirtd required but unavailable: {reason}")
        pytest.skip(f"libvirtd unavailable: {reason}")
    with LibvirtDaemon(env={_ENV_MARK: "1"}) as daemon:
        yield daemon


#: Set in the private libvirtd's environment (``LibvirtDaemon(env=...)``, which the
#: throughput benchmark uses for libvirtd's malloc tuning).
_ENV_MARK = "VIRNET_TEST_LIBVIRTD_ENV"


def test_private_libvirtd_gets_the_extra_environment(libvirtd: LibvirtDaemon) -> None:
    assert libvirtd.pid is not None
    with open(f"/proc/{libvirtd.pid}/environ", "rb") as fh:
        environ = fh.read().split(b"\0")
    assert f"{_ENV_MARK}=1".encode() in environ
    assert _ENV_MARK not in os.environ  # ours is left alone


async def test_auth_list_and_open_test_driver(libvirtd: LibvirtDaemon) -> None:
    client = await virnet.connect(f"unix://{libvirtd.socket_path}", hello=False)
    try:
        assert client.mode is virnet.Mode.UNKNOWN  # HELLO never sent to libvirtd
        auth = await client.call(rp.AUTH_LIST)
        assert auth.types == [rp.AUTH_NONE]
        await client.call(rp.CONNECT_OPEN, rp.ConnectOpenArgs("test:///default", 0))
        assert (await client.call(rp.CONNECT_GET_URI)).uri == "test:///default"
        await client.call(rp.CONNECT_CLOSE)
    finally:
        await client.close()


async def test_open_qemu_system(libvirtd: LibvirtDaemon) -> None:
    async with await virnet.libvirt.connect(libvirtd.socket_path, "qemu:///system") as conn:
        assert await conn.get_uri() == "qemu:///system"


async def test_keepalive_negotiated_and_exchanged(libvirtd: LibvirtDaemon) -> None:
    conn = await virnet.libvirt.connect(
        libvirtd.socket_path, "test:///default", keepalive=False
    )
    try:
        assert await conn.supports_feature(rp.FEATURE_PROGRAM_KEEPALIVE)
        conn.client.enable_keepalive()
        rtt = await conn.client.ping(timeout=5)  # libvirtd answers PING with PONG
        assert 0 < rtt < 5
        assert conn.client.protocol.keepalive.enabled
        assert (await conn.lookup_domain("test")).name == "test"
    finally:
        await conn.close()
    assert conn.client.is_closed


async def test_domain_lookup(libvirtd: LibvirtDaemon) -> None:
    async with await virnet.libvirt.connect(libvirtd.socket_path, "test:///default") as conn:
        dom = await conn.lookup_domain("test")
        assert dom.name == "test"
        assert len(dom.uuid) == 16
        assert dom.id == 1


async def test_missing_domain_error(libvirtd: LibvirtDaemon) -> None:
    async with await virnet.libvirt.connect(libvirtd.socket_path, "test:///default") as conn:
        with pytest.raises(RPCError) as info:
            await conn.lookup_domain("no-such-domain")
        err = info.value
        assert err.code == ErrorCode.NO_DOMAIN
        assert err.domain == 12  # VIR_FROM_TEST: the test driver reports it
        assert err.message == "Domain not found"  # libvirt's own wording
        assert err.level == 2
        # the connection is still fine after an error reply
        assert (await conn.lookup_domain("test")).name == "test"


async def test_hello_to_libvirtd_falls_back_to_legacy(libvirtd: LibvirtDaemon) -> None:
    async with await virnet.connect(f"unix://{libvirtd.socket_path}") as client:
        assert client.mode is virnet.Mode.LEGACY
        await client.call(rp.CONNECT_OPEN, rp.ConnectOpenArgs("test:///default", 0))
        assert (await client.call(rp.CONNECT_GET_URI)).uri == "test:///default"
        await client.call(rp.CONNECT_CLOSE)


async def test_storage_volume_lookup_and_info(libvirtd: LibvirtDaemon) -> None:
    pool_name, _ = libvirtd.create_dir_pool()
    libvirtd.create_raw_volume(pool_name, "vol1", "8M")
    async with await virnet.libvirt.connect(libvirtd.socket_path, "qemu:///system") as conn:
        pool = await conn.lookup_pool(pool_name)
        assert pool.name == pool_name
        vol = await conn.lookup_volume(pool, "vol1")
        assert vol.name == "vol1"
        info = await conn.volume_info(vol)
        assert info.capacity == 8 * 1024 * 1024
        with pytest.raises(RPCError) as exc:
            await conn.lookup_volume(pool, "missing")
        assert exc.value.code == ErrorCode.NO_STORAGE_VOL


# ----------------------------------------------------------------------------- streams
VOLUME_SIZE = 2 * 1024**3 + 3 * 65536  # multi-GiB, and not a multiple of the packet size


def _block(i: int) -> bytes:
    """1 MiB of deterministic, position-dependent data."""
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return seed * (1024 * 1024 // len(seed))


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_multi_gib_volume_upload_and_download(libvirtd: LibvirtDaemon) -> None:
    pool_name, _ = libvirtd.create_dir_pool()
    libvirtd.create_raw_volume(pool_name, "big", str(VOLUME_SIZE))
    async with await virnet.libvirt.connect(libvirtd.socket_path, "qemu:///system") as conn:
        vol = await conn.lookup_volume(await conn.lookup_pool(pool_name), "big")
        assert (await conn.volume_info(vol)).capacity == VOLUME_SIZE
        up_hash = hashlib.sha256()
        st = await conn.upload_volume(vol)
        left, i = VOLUME_SIZE, 0
        while left:
            block = _block(i)[: min(left, 1 << 20)]
            up_hash.update(block)
            await st.send(block)
            left -= len(block)
            i += 1
        await st.finish()
        down_hash = hashlib.sha256()
        st = await conn.download_volume(vol)
        got = await st.recv_all(down_hash.update)
        await st.finish()
        assert got == VOLUME_SIZE
        assert down_hash.hexdigest() == up_hash.hexdigest()
        # the connection is still good for calls
        assert (await conn.volume_info(vol)).capacity == VOLUME_SIZE


async def test_sparse_volume_upload_and_download(libvirtd: LibvirtDaemon) -> None:
    pool_name, _ = libvirtd.create_dir_pool()
    size = 64 * 1024 * 1024
    # --allocation 0: the volume starts sparse (by default libvirt preallocates it)
    libvirtd.virsh("vol-create-as", pool_name, "sparse", str(size), "--allocation", "0",
                   "--format", "raw")
    path = libvirtd.virsh("vol-path", "--pool", pool_name, "sparse").strip()
    async with await virnet.libvirt.connect(libvirtd.socket_path, "qemu:///system") as conn:
        vol = await conn.lookup_volume(await conn.lookup_pool(pool_name), "sparse")
        st = await conn.upload_volume(vol, sparse=True)
        await st.send(b"A" * 65536)
        await st.send_hole(32 * 1024 * 1024 - 65536)
        await st.send(b"B" * 65536)
        await st.send_hole(size - 32 * 1024 * 1024 - 65536)
        await st.finish()
        st_blocks = os.stat(path).st_blocks * 512
        assert st_blocks < 4 * 1024 * 1024, st_blocks  # the volume stayed sparse
        with open(path, "rb") as fh:
            assert fh.read(65536) == b"A" * 65536
            fh.seek(32 * 1024 * 1024)
            assert fh.read(65536) == b"B" * 65536
        st = await conn.download_volume(vol, sparse=True)
        items = [i if isinstance(i, Hole) else bytes(i) async for i in st]
        await st.finish()
        holes = [i for i in items if isinstance(i, Hole)]
        data = b"".join(i for i in items if isinstance(i, bytes))
        assert holes, "libvirtd sent no holes for a sparse download"
        assert sum(h.length for h in holes) + len(data) == size
        assert data.count(b"A") == 65536 and data.count(b"B") == 65536


async def test_screenshot_png(libvirtd: LibvirtDaemon) -> None:
    async with await virnet.libvirt.connect(libvirtd.socket_path, "test:///default") as conn:
        mime, png = await conn.screenshot(await conn.lookup_domain("test"))
    assert mime == "image/png"
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 1000


async def test_abort_mid_upload_and_mid_download(libvirtd: LibvirtDaemon) -> None:
    pool_name, _ = libvirtd.create_dir_pool()
    libvirtd.create_raw_volume(pool_name, "ab", str(256 * 1024 * 1024))
    async with await virnet.libvirt.connect(libvirtd.socket_path, "qemu:///system") as conn:
        vol = await conn.lookup_volume(await conn.lookup_pool(pool_name), "ab")
        st = await conn.upload_volume(vol)
        await st.send(bytes(8 * 1024 * 1024))
        await st.abort()
        assert st.state is StreamState.ABORTED
        assert (await conn.volume_info(vol)).capacity == 256 * 1024 * 1024
        st = await conn.download_volume(vol)
        await st.recv()
        await st.abort()
        assert st.state is StreamState.ABORTED
        # the same connection still works, for calls and for a new stream
        assert (await conn.volume_info(vol)).capacity == 256 * 1024 * 1024
        st = await conn.download_volume(vol, 0, 1024 * 1024)
        chunks = bytearray()
        await st.recv_all(chunks.extend)
        await st.finish()
        assert len(chunks) == 1024 * 1024
