"""The compiled wire core (``virnet._wire``) against its pure twin (``virnet._wire_py``).

Both modules are imported directly, whatever ``virnet._impl`` chose, and must agree on
everything Python can see: names, signatures, bytes produced, messages decoded, buffer
sizes handed out, and the type and text of every exception.  A build without the
extension fails here unless ``VIRNET_NO_EXTENSIONS`` is set (a deliberate pure build).
"""

from __future__ import annotations

import array
import enum
import functools
import inspect
import math
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import _cores
from virnet import _wire_py as py_wire
from virnet.errors import ProtocolError, XdrError

c_wire = _cores.compiled(module_level=True)

MODULES = [pytest.param(py_wire, id="pure"), pytest.param(c_wire, id="compiled")]

PROG = 0x20008100
MIN_PACKET = 28


class Color(enum.IntEnum):
    RED = 3


class Str(str):
    pass


# ----------------------------------------------------------------------------- helpers


def norm(value: Any) -> Any:
    """A comparable picture of a result, including which kind of buffer it is."""
    if isinstance(value, (py_wire.Message, c_wire.Message)):
        return (
            "Message",
            value.prog,
            value.vers,
            value.proc,
            value.type,
            value.serial,
            value.status,
            norm(value.payload),
        )
    if isinstance(value, memoryview):
        return ("memoryview", value.tobytes(), value.format, value.readonly, value.ndim)
    if isinstance(value, list):
        return [norm(v) for v in value]
    if isinstance(value, tuple):
        return tuple(norm(v) for v in value)
    if isinstance(value, float) and math.isnan(value):
        return ("nan", struct.pack(">d", value))
    return (type(value).__name__, value)


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return ("ok", norm(fn(*args, **kwargs)))
    except Exception as exc:  # the exception is the result here
        return ("raise", type(exc), str(exc))


def same(call: Callable[[Any], Any]) -> Any:
    """Run ``call(module)`` on both twins; they must agree.  Returns the outcome."""
    expected = outcome(call, py_wire)
    got = outcome(call, c_wire)
    assert got == expected
    return expected


def content(msgs: list[Any]) -> list[Any]:
    """Messages without the kind of payload buffer (which depends on how bytes arrived)."""
    return [(m.prog, m.vers, m.proc, m.type, m.serial, m.status, bytes(m.payload)) for m in msgs]


def stream_wire(mod: Any, data: bytes, serial: int = 7) -> bytes:
    return bytes(mod.join(mod.encode_stream_data(PROG, 1, 3, serial, data)))


def packet(mod: Any, payload: bytes, serial: int = 1, proc: int = 1) -> bytes:
    return bytes(mod.join(mod.encode_message(PROG, 1, proc, 0, serial, 0, payload)))


