"""Microbenchmarks of the wire core, each run for both twins (root ``wire`` fixture).

Run with::

    python -m pytest bench/test_bench_wire.py --benchmark-only -p no:cacheprovider

(the path must be given: pytest's ``testpaths`` is ``tests/``).  Decoding is driven the way
a ``BufferedProtocol`` transport drives it: ``get_buffer()``, copy at most one socket
read's worth of bytes into the view it returns, ``buffer_updated(n)``.  The copy is part
of the measured time and is the same for both twins; it stands in for ``recv_into``.
Throughput figures are stored in ``benchmark.extra_info`` (see ``--benchmark-json``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, Any

import pytest

from virnet import xdr

PROG = 0x20008086
VERS = 1
PROC = 7
CALL = 0
STREAM = 3
OK = 0
CONTINUE = 2
STREAM_CHUNK = 262120

#: One socket read delivers at most this much in the small-message case (typical size of
#: a read from a busy socket; uvloop offers the whole ``get_buffer`` view).
SMALL_READ = 64 * 1024
N_SMALL = 10_000
SMALL_PAYLOAD = bytes(range(60))

N_DATA = 64  # 64 packets of 262120 bytes: 16 MiB per round


def _pump(wire: ModuleType, blob: bytes, read_size: int) -> tuple[int, int]:
    """Decode ``blob`` with a fresh decoder, one simulated socket read at a time.

    Returns (messages, payload bytes) so the result can be checked.
    """
    dec = wire.FrameDecoder()
    src = memoryview(blob)
    total = len(src)
    pos = 0
    count = 0
    nbytes = 0
    while pos < total:
        buf = dec.get_buffer(read_size)
        n = min(len(buf), read_size, total - pos)
        buf[:n] = src[pos : pos + n]
        pos += n
        for msg in dec.buffer_updated(n):
            count += 1
            nbytes += len(msg.payload)
    return count, nbytes


def _rate(benchmark: Any, nbytes: int) -> None:
    """Record bytes/s in ``extra_info``: from the median round, and from the fastest one
    (``*_best``; on a shared, noisy machine the minimum is the steadier figure).
    Nothing is recorded under ``--benchmark-disable`` (a plain correctness run)."""
    if benchmark.stats is None:
        return
    stats = benchmark.stats.stats
    benchmark.extra_info["bytes_per_round"] = nbytes
    benchmark.extra_info["bytes_per_s"] = nbytes / stats.median
    benchmark.extra_info["GB_per_s"] = nbytes / stats.median / 1e9
    benchmark.extra_info["GB_per_s_best"] = nbytes / stats.min / 1e9


def test_decode_small_calls(benchmark: Any, wire: ModuleType) -> None:
    """Decode 10,000 CALL packets with 60-byte payloads (88 bytes each on the wire),
    received in 64 KiB reads: the per-message cost of the scratch-buffer path."""
    blob = b"".join(
        wire.pack_header(PROG, VERS, PROC, CALL, serial, OK, len(SMALL_PAYLOAD)) + SMALL_PAYLOAD
        for serial in range(1, N_SMALL + 1)
    )
    count, nbytes = benchmark(_pump, wire, blob, SMALL_READ)
    assert count == N_SMALL
    assert nbytes == N_SMALL * len(SMALL_PAYLOAD)
    _rate(benchmark, len(blob))
    if benchmark.stats is not None:
        stats = benchmark.stats.stats
        benchmark.extra_info["messages_per_s"] = N_SMALL / stats.median
        benchmark.extra_info["ns_per_message"] = stats.median / N_SMALL * 1e9
        benchmark.extra_info["ns_per_message_best"] = stats.min / N_SMALL * 1e9


@pytest.mark.parametrize("read_size", [64 * 1024, 256 * 1024], ids=["read64k", "read256k"])
def test_decode_data_packets(benchmark: Any, wire: ModuleType, read_size: int) -> None:
    """Decode a run of 64 full STREAM data packets (262120-byte payloads, 16 MiB), received
    in 64 KiB or 256 KiB reads: the large-packet path (own buffer, peek for the next
    header).  ``extra_info["GB_per_s"]`` counts payload bytes."""
    payload = bytes(STREAM_CHUNK)
    header = wire.pack_header(PROG, VERS, PROC, STREAM, 1, CONTINUE, STREAM_CHUNK)
    blob = (header + payload) * N_DATA
    count, nbytes = benchmark(_pump, wire, blob, read_size)
    assert count == N_DATA
    assert nbytes == N_DATA * STREAM_CHUNK
    _rate(benchmark, nbytes)


def test_encode_stream_data_1mib(benchmark: Any, wire: ModuleType) -> None:
    """Frame 1 MiB of stream data with ``encode_stream_data``: headers plus memoryview
    slices (no payload copy), as handed to ``writelines``."""
    data = bytearray(1024 * 1024)
    out = benchmark(wire.encode_stream_data, PROG, VERS, PROC, 1, data)
    assert len(out) == 2 * -(-len(data) // STREAM_CHUNK)
    _rate(benchmark, len(data))


def test_encode_stream_packet_header(benchmark: Any, wire: ModuleType) -> None:
    """``pack_header`` for one stream data packet: the fixed per-packet cost of sending."""
    out = benchmark(wire.pack_header, PROG, VERS, PROC, STREAM, 1, CONTINUE, STREAM_CHUNK)
    assert len(out) == 28


@xdr.struct
class DomainInfo:
    """A small struct shaped like a typical libvirt reply."""

    name: Annotated[str, xdr.string(1024)]
    uuid: Annotated[bytes, xdr.fixed_opaque(16)]
    id: xdr.Int
    state: xdr.UInt
    memory: xdr.UHyper
    vcpus: xdr.UInt
    cpu_time: xdr.UHyper
    description: Annotated[str, xdr.string(4096)]


INFO = DomainInfo(
    name="guest-01.example.org",
    uuid=bytes(range(16)),
    id=42,
    state=1,
    memory=8 * 1024 * 1024,
    vcpus=4,
    cpu_time=123_456_789_000,
    description="a small test domain used by the benchmarks",
)


def _struct_type(wire: ModuleType) -> xdr.StructType[DomainInfo]:
    """``DomainInfo``'s XDR type, used with ``wire``'s Packer/Unpacker.

    Since ``dbf082b`` the primitives call the method of the packer object they are
    given (``xdr._Primitive``), never an unbound method of the twin ``virnet._impl``
    chose at import, so one schema serves both twins: the same work as ``xdr.encode``.
    """
    del wire  # the packer passed at call time decides the twin
    return xdr.type_of(DomainInfo)  # type: ignore[return-value]


def _encode(wire: ModuleType, stype: Any, value: DomainInfo) -> bytes:
    packer = wire.Packer()
    stype.pack(packer, value)
    return bytes(packer.getvalue())


def _decode(wire: ModuleType, stype: Any, data: bytes) -> DomainInfo:
    unpacker = wire.Unpacker(data)
    value: DomainInfo = stype.unpack(unpacker)
    unpacker.done()
    return value


def test_xdr_encode_struct(benchmark: Any, wire: ModuleType) -> None:
    """Encode an 8-field struct (strings, fixed opaque, ints, hypers) with the twin's
    ``Packer`` through the ``xdr`` schema layer."""
    stype = _struct_type(wire)
    data = benchmark(_encode, wire, stype, INFO)
    assert data == xdr.encode(DomainInfo, INFO)


def test_xdr_decode_struct(benchmark: Any, wire: ModuleType) -> None:
    """Decode the same struct with the twin's ``Unpacker`` through the ``xdr`` schema
    layer (including the trailing-data check)."""
    stype = _struct_type(wire)
    data = _encode(wire, stype, INFO)
    value = benchmark(_decode, wire, stype, data)
    assert value == INFO
