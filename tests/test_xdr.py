"""The XDR schema: round trips for every type (hypothesis), limits and error paths."""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virnet import _impl, xdr
from virnet.errors import XdrError


class Color(enum.IntEnum):
    RED = 0
    GREEN = 1
    BLUE = 7


@xdr.struct
class Inner:
    name: Annotated[str, xdr.string(16)]
    tag: Annotated[bytes, xdr.fixed_opaque(3)]


@xdr.struct
class Everything:
    i: xdr.Int
    u: xdr.UInt
    h: xdr.Hyper
    uh: xdr.UHyper
    b: xdr.Bool
    f: xdr.Float
    d: xdr.Double
    color: Annotated[Color, xdr.enum(Color)]
    blob: Annotated[bytes, xdr.opaque(10)]
    text: Annotated[str, xdr.string(40)]
    maybe: Annotated[int | None, xdr.optional(xdr.uint)]
    items: Annotated[list[Inner], xdr.array(Inner, 4)]
    pair: Annotated[list[int], xdr.fixed_array(xdr.hyper, 2)]
    choice: Annotated[
        tuple[int, Any], xdr.union(xdr.int_, {1: xdr.uint, 2: xdr.string(8), 3: None})
    ]
    nested: Inner


INTS = {
    xdr.int_: st.integers(-(2**31), 2**31 - 1),
    xdr.uint: st.integers(0, 2**32 - 1),
    xdr.hyper: st.integers(-(2**63), 2**63 - 1),
    xdr.uhyper: st.integers(0, 2**64 - 1),
}


@pytest.mark.parametrize("xtype", list(INTS), ids=lambda t: t.name)
@given(data=st.data())
def test_integer_round_trip(xtype: xdr.XdrType[int], data: st.DataObject) -> None:
    value = data.draw(INTS[xtype])
    encoded = xdr.encode(xtype, value)
    assert len(encoded) == (8 if "hyper" in xtype.name else 4)
    assert xdr.decode(xtype, encoded) == value


@pytest.mark.parametrize(
    ("xtype", "value"),
    [(xdr.int_, 2**31), (xdr.int_, -(2**31) - 1), (xdr.uint, -1), (xdr.uint, 2**32),
     (xdr.hyper, 2**63), (xdr.uhyper, -1), (xdr.uhyper, 2**64)],
)
def test_integer_out_of_range(xtype: xdr.XdrType[int], value: int) -> None:
    with pytest.raises(XdrError, match="out of range"):
        xdr.encode(xtype, value)


@given(st.booleans())
def test_bool_round_trip(value: bool) -> None:
    assert xdr.decode(xdr.bool_, xdr.encode(xdr.bool_, value)) is value


def test_bool_must_be_0_or_1() -> None:
    with pytest.raises(XdrError, match="bool"):
        xdr.decode(xdr.bool_, b"\0\0\0\2")


@given(st.floats(width=32, allow_nan=False))
def test_float_round_trip(value: float) -> None:
    assert xdr.decode(xdr.float_, xdr.encode(xdr.float_, value)) == value


@given(st.floats())
def test_double_round_trip(value: float) -> None:
    out = xdr.decode(xdr.double, xdr.encode(xdr.double, value))
    assert out == value or (math.isnan(out) and math.isnan(value))


@given(st.binary(max_size=64))
def test_opaque_round_trip_and_padding(value: bytes) -> None:
    xtype = xdr.opaque(64)
    encoded = xdr.encode(xtype, value)
    assert len(encoded) % 4 == 0 and len(encoded) == 4 + len(value) + (-len(value) % 4)
    assert xdr.decode(xtype, encoded) == value


@given(st.binary(min_size=5, max_size=5))
def test_fixed_opaque_round_trip(value: bytes) -> None:
    assert xdr.decode(xdr.fixed_opaque(5), xdr.encode(xdr.fixed_opaque(5), value)) == value


@given(st.text(max_size=30))
def test_string_round_trip(value: str) -> None:
    xtype = xdr.string(200)
    assert xdr.decode(xtype, xdr.encode(xtype, value)) == value


@given(st.lists(st.integers(0, 2**32 - 1), max_size=10))
def test_array_round_trip(value: list[int]) -> None:
    xtype: xdr.XdrType[list[int]] = xdr.array(xdr.uint, 10)
    assert xdr.decode(xtype, xdr.encode(xtype, value)) == value