def drive(mod: Any, wire: bytes, sizes: Iterator[int], **kwargs: Any) -> list[Any]:
    """Receive ``wire`` through get_buffer/buffer_updated, each read at most the next size.

    Returns the trace: every buffer length handed out, pending count and messages.
    """
    dec = mod.FrameDecoder(**kwargs)
    trace: list[Any] = []
    pos = 0
    while pos < len(wire):
        buf = dec.get_buffer(-1)
        n = min(len(buf), next(sizes), len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        pos += n
        msgs = dec.buffer_updated(n)
        trace.append((len(buf), n, dec.pending, norm(msgs)))
    return trace


# ----------------------------------------------------------------------------- interface

INTERFACE = [
    "Buffer",
    "Calls",
    "DIRECT_THRESHOLD",
    "FrameDecoder",
    "IS_COMPILED",
    "Message",
    "Packer",
    "SCRATCH_SIZE",
    "Unpacker",
    "check_length",
    "encode_message",
    "encode_stream_data",
    "join",
    "pack_header",
    "queue_message",
]


def test_compiled_module_is_compiled() -> None:
    assert c_wire.IS_COMPILED is True
    assert py_wire.IS_COMPILED is False
    assert str(c_wire.__file__).endswith((".so", ".pyd"))


@pytest.mark.parametrize("name", INTERFACE)
def test_names_and_constants(name: str) -> None:
    assert hasattr(py_wire, name)
    assert hasattr(c_wire, name)
    if name in ("SCRATCH_SIZE", "DIRECT_THRESHOLD", "Buffer"):
        assert getattr(c_wire, name) == getattr(py_wire, name)


def _params(fn: Any) -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize(
    "name",
    [
        "check_length",
        "pack_header",
        "encode_message",
        "encode_stream_data",
        "join",
        "queue_message",
    ],
)
def test_function_signatures(name: str) -> None:
    assert _params(getattr(c_wire, name)) == _params(getattr(py_wire, name))


@pytest.mark.parametrize(
    ("cls", "make"),
    [
        ("Message", lambda m: m.Message(1, 2, 3, 4, 5, 6, b"")),
        ("FrameDecoder", lambda m: m.FrameDecoder()),
        ("Packer", lambda m: m.Packer()),
        ("Unpacker", lambda m: m.Unpacker(b"")),
        ("Calls", lambda m: m.Calls(True)),
    ],
)
def test_class_surfaces(cls: str, make: Callable[[Any], Any]) -> None:
    py_obj, c_obj = make(py_wire), make(c_wire)
    public = {n for n in dir(py_obj) if not n.startswith("_")}
    assert {n for n in dir(c_obj) if not n.startswith("_")} == public
    for name in public:
        py_attr = getattr(type(py_obj), name, None)
        if inspect.isfunction(py_attr):
            assert _params(getattr(type(c_obj), name)) == _params(py_attr), name
    for dunder in ("__len__", "__eq__", "__repr__"):
        assert (dunder in type(py_obj).__dict__) == (dunder in type(c_obj).__dict__)


def test_constructor_keywords() -> None:
    for mod in (py_wire, c_wire):
        dec = mod.FrameDecoder(max_message=1000, scratch_size=mod.SCRATCH_SIZE * 2)
        assert dec.max_message == 1000
        dec.max_message = 2000
        assert dec.max_message == 2000
        msg = mod.Message(prog=1, vers=2, proc=3, type=4, serial=5, status=6, payload=b"x")
        assert (msg.prog, msg.type, msg.payload) == (1, 4, b"x")
        assert len(mod.Unpacker(data=b"abcd").unpack_fopaque(size=4)) == 4
    same(lambda m: m.FrameDecoder(max_message=23))
    same(lambda m: m.FrameDecoder(scratch_size=m.DIRECT_THRESHOLD + MIN_PACKET - 1))
    same(lambda m: m.FrameDecoder(scratch_size=m.DIRECT_THRESHOLD + MIN_PACKET).pending)
    same(lambda m: m.FrameDecoder(scratch_size=100000.5))
    for mod in (py_wire, c_wire):  # same exception; CPython words it differently for C types
        with pytest.raises(TypeError):
            mod.Packer(1)
        with pytest.raises(TypeError):
            mod.Message(1, 2, 3)


# ----------------------------------------------------------------------------- Message


def test_message_semantics() -> None:
    for mod in (py_wire, c_wire):
        a = mod.Message(0x20008086, 1, 2, 3, 4, 5, b"abc")
        assert a == mod.Message(0x20008086, 1, 2, 3, 4, 5, bytearray(b"abc"))
        assert a == mod.Message(0x20008086, 1, 2, 3, 4, 5, memoryview(b"abc"))
        assert a != mod.Message(0x20008086, 1, 2, 3, 4, 6, b"abc")
        assert a != mod.Message(0x20008086, 1, 2, 3, 4, 5, b"abd")
        assert a != (0x20008086, 1, 2, 3, 4, 5, b"abc")
        assert a.__eq__(42) is NotImplemented
        with pytest.raises(TypeError, match="unhashable"):
            hash(a)
        a.serial = 99
        assert a.serial == 99
    assert repr(py_wire.Message(0x20008086, 1, 2, 3, 4, 5, b"abc")) == repr(
        c_wire.Message(0x20008086, 1, 2, 3, 4, 5, b"abc")
    )
    same(lambda m: repr(m.Message(-1, 1, 2, 3, 4, 5, memoryview(b"abcdef")[1:])))
    same(lambda m: repr(m.Message("x", 1, 2, 3, 4, 5, b"")))


# ----------------------------------------------------------------------------- encoding

GOLDEN = [
    (
        lambda m: m.encode_message(0x20008086, 1, 1, 0, 1, 0, b"abcd"),
        "0000002020008086000000010000000100000000000000010000000061626364",
    ),
    (
        lambda m: m.encode_message(0x6B656570, 1, 1, 2, 0, 0),
        "0000001c6b6565700000000100000001000000020000000000000000",
    ),
    (
        lambda m: [m.pack_header(1, 2, -1, 3, 0xFFFFFFFF, -0x80000000, 5)],
        "000000210000000100000002ffffffff00000003ffffffff80000000",
    ),
    (
        lambda m: m.encode_stream_data(PROG, 1, 3, 9, b"0123456789", chunk_size=4),
        "000000202000810000000001000000030000000300000009000000023031323300000020"
        "200081000000000100000003000000030000000900000002343536370000001e2000810000"
        "000001000000030000000300000009000000023839",
    ),
    (
        lambda m: m.encode_stream_data(PROG, 1, 3, 9, b""),
        "0000001c200081000000000100000003000000030000000900000002",
    ),
]


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize(("call", "expected"), GOLDEN)
def test_golden_bytes(mod: Any, call: Callable[[Any], Any], expected: str) -> None:
    assert mod.join(call(mod)).hex() == expected


def test_golden_header_fields() -> None:
    for mod in (py_wire, c_wire):
        hdr = mod.pack_header(1, 2, -1, 3, 0xFFFFFFFF, -0x80000000, 5)
        assert struct.unpack(">IIIiiIi", hdr) == (33, 1, 2, -1, 3, 0xFFFFFFFF, -0x80000000)


HEADER_ARGS = [
    (1, 1, 1, 0, 1, 0),
    (0xFFFFFFFF, 0, -0x80000000, 0x7FFFFFFF, 0xFFFFFFFF, -1),
    (Color.RED, True, Color.RED, False, 0, Color.RED),
    (-1, 1, 1, 0, 1, 0),
    (2**32, 1, 1, 0, 1, 0),
    (1, 2**32, 1, 0, 1, 0),
    (1, 1, 2**31, 0, 1, 0),
    (1, 1, -(2**31) - 1, 0, 1, 0),
    (1, 1, 1, 2**31, 1, 0),
    (1, 1, 1, 0, -1, 0),
    (1, 1, 1, 0, 1, 2**40),
    (1, 1, 1, 0, 1, 2**70),
    (1.5, 1, 1, 0, 1, 0),
    (1, 1, 1, 0, 1.0, 0),
    ("x", 1, 1, 0, 1, 0),
    (None, 1, 1, 0, 1, 0),
]


@pytest.mark.parametrize("args", HEADER_ARGS)
@pytest.mark.parametrize(
    "payload_len", [0, 5, -28, -29, 2**32 - 28, 2**32 - 29, 2**64, 1.0, "x", None, True]
)
def test_pack_header_parity(args: tuple[Any, ...], payload_len: Any) -> None:
    same(lambda m: m.pack_header(*args, payload_len))
    same(lambda m: m.pack_header(*args, payload_len=payload_len))


@pytest.mark.parametrize("args", HEADER_ARGS)
@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"abc",
        bytearray(b"abcd"),
        memoryview(b"abcdef")[1:],
        memoryview(b""),
        array.array("I", [1, 2]),
        memoryview(array.array("I", [1, 2])),
        "text",
        42,
    ],
)
def test_encode_message_parity(args: tuple[Any, ...], payload: Any) -> None:
    same(lambda m: m.encode_message(*args, payload))
    same(lambda m: m.encode_message(*args, payload=payload))


