"""DOMAIN_OPEN_CONSOLE (REMOTE procedure 201) against a real, private libvirtd: the
test driver has no consoles, so libvirtd's refusal must surface as an ``RPCError`` with
libvirt's own fields, no stream left behind, and the connection still usable.  Skipped
where libvirtd cannot run (CI sets VIRNET_REQUIRE_LIBVIRT=1: then it fails instead)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import virnet.libvirt
from _libvirtd import LibvirtDaemon, libvirtd_available
from virnet.errors import ErrorCode, RPCError, StreamError
from virnet.libvirt import protocol as rp

pytestmark = pytest.mark.libvirt

VIR_FROM_DOMAIN = 20  # virErrorDomain: "Domain Config", where the driver check reports


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[LibvirtDaemon]:
    reason = libvirtd_available()
    if reason:
        if os.environ.get("VIRNET_REQUIRE_LIBVIRT"):
            pytest.fail(f"libvirtd required but unavailable: {reason}")
        pytest.skip(f"libvirtd unavailable: {reason}")
    with LibvirtDaemon() as daemon:
        yield daemon


def test_wire_declaration() -> None:
    proc = rp.DOMAIN_OPEN_CONSOLE
    assert proc.number == 201 and proc.program.number == 0x20008086
    assert proc.stream is virnet.StreamDirection.BOTH
    dom = rp.Domain("test", bytes(range(16)), 1)
    raw = proc.encode_args(rp.OpenConsoleArgs(dom, None, rp.DOMAIN_CONSOLE_FORCE))
    # remote_nonnull_domain, then remote_string dev_name (NULL: flag 0), then flags.
    assert raw == (b"\0\0\0\x04test" + bytes(range(16)) + b"\0\0\0\x01"
                   + b"\0\0\0\0" + b"\0\0\0\x01")
    assert (rp.DOMAIN_CONSOLE_FORCE, rp.DOMAIN_CONSOLE_SAFE) == (1, 2)


@pytest.mark.parametrize("dev_name", [None, "serial0"])
@pytest.mark.parametrize("force, safe", [(False, False), (True, False), (False, True)])
async def test_open_console_refused_by_the_test_driver(
    libvirtd: LibvirtDaemon, dev_name: str | None, force: bool, safe: bool
) -> None:
    async with await virnet.libvirt.connect(libvirtd.socket_path, "test:///default") as conn:
        dom = await conn.lookup_domain("test")
        with pytest.raises(RPCError) as info:
            await conn.open_console(dom, dev_name, force=force, safe=safe)
        err = info.value
        assert not isinstance(err, StreamError)  # the call's error reply, no stream
        assert err.code == ErrorCode.NO_SUPPORT
        assert err.domain == VIR_FROM_DOMAIN
        assert err.level == 2
        assert err.message == (
            "this function is not supported by the connection driver: virDomainOpenConsole"
        )
        assert not conn.client.protocol.streams  # nothing registered is left
        # The connection goes on.
        assert (await conn.lookup_domain("test")).name == "test"