@given(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)))
def test_optional_round_trip(value: int | None) -> None:
    xtype: xdr.XdrType[int | None] = xdr.optional(xdr.hyper)
    assert xdr.decode(xtype, xdr.encode(xtype, value)) == value


def _inner() -> st.SearchStrategy[Inner]:
    return st.builds(Inner, st.text(max_size=4), st.binary(min_size=3, max_size=3))


EVERYTHING = st.builds(
    Everything,
    INTS[xdr.int_], INTS[xdr.uint], INTS[xdr.hyper], INTS[xdr.uhyper], st.booleans(),
    st.floats(width=32, allow_nan=False), st.floats(allow_nan=False),
    st.sampled_from(Color), st.binary(max_size=10), st.text(max_size=10),
    st.one_of(st.none(), INTS[xdr.uint]), st.lists(_inner(), max_size=4),
    st.lists(INTS[xdr.hyper], min_size=2, max_size=2),
    st.one_of(
        st.tuples(st.just(1), INTS[xdr.uint]),
        st.tuples(st.just(2), st.text(alphabet="abc", max_size=8)),
        st.tuples(st.just(3), st.none()),
    ),
    _inner(),
)


@given(EVERYTHING)
def test_struct_round_trip(value: Everything) -> None:
    encoded = xdr.encode(Everything, value)
    assert xdr.decode(Everything, encoded) == value


@given(EVERYTHING, st.data())
def test_struct_truncated_anywhere_is_an_error(value: Everything, data: st.DataObject) -> None:
    encoded = xdr.encode(Everything, value)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(XdrError):
        xdr.decode(Everything, encoded[:cut])


def test_trailing_garbage() -> None:
    with pytest.raises(XdrError, match="trailing"):
        xdr.decode(xdr.uint, b"\0\0\0\1\0\0\0\0")


def test_limits_on_encode() -> None:
    with pytest.raises(XdrError, match="maximum of 4"):
        xdr.encode(xdr.string(4), "hello")
    with pytest.raises(XdrError, match="maximum of 2"):
        xdr.encode(xdr.opaque(2), b"abc")
    with pytest.raises(XdrError, match="maximum of 1"):
        xdr.encode(xdr.array(xdr.uint, 1), [1, 2])
    with pytest.raises(XdrError, match="exactly 3"):
        xdr.encode(xdr.fixed_opaque(3), b"ab")
    with pytest.raises(XdrError, match="exactly 2"):
        xdr.encode(xdr.fixed_array(xdr.uint, 2), [1])


def test_limits_on_decode_name_the_field() -> None:
    good = Inner("abc", b"xyz")
    encoded = bytearray(xdr.encode(Inner, good))
    encoded[3] = 17  # name length 17 > string<16>
    with pytest.raises(XdrError) as info:
        xdr.decode(Inner, bytes(encoded))
    assert info.value.path == "name"
    assert "maximum of 16" in str(info.value)


def test_nested_error_path() -> None:
    xtype: xdr.XdrType[list[Inner]] = xdr.array(Inner, 4)
    data = bytearray(xdr.encode(xtype, [Inner("a", b"123"), Inner("b", b"456")]))
    data = data[:-2]
    with pytest.raises(XdrError) as info:
        xdr.decode(xtype, bytes(data))
    assert info.value.path == "[1].tag"


def test_array_count_cannot_allocate() -> None:
    # A count of 2**32-1 elements with nothing behind it is rejected before any work.
    with pytest.raises(XdrError, match="exceeds"):
        xdr.decode(xdr.array(xdr.uint, 100), b"\xff\xff\xff\xff")
    with pytest.raises(XdrError, match="cannot fit"):
        xdr.decode(xdr.array(xdr.uint), b"\x00\xff\xff\xff")


def test_nonzero_padding_rejected() -> None:
    with pytest.raises(XdrError, match="padding"):
        xdr.decode(xdr.opaque(8), b"\0\0\0\1a\0\0\1")


def test_bad_optional_flag_and_enum_and_union() -> None:
    with pytest.raises(XdrError, match="optional flag"):
        xdr.decode(xdr.optional(xdr.uint), b"\0\0\0\2\0\0\0\0")
    with pytest.raises(XdrError, match="not a valid Color"):
        xdr.decode(xdr.enum(Color), b"\0\0\0\3")
    with pytest.raises(XdrError, match="no union arm"):
        xdr.decode(xdr.union(xdr.int_, {1: xdr.uint}), b"\0\0\0\2\0\0\0\0")
    with pytest.raises(XdrError, match="not a valid Color"):
        xdr.encode(xdr.enum(Color), 5)