def test_encode_message_does_not_copy() -> None:
    for mod in (py_wire, c_wire):
        payload = bytearray(b"xyz")
        assert mod.encode_message(1, 1, 1, 0, 1, 0, payload)[1] is payload


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"a",
        bytes(range(256)) * 5,
        bytearray(b"z" * 1000),
        memoryview(b"q" * 100)[3:],
        array.array("I", range(100)),
        memoryview(b"abcdef")[::2],
        "text",
    ],
)
@pytest.mark.parametrize("chunk_size", [1, 3, 64, 262120, 0, -1, 262121, 2.0, 2**70, "4"])
def test_encode_stream_data_parity(data: Any, chunk_size: Any) -> None:
    same(lambda m: m.encode_stream_data(PROG, 1, 3, 7, data, chunk_size))


@pytest.mark.parametrize(
    "fields", [(PROG, 1, 3, 7), (-1, 1, 3, 7), (PROG, 1, 2**31, 7), (PROG, 1, 3, 1.5)]
)
def test_encode_stream_data_field_errors(fields: tuple[Any, ...]) -> None:
    same(lambda m: m.encode_stream_data(*fields, b"abcdefgh", 3))
    same(lambda m: m.encode_stream_data(*fields, b""))


def test_encode_stream_data_views_are_slices() -> None:
    data = bytes(range(256)) * 4096
    for mod in (py_wire, c_wire):
        out = mod.encode_stream_data(PROG, 1, 3, 7, data)
        views = out[1::2]
        assert all(isinstance(v, memoryview) and v.obj is data for v in views)
        assert [len(v) for v in views] == [262120] * 4 + [96]
        assert b"".join(views) == data


def test_join_parity() -> None:
    same(lambda m: m.join([b"ab", bytearray(b"c"), memoryview(b"de")]))
    same(lambda m: m.join([]))
    same(lambda m: m.join(["x"]))


# ----------------------------------------------------------------------------- decoding


def _mixed_wire(mod: Any, rng: random.Random, count: int) -> bytes:
    sizes = [0, 1, 3, 4, 32, 100, 65536 - 29, 65536 - 28, 65536 - 27, 65536, 200000, 262120]
    parts = []
    for serial in range(count):
        n = rng.choice(sizes) if rng.random() < 0.6 else rng.randrange(0, 300000)
        payload = rng.randbytes(n)
        if rng.random() < 0.5:
            parts.append(packet(mod, payload, serial=serial, proc=rng.randrange(-5, 500)))
        else:
            parts.append(stream_wire(mod, payload, serial=serial))
    return b"".join(parts)


def test_stream_of_a_million_bytes() -> None:
    data = random.Random(1).randbytes(1_000_000)
    wire = stream_wire(py_wire, data)
    assert stream_wire(c_wire, data) == wire
    results = {}
    for mod in (py_wire, c_wire):
        at_once = mod.FrameDecoder().feed(wire)
        dec = mod.FrameDecoder()
        one_by_one = []
        for i in range(len(wire)):
            one_by_one.extend(dec.feed(wire[i : i + 1]))
        assert dec.pending == 0
        assert content(one_by_one) == content(at_once)
        assert norm(one_by_one) == norm(at_once)  # here even the buffer kinds agree
        assert b"".join(bytes(m.payload) for m in at_once) == data
        assert [len(m.payload) for m in at_once] == [262120, 262120, 262120, 213640]
        assert all(isinstance(m.payload, memoryview) for m in at_once)
        assert {(m.type, m.status, m.serial) for m in at_once} == {(3, 2, 7)}
        results[mod.__name__] = norm(at_once)
    assert results["virnet._wire"] == results["virnet._wire_py"]


@pytest.mark.parametrize("seed", range(6))
def test_random_reads_trace(seed: int) -> None:
    """Same buffers handed out, same pending counts, same messages, read by read."""
    rng = random.Random(seed)
    wire = _mixed_wire(py_wire, rng, 40)
    read_sizes = [rng.choice([1, 7, 28, 29, 4096, 65536, 262144, 10**7]) for _ in range(5000)]
    kwargs = {} if seed % 2 else {"scratch_size": py_wire.DIRECT_THRESHOLD + MIN_PACKET}
    traces = [drive(mod, wire, iter(read_sizes * 100), **kwargs) for mod in (py_wire, c_wire)]
    assert traces[1] == traces[0]


@pytest.mark.parametrize("seed", range(3))
def test_random_feed_chunks(seed: int) -> None:
    rng = random.Random(100 + seed)
    wire = _mixed_wire(py_wire, rng, 30)
    cuts = sorted(rng.sample(range(1, len(wire)), 200))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    results = []
    for mod in (py_wire, c_wire):
        dec = mod.FrameDecoder()
        out = []
        for piece in pieces:
            out.extend(dec.feed(piece))
        assert content(out) == content(mod.FrameDecoder().feed(wire))
        results.append(norm(out))
    assert results[0] == results[1]


def test_split_at_every_offset() -> None:
    wire = b"".join(
        [packet(py_wire, b"", serial=1), packet(py_wire, b"abcde", serial=2)]
        + [packet(py_wire, bytes(range(n)), serial=3 + n) for n in (1, 4, 60)]
    )
    for mod in (py_wire, c_wire):
        whole = norm(mod.FrameDecoder().feed(wire))
        assert len(whole) == 5
        for k in range(len(wire) + 1):
            dec = mod.FrameDecoder()
            assert norm(dec.feed(wire[:k]) + dec.feed(memoryview(wire)[k:])) == whole


def test_large_packet_offsets() -> None:
    big = packet(py_wire, bytes(range(256)) * 1024, serial=5)  # 262172 bytes
    wire = big + packet(py_wire, b"tail", serial=6) + big
    offsets = [*range(0, 40), 262140, 262143, 262144, 262145, len(big) - 1, len(big)]
    results = []
    for mod in (py_wire, c_wire):
        whole = content(mod.FrameDecoder().feed(wire))
        for k in offsets:
            dec = mod.FrameDecoder()
            msgs = dec.feed(wire[:k]) + dec.feed(wire[k:])
            assert content(msgs) == whole
            results.append((k, norm(msgs)))
    assert results[: len(offsets)] == results[len(offsets) :]


