"""Interop with a real libvirtd (Debian's packages), started privately by a fixture.

Skipped with a clear reason only where libvirtd cannot be installed or run (not root, no
packages); CI sets VIRNET_REQUIRE_LIBVIRT=1, which turns that skip into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import virnet
import virnet.libvirt
from _libvirtd import LibvirtDaemon, libvirtd_available
from virnet.errors import ErrorCode, RPCError
from virnet.libvirt import protocol as rp

pytestmark = pytest.mark.libvirt


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[LibvirtDaemon]:
    reason = libvirtd_available()
    if reason:
        if os.environ.get("VIRNET_REQUIRE_LIBVIRT"):
            pytest.fail(f"libvirtd required but unavailable: {reason}")
        pytest.skip(f"libvirtd unavailable: {reason}")
    with LibvirtDaemon() as daemon:
        yield daemon


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