def test_union_default_arm() -> None:
    xtype = xdr.union(xdr.int_, {1: xdr.uint}, default=xdr.string(8))
    assert xdr.decode(xtype, xdr.encode(xtype, (9, "x"))) == (9, "x")


def test_wrong_python_types() -> None:
    with pytest.raises(XdrError):
        xdr.encode(xdr.string(8), b"bytes")
    with pytest.raises(XdrError):
        xdr.encode(xdr.opaque(8), "text")
    with pytest.raises(XdrError, match="Inner expected"):
        xdr.encode(Inner, 5)
    with pytest.raises(XdrError) as info:
        xdr.encode(Inner, Inner(5, b"abc"))  # type: ignore[arg-type]
    assert info.value.path == "name"


def test_struct_needs_xdr_annotations() -> None:
    with pytest.raises(TypeError, match="annotate"):

        @xdr.struct
        class Bad:
            x: int


def test_struct_codecs_compile_once_on_first_use() -> None:
    """Codecs are generated lazily; a pack/unpack bound before the first use keeps
    working and does not compile again on every call."""
    from virnet import xdr

    @xdr.struct
    class Lazy:
        a: xdr.UInt
        b: Annotated[str, xdr.string(10)]

    t = Lazy.__xdr_type__  # type: ignore[attr-defined]
    # bound before any use
    early_pack, early_unpack, early_encode, early_decode = t.pack, t.unpack, t.encode, t.decode
    compiled: list[str] = []
    real_pack, real_unpack = t._compile_pack, t._compile_unpack

    def compile_pack(kind: str = "pack") -> Any:
        compiled.append(kind)
        return real_pack(kind)

    def compile_unpack(kind: str = "unpack") -> Any:
        compiled.append(kind)
        return real_unpack(kind)

    t._compile_pack, t._compile_unpack = compile_pack, compile_unpack
    for _ in range(3):
        packer = _impl.Packer()
        early_pack(packer, Lazy(7, "hi"))
        assert early_unpack(_impl.Unpacker(packer.getvalue())) == Lazy(7, "hi")
        assert early_decode(early_encode(Lazy(7, "hi"))) == Lazy(7, "hi")
        assert early_encode(Lazy(7, "hi")) == packer.getvalue()
    assert xdr.decode(Lazy, xdr.encode(Lazy, Lazy(1, "x"))) == Lazy(1, "x")
    assert sorted(compiled) == ["decode", "encode", "pack", "unpack"]


def test_struct_messages_are_checked_like_any_type() -> None:
    """A struct's whole-message codecs (generated, not ``XdrType.encode``/``decode``)
    refuse what the generic ones refuse, with the field named."""

    @xdr.struct
    class Pair:
        a: xdr.UInt
        b: Annotated[str, xdr.string(4)]

    t = Pair.__xdr_type__  # type: ignore[attr-defined]
    good = xdr.encode(Pair, Pair(1, "ab"))
    assert good == xdr.XdrType.encode(t, Pair(1, "ab"))  # same bytes as the generic path
    with pytest.raises(XdrError, match="trailing"):
        xdr.decode(Pair, good + b"\0\0\0\0")
    with pytest.raises(XdrError, match=r"\bb\b.*maximum of 4|maximum of 4.*\bb\b"):
        xdr.encode(Pair, Pair(1, "hello"))
    with pytest.raises(XdrError, match="Pair expected"):
        xdr.encode(Pair, (1, "ab"))
    with pytest.raises(XdrError):
        xdr.decode(Pair, good[:-1])
    t.compile()
    assert xdr.decode(Pair, xdr.encode(Pair, Pair(2, "cd"))) == Pair(2, "cd")


def test_optional_of_optional_or_void_is_refused() -> None:
    # Found by fuzz/fuzz_xdr.py: optional(optional(T)) decoded "present, inner absent"
    # (flags 1, 0) to None, which encodes back as the single flag 0; optional(void) has
    # the same problem.  Such a schema cannot round-trip, so it is refused up front.
    with pytest.raises(TypeError, match="cannot be told from absent"):
        xdr.optional(xdr.optional(xdr.uint))
    with pytest.raises(TypeError, match="cannot be told from absent"):
        xdr.optional(None)