@pytest.mark.parametrize("mod", MODULES)
def test_receive_design(mod: Any) -> None:
    """Small packets are bytes copied out of the scratch; a large one gets its own buffer
    after its length word, is delivered as a view [28:] of it, and then the decoder peeks."""
    dec = mod.FrameDecoder()
    big = packet(mod, b"B" * 262120, serial=1)
    small = packet(mod, b"s" * 32, serial=2)

    buf = dec.get_buffer(-1)
    assert len(buf) == mod.SCRATCH_SIZE
    buf[:100] = big[:100]
    assert dec.buffer_updated(100) == []
    assert dec.pending == 100
    buf = dec.get_buffer(-1)
    assert len(buf) == len(big) - 100  # the packet's own buffer, the rest of it
    buf[:] = big[100:]
    (msg,) = dec.buffer_updated(len(buf))
    assert isinstance(msg.payload, memoryview)
    assert isinstance(msg.payload.obj, bytearray) and len(msg.payload.obj) == len(big)
    assert len(msg.payload) == 262120 and msg.payload.tobytes() == b"B" * 262120
    fields = (msg.prog, msg.vers, msg.proc, msg.type, msg.serial, msg.status)
    assert fields == (PROG, 1, 1, 0, 1, 0)

    buf = dec.get_buffer(-1)
    assert len(buf) == MIN_PACKET  # peek mode: one header's worth
    buf[:] = big[:MIN_PACKET]
    assert dec.buffer_updated(MIN_PACKET) == []
    buf = dec.get_buffer(-1)
    assert len(buf) == len(big) - MIN_PACKET
    buf[:] = big[MIN_PACKET:]
    (msg2,) = dec.buffer_updated(len(buf))
    assert msg2.payload.obj is not msg.payload.obj

    buf = dec.get_buffer(-1)
    assert len(buf) == MIN_PACKET
    buf[:] = small[:MIN_PACKET]
    assert dec.buffer_updated(MIN_PACKET) == []  # a small packet ends peek mode
    buf = dec.get_buffer(-1)
    assert len(buf) == mod.SCRATCH_SIZE - MIN_PACKET
    buf[: len(small) - MIN_PACKET] = small[MIN_PACKET:]
    (msg3,) = dec.buffer_updated(len(small) - MIN_PACKET)
    assert type(msg3.payload) is bytes and msg3.payload == b"s" * 32
    assert len(dec.get_buffer(-1)) == mod.SCRATCH_SIZE

    # A large packet already complete in the scratch is copied out like a small one.
    (msg4,) = dec.feed(packet(mod, b"m" * 100000))
    assert type(msg4.payload) is bytes and len(msg4.payload) == 100000


def test_compaction_keeps_partial_packets() -> None:
    """Many small packets, read in one scratch-full at a time: the partial packet at the
    end of the scratch moves to its front, same as the twin."""
    rng = random.Random(7)
    wire = b"".join(packet(py_wire, rng.randbytes(rng.randrange(0, 3000))) for _ in range(400))
    traces = [drive(mod, wire, iter([10**9] * 10**4)) for mod in (py_wire, c_wire)]
    assert traces[0] == traces[1]
    assert sum(len(t[3]) for t in traces[1]) == 400


# ----------------------------------------------------------------------------- bad input


def _len_word(n: int) -> bytes:
    return struct.pack(">I", n) + b"\0" * 24


@pytest.mark.parametrize("max_message", [py_wire.FrameDecoder().max_message, 1000])
@pytest.mark.parametrize("bad", [0, 1, 27, 0xFFFFFFFF, 2**31, "max+5"])
@pytest.mark.parametrize("prefix", [b"", "one-packet"])
@pytest.mark.parametrize("how", ["feed", "buffer"])
def test_bad_length_words(max_message: int, bad: Any, prefix: Any, how: str) -> None:
    if bad == "max+5":
        bad = max_message + 5
    head = packet(py_wire, b"ok") if prefix == "one-packet" else b""
    wire = head + _len_word(bad) + b"x" * 64
    expected: Any = None
    for mod in (py_wire, c_wire):
        dec = mod.FrameDecoder(max_message)
        with pytest.raises(ProtocolError) as info:
            if how == "feed":
                dec.feed(wire)
            else:
                buf = dec.get_buffer(-1)
                buf[: len(wire)] = wire
                dec.buffer_updated(len(wire))
        assert type(info.value) is ProtocolError
        reason = str(info.value)
        if expected is None:
            expected = reason
            with pytest.raises(ProtocolError) as direct:
                py_wire.check_length(bad, max_message)
            assert reason == str(direct.value)
        assert reason == expected
        # The decoder stays dead, with the same reason, whatever is asked of it.
        calls: tuple[Callable[[], object], ...] = (
            functools.partial(dec.get_buffer, -1),
            functools.partial(dec.buffer_updated, 0),
            functools.partial(dec.feed, b"more"),
            functools.partial(dec.feed, packet(mod, b"fine")),
        )
        for call in calls:
            with pytest.raises(ProtocolError) as again:
                call()
            assert str(again.value) == expected
        assert dec.feed(b"") == []


def test_limit_boundary() -> None:
    for mod in (py_wire, c_wire):
        dec = mod.FrameDecoder(max_message=100)
        (msg,) = dec.feed(packet(mod, b"p" * 76))  # length word 104 = 100 + 4
        assert len(msg.payload) == 76
        with pytest.raises(ProtocolError, match="exceeds the limit of 104 bytes"):
            dec.feed(packet(mod, b"p" * 77))
    same(lambda m: m.FrameDecoder(max_message=100).feed(packet(m, b"p" * 77)))


