"""The sans-IO stream core on its own: no loop, no sockets, no clock.

Two ``ConnectionCore``s (a client and a server) are wired back to back through byte
pipes that the tests move by hand, so every packet crosses the real encoder, decoder and
router.  ``StreamCore`` is driven through its own methods (what the asyncio ``Stream``
facade calls) and by packets from the peer.

* HELLO offer/accept/reply in the core;
* the routing table (only the core writes it);
* state tables, h2 style: every (state, input) pair either makes a legal transition or
  raises the core's own error (``ProtocolError`` / ``StreamError``), never another;
* stateful tests for credit (native) and the legacy receive limit, and the
  connection-wide receive budget.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from virnet import protocol, xdr
from virnet._core import FEATURES, ConnectionCore, Mode
from virnet._impl import encode_message
from virnet._streams import EOF, SEND_QUEUE_LIMIT, Hole, StreamCore, StreamState
from virnet.constants import (
    CONTROL_CREDIT,
    CONTROL_PROGRAM,
    CONTROL_VERSION,
    FEATURE_FLOW_CONTROL,
    FEATURE_KEEPALIVE,
    STREAM_CHUNK,
    MessageStatus,
    MessageType,
)
from virnet.errors import ProtocolError, RPCError, StreamError
from virnet.limits import DEFAULT_LIMITS, Limits

PROG, VERS, PROC = 0x20000001, 1, 7
STREAM = int(MessageType.STREAM)
HOLE = int(MessageType.STREAM_HOLE)
OK = int(MessageStatus.OK)
ERROR = int(MessageStatus.ERROR)
CONTINUE = int(MessageStatus.CONTINUE)
CLOSED = {StreamState.FINISHED, StreamState.ABORTED, StreamState.FAILED}


class Conn(ConnectionCore):
    """A core that records what it tells the glue."""

    def __init__(self, *, is_client: bool, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(is_client=is_client, limits=limits)
        self.paused = False
        self.pause_changes = 0
        self.closed_streams: list[StreamCore] = []
        self.unrouted = 0

    def on_rx_pause(self, paused: bool) -> None:
        assert paused != self.paused, "pause reported twice"
        self.paused = paused
        self.pause_changes += 1

    def on_stream_closed(self, stream: StreamCore) -> None:
        self.closed_streams.append(stream)

    def on_unrouted_stream(self, msg: Any) -> None:
        self.unrouted += 1

    def on_call(self, msg: Any) -> None:
        pass  # the HELLO tests call accept_hello themselves

    def output(self, budget: int = 1 << 30) -> bytes:
        return b"".join(bytes(b) for b in self.take_output(budget))


class Recorder:
    """A stream listener counting what the core reported."""

    def __init__(self) -> None:
        self.rx = self.tx = self.finish_requests = 0
        self.confirms: list[StreamError | None] = []

    def on_rx(self) -> None:
        self.rx += 1

    def on_tx(self) -> None:
        self.tx += 1

    def on_confirm(self, err: StreamError | None) -> None:
        self.confirms.append(err)

    def on_finish_request(self) -> None:
        self.finish_requests += 1


def pair(native: bool = True, **limits: int) -> tuple[Conn, Conn]:
    lim = DEFAULT_LIMITS.replace(**limits)
    client, server = Conn(is_client=True, limits=lim), Conn(is_client=False, limits=lim)
    if native:
        reply = server.accept_hello(client.hello_offer())
        client.apply_hello_reply(reply)
    else:
        client.hello_refused()
    return client, server


def packet(status: int, payload: bytes = b"", *, mtype: int = STREAM, serial: int = 1) -> bytes:
    return b"".join(
        bytes(b) for b in encode_message(PROG, VERS, PROC, mtype, serial, status, payload)
    )


def hole_packet(length: int, flags: int = 0) -> bytes:
    return packet(
        CONTINUE, xdr.encode(protocol.StreamHole, protocol.StreamHole(length, flags)), mtype=HOLE
    )


def credit_packet(amount: int, serial: int = 1) -> bytes:
    payload = xdr.encode(protocol.Credit, protocol.Credit(PROG, VERS, PROC, serial, amount))
    return b"".join(
        bytes(b)
        for b in encode_message(
            CONTROL_PROGRAM, CONTROL_VERSION, CONTROL_CREDIT, int(MessageType.MESSAGE), 0, OK,
            payload,
        )
    )


# ---------------------------------------------------------------------- HELLO
def test_hello_offer_accept_and_reply() -> None:
    client = Conn(is_client=True, limits=Limits(window=1 << 20))
    server = Conn(is_client=False, limits=Limits(window=3 << 20))
    offer = client.hello_offer()
    assert xdr.decode(protocol.Hello, offer) == protocol.Hello(FEATURES, 1 << 20)
    assert client.mode is Mode.UNKNOWN  # nothing is decided by offering
    reply = server.accept_hello(offer)
    assert server.mode is Mode.NATIVE and server.features == FEATURES
    assert server.peer_window == 1 << 20 and server.flow_control and server.keepalive_negotiated
    assert xdr.decode(protocol.Hello, reply) == protocol.Hello(FEATURES, 3 << 20)
    client.apply_hello_reply(reply)
    assert client.mode.value == "native" and client.features == FEATURES  # (mypy narrows)
    assert client.peer_window == 3 << 20 and client.flow_control


def test_hello_accepts_only_known_features_and_the_offered_ones() -> None:
    server = Conn(is_client=False)
    reply = server.accept_hello(xdr.encode(protocol.Hello, protocol.Hello(0xFFFF_FFFF, 5)))
    assert server.features == FEATURES  # unknown bits are not accepted
    assert xdr.decode(protocol.Hello, reply).features == FEATURES
    client = Conn(is_client=True)
    client.hello_offer(FEATURE_KEEPALIVE)
    client.apply_hello_reply(xdr.encode(protocol.Hello, protocol.Hello(0xFFFF_FFFF, 5)))
    assert client.features == FEATURE_KEEPALIVE  # a reply cannot add what we did not offer
    assert not client.flow_control and client.keepalive_negotiated
    server = Conn(is_client=False)
    server.accept_hello(xdr.encode(protocol.Hello, protocol.Hello(FEATURE_FLOW_CONTROL, 5)))
    assert server.flow_control and not server.keepalive_negotiated


def test_hello_malformed_offer_is_an_error_reply_and_changes_nothing() -> None:
    server = Conn(is_client=False)
    with pytest.raises(RPCError, match="invalid HELLO"):
        server.accept_hello(b"\x00\x00")
    assert server.mode is Mode.UNKNOWN and server.features == 0


def test_hello_bad_reply_and_refusal() -> None:
    client = Conn(is_client=True)
    client.hello_offer()
    with pytest.raises(ProtocolError, match="bad HELLO reply"):
        client.apply_hello_reply(b"\x01")
    client.hello_refused()
    assert client.mode is Mode.LEGACY and not client.flow_control
    assert not client.keepalive_negotiated


def test_credit_before_negotiation_is_a_protocol_error() -> None:
    client, _ = pair(native=False)
    with pytest.raises(ProtocolError, match="CREDIT before flow control"):
        client.feed(credit_packet(10))


# ---------------------------------------------------------------------- routing table
def test_only_the_core_writes_the_routing_table() -> None:
    client, _ = pair()
    st_ = client.open_stream(PROG, VERS, PROC, 1)
    assert client.streams == {st_.key: st_}
    st_.terminate(StreamState.FAILED, None)
    assert client.streams == {} and client.closed_streams == [st_]
    st_.terminate(StreamState.ABORTED, None)  # closed already: nothing happens
    assert st_.state is StreamState.FAILED and client.closed_streams == [st_]
    # A stale end does not unregister a newer stream of the same name.
    old = client.open_stream(PROG, VERS, PROC, 2)
    new = client.open_stream(PROG, VERS, PROC, 2)
    old.terminate(StreamState.FAILED, None)
    assert client.streams == {new.key: new}
    client.feed(packet(CONTINUE, b"late", serial=1))  # an ended stream's late packet
    assert client.unrouted == 1


def test_packet_buffers_of_ended_streams_are_given_back() -> None:
    """Several streams whose data waits unread keep a pooled packet buffer busy per
    packet; once the last stream has ended the connection keeps only POOL_KEEP."""
    from virnet import _wire_py

    client, _ = pair()
    streams = [client.open_stream(PROG, VERS, PROC, serial) for serial in (1, 2)]
    chunk = bytes(STREAM_CHUNK)
    for _ in range(12):
        for serial in (1, 2):
            client.feed(packet(CONTINUE, chunk, serial=serial))
    assert client.decoder.pooled == 24  # one per unread packet, none freed yet
    streams[0].terminate(StreamState.ABORTED, None)
    assert client.decoder.pooled == 24  # another stream is still open
    streams[1].terminate(StreamState.ABORTED, None)
    assert client.decoder.pooled == _wire_py.POOL_KEEP


# ---------------------------------------------------------------------- state tables
#: Legal state changes of one step.  A server never shows FINISHING; it goes from OPEN
#: straight to FINISHED when its completion confirms the client's finish.
LEGAL = {
    StreamState.OPEN: {StreamState.OPEN, StreamState.FINISHING} | CLOSED,
    StreamState.FINISHING: {StreamState.FINISHING} | CLOSED,
    StreamState.FINISHED: {StreamState.FINISHED},
    StreamState.ABORTED: {StreamState.ABORTED},
    StreamState.FAILED: {StreamState.FAILED},
}

WIRE_INPUTS: dict[str, Any] = {
    "data": lambda: packet(CONTINUE, b"x" * 1000),
    "big data": lambda: packet(CONTINUE, b"y" * STREAM_CHUNK),
    "eof": lambda: packet(CONTINUE),
    "ok": lambda: packet(OK),
    "abort": lambda: packet(ERROR),
    "error": lambda: packet(ERROR, protocol.encode_error(RPCError("boom"))),
    "garbage error": lambda: packet(ERROR, b"\x00\x01"),
    "hole": lambda: hole_packet(4096),
    "bad hole": lambda: hole_packet(0, 1),
    "garbage hole": lambda: packet(CONTINUE, b"\x01", mtype=HOLE),
    "credit": lambda: credit_packet(STREAM_CHUNK),
}


def _api(name: str) -> Any:
    def send(s: StreamCore) -> None:
        s.check_send()
        s.queue(b"z" * 3000, 3000)

    def read(s: StreamCore) -> None:
        s.check_recv()
        if s.rx:
            s.take(100)

    actions = {
        "send": send,
        "send hole": lambda s: s.queue_hole(10),
        "send eof": lambda s: s.queue_eof(),
        "finish": lambda s: s.start_finish(),
        "abort": lambda s: s.start_abort("stop"),
        "read": read,
        "flush": lambda s: s.conn.take_output(1 << 30),
        "fail": lambda s: s.fail_after_data(StreamError("server failed")),
        "discard": lambda s: s.discard_unread(),
        "confirm": lambda s: s.queue_finish_confirmation(),
        "lost": lambda s: s.connection_lost(ConnectionError("gone")),
        "give up": lambda s: s.terminate(StreamState.ABORTED, None),
    }
    return actions[name]


API_INPUTS = [
    "send", "send hole", "send eof", "finish", "abort", "read", "flush", "fail", "discard",
    "confirm", "lost", "give up",
]
INPUTS = [("wire", n) for n in WIRE_INPUTS] + [("api", n) for n in API_INPUTS]


def apply(s: StreamCore, kind: str, name: str) -> None:
    if kind == "wire":
        s.conn.feed(WIRE_INPUTS[name]())
    else:
        _api(name)(s)


def check_consistent(s: StreamCore) -> None:
    conn = s.conn
    assert s.tx_bytes >= 0 and s.rx_bytes >= 0 and conn.rx_buffered >= 0
    assert s.credit >= 0 or not s.native
    if s.closed:
        assert s.key not in conn.streams
        assert not s.tx and s.tx_bytes == 0
        assert s not in conn._rx_over_limit
    else:
        assert conn.streams.get(s.key) is s
        assert conn.rx_buffered == s.rx_bytes


def make_stream(is_client: bool, native: bool, sparse: bool, direction: str) -> StreamCore:
    client, server = pair(native=native)
    conn = client if is_client else server
    s = conn.open_stream(
        PROG, VERS, PROC, 1, sparse=sparse,
        can_send=direction != ("download" if is_client else "upload"),
        can_recv=direction != ("upload" if is_client else "download"),
    )
    s.listener = Recorder()
    return s


def step(s: StreamCore, kind: str, name: str) -> None:
    before = s.state
    try:
        apply(s, kind, name)
    except (ProtocolError, StreamError):
        pass  # the core's own errors are fine; anything else fails the test
    assert s.state in LEGAL[before], (before, kind, name, s.state)
    if s.is_client is False:
        assert s.state is not StreamState.FINISHING
    check_consistent(s)


setups = st.tuples(
    st.booleans(), st.booleans(), st.booleans(), st.sampled_from(["upload", "download", "both"])
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups, inputs=st.lists(st.sampled_from(INPUTS), max_size=12))
def test_every_state_input_pair_is_legal_or_the_cores_own_error(
    setup: tuple[bool, bool, bool, str], inputs: list[tuple[str, str]]
) -> None:
    s = make_stream(*setup)
    for kind, name in inputs:
        step(s, kind, name)


#: State prefixes reached from a fresh stream, for the exhaustive table below.
PREFIXES: dict[str, list[tuple[str, str]]] = {
    "open": [],
    "eof received": [("wire", "eof")],
    "finishing": [("api", "finish")],
    "aborting": [("api", "abort")],
    "failing": [("api", "fail")],
    "finish requested": [("wire", "ok")],
    "closed": [("api", "lost")],
}


@pytest.mark.parametrize("is_client", [True, False], ids=["client", "server"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "legacy"])
@pytest.mark.parametrize("prefix", list(PREFIXES))
@pytest.mark.parametrize("kind,name", INPUTS, ids=[f"{k}:{n}" for k, n in INPUTS])
def test_state_table(is_client: bool, native: bool, prefix: str, kind: str, name: str) -> None:
    for sparse in (False, True):
        s = make_stream(is_client, native, sparse, "both")
        for k, n in PREFIXES[prefix]:
            step(s, k, n)
        step(s, kind, name)


@pytest.mark.parametrize(
    "is_client,prefix,wire,expect",
    [
        # (role, reached by, packet) -> the state it leads to, or the error it raises
        (True, [], "ok", ProtocolError),  # a confirmation that answers nothing
        (True, [("api", "finish")], "ok", StreamState.FINISHED),
        (True, [("api", "finish")], "error", StreamState.FAILED),
        (True, [("api", "finish")], "garbage error", ProtocolError),
        (True, [("api", "abort")], "ok", StreamState.ABORTED),
        (True, [("api", "abort")], "abort", StreamState.FAILED),
        (True, [], "abort", StreamState.FAILED),  # the server aborted
        (False, [], "ok", StreamState.OPEN),  # a finish request
        (False, [("wire", "ok")], "ok", ProtocolError),  # a second finish request
        (False, [], "abort", StreamState.ABORTED),  # the client aborted
        (True, [], "hole", StreamState.FAILED),  # not opened sparse
        (False, [], "bad hole", StreamState.FAILED),
        (True, [("wire", "eof")], "data", StreamState.FAILED),  # data after EOF
        (False, [("wire", "eof")], "eof", StreamState.FAILED),
    ],
)
def test_expected_transitions(
    is_client: bool, prefix: list[tuple[str, str]], wire: str, expect: Any
) -> None:
    s = make_stream(is_client, True, False, "both")
    for kind, name in prefix:
        apply(s, kind, name)
    if isinstance(expect, StreamState):
        s.conn.feed(WIRE_INPUTS[wire]())
        assert s.state is expect
    else:
        with pytest.raises(expect):
            s.conn.feed(WIRE_INPUTS[wire]())
    check_consistent(s)


def test_client_confirmations_reach_the_listener() -> None:
    s = make_stream(True, True, False, "both")
    rec = s.listener
    assert isinstance(rec, Recorder)
    s.start_finish()
    s.conn.feed(packet(ERROR, protocol.encode_error(RPCError("disk full"))))
    assert s.state is StreamState.FAILED and len(rec.confirms) == 1
    assert isinstance(rec.confirms[0], StreamError) and "disk full" in str(rec.confirms[0])


def test_server_abort_confirms_with_ok_and_local_failures_send_errors() -> None:
    client, server = pair()
    s = server.open_stream(PROG, VERS, PROC, 1)
    client.open_stream(PROG, VERS, PROC, 1)
    server.feed(packet(ERROR))
    assert s.state is StreamState.ABORTED
    assert server.output() == packet(OK)  # libvirt's confirmation of an abort
    c = make_stream(True, True, False, "both")
    c.conn.feed(packet(CONTINUE, b"x", mtype=HOLE))  # garbage hole, not sparse either
    assert c.state is StreamState.FAILED
    assert isinstance(c.conn, Conn)
    assert c.conn.output() == packet(ERROR)  # a client aborts with an empty error


def test_server_failure_goes_out_behind_the_data() -> None:
    client, server = pair()
    s = server.open_stream(PROG, VERS, PROC, 1, can_recv=False)
    c = client.open_stream(PROG, VERS, PROC, 1, can_send=False)
    s.queue(b"a" * 100, 100)
    s.fail_after_data(StreamError("later"))
    assert s.state is StreamState.OPEN and s.error is not None  # still sending
    client.feed(server.output())
    assert s.state.value == "failed" and c.state is StreamState.FAILED  # (mypy narrows)
    assert c.bytes_received == 100 and bytes(c.take(None)) == b"a" * 100
    assert c.error is not None and "later" in str(c.error)


# ---------------------------------------------------------------------- flow control
def test_sending_waits_for_credit_and_packets_fit_the_peer_window() -> None:
    client, server = pair(window=100_000)
    s = server.open_stream(PROG, VERS, PROC, 1)
    c = client.open_stream(PROG, VERS, PROC, 1)
    assert s.credit == 100_000 and s.chunk == 100_000  # packets fit the peer's window
    s.queue(b"a" * 60_000, 60_000)
    s.queue(b"b" * 60_000, 60_000)
    client.feed(server.output())
    assert c.rx_bytes == 60_000 and s.credit == 40_000 and s.tx_bytes == 60_000
    assert not server.has_output()  # the next packet waits for credit
    c.take(None)  # consumed 60_000 >= half the window: a CREDIT goes out
    server.feed(client.output())
    assert s.credit == 100_000
    client.feed(server.output())
    assert c.rx_bytes == 60_000 and s.tx_bytes == 0


def test_a_peer_beyond_its_credit_fails_the_stream() -> None:
    client, _ = pair(window=1000)
    c = client.open_stream(PROG, VERS, PROC, 1)
    client.feed(packet(CONTINUE, b"x" * 1001))
    assert c.state is StreamState.FAILED and "flow-control window" in str(c.error)


def test_hole_reads_and_eof() -> None:
    s = make_stream(True, True, True, "both")
    s.conn.feed(hole_packet(10) + packet(CONTINUE, b"abc") + packet(CONTINUE))
    hole = s.take(None)
    assert hole == Hole(10)
    assert s.take_hole(hole, 4) == 4 and s.rx[0] == Hole(6)
    s.take(None)
    assert bytes(s.take(2)) == b"ab" and bytes(s.take(None)) == b"c"
    assert s.take(None) is EOF and s.at_eof


class FlowMachine(RuleBasedStateMachine):
    """A client downloading on several streams from a server, bytes moved by hand in
    arbitrary pieces.  Native mode: credit and the connection-wide budget; legacy mode:
    the receive limit and pausing the connection's reading."""

    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.client: Conn
        self.server: Conn
        self.pairs: list[tuple[StreamCore, StreamCore]] = []
        self.to_client = bytearray()
        self.to_server = bytearray()
        self.window = 0
        self.next_serial = 1

    @initialize(
        native=st.booleans(),
        window=st.sampled_from([4096, 100_000, STREAM_CHUNK, 3 * STREAM_CHUNK]),
        budget=st.sampled_from([1, 50_000, 600_000, 64 << 20]),
    )
    def setup(self, native: bool, window: int, budget: int) -> None:
        self.native = native
        self.window = window
        self.client, self.server = pair(native=native, window=window, rx_budget=budget)

    @precondition(lambda self: len(self.pairs) < 4)
    @rule(target=streams)
    def open(self) -> int:
        serial = self.next_serial
        self.next_serial += 1
        c = self.client.open_stream(PROG, VERS, PROC, serial, can_send=False)
        s = self.server.open_stream(PROG, VERS, PROC, serial, can_recv=False)
        self.pairs.append((c, s))
        return len(self.pairs) - 1

    @rule(i=streams, n=st.integers(1, 2 * STREAM_CHUNK))
    def server_sends(self, i: int, n: int) -> None:
        _, s = self.pairs[i]
        if s.closed or s.tx_bytes >= SEND_QUEUE_LIMIT:
            return
        pos = 0
        while pos < n:  # as Stream.send cuts it
            k = min(s.chunk, n - pos)
            s.queue(b"d" * k, k)
            pos += k

    @rule(
        budget=st.sampled_from([1, 32 * 1024, 1 << 20]),
        limit=st.sampled_from([32768, STREAM_CHUNK]),
    )
    def server_flushes(self, budget: int, limit: int) -> None:
        for b in self.server.take_output(budget, limit):
            self.to_client += b

    @rule(n=st.integers(1, STREAM_CHUNK + 28))
    def client_reads_socket(self, n: int) -> None:
        if self.client.paused or not self.to_client:
            return  # the glue does not read while the core says pause
        data = bytes(self.to_client[:n])
        del self.to_client[:n]
        self.client.feed(data)

    @rule()
    def client_flushes(self) -> None:
        self.to_server += self.client.output()

    @rule(n=st.integers(1, 4096))
    def server_reads_socket(self, n: int) -> None:
        data = bytes(self.to_server[:n])
        del self.to_server[:n]
        self.server.feed(data)

    @rule(i=streams, maximum=st.sampled_from([None, 1, 1000, STREAM_CHUNK]))
    def reader_consumes(self, i: int, maximum: int | None) -> None:
        c, _ = self.pairs[i]
        if c.rx:
            c.take(maximum)

    @rule(i=consumes(streams))
    def client_aborts(self, i: int) -> None:
        c, _ = self.pairs[i]
        if not c.closed:
            c.start_abort("enough")
            c.terminate(StreamState.ABORTED, None)  # as the facade does when it gives up

    def settle(self) -> None:
        """Move every byte both ways until nothing moves (readers drain everything)."""
        for _ in range(10_000):
            moved = False
            for c, _ in self.pairs:
                while c.rx and c.rx[0] is not EOF:
                    c.take(None)
                    moved = True
            out = self.client.output()
            if out:
                self.server.feed(out)
                moved = True
            out = self.server.output()
            if out:
                self.to_client += out
            if self.to_client and not self.client.paused:
                data = bytes(self.to_client)
                self.to_client.clear()
                self.client.feed(data)
                moved = True
            if self.to_server:
                self.server.feed(bytes(self.to_server))
                self.to_server.clear()
                moved = True
            if not moved:
                return
        raise AssertionError("no quiescence")

    @rule()
    def everything_drains(self) -> None:
        self.settle()
        client = self.client
        # A paused connection resumes and no credit stays held back once readers drain.
        assert not client.paused and not client.deferred_grants
        assert client.rx_buffered == 0
        for c, s in self.pairs:
            if c.closed or s.closed:
                continue
            assert s.tx_bytes == 0, "data stuck although every reader drained"
            if self.native:
                # Everything consumed was granted, up to less than one grant step.
                assert c.consumed < c.grant_step
                assert s.credit + s.bytes_sent == self.window + c.bytes_received - c.consumed

    @invariant()
    def credit_and_budget(self) -> None:
        if not self.pairs:
            return
        client = self.client
        open_rx = sum(c.rx_bytes for c, _ in self.pairs if not c.budget_released)
        assert client.rx_buffered == open_rx
        assert client.paused == bool(client._rx_over_limit)
        assert all(not x.closed for x in client.deferred_grants)
        if client.deferred_grants:
            assert client.rx_buffered > client.rx_budget
        for c, s in self.pairs:
            assert c.state is not StreamState.FAILED, c.error  # a peer that keeps to its credit
            assert c.rx_bytes >= 0 and c.consumed >= 0
            assert s.bytes_sent >= c.bytes_received or c.closed
            if self.native:
                assert 0 <= s.credit <= self.window
                # Never more granted than the window: what the server may still send
                # and what is unread fit in one window.
                if not c.closed:
                    granted = c.bytes_received - c.rx_bytes - c.consumed
                    assert s.credit + s.bytes_sent <= self.window + granted
                    assert c.rx_bytes <= self.window
            else:
                assert s.credit == 0
                # At most one read beyond the limit before reading pauses: the read's
                # bytes (one packet's worth here) and the partial packet before it.
                assert c.rx_bytes <= self.window + 2 * STREAM_CHUNK
                if c.over_limit:
                    assert c.rx_bytes > self.window // 2 and client.paused


FlowMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestFlow = FlowMachine.TestCase


def test_budget_defers_credit_and_a_reader_releases_it() -> None:
    """The connection-wide budget: past it no stream gets more credit; reading the
    stream that holds the data releases the other's."""
    client, server = pair(window=100_000, rx_budget=100_000)
    ca, sa = client.open_stream(PROG, VERS, PROC, 1), server.open_stream(PROG, VERS, PROC, 1)
    cb, sb = client.open_stream(PROG, VERS, PROC, 2), server.open_stream(PROG, VERS, PROC, 2)
    sa.queue(b"a" * 100_000, 100_000)
    sb.queue(b"b" * 100_000, 100_000)
    client.feed(server.output())
    assert client.rx_buffered == 200_000
    ca.take(60_000)  # a's reader consumes a grant step, but b keeps us over budget
    assert ca in client.deferred_grants and not client.has_output()
    cb.take(None)  # reading b brings the connection back: a's credit goes out
    assert not client.deferred_grants
    server.feed(client.output())
    assert sa.credit == 60_000 and sb.credit == 100_000


def test_a_stream_ending_releases_deferred_credit() -> None:
    client, server = pair(window=100_000, rx_budget=100_000)
    ca, sa = client.open_stream(PROG, VERS, PROC, 1), server.open_stream(PROG, VERS, PROC, 1)
    cb, sb = client.open_stream(PROG, VERS, PROC, 2), server.open_stream(PROG, VERS, PROC, 2)
    sa.queue(b"a" * 100_000, 100_000)
    sb.queue(b"b" * 100_000, 100_000)
    client.feed(server.output())
    ca.take(60_000)
    assert client.deferred_grants == [ca]
    cb.start_abort("no")
    server.feed(client.output())
    client.feed(server.output())  # the server's confirmation: b ends
    assert cb.state is StreamState.ABORTED
    # b's unread data stopped counting: a's credit goes out.
    assert not client.deferred_grants and client.rx_buffered == 40_000
    server.feed(client.output())
    assert sa.credit == 60_000


def test_legacy_limit_pauses_and_resumes_reading() -> None:
    client, server = pair(native=False, window=100_000)
    c, s = client.open_stream(PROG, VERS, PROC, 1), server.open_stream(PROG, VERS, PROC, 1)
    s.queue(b"x" * 150_000, 150_000)
    client.feed(server.output())
    assert client.paused and c.over_limit
    c.take(90_000)  # 60_000 left: above half the limit, still paused
    assert client.paused
    c.take(20_000)
    assert not client.paused and client.pause_changes == 2
    c.take(None)
    s2 = client.open_stream(PROG, VERS, PROC, 2)
    client.feed(packet(CONTINUE, b"y" * 100_001, serial=2))
    assert client.paused
    s2.connection_lost(ConnectionError("gone"))  # an ending stream resumes reading too
    assert not client.paused
