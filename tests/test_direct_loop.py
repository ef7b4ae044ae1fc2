"""The inner loop of direct runs (``splice_packets``), both twins, over a real Unix
socket pair: whole packets move socket -> pipe -> sink, and each way out (budget, stop,
wait, partial or foreign header, a socket that runs dry inside a packet, a sink that does
not take a splice) returns exactly the state ``DirectRun`` continues from.  Every case
checks explicit values, so the twins agree because both are right."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest

import _cores
from _rpcutil import pattern
from virnet._impl import pack_header
from virnet.constants import MessageStatus, MessageType

KEY = (0x20008086, 1, 7, 5)
STREAM = int(MessageType.STREAM)
CONTINUE = int(MessageStatus.CONTINUE)
PIPE_SIZE = 1024 * 1024


@pytest.fixture(params=["pure", "compiled"])
def loop(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "pure":
        return _cores.pure("_direct_loop")
    return _cores.compiled(name="_direct_loop")


def packet(
    payload: bytes,
    key: tuple[int, int, int, int] = KEY,
    mtype: int = STREAM,
    status: int = CONTINUE,
) -> bytes:
    prog, vers, proc, serial = key
    return bytes(pack_header(prog, vers, proc, mtype, serial, status, len(payload))) + payload


@dataclass
class Out:
    why: int
    moved: int
    packets: int
    offset: int
    size: int
    left: int
    pending: int
    header: bytes
    sink: bytes  # what the sink file holds
    rest: bytes  # what is still in the socket
    piped: bytes  # what is still in the pipe


class Rig:
    def __init__(self, tmp: str) -> None:
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.b.setblocking(False)
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
        except OSError:
            pass
        os.set_blocking(self.r, False)
        self.path = os.path.join(tmp, "sink.bin")
        self.sink = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def close(self) -> None:
        self.a.close()
        self.b.close()
        for fd in (self.r, self.w, self.sink):
            os.close(fd)

    def run(
        self,
        loop: ModuleType,
        feed: bytes,
        *,
        eof: bool = False,
        offset: int = 0,
        limit: int = -1,
        budget: int = 1 << 40,
        stop: int = 0,
        max_payload: int = 1 << 20,
    ) -> Out:
        self.a.sendall(feed)
        if eof:
            self.a.shutdown(socket.SHUT_WR)
        header = bytearray(28)
        got = loop.splice_packets(
            self.b.fileno(), self.r, self.w, PIPE_SIZE, self.sink, offset, KEY,
            max_payload, limit, budget, bytearray([stop]), header,
        )
        assert len(got) == 7 and all(type(v) is int for v in got), got
        rest = b""
        try:
            while chunk := self.b.recv(1 << 20):
                rest += chunk
        except BlockingIOError:
            pass
        piped = b""
        try:
            while chunk := os.read(self.r, 1 << 20):
                piped += chunk
        except BlockingIOError:
            pass
        with open(self.path, "rb") as fh:
            sink = fh.read()
        why, moved, packets, offset, size, left, pending = got
        return Out(
            why, moved, packets, offset, size, left, pending, bytes(header), sink, rest, piped
        )


@pytest.fixture
def rig(tmp_path: os.PathLike[str]) -> Iterator[Rig]:
    r = Rig(os.fspath(tmp_path))
    try:
        yield r
    finally:
        r.close()


P1, P2, P3 = pattern(1000, 1), pattern(3000, 2), pattern(500, 3)


def test_whole_packets_until_the_socket_has_nothing(loop: ModuleType, rig: Rig) -> None:
    out = rig.run(loop, packet(P1) + packet(P2) + packet(P3))
    assert (out.why, out.moved, out.packets, out.offset) == (loop.WAIT, 4500, 3, 4500)
    assert out.sink == P1 + P2 + P3
    assert (out.rest, out.piped) == (b"", b"")


def test_offset_places_the_bytes(loop: ModuleType, rig: Rig) -> None:
    out = rig.run(loop, packet(P1), offset=100)
    assert (out.why, out.offset) == (loop.WAIT, 1100)
    assert out.sink == bytes(100) + P1


def test_offset_minus_one_writes_at_the_sinks_own_position(loop: ModuleType, rig: Rig) -> None:
    os.write(rig.sink, b"abc")
    out = rig.run(loop, packet(P1) + packet(P3), offset=-1)
    assert (out.why, out.moved, out.offset) == (loop.WAIT, 1500, -1)
    assert out.sink == b"abc" + P1 + P3


def test_budget_returns_after_the_packet_that_reaches_it(loop: ModuleType, rig: Rig) -> None:
    out = rig.run(loop, packet(P1) + packet(P2) + packet(P3), budget=1500)
    assert (out.why, out.moved, out.packets, out.offset) == (loop.BUDGET, 4000, 2, 4000)
    assert out.rest == packet(P3)


def test_the_stop_flag_is_read_before_each_packet(loop: ModuleType, rig: Rig) -> None:
    out = rig.run(loop, packet(P1), stop=1)
    assert (out.why, out.moved, out.packets) == (loop.STOPPED, 0, 0)
    assert out.rest == packet(P1) and out.sink == b""


def test_a_partial_header_is_handed_back(loop: ModuleType, rig: Rig) -> None:
    data = packet(P1) + packet(P3)[:10]
    out = rig.run(loop, data)
    assert (out.why, out.moved, out.packets, out.left) == (loop.PARTIAL, 1000, 1, 10)
    assert out.header[:10] == packet(P3)[:10]
    assert out.rest == b""


def test_end_of_stream_at_a_boundary_is_a_partial_of_nothing(loop: ModuleType, rig: Rig) -> None:
    out = rig.run(loop, packet(P1), eof=True)
    assert (out.why, out.moved, out.left) == (loop.PARTIAL, 1000, 0)


@pytest.mark.parametrize(
    "other",
    [
        packet(P3, key=(KEY[0], KEY[1], KEY[2], 6)),  # another stream
        packet(P3, key=(KEY[0], KEY[1], 8, KEY[3])),  # another procedure
        packet(P3, key=(KEY[0] + 1, KEY[1], KEY[2], KEY[3])),
        packet(P3, key=(KEY[0], 2, KEY[2], KEY[3])),
        packet(P3, mtype=int(MessageType.REPLY)),
        packet(b"", status=int(MessageStatus.OK)),  # the stream's end
        packet(P3, status=int(MessageStatus.ERROR)),
        packet(b""),  # an empty data packet (a hole's neighbour, or odd): not a run's
        packet(pattern(2000, 4)),  # over max_payload
    ],
    ids=["serial", "proc", "prog", "vers", "reply", "eof", "error", "empty", "too-big"],
)
def test_anything_but_this_streams_data_is_foreign(
    loop: ModuleType, rig: Rig, other: bytes
) -> None:
    out = rig.run(loop, packet(P1) + other, max_payload=1500)
    assert (out.why, out.moved, out.packets, out.offset) == (loop.FOREIGN, 1000, 1, 1000)
    assert out.header == other[:28]
    assert out.rest == other[28:]  # the payload is left for the ordinary path
    assert out.sink == P1


@pytest.mark.parametrize("limit", [1400, 1500])
def test_a_packet_past_the_limit_is_foreign(loop: ModuleType, rig: Rig, limit: int) -> None:
    out = rig.run(loop, packet(P1) + packet(P3), limit=limit)
    if limit < 1500:
        assert (out.why, out.moved, out.packets) == (loop.FOREIGN, 1000, 1)
        assert out.header == packet(P3)[:28]
    else:  # exactly the limit is allowed
        assert (out.why, out.moved, out.packets) == (loop.WAIT, 1500, 2)


def test_the_socket_running_dry_inside_a_packet(loop: ModuleType, rig: Rig) -> None:
    out = rig.run(loop, packet(P1) + packet(P2)[:28 + 1200])
    assert out.why == loop.SOCKET
    assert (out.moved, out.packets, out.offset) == (1000, 1, 2200)
    assert (out.size, out.left, out.pending) == (3000, 1800, 0)
    assert out.sink == P1 + P2[:1200]


def test_a_sink_that_refuses_splice_leaves_the_bytes_in_the_pipe(
    loop: ModuleType, tmp_path: os.PathLike[str]
) -> None:
    rig = Rig(os.fspath(tmp_path))
    try:
        os.close(rig.sink)  # O_APPEND: splice into it fails with EINVAL
        rig.sink = os.open(rig.path, os.O_WRONLY | os.O_APPEND)
        out = rig.run(loop, packet(P2) + packet(P1), offset=-1)
    finally:
        rig.close()
    assert out.why == loop.SINK
    assert (out.moved, out.packets, out.offset) == (0, 0, -1)
    assert (out.size, out.left, out.pending) == (3000, 0, 3000)
    assert out.piped == P2 and out.sink == b""
    assert out.rest == packet(P1)


def test_bad_buffers_are_refused(loop: ModuleType, rig: Rig) -> None:
    for stop, header in ((bytearray(), bytearray(28)), (bytearray(1), bytearray(27))):
        with pytest.raises(ValueError, match="stop must hold a byte and header 28 bytes"):
            loop.splice_packets(
                rig.b.fileno(), rig.r, rig.w, PIPE_SIZE, rig.sink, 0, KEY,
                1 << 20, -1, 1 << 30, stop, header,
            )


def test_the_twins_have_one_surface() -> None:
    pure = _cores.pure("_direct_loop")
    names = ["BUDGET", "STOPPED", "WAIT", "PARTIAL", "FOREIGN", "SOCKET", "SINK"]
    assert len({getattr(pure, n) for n in names}) == len(names)
    if _cores.NO_EXTENSIONS:
        return
    compiled = _cores.compiled(name="_direct_loop")
    assert [getattr(compiled, n) for n in names] == [getattr(pure, n) for n in names]
    assert compiled.IS_COMPILED and not pure.IS_COMPILED