def test_max_message_changed_later() -> None:
    for value in (50, 10**20, -(10**20), 64.5, 65.0):

        def run(m: Any, value: Any = value) -> Any:
            dec = m.FrameDecoder()
            dec.max_message = value
            return [dec.max_message, dec.feed(packet(m, b"p" * 40))]

        same(run)


@pytest.mark.parametrize(
    ("length", "limit"),
    [(28, 24), (27, 24), (0, 100), (-5, 100), (1000, 996), (1001, 996), (2**70, 100), (30.5, 24)],
)
def test_check_length_parity(length: Any, limit: Any) -> None:
    same(lambda m: m.check_length(length, limit))


# Not a float: the pure twin cannot tell 1.5 from a count; the compiled one refuses it.
@pytest.mark.parametrize("nbytes", [-1, 0, 1, 28, 29, 2**40, 2**70, "3", None, Color.RED])
@pytest.mark.parametrize("state", ["fresh", "peek", "body", "partial"])
def test_buffer_updated_range(nbytes: Any, state: str) -> None:
    def run(m: Any) -> Any:
        dec = m.FrameDecoder()
        big = packet(m, b"B" * 100000)
        if state == "peek":
            dec.feed(big)
            dec.feed(big)
        elif state == "body":
            dec.feed(big[:50])
        elif state == "partial":
            dec.feed(big[:2] * 20)
        return [dec.buffer_updated(nbytes), dec.pending]

    same(run)


def test_feed_rejects_what_memoryview_rejects() -> None:
    for data in ("text", 42, None, memoryview(b"abcdef")[::2], array.array("B", b"xyz")):
        same(lambda m, data=data: m.FrameDecoder().feed(data))  # type: ignore[misc]
    released = memoryview(b"abc")
    released.release()
    same(lambda m: m.FrameDecoder().feed(released))


# ----------------------------------------------------------------------------- XDR Packer

PACK_CASES: list[tuple[str, list[tuple[Any, ...]]]] = [
    (
        "pack_int",
        [
            (0,),
            (1,),
            (-1,),
            (2**31 - 1,),
            (-(2**31),),
            (2**31,),
            (-(2**31) - 1,),
            (True,),
            (Color.RED,),
            (1.5,),
            (2.0,),
            ("x",),
            (None,),
            (2**100,),
        ],
    ),
    (
        "pack_uint",
        [(0,), (2**32 - 1,), (2**32,), (-1,), (False,), (Color.RED,), (3.0,), ("x",)],
    ),
    (
        "pack_hyper",
        [(0,), (-1,), (2**63 - 1,), (-(2**63),), (2**63,), (-(2**63) - 1,), (2**200,), (1.0,)],
    ),
    (
        "pack_uhyper",
        [(0,), (2**64 - 1,), (2**63,), (2**64,), (-1,), (-(2**70),), (True,), (5.5,)],
    ),
    ("pack_bool", [(True,), (False,), (0,), (2,), ("",), ("x",), (None,), ([],)]),
    (
        "pack_float",
        [
            (1.5,),
            (-0.0,),
            (math.inf,),
            (-math.inf,),
            (math.nan,),
            (1e300,),
            (-1e300,),
            (3.4028234663852886e38,),
            (3.4028235677973366e38,),
            (1e-50,),
            (1,),
            (2**200,),
            (10**400,),
            ("x",),
            (None,),
            (Color.RED,),
        ],
    ),
    (
        "pack_double",
        [(1.5,), (-0.0,), (math.nan,), (math.inf,), (1,), (10**400,), ("x",), (None,)],
    ),
    (
        "pack_fopaque",
        [
            (3, b"abc"),
            (4, b"abcd"),
            (0, b""),
            (5, b"abc"),
            (3, bytearray(b"abc")),
            (3, memoryview(b"xabc")[1:]),
            (8, array.array("I", [1, 2])),
            (2, array.array("I", [1])),
            (2, memoryview(b"abcd")[::2]),
            (3.0, b"abc"),
            ("3", b"abc"),
            (3, "abc"),
            (-1, b""),
            (2**70, b"abc"),
            (True, b"a"),
        ],
    ),
    (
        "pack_opaque",
        [
            (b"",),
            (b"abcde",),
            (b"abcde", 4),
            (b"abcde", 5),
            (b"abcd", -1),
            (b"x", 2**70),
            (b"abc", 2.5),
            (b"abc", 3.0),
            (bytearray(b"ab"),),
            (memoryview(b"abcdefg")[2:],),
            (array.array("H", [1, 2, 3]),),
            ("text",),
            (b"abc", "9"),
        ],
    ),
    (
        "pack_string",
        [
            ("",),
            ("abc",),
            ("héllo wörld",),
            ("\udcff\udc80",),
            ("日本語",),
            ("abcde", 4),
            ("abcde", 5),
            ("ééé", 5),
            ("ééé", 6),
            (b"abc",),
            (None,),
            (Str("sub"),),
            ("x", -1),
            ("abc", 2**80),
            ("abc", 2.9),
        ],
    ),
]


def _flat_cases() -> list[Any]:
    return [
        pytest.param(method, args, id=f"{method}-{i}")
        for method, cases in PACK_CASES
        for i, args in enumerate(cases)
    ]


@pytest.mark.parametrize(("method", "args"), _flat_cases())
def test_packer_parity(method: str, args: tuple[Any, ...]) -> None:
    def run(m: Any) -> Any:
        p = m.Packer()
        p.pack_uint(0xA5A5A5A5)  # something before, so appends are checked too
        return [outcome(getattr(p, method), *args), p.getvalue(), len(p)]

    result = same(run)
    if result[1][0][0] == "ok" and method != "pack_bool":
        # Round trip through both Unpackers.
        data = result[1][1][1]
        unpack = "unpack_" + method.removeprefix("pack_")
        for mod in (py_wire, c_wire):
            u = mod.Unpacker(data)
            assert u.unpack_uint() == 0xA5A5A5A5
            if method == "pack_fopaque":
                extra: tuple[Any, ...] = (len(memoryview(args[1]).cast("B")),)
            else:
                extra = args[1:]
            value = getattr(u, unpack)(*extra)
            u.done()
            original = args[1] if method == "pack_fopaque" else args[0]
            if method in ("pack_fopaque", "pack_opaque"):
                assert value == memoryview(original).cast("B").tobytes()
            elif method == "pack_float":
                assert value == struct.unpack(">f", struct.pack(">f", original))[0] or (
                    math.isnan(value)
                )
            elif method == "pack_double":
                assert value == original or math.isnan(value)
            else:
                assert value == original


