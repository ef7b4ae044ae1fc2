"""The sans-IO connection core on its own: no loop, no sockets."""

from __future__ import annotations

from typing import Any

from virnet._core import Buffer, ConnectionCore
from virnet.constants import STREAM_CHUNK


class Core(ConnectionCore):
    def __init__(self) -> None:
        super().__init__(is_client=True)
        self.notified = 0

    def on_output(self) -> None:
        self.notified += 1


class Endpoint:
    """A stream endpoint with ``packets`` payloads to send, cut at the flush's limit."""

    def __init__(self, name: str, sizes: list[int]) -> None:
        self.name = name
        self.sizes = sizes
        self.limits: list[int] = []

    def next_packet(self, limit: int) -> tuple[list[Buffer], int, bool] | None:
        self.limits.append(limit)
        if not self.sizes:
            return None
        n = min(self.sizes[0], limit)
        if n == self.sizes[0]:
            self.sizes.pop(0)
        else:
            self.sizes[0] -= n
        return [f"{self.name}{n}".encode()], n, bool(self.sizes)


def test_urgent_packets_notify_even_behind_stream_data() -> None:
    """The glue may be holding stream data back (transport full); a call, reply or
    control packet queued then must still get a flush of its own."""
    core = Core()
    core.mark_ready(Endpoint("a", [100]))
    assert core.notified == 1
    core.queue_urgent([b"call"])
    assert core.notified == 2  # stream data pending did not swallow the notification
    core.queue_urgent([b"more"])
    assert core.notified == 2  # already pending: one flush takes both
    assert core.take_output(0) == [b"call", b"more"]
    core.queue_urgent([b"again"])
    assert core.notified == 3


def test_take_output_urgent_first_round_robin_and_packet_limit() -> None:
    core = Core()
    a = Endpoint("a", [300, 300])
    b = Endpoint("b", [50])
    core.mark_ready(a)
    core.mark_ready(b)
    core.queue_urgent([b"reply"])
    out = core.take_output(10_000, packet_limit=200)
    assert out == [b"reply", b"a200", b"b50", b"a100", b"a200", b"a100"]
    assert set(a.limits) == {200}
    assert not core.has_output()


def test_take_output_budget_and_default_limit() -> None:
    core = Core()
    a = Endpoint("a", [STREAM_CHUNK] * 4)
    core.mark_ready(a)
    out: Any = core.take_output(2 * STREAM_CHUNK)
    assert len(out) == 2 and a.limits == [STREAM_CHUNK] * 2
    assert core.has_output()
    assert core.take_output(0) == []  # a zero budget takes urgent packets only


def test_take_urgent_alone_only_when_no_stream_is_ready() -> None:
    """The glue's shortcut (write calls and replies straight to the transport) may only
    take the urgent packets when they are all there is: with a stream ready it gets
    None, nothing is taken, and the full ``take_output`` still sees both."""
    core = Core()
    assert core.take_urgent_alone() == []
    core.queue_urgent([b"reply1"])
    core.queue_urgent([b"reply2"])
    assert core.take_urgent_alone() == [b"reply1", b"reply2"]
    assert not core.has_output()

    a = Endpoint("a", [100])
    core.mark_ready(a)
    core.queue_urgent([b"reply3"])
    assert core.take_urgent_alone() is None
    assert core.take_output(10_000) == [b"reply3", b"a100"]


def test_send_reply_counts_and_notify_false_does_not_notify() -> None:
    core = Core()
    n1 = core.send_reply(0x20008086, 1, 66, 5, 0, b"abcd", notify=False)
    n2 = core.send_reply(0x20008086, 1, 66, 6, 1, b"", notify=False)
    assert core.notified == 0  # the caller writes them itself
    assert n2 > n1 >= 1 and core.urgent_backlog() == n2
    decoded = b"".join(bytes(b) for b in core.take_output(0))
    # two REPLY packets, serials 5 and 6, statuses OK and ERROR, in order
    assert len(decoded) == 28 + 4 + 28
    assert decoded[20:24] == (5).to_bytes(4, "big") and decoded[24:28] == bytes(4)
    assert decoded[32 + 20 : 32 + 24] == (6).to_bytes(4, "big")
    assert decoded[32 + 24 : 32 + 28] == (1).to_bytes(4, "big")
