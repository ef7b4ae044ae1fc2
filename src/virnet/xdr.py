"""A small declarative XDR schema (RFC 4506) for procedure arguments and replies.

Types are objects with ``pack(packer, value)`` and ``unpack(unpacker)``; structs are
dataclasses whose fields carry their XDR type in an ``Annotated`` hint::

    @xdr.struct
    class OpenArgs:
        name: Annotated[str | None, xdr.optional(xdr.string(4194304))]
        flags: xdr.UInt

    data = xdr.encode(OpenArgs, OpenArgs("qemu:///system", 0))
    args = xdr.decode(OpenArgs, data)

Every limit is checked on both sides, and a decode error names the field it happened in
(``XdrError.path``, for example ``"entries[3].name"``).  The primitives come from the wire
core (compiled when available), so this layer only walks the schema.
"""

from __future__ import annotations

import dataclasses
import enum as _enum
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Generic, TypeVar, cast, dataclass_transform

from ._impl import Packer, Unpacker
from .errors import XdrError

T = TypeVar("T")
E = TypeVar("E", bound=_enum.IntEnum)
Buffer = bytes | bytearray | memoryview

_UINT_MAX = 0xFFFFFFFF


class XdrType(Generic[T]):
    """An XDR type: knows how to pack a Python value and unpack it again."""

    name = "type"

    def pack(self, packer: Any, value: T) -> None:
        raise NotImplementedError

    def unpack(self, unpacker: Any) -> T:
        raise NotImplementedError

    def encode(self, value: T) -> bytes:
        """``value`` as XDR bytes."""
        packer = Packer()
        self.pack(packer, value)
        return packer.getvalue()

    def decode(self, data: Buffer) -> T:
        """All of ``data`` decoded; leftover bytes are an error."""
        unpacker = Unpacker(data)
        value = self.unpack(unpacker)
        unpacker.done()
        return value

    def __repr__(self) -> str:
        return f"xdr.{self.name}"


class _Primitive(XdrType[T]):
    """A primitive: calls the packer's / unpacker's method of that name.  (Methods are
    looked up on the object, never taken unbound from one twin's class: a compiled
    method called with the other twin's object would not be safe.)"""

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self.pack = eval(f"lambda packer, value: packer.pack_{kind}(value)")  # type: ignore[method-assign]
        self.unpack = eval(f"lambda unpacker: unpacker.unpack_{kind}()")  # type: ignore[method-assign]


int_: XdrType[int] = _Primitive("int", "int")
uint: XdrType[int] = _Primitive("uint", "uint")
hyper: XdrType[int] = _Primitive("hyper", "hyper")
uhyper: XdrType[int] = _Primitive("uhyper", "uhyper")
bool_: XdrType[bool] = _Primitive("bool", "bool")
float_: XdrType[float] = _Primitive("float", "float")
double: XdrType[float] = _Primitive("double", "double")


class _Void(XdrType[None]):
    name = "void"

    def pack(self, packer: Any, value: None) -> None:
        if value is not None:
            raise XdrError(f"void takes no value, got {type(value).__name__}")

    def unpack(self, unpacker: Any) -> None:
        return None


void: XdrType[None] = _Void()


class string(XdrType[str]):
    """``string<maximum>``; the maximum counts UTF-8 bytes."""

    def __init__(self, maximum: int = _UINT_MAX) -> None:
        self.maximum = maximum
        self.name = f"string({maximum})"

    def pack(self, packer: Any, value: str) -> None:
        packer.pack_string(value, self.maximum)

    def unpack(self, unpacker: Any) -> str:
        return cast(str, unpacker.unpack_string(self.maximum))