def test_packer_growth_and_reset() -> None:
    def run(m: Any) -> Any:
        p = m.Packer()
        seen = []
        for i in range(3000):
            p.pack_opaque(bytes([i % 256]) * (i % 37))
            p.pack_hyper(-i)
        seen.append((len(p), p.getvalue()))
        p.reset()
        seen.append((len(p), p.getvalue()))
        p.pack_string("after reset")
        seen.append((len(p), p.getvalue()))
        p.__init__()
        seen.append((len(p), p.getvalue()))
        return seen

    same(run)


def test_packer_subclass_and_unbound_methods() -> None:
    for mod in (py_wire, c_wire):

        class MyPacker(mod.Packer):  # type: ignore[name-defined,misc]
            def pack_pair(self, a: int, b: int) -> None:
                self.pack_int(a)
                self.pack_int(b)

        p = MyPacker()
        p.pack_pair(1, -1)
        mod.Packer.pack_uint(p, 7)
        assert p.getvalue() == bytes.fromhex("00000001ffffffff00000007")


# ----------------------------------------------------------------------------- XDR Unpacker

UNPACK_DATA = [
    b"",
    b"\x00",
    b"\x00\x00\x00",
    b"\x00\x00\x00\x01",
    b"\x00\x00\x00\x02",
    b"\xff\xff\xff\xff",
    b"\x80\x00\x00\x00\x00\x00\x00\x00",
    b"\x7f\x80\x00\x00",
    b"\x7f\xc0\x00\x01",
    b"\xff\xf8\x00\x00\x00\x00\x00\x01",
    bytes.fromhex("00000003616263000000"),
    bytes.fromhex("0000000361626300"),
    bytes.fromhex("0000000361626301"),
    bytes.fromhex("00000003616263"),
    bytes.fromhex("00000004c3a9ff80"),
    bytes.fromhex("00000005ededa080ed"),
    bytes.fromhex("0000000000000000"),
    bytes.fromhex("00000002000000010000000200"),
    bytes.fromhex("ffffffff00000000"),
    bytes(range(40)),
]

UNPACK_CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("unpack_int", ()),
    ("unpack_uint", ()),
    ("unpack_hyper", ()),
    ("unpack_uhyper", ()),
    ("unpack_bool", ()),
    ("unpack_float", ()),
    ("unpack_double", ()),
    ("unpack_fopaque", (0,)),
    ("unpack_fopaque", (1,)),
    ("unpack_fopaque", (3,)),
    ("unpack_fopaque", (4,)),
    ("unpack_fopaque", (-1,)),
    ("unpack_fopaque", (2**70,)),
    ("unpack_fopaque", (2**62,)),
    ("unpack_fopaque", (2.0,)),
    ("unpack_fopaque", ("3",)),
    ("unpack_fopaque", (Color.RED,)),
    ("unpack_opaque", ()),
    ("unpack_opaque", (2,)),
    ("unpack_opaque", (3,)),
    ("unpack_opaque", (-1,)),
    ("unpack_opaque", (2.5,)),
    ("unpack_opaque", (2**70,)),
    ("unpack_string", ()),
    ("unpack_string", (2,)),
    ("unpack_string", (5,)),
    ("unpack_array_length", (0,)),
    ("unpack_array_length", (1,)),
    ("unpack_array_length", (2,)),
    ("unpack_array_length", (2**40,)),
    ("unpack_array_length", (1.5,)),
    ("done", ()),
]


@pytest.mark.parametrize("data", UNPACK_DATA, ids=lambda d: d.hex() or "empty")
@pytest.mark.parametrize(("method", "args"), UNPACK_CALLS)
def test_unpacker_parity(data: bytes, method: str, args: tuple[Any, ...]) -> None:
    def run(m: Any) -> Any:
        u = m.Unpacker(data)
        steps = []
        for _ in range(3):  # repeated, so positions after errors matter too
            steps.append(outcome(getattr(u, method), *args))
            steps.append((u.position, u.remaining))
        return steps

    same(run)


@pytest.mark.parametrize(
    "make",
    [
        lambda: b"\x00\x00\x00\x05abcde\x00\x00\x00",
        lambda: bytearray(b"\x00\x00\x00\x05abcde\x00\x00\x00"),
        lambda: memoryview(b"--\x00\x00\x00\x05abcde\x00\x00\x00")[2:],
        lambda: array.array("B", b"\x00\x00\x00\x05abcde\x00\x00\x00"),
        lambda: memoryview(array.array("I", [5, 0x61626364, 0x65000000])),
        lambda: memoryview(bytes(range(12))).cast("B", (3, 4)),
        lambda: memoryview(b"abcdefgh")[::2],
        lambda: "text",
        lambda: 12,
        lambda: None,
    ],
)
def test_unpacker_inputs(make: Callable[[], Any]) -> None:
    def run(m: Any) -> Any:
        u = m.Unpacker(make())
        return [u.remaining, outcome(u.unpack_opaque), outcome(u.done), u.position]

    same(run)


def test_unpacker_released_view_and_locks() -> None:
    released = memoryview(b"abcd")
    released.release()
    same(lambda m: m.Unpacker(released))
    for mod in (py_wire, c_wire):
        data = bytearray(b"\x00\x00\x00\x01")
        u = mod.Unpacker(data)
        with pytest.raises(BufferError):
            data.extend(b"more")  # the Unpacker still reads it
        assert u.unpack_int() == 1
        del u
        data.extend(b"more")


