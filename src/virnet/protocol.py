"""Payload structures of the RPC layer itself: errors, stream holes, virnet's HELLO/CREDIT.

``MessageError`` is libvirt's ``virNetMessageError`` (byte-identical to ``remote_error``).
Its ``dom`` and ``net`` members are unused by libvirt; senders write them as absent and we
decode and drop them.
"""

from __future__ import annotations

from typing import Annotated

from . import xdr
from .constants import STRING_MAX
from .errors import ErrorCode, ErrorDomain, ErrorLevel, RPCError

NonnullString = Annotated[str, xdr.string(STRING_MAX)]
OptString = Annotated[str | None, xdr.optional(xdr.string(STRING_MAX))]


@xdr.struct
class MessageDomain:
    name: NonnullString
    uuid: Annotated[bytes, xdr.fixed_opaque(16)]
    id: xdr.Int


@xdr.struct
class MessageNetwork:
    name: NonnullString
    uuid: Annotated[bytes, xdr.fixed_opaque(16)]


@xdr.struct
class MessageError:
    code: xdr.Int
    domain: xdr.Int
    message: OptString
    level: xdr.Int
    dom: Annotated[MessageDomain | None, xdr.optional(MessageDomain)]
    str1: OptString
    str2: OptString
    str3: OptString
    int1: xdr.Int
    int2: xdr.Int
    net: Annotated[MessageNetwork | None, xdr.optional(MessageNetwork)]


@xdr.struct
class StreamHole:
    """Payload of a STREAM_HOLE packet: skip ``length`` bytes (flags must be 0)."""

    length: xdr.Hyper
    flags: xdr.UInt


@xdr.struct
class Hello:
    """VIRNET_CONTROL HELLO arguments and reply: feature bits and the receive window."""

    features: xdr.UInt
    window: xdr.UInt


@xdr.struct
class Credit:
    """VIRNET_CONTROL CREDIT: the sender may send ``bytes`` more on that stream."""

    prog: xdr.UInt
    vers: xdr.UInt
    proc: xdr.Int
    serial: xdr.UInt
    bytes: xdr.UInt


def encode_error(exc: RPCError) -> bytes:
    """The ``virNetMessageError`` payload carrying ``exc``'s fields."""
    return xdr.encode(
        MessageError,
        MessageError(
            int(exc.code),
            int(exc.domain),
            exc.message,
            int(exc.level),
            None,
            exc.str1,
            exc.str2,
            exc.str3,
            exc.int1,
            exc.int2,
            None,
        ),
    )


def decode_error(
    payload: bytes | bytearray | memoryview, cls: type[RPCError] = RPCError
) -> RPCError:
    """An exception built from a ``virNetMessageError`` payload (raises XdrError if bad)."""
    err = xdr.decode(MessageError, payload)
    code: int = err.code
    domain: int = err.domain
    level: int = err.level
    try:
        code = ErrorCode(code)
    except ValueError:
        pass
    try:
        domain = ErrorDomain(domain)
    except ValueError:
        pass
    try:
        level = ErrorLevel(level)
    except ValueError:
        pass
    return cls(
        err.message,
        code=code,
        domain=domain,
        level=level,
        str1=err.str1,
        str2=err.str2,
        str3=err.str3,
        int1=err.int1,
        int2=err.int2,
    )