class opaque(XdrType[bytes]):
    """``opaque<maximum>``: variable-length bytes."""

    def __init__(self, maximum: int = _UINT_MAX) -> None:
        self.maximum = maximum
        self.name = f"opaque({maximum})"

    def pack(self, packer: Any, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise XdrError(f"bytes expected, got {type(value).__name__}")
        packer.pack_opaque(value, self.maximum)

    def unpack(self, unpacker: Any) -> bytes:
        return cast(bytes, unpacker.unpack_opaque(self.maximum))


class fixed_opaque(XdrType[bytes]):
    """``opaque[size]``: exactly ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.name = f"fixed_opaque({size})"

    def pack(self, packer: Any, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise XdrError(f"bytes expected, got {type(value).__name__}")
        packer.pack_fopaque(self.size, value)

    def unpack(self, unpacker: Any) -> bytes:
        return cast(bytes, unpacker.unpack_fopaque(self.size))


class optional(XdrType[T | None]):
    """``T *``: ``None`` or a value of ``T``."""

    def __init__(self, inner: Any) -> None:
        self.inner: XdrType[T] = type_of(inner)
        if isinstance(self.inner, optional | _Void):
            # Both levels' "absent" would decode to None: encode(decode(x)) != x.
            raise TypeError(f"optional({self.inner!r}) cannot be told from absent in Python")
        self.name = f"optional({self.inner!r})"

    def pack(self, packer: Any, value: T | None) -> None:
        if value is None:
            packer.pack_uint(0)
        else:
            packer.pack_uint(1)
            self.inner.pack(packer, value)

    def unpack(self, unpacker: Any) -> T | None:
        flag = unpacker.unpack_uint()
        if flag == 0:
            return None
        if flag != 1:
            raise XdrError(f"optional flag must be 0 or 1, got {flag}")
        return self.inner.unpack(unpacker)


class array(XdrType[list[T]]):
    """``T<maximum>``: a variable-length array."""

    def __init__(self, element: Any, maximum: int = _UINT_MAX) -> None:
        self.element: XdrType[T] = type_of(element)
        self.maximum = maximum
        self.name = f"array({self.element!r}, {maximum})"

    def pack(self, packer: Any, value: Sequence[T]) -> None:
        n = len(value)
        if n > self.maximum:
            raise XdrError(f"array of {n} elements exceeds its maximum of {self.maximum}")
        packer.pack_uint(n)
        element = self.element
        for i, item in enumerate(value):
            try:
                element.pack(packer, item)
            except XdrError as exc:
                raise exc.at(f"[{i}]") from None

    def unpack(self, unpacker: Any) -> list[T]:
        n = unpacker.unpack_array_length(self.maximum)
        element = self.element
        out: list[T] = []
        for i in range(n):
            try:
                out.append(element.unpack(unpacker))
            except XdrError as exc:
                raise exc.at(f"[{i}]") from None
        return out


class fixed_array(XdrType[list[T]]):
    """``T[size]``: exactly ``size`` elements."""

    def __init__(self, element: Any, size: int) -> None:
        self.element: XdrType[T] = type_of(element)
        self.size = size
        self.name = f"fixed_array({self.element!r}, {size})"

    def pack(self, packer: Any, value: Sequence[T]) -> None:
        if len(value) != self.size:
            raise XdrError(f"fixed array needs exactly {self.size} elements, got {len(value)}")
        for i, item in enumerate(value):
            try:
                self.element.pack(packer, item)
            except XdrError as exc:
                raise exc.at(f"[{i}]") from None

    def unpack(self, unpacker: Any) -> list[T]:
        out: list[T] = []
        for i in range(self.size):
            try:
                out.append(self.element.unpack(unpacker))
            except XdrError as exc:
                raise exc.at(f"[{i}]") from None
        return out


class enum(XdrType[E]):
    """An XDR enum backed by a Python ``IntEnum``; unknown values are decode errors."""

    def __init__(self, cls: type[E]) -> None:
        self.cls = cls
        self.name = f"enum({cls.__name__})"

    def pack(self, packer: Any, value: E) -> None:
        try:
            member = self.cls(value)
        except ValueError:
            raise XdrError(f"{value!r} is not a valid {self.cls.__name__}") from None
        packer.pack_int(int(member))

    def unpack(self, unpacker: Any) -> E:
        value = unpacker.unpack_int()
        try:
            return self.cls(value)
        except ValueError:
            raise XdrError(f"{value} is not a valid {self.cls.__name__}") from None


_MISSING: Any = object()


class union(XdrType[tuple[int, Any]]):
    """A discriminated union; its Python value is ``(discriminant, arm_value)``.

    ``arms`` maps discriminant values to arm types (``void`` for an empty arm);
    ``default`` is the type of the ``default:`` arm, if the union has one.
    """

    def __init__(
        self, discriminant: Any, arms: Mapping[int, Any], default: Any = _MISSING
    ) -> None:
        self.discriminant: XdrType[int] = type_of(discriminant)
        self.arms = {int(k): type_of(v) for k, v in arms.items()}
        self.default: XdrType[Any] | None = None if default is _MISSING else type_of(default)
        self.name = "union"

    def _arm(self, disc: int) -> XdrType[Any]:
        arm = self.arms.get(disc, self.default)
        if arm is None:
            raise XdrError(f"no union arm for discriminant {disc}")
        return arm

    def pack(self, packer: Any, value: tuple[int, Any]) -> None:
        try:
            disc, inner = value
        except (TypeError, ValueError):
            raise XdrError("union value must be a (discriminant, value) pair") from None
        arm = self._arm(int(disc))
        self.discriminant.pack(packer, disc)
        try:
            arm.pack(packer, inner)
        except XdrError as exc:
            raise exc.at(f"<{disc}>") from None

    def unpack(self, unpacker: Any) -> tuple[int, Any]:
        disc = self.discriminant.unpack(unpacker)
        arm = self._arm(int(disc))
        try:
            return (disc, arm.unpack(unpacker))
        except XdrError as exc:
            raise exc.at(f"<{disc}>") from None


class StructType(XdrType[T]):
    """The XDR type of an ``@struct`` class: its fields in declaration order.

    ``pack`` and ``unpack`` are generated once per struct as straight-line code (one
    direct method call per primitive field), the way attrs and msgspec do it: walking a
    field list per call was most of the cost of a small RPC.  ``f`` tracks the field
    being handled so that an error still names it.
    """

    def __init__(self, cls: type[T], fields: list[tuple[str, XdrType[Any]]]) -> None:
        self.cls = cls
        self.fields = fields
        self.name = cls.__name__
        # Compiled on first use: a program declares dozens of structs, and a command-line
        # client that makes one call should not pay for generating every codec at import.
        # A whole message (a call's arguments, a reply) is encoded and decoded by
        # generated functions too, with the packer and the end check inline: the layer
        # of ``XdrType.encode``/``decode`` around the generated body was a Python call
        # per message on each side.
        self._compiled: dict[str, Callable[..., Any]] = {}  # "pack", "unpack", ...
        self.pack = self._first_pack  # type: ignore[method-assign]
        self.unpack = self._first_unpack  # type: ignore[method-assign]
        self.encode = self._first_encode  # type: ignore[method-assign]
        self.decode = self._first_decode  # type: ignore[method-assign]

    def compile(self) -> None:
        """Generate the codecs now (instead of at first use): ``pack``, ``unpack``,
        ``encode`` and ``decode`` are then the generated functions themselves."""
        for kind in ("pack", "unpack", "encode", "decode"):
            self._codec(kind)

    def _codec(self, kind: str) -> Callable[..., Any]:
        """The generated ``kind`` function, made once and from then on the attribute of
        that name itself."""
        fn = self._compiled.get(kind)
        if fn is None:
            make = self._compile_pack if kind in ("pack", "encode") else self._compile_unpack
            fn = self._compiled[kind] = make(kind)
            setattr(self, kind, fn)
        return fn

    # Whoever bound one of these before the first use keeps calling the ``_first_``
    # method: it compiles once, then only forwards.
    def _first_pack(self, packer: Any, value: Any) -> None:
        self._codec("pack")(packer, value)

    def _first_unpack(self, unpacker: Any) -> Any:
        return self._codec("unpack")(unpacker)

    def _first_encode(self, value: Any) -> bytes:
        return self._codec("encode")(value)  # type: ignore[no-any-return]

    def _first_decode(self, data: Buffer) -> Any:
        return self._codec("decode")(data)

    def _field_code(self, i: int, ftype: XdrType[Any], packing: bool, arg: str = "") -> str:
        if isinstance(ftype, _Primitive):
            return f"packer.pack_{ftype.kind}({arg})" if packing else f"u.unpack_{ftype.kind}()"
        if isinstance(ftype, string):
            return (
                f"packer.pack_string({arg}, {ftype.maximum})"
                if packing
                else f"u.unpack_string({ftype.maximum})"
            )
        return f"t{i}.pack(packer, {arg})" if packing else f"t{i}.unpack(u)"

    def _namespace(self) -> dict[str, Any]:
        ns: dict[str, Any] = {"cls": self.cls, "names": [n for n, _ in self.fields]}
        ns.update({f"t{i}": ftype for i, (_, ftype) in enumerate(self.fields)})
        ns.update(XdrError=XdrError, type=type, Packer=Packer, Unpacker=Unpacker)
        return ns

    def _compile_pack(self, kind: str = "pack") -> Callable[..., Any]:
        """``pack(packer, value)``, or with ``kind="encode"`` ``encode(value)`` (a
        packer of its own, its bytes returned)."""
        head = "def pack(packer, value):" if kind == "pack" else "def encode(value):"
        lines = [
            head,
            *(["    packer = Packer()"] if kind == "encode" else []),
            "    if not isinstance(value, cls):",
            "        raise XdrError(f'{cls.__name__} expected, got {type(value).__name__}')",
            "    f = 0",
            "    try:",
        ]
        for i, (name, ftype) in enumerate(self.fields):
            lines.append(f"        f = {i}")
            lines.append("        " + self._field_code(i, ftype, True, f"value.{name}"))
        lines.append("        pass")
        lines += [
            "    except XdrError as exc:",
            "        raise exc.at(names[f]) from None",
            "    except (TypeError, ValueError, OverflowError, AttributeError) as exc:",
            "        raise XdrError(str(exc), names[f]) from None",
        ]
        if kind == "encode":
            lines.append("    return packer.getvalue()")
        ns = self._namespace()
        exec("\n".join(lines), ns)
        return ns[kind]  # type: ignore[no-any-return]

    def _compile_unpack(self, kind: str = "unpack") -> Callable[[Any], Any]:
        """``unpack(unpacker)``, or with ``kind="decode"`` ``decode(data)`` (all of
        ``data``: leftover bytes are an error)."""
        if kind == "decode":
            lines = ["def decode(data):", "    u = Unpacker(data)", "    f = 0", "    try:"]
        else:
            lines = ["def unpack(u):", "    f = 0", "    try:"]
        for i, (_, ftype) in enumerate(self.fields):
            lines.append(f"        f = {i}")
            lines.append(f"        v{i} = " + self._field_code(i, ftype, False))
        lines.append("        pass")
        lines += [
            "    except XdrError as exc:",
            "        raise exc.at(names[f]) from None",
        ]
        if kind == "decode":
            lines.append("    u.done()")
        lines.append(
            "    return cls(" + ", ".join(f"v{i}" for i in range(len(self.fields))) + ")"
        )
        ns = self._namespace()
        exec("\n".join(lines), ns)
        return ns[kind]  # type: ignore[no-any-return]


def _field_type(owner: type, name: str, hint: Any) -> XdrType[Any]:
    if typing.get_origin(hint) is Annotated:
        for meta in reversed(hint.__metadata__):
            if isinstance(meta, XdrType) or hasattr(meta, "__xdr_type__"):
                return type_of(meta)
    if isinstance(hint, type) and hasattr(hint, "__xdr_type__"):
        return type_of(hint)
    raise TypeError(
        f"{owner.__name__}.{name}: annotate with Annotated[..., <xdr type>] or an @xdr.struct"
    )


@dataclass_transform()
def struct(cls: type[T]) -> type[T]:
    """Make ``cls`` a dataclass (slots, positional ``__init__``) and an XDR struct."""
    dc: Any = dataclasses.dataclass(slots=True)(cls)
    module = sys.modules.get(dc.__module__)
    hints = typing.get_type_hints(
        dc, globalns=vars(module) if module else None, include_extras=True
    )
    fields = [(f.name, _field_type(dc, f.name, hints[f.name])) for f in dataclasses.fields(dc)]
    dc.__xdr_type__ = StructType(dc, fields)
    return cast(type[T], dc)


def type_of(spec: Any) -> XdrType[Any]:
    """The ``XdrType`` for a type object, an ``@struct`` class, or ``None`` (void)."""
    if spec is None:
        return void
    if isinstance(spec, XdrType):
        return spec
    xt = getattr(spec, "__xdr_type__", None)
    if isinstance(xt, XdrType):
        return xt
    raise TypeError(f"{spec!r} is not an XDR type or @xdr.struct class")


def encode(spec: Any, value: Any) -> bytes:
    """Encode ``value`` as the XDR type ``spec`` (an XdrType, a struct class or None)."""
    return type_of(spec).encode(value)


def decode(spec: Any, data: Buffer) -> Any:
    """Decode all of ``data`` as ``spec``; leftover bytes are an error."""
    return type_of(spec).decode(data)


# Annotated aliases for struct fields.
Int = Annotated[int, int_]
UInt = Annotated[int, uint]
Hyper = Annotated[int, hyper]
UHyper = Annotated[int, uhyper]
Bool = Annotated[bool, bool_]
Float = Annotated[float, float_]
Double = Annotated[float, double]

__all__ = [
    "Bool",
    "Double",
    "Float",
    "Hyper",
    "Int",
    "StructType",
    "UHyper",
    "UInt",
    "XdrType",
    "array",
    "bool_",
    "decode",
    "double",
    "encode",
    "enum",
    "fixed_array",
    "fixed_opaque",
    "float_",
    "hyper",
    "int_",
    "opaque",
    "optional",
    "string",
    "struct",
    "type_of",
    "uhyper",
    "uint",
    "union",
    "void",
]