def test_unpacker_sequence_round_trip() -> None:
    def run(m: Any) -> Any:
        p = m.Packer()
        p.pack_int(-5)
        p.pack_uhyper(2**64 - 1)
        p.pack_string("naïve \udcff")
        p.pack_opaque(b"\x00\x01\x02")
        p.pack_bool(True)
        p.pack_double(-2.5)
        p.pack_float(0.1)
        p.pack_uint(2)
        p.pack_fopaque(5, b"fixed")
        u = m.Unpacker(p.getvalue())
        out = [
            u.unpack_int(),
            u.unpack_uhyper(),
            u.unpack_string(),
            u.unpack_opaque(),
            u.unpack_bool(),
            u.unpack_double(),
            u.unpack_float(),
            u.unpack_array_length(10),
            u.unpack_fopaque(5),
            u.position,
            u.remaining,
        ]
        u.done()
        return out

    result = same(run)
    assert result[0] == "ok"


# ----------------------------------------------------------------------------- misc


def test_pickle_and_copy() -> None:
    import copy
    import pickle

    for mod in (py_wire, c_wire):
        msg = mod.Message(PROG, 1, 2, 3, 4, 5, b"abc")
        assert pickle.loads(pickle.dumps(msg)) == msg
        assert copy.copy(msg) == msg
        packer = mod.Packer()
        packer.pack_string("hello")
        assert pickle.loads(pickle.dumps(packer)).getvalue() == packer.getvalue()
        assert copy.deepcopy(packer).getvalue() == packer.getvalue()
        # These cannot be pickled (and the compiled ones must not crash trying).
        for obj in (mod.FrameDecoder(), mod.Unpacker(b"abcd"), mod.Calls(True)):
            with pytest.raises(TypeError):
                pickle.dumps(obj)


def test_uninitialised_objects_do_not_crash() -> None:
    dec = c_wire.FrameDecoder.__new__(c_wire.FrameDecoder)
    with pytest.raises(RuntimeError):
        dec.get_buffer(-1)
    with pytest.raises(RuntimeError):
        dec.buffer_updated(1)
    with pytest.raises(RuntimeError):
        dec.feed(b"abc")
    assert dec.feed(b"") == []
    unpacker = c_wire.Unpacker.__new__(c_wire.Unpacker)
    with pytest.raises(XdrError):
        unpacker.unpack_int()
    assert unpacker.unpack_fopaque(0) == b""
    calls = c_wire.Calls.__new__(c_wire.Calls)
    with pytest.raises(TypeError):
        calls.add_call([], PROG, 1, 1, b"")
    with pytest.raises(ProtocolError, match="REPLY sent to a server"):  # no role set: a server
        calls.dispatch(None, [c_wire.Message(PROG, 1, 1, 1, 1, 0, b"")])
    with pytest.raises(AttributeError):  # no call table to answer from
        calls.is_client = True
        calls.dispatch(None, [c_wire.Message(PROG, 1, 1, 1, 1, 0, b"")])
    packer = c_wire.Packer.__new__(c_wire.Packer)
    packer.pack_hyper(1)
    assert packer.getvalue() == b"\0" * 7 + b"\1"


# ----------------------------------------------------------------------------- Calls


class Recorder:
    """A connection core as ``Calls.dispatch`` sees it: it records every hook."""

    def __init__(self) -> None:
        self.log: list[Any] = []

    def on_reply(self, serial: Any, status: Any, payload: Any) -> None:
        self.log.append(("reply", serial, status, norm(payload)))

    def on_call(self, msg: Any) -> None:
        self.log.append(("call", norm(msg)))

    def receive_other(self, msg: Any) -> None:
        self.log.append(("other", norm(msg)))


def _calls_run(mod: Any, is_client: bool, sent: list[Any], received: list[Any]) -> Any:
    """Send the calls ``sent``, then dispatch ``received`` (reads of header tuples);
    a picture of everything that happened, exceptions included."""
    calls = mod.Calls(is_client)
    core = Recorder()
    out: list[Any] = []
    serials = [outcome(calls.add_call, out, *args) for args in sent]
    reads = []
    for read in received:
        msgs = [mod.Message(*fields) for fields in read]
        reads.append(outcome(calls.dispatch, core, msgs))
    pending = sorted(calls.pending.items(), key=repr)
    return serials, norm(out), reads, core.log, pending, calls.is_client


def _reply(serial: int, status: Any = 0, prog: Any = PROG, vers: Any = 1, proc: Any = 1,
           mtype: Any = 1) -> tuple[Any, ...]:
    return (prog, vers, proc, mtype, serial, status, b"r%d" % serial)


DISPATCH_CASES: dict[str, tuple[bool, list[Any], list[Any]]] = {
    # replies in any order, an error reply, other packets between them
    "replies": (
        True,
        [(PROG, 1, 1, b"a"), (PROG, 1, 2, b""), (PROG, 2, 3, memoryview(b"xyz"))],
        [
            [_reply(3, vers=2, proc=3), _reply(1, 1), (PROG, 1, 7, 3, 9, 2, b"data")],
            [_reply(2, proc=2)],
        ],
    ),
    "invalid status": (True, [(PROG, 1, 1, b"")], [[_reply(1, 2)]]),
    "answers no call": (True, [(PROG, 1, 1, b"")], [[_reply(2)]]),
    "answered twice": (True, [(PROG, 1, 1, b"")], [[_reply(1), _reply(1)]]),
    "wrong program": (True, [(PROG, 1, 1, b"")], [[_reply(1, prog=PROG + 1), _reply(1)]]),
    "wrong version": (True, [(PROG, 1, 1, b"")], [[_reply(1, vers=2)]]),
    "wrong procedure": (True, [(PROG, 1, 1, b"")], [[_reply(1, proc=-1)]]),
    "call to a client": (True, [(PROG, 1, 1, b"")], [[_reply(1, mtype=0)]]),
    "calls, then a reply to a server": (
        False, [], [[_reply(5, mtype=0), _reply(6, 1, mtype=0)], [_reply(5)]]
    ),
    "others on a server": (False, [], [[_reply(0, mtype=2), _reply(0, mtype=99)]]),
    # fields that are not plain ints are compared as Python compares them
    "odd field types": (
        True,
        [(PROG, 1, Color.RED, b""), (PROG, 1.0, 4, b"")],
        [[_reply(1, 0.0, vers=True, proc=3, mtype=Color.RED - 2),
          _reply(2, False, proc=4.0, mtype=1.0)]],
    ),
    "type as a string": (True, [(PROG, 1, 1, b"")], [[_reply(1, mtype="1")]]),
    "a read after an error": (
        True, [(PROG, 1, 1, b""), (PROG, 1, 2, b"")], [[_reply(1, 3)], [_reply(2, 1, proc=2)]]
    ),
}


@pytest.mark.parametrize("case", DISPATCH_CASES)
def test_calls_dispatch_parity(case: str) -> None:
    is_client, sent, received = DISPATCH_CASES[case]
    same(lambda m: _calls_run(m, is_client, sent, received))


@pytest.mark.parametrize(
    "sent",
    [
        [(PROG, 1, 1, b"", 7), (PROG, 1, 1, b"x", 2**32 - 1), (PROG, 1, 1, b"", 0)],
        [(PROG, 1, 1, b"", 2**32)],  # registered, then the header refuses it
        [(PROG, 1, 2**31, b"")],
        [(PROG, 1, 1, "text")],  # a str: its length is taken, as encode_message does
        [(PROG, 1, 1, b"", -1)],
        [(PROG, 1, 1, 5)],
    ],
)
def test_calls_add_call_parity(sent: list[Any]) -> None:
    same(lambda m: _calls_run(m, True, sent, []))


def test_calls_serials() -> None:
    for mod in (py_wire, c_wire):
        calls = mod.Calls(True)
        assert [calls.allocate_serial() for _ in range(3)] == [1, 2, 3]
        out: list[Any] = []
        assert calls.add_call(out, PROG, 1, 1) == 4
        assert calls.pending == {4: (PROG, 1, 1)}
        assert out == mod.encode_message(PROG, 1, 1, 0, 4, 0)  # no payload: one buffer
        assert calls.add_call(out, PROG, 1, 1, b"", 9) == 9  # explicit: not allocated
        assert calls.allocate_serial() == 5
    # 2**32 - 1 is followed by 1, never 0 (only the twin's counter can be set from here;
    # the compiled one wraps the same way in C).
    calls = py_wire.Calls(True)
    calls._next = 0xFFFFFFFE
    assert [calls.allocate_serial() for _ in range(3)] == [0xFFFFFFFE, 0xFFFFFFFF, 1]


def test_calls_role_and_any_iterable() -> None:
    for mod in (py_wire, c_wire):
        calls = mod.Calls(0)
        assert calls.is_client is False
        calls.is_client = "yes"
        assert calls.is_client is True
        core = Recorder()
        calls.add_call([], PROG, 1, 1)
        calls.dispatch(core, (m for m in [mod.Message(PROG, 1, 1, 1, 1, 0, b"")]))
        assert core.log == [("reply", 1, 0, ("bytes", b""))]


@pytest.mark.parametrize(
    "args",
    [
        (PROG, 1, 2, 1, 5, 0, b"payload"),
        (PROG, 1, 2, 1, 5, 0),
        (PROG, 1, 2, 1, 5, 0, bytearray(b"abc")),
        (PROG, 1, 2, 1, 5, 0, memoryview(b"abcd")[1:]),
        (PROG, 1, 2, 1, 5, 0, memoryview(array.array("i", [1, 2]))),
        (PROG, 1, 2, 1, 2**32, 0, b"x"),
        (PROG, 1, 2, 1, 5, 0, 5),
    ],
)
def test_queue_message_parity(args: tuple[Any, ...]) -> None:
    def run(m: Any) -> Any:
        out: list[Any] = [b"before"]
        return outcome(m.queue_message, out, *args), norm(out)

    result, out = same(run)[1]
    if result[0] == "ok":  # appended exactly what encode_message returns
        assert out[1:] == norm(py_wire.encode_message(*args))


def test_queue_message_other_queues() -> None:
    import collections

    def run(m: Any) -> Any:
        out: collections.deque[Any] = collections.deque()
        m.queue_message(out, PROG, 1, 2, 1, 5, 0, b"ab")
        m.queue_message(out, PROG, 1, 2, 1, 5, 0)
        return norm(list(out)), outcome(m.queue_message, (), PROG, 1, 2, 1, 5, 0)

    same(run)


@pytest.mark.parametrize("mod", MODULES)
def test_packet_buffer_pool_grows_to_its_bound_and_trims(mod: Any) -> None:
    """Full stream packets held by their readers each keep a pooled buffer busy: the pool
    grows to POOL_MAX (no fresh buffer per packet while several streams lag a little),
    reuses what is released, and ``trim_pool`` gives back all but POOL_KEEP."""
    packet = mod.join(mod.encode_stream_data(PROG, 1, 1, 7, bytes(262120)))
    assert len(packet) == py_wire.POOL_BUFFER
    dec = mod.FrameDecoder()
    held = []
    for _ in range(py_wire.POOL_MAX + 8):
        held.extend(dec.feed(packet))
    assert dec.pooled == py_wire.POOL_MAX
    held.clear()  # every buffer free again: reused, none added
    for _ in range(py_wire.POOL_MAX):
        held.extend(dec.feed(packet))
    assert dec.pooled == py_wire.POOL_MAX
    assert all(len(m.payload) == 262120 for m in held)
    dec.trim_pool()
    assert dec.pooled == py_wire.POOL_KEEP
    held.clear()
    dec.trim_pool()
    assert dec.pooled == py_wire.POOL_KEEP
