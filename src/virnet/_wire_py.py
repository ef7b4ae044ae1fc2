"""The wire core in pure Python: framing, receive buffers, chunking, XDR primitives, and
the per-call bookkeeping (``Calls``: serials, pending calls, CALL/REPLY routing).

This module and the compiled ``virnet._wire`` (``pyx/virnet/_wire.pyx``) are twins with
one interface; ``virnet._impl`` picks one.  Everything here is sans-IO: bytes go in,
``Message`` objects come out, and outgoing packets are returned as lists of buffers for a
vectored write.  Nothing here touches an event loop, a socket or a clock.

Receive path design (the same in both twins):

* Small packets are read into one fixed *scratch* buffer, many per read; each complete
  packet's payload is copied out (a few bytes), so the scratch can be reused at once.
* A packet too large for that (a 256 KiB stream data packet) gets a buffer of its own,
  allocated only after its length word passed the limit checks.  ``get_buffer`` then hands
  out the rest of that buffer, so the payload lands in its final place straight from the
  socket and is delivered as a ``memoryview`` of it, never copied again.
* After a large packet the decoder asks for just one header's worth of bytes next
  ("peek"), so a run of data packets never lands in the scratch buffer at all.  A small
  packet ends peek mode.

The scratch buffer is never resized (memoryviews of it may be alive while the transport
reads); partial packets are moved to its front instead.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from typing import Any, Final

from .constants import (
    HEADER_SIZE,
    LEN_SIZE,
    MAX_MESSAGE,
    MIN_PACKET,
    STREAM_CHUNK,
    MessageStatus,
    MessageType,
)
from .errors import ProtocolError, XdrError

Buffer = bytes | bytearray | memoryview

_PREFIX = struct.Struct(">IIIiiIi")  # length word + header
_HEADER = struct.Struct(">IIiiIi")
_LEN = struct.Struct(">I")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")

SCRATCH_SIZE: Final = 256 * 1024
#: Size of the recycled buffers for large packets: one full stream data packet.
POOL_BUFFER: Final = MIN_PACKET + STREAM_CHUNK
#: Recycled buffers kept per decoder (16 MiB): several streams whose readers run a few
#: packets behind keep that many busy at once, and a fresh buffer per packet beyond the
#: pool cost a third of an 8-stream download's receiving CPU (page faults, zeroing).
POOL_MAX: Final = 64
#: Recycled buffers kept once the connection's streams have ended (4 MiB).
POOL_KEEP: Final = 16
#: Packets larger than this that are not already complete in the scratch buffer get their
#: own buffer: copying them out of the scratch would cost more than the extra read.
DIRECT_THRESHOLD: Final = 64 * 1024
_CALL = int(MessageType.CALL)
_REPLY = int(MessageType.REPLY)
_STREAM = int(MessageType.STREAM)
_OK = int(MessageStatus.OK)
_ERROR = int(MessageStatus.ERROR)
_CONTINUE = int(MessageStatus.CONTINUE)

IS_COMPILED: Final = False


class Message:
    """One received packet: the header fields and the payload (bytes-like, maybe a view)."""

    __slots__ = ("payload", "proc", "prog", "serial", "status", "type", "vers")

    def __init__(
        self,
        prog: int,
        vers: int,
        proc: int,
        type: int,
        serial: int,
        status: int,
        payload: Buffer,
    ) -> None:
        self.prog = prog
        self.vers = vers
        self.proc = proc
        self.type = type
        self.serial = serial
        self.status = status
        self.payload = payload

    def __repr__(self) -> str:
        return (
            f"Message(prog={self.prog:#x}, vers={self.vers}, proc={self.proc}, "
            f"type={self.type}, serial={self.serial}, status={self.status}, "
            f"payload=<{len(self.payload)} bytes>)"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.prog == other.prog
            and self.vers == other.vers
            and self.proc == other.proc
            and self.type == other.type
            and self.serial == other.serial
            and self.status == other.status
            and bytes(self.payload) == bytes(other.payload)
        )

    __hash__ = None  # type: ignore[assignment]


def check_length(length: int, max_message: int) -> None:
    """Reject a length word before anything is allocated for it."""
    if length < MIN_PACKET:
        raise ProtocolError(f"packet length {length} is below the minimum of {MIN_PACKET}")
    if length - LEN_SIZE > max_message:
        raise ProtocolError(
            f"packet length {length} exceeds the limit of {max_message + LEN_SIZE} bytes"
        )


class FrameDecoder:
    """Turns received bytes into ``Message`` objects; made for ``BufferedProtocol``.

    ``get_buffer()`` returns the writable view to receive into; ``buffer_updated(n)`` says
    how many bytes arrived there and returns the packets completed.  ``feed()`` does both
    for bytes that are already in memory.  After a ``ProtocolError`` the decoder is dead.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, scratch_size: int = SCRATCH_SIZE) -> None:
        if max_message < HEADER_SIZE:
            raise ValueError(f"max_message must be at least {HEADER_SIZE}")
        if scratch_size < DIRECT_THRESHOLD + MIN_PACKET:
            raise ValueError(f"scratch_size must be at least {DIRECT_THRESHOLD + MIN_PACKET}")
        self.max_message = max_message
        self._scratch = bytearray(scratch_size)
        self._scratch_view = memoryview(self._scratch)
        self._start = 0  # first unparsed byte in the scratch
        self._end = 0  # one past the last received byte in the scratch
        self._body: bytearray | None = None  # a large packet's own buffer
        self._body_view: memoryview | None = None
        self._body_pos = 0
        self._pool: list[bytearray] = []
        self._peek = False
        self._failed: str | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole packet."""
        if self._body is not None:
            return self._body_pos
        return self._end - self._start

    @property
    def pooled(self) -> int:
        """Recycled packet buffers held for reuse (free or not)."""
        return len(self._pool)

    def trim_pool(self) -> None:
        """Keep at most POOL_KEEP recycled buffers: the connection's streams ended, and
        the buffers that several of them kept busy at once are given back."""
        del self._pool[POOL_KEEP:]

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._failed is not None:
            raise ProtocolError(self._failed)
        if self._body_view is not None:
            return self._body_view[self._body_pos :]
        if self._start == self._end:
            self._start = self._end = 0
            if self._peek:
                return self._scratch_view[:MIN_PACKET]
        elif len(self._scratch) - self._end < MIN_PACKET:
            self._compact()
        return self._scratch_view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Message]:
        if self._failed is not None:
            raise ProtocolError(self._failed)
        body_view = self._body_view
        if body_view is not None:
            free = len(body_view) - self._body_pos
        else:
            free = len(self._scratch) - self._end
        if not 0 <= nbytes <= free:
            raise ValueError(f"nbytes must be in 0..{free}, got {nbytes}")
        if body_view is not None:
            self._body_pos += nbytes
            if self._body_pos < len(body_view):
                return []
            return [self._finish_body()]
        self._end += nbytes
        return self._parse_scratch()

    def feed(self, data: Buffer) -> list[Message]:
        """Decode bytes already in memory (copies them into the receive buffers)."""
        view = memoryview(data).cast("B")
        out: list[Message] = []
        pos = 0
        total = len(view)
        while pos < total:
            buf = self.get_buffer(total - pos)
            n = min(len(buf), total - pos)
            buf[:n] = view[pos : pos + n]
            pos += n
            out.extend(self.buffer_updated(n))
        return out

    def _fail(self, reason: str) -> ProtocolError:
        self._failed = reason
        return ProtocolError(reason)

    def _compact(self) -> None:
        size = self._end - self._start
        self._scratch[0:size] = self._scratch[self._start : self._end]
        self._start = 0
        self._end = size

    def _pooled_body(self, length: int) -> bytearray:
        """A buffer for one large packet.  Packets up to POOL_BUFFER bytes (every stream
        data packet) reuse buffers nobody references any more: a fresh 256 KiB
        allocation costs dozens of page faults and lands in cold cache.  A pooled buffer
        is free when the pool holds its only reference (delivered payload views keep
        one while they live)."""
        if length > POOL_BUFFER:
            return bytearray(length)
        pool = self._pool
        # First free buffer from the front: the same one or two buffers cycle while the
        # reader keeps up, so the kernel copies into cache-warm memory.
        for candidate in pool:
            # references: the pool's list, ``candidate``, and getrefcount's argument
            if sys.getrefcount(candidate) == 3:
                return candidate
        n = len(pool)
        body = bytearray(POOL_BUFFER)
        if n < POOL_MAX:
            pool.append(body)
        return body

    def _finish_body(self) -> Message:
        body = self._body
        view = self._body_view
        assert body is not None and view is not None
        self._body = None
        self._body_view = None
        self._body_pos = 0
        self._peek = True
        prog, vers, proc, mtype, serial, status = _HEADER.unpack_from(body, LEN_SIZE)
        return Message(prog, vers, proc, mtype, serial, status, view[MIN_PACKET:])

    def _parse_scratch(self) -> list[Message]:
        out: list[Message] = []
        scratch = self._scratch
        start = self._start
        end = self._end
        while end - start >= LEN_SIZE:
            (length,) = _LEN.unpack_from(scratch, start)
            if length < MIN_PACKET or length - LEN_SIZE > self.max_message:
                self._start = start
                try:
                    check_length(length, self.max_message)
                except ProtocolError as exc:
                    raise self._fail(str(exc)) from None
            avail = end - start
            if avail >= length:
                prog, vers, proc, mtype, serial, status = _HEADER.unpack_from(
                    scratch, start + LEN_SIZE
                )
                payload = bytes(scratch[start + MIN_PACKET : start + length])
                out.append(Message(prog, vers, proc, mtype, serial, status, payload))
                start += length
                if length <= DIRECT_THRESHOLD:
                    self._peek = False
                continue
            if length > DIRECT_THRESHOLD or length > len(scratch):
                # Give the packet its own buffer; the rest of it is read straight in.
                body = self._pooled_body(length)
                body[0:avail] = scratch[start:end]
                self._body = body
                view = memoryview(body)
                self._body_view = view if len(body) == length else view[:length]
                self._body_pos = avail
                start = end
            else:
                self._peek = False
            break
        if start == end:
            start = end = 0
        self._start = start
        self._end = end
        return out


# ----------------------------------------------------------------------------- encoding


def pack_header(
    prog: int, vers: int, proc: int, type: int, serial: int, status: int, payload_len: int = 0
) -> bytes:
    """Length word + header for a packet whose payload is ``payload_len`` bytes."""
    try:
        return _PREFIX.pack(
            MIN_PACKET + payload_len, prog, vers, proc, type, serial, status
        )
    except struct.error as exc:
        raise XdrError(f"header field out of range: {exc}") from None


def encode_message(
    prog: int,
    vers: int,
    proc: int,
    type: int,
    serial: int,
    status: int,
    payload: Buffer = b"",
) -> list[Buffer]:
    """A whole packet as ``[header, payload]`` for ``writelines`` (payload not copied)."""
    n = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    header = pack_header(prog, vers, proc, type, serial, status, n)
    if n == 0:
        return [header]
    return [header, payload]


def encode_stream_data(
    prog: int,
    vers: int,
    proc: int,
    serial: int,
    data: Buffer,
    chunk_size: int = STREAM_CHUNK,
) -> list[Buffer]:
    """STREAM+CONTINUE packets for ``data``, at most ``chunk_size`` payload bytes each.

    Returns ``[header, view, header, view, ...]``; the views are slices of ``data``, so
    nothing is copied.  Empty ``data`` gives one empty packet, which is how a download
    signals EOF.
    """
    if not 0 < chunk_size <= STREAM_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{STREAM_CHUNK}")
    view = memoryview(data).cast("B")
    total = len(view)
    if total == 0:
        return [pack_header(prog, vers, proc, _STREAM, serial, _CONTINUE, 0)]
    out: list[Buffer] = []
    pos = 0
    while pos < total:
        n = min(chunk_size, total - pos)
        out.append(pack_header(prog, vers, proc, _STREAM, serial, _CONTINUE, n))
        out.append(view[pos : pos + n])
        pos += n
    return out


def queue_message(
    out: list[Buffer],
    prog: int,
    vers: int,
    proc: int,
    type: int,
    serial: int,
    status: int,
    payload: Buffer = b"",
) -> None:
    """``out.extend(encode_message(...))``: append a whole packet to an output queue."""
    out.extend(encode_message(prog, vers, proc, type, serial, status, payload))


# ----------------------------------------------------------------------------- calls


class Calls:
    """One connection's calls: serial allocation, the calls awaiting a reply, and the
    routing of received packets (the per-call hot path, so it lives in the wire core).

    ``dispatch(core, msgs)`` takes the packets of one read in order: a REPLY is checked
    against the role, its status and the call it answers (by serial, program, version
    and procedure), then handed to ``core.on_reply(serial, status, payload)``; a CALL is
    checked against the role and handed to ``core.on_call(msg)``; any other packet goes
    to ``core.receive_other(msg)``.  A violation raises ``ProtocolError`` and stops
    there, the packets after it left unrouted.  Nothing here touches a loop or a clock:
    ``core`` is whatever object has those three methods.
    """

    __slots__ = ("_is_client", "_next", "_pending")

    def __init__(self, is_client: bool) -> None:
        self._is_client = bool(is_client)
        self._next = 1
        self._pending: dict[int, tuple[int, int, int]] = {}

    @property
    def is_client(self) -> bool:
        return self._is_client

    @is_client.setter
    def is_client(self, value: bool) -> None:
        self._is_client = bool(value)

    @property
    def pending(self) -> dict[int, tuple[int, int, int]]:
        """serial -> (prog, vers, proc) of every call sent and not answered yet."""
        return self._pending

    def __reduce__(self) -> Any:
        # A live connection's bookkeeping means nothing elsewhere (the compiled twin
        # refuses too).
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def allocate_serial(self) -> int:
        serial = self._next
        self._next = (serial + 1) & 0xFFFFFFFF or 1
        return serial

    def add_call(
        self,
        out: list[Buffer],
        prog: int,
        vers: int,
        proc: int,
        payload: Buffer = b"",
        serial: int | None = None,
    ) -> int:
        """Register a call (a new serial unless ``serial`` is given) and append its CALL
        packet to ``out``; returns the serial."""
        if serial is None:
            serial = self.allocate_serial()
        self._pending[serial] = (prog, vers, proc)
        out.extend(encode_message(prog, vers, proc, _CALL, serial, _OK, payload))
        return serial

    def dispatch(self, core: Any, msgs: list[Message]) -> None:
        """Check and route ``msgs`` in order (see the class docstring)."""
        pending = self._pending
        # The hooks are looked up once per read, not per packet.
        on_reply: Any = None
        on_call: Any = None
        for msg in msgs:
            mtype = msg.type
            if mtype == _REPLY:
                if not self._is_client:
                    raise ProtocolError("REPLY sent to a server")
                status = msg.status
                if status != _OK and status != _ERROR:
                    raise ProtocolError(f"REPLY with invalid status {status}")
                expected = pending.pop(msg.serial, None)
                if expected is None:
                    raise ProtocolError(f"REPLY with serial {msg.serial} answers no call")
                if expected != (msg.prog, msg.vers, msg.proc):
                    raise ProtocolError(
                        f"REPLY for serial {msg.serial} names program {msg.prog:#x} "
                        f"v{msg.vers} procedure {msg.proc}, not the call's"
                    )
                if on_reply is None:
                    on_reply = core.on_reply
                on_reply(msg.serial, status, msg.payload)
            elif mtype == _CALL:
                if self._is_client:
                    raise ProtocolError("CALL sent to a client")
                if on_call is None:
                    on_call = core.on_call
                on_call(msg)
            else:
                core.receive_other(msg)


# ----------------------------------------------------------------------------- XDR


def _pad(n: int) -> int:
    return (4 - (n & 3)) & 3


_ZEROS = b"\0\0\0\0"


class Packer:
    """Appends XDR-encoded values to a growing buffer (RFC 4506)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()

    def pack_int(self, value: int) -> None:
        if not -0x80000000 <= value <= 0x7FFFFFFF:
            raise XdrError(f"int {value} out of range")
        self._buf += _I32.pack(value)

    def pack_uint(self, value: int) -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise XdrError(f"unsigned int {value} out of range")
        self._buf += _U32.pack(value)

    def pack_hyper(self, value: int) -> None:
        if not -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF:
            raise XdrError(f"hyper {value} out of range")
        self._buf += _I64.pack(value)

    def pack_uhyper(self, value: int) -> None:
        if not 0 <= value <= 0xFFFFFFFFFFFFFFFF:
            raise XdrError(f"unsigned hyper {value} out of range")
        self._buf += _U64.pack(value)

    def pack_bool(self, value: bool) -> None:
        self._buf += _U32.pack(1 if value else 0)

    def pack_float(self, value: float) -> None:
        try:
            self._buf += _F32.pack(value)
        except (OverflowError, struct.error) as exc:
            raise XdrError(f"float {value!r}: {exc}") from None

    def pack_double(self, value: float) -> None:
        self._buf += _F64.pack(value)

    def pack_fopaque(self, size: int, data: Buffer) -> None:
        n = len(memoryview(data).cast("B"))
        if n != size:
            raise XdrError(f"fixed opaque needs exactly {size} bytes, got {n}")
        self._buf += data
        self._buf += _ZEROS[: _pad(n)]

    def pack_opaque(self, data: Buffer, maximum: int = 0xFFFFFFFF) -> None:
        n = len(memoryview(data).cast("B"))
        if n > maximum:
            raise XdrError(f"opaque of {n} bytes exceeds its maximum of {maximum}")
        self._buf += _U32.pack(n)
        self._buf += data
        self._buf += _ZEROS[: _pad(n)]

    def pack_string(self, value: str, maximum: int = 0xFFFFFFFF) -> None:
        if not isinstance(value, str):
            raise XdrError(f"string expected, got {type(value).__name__}")
        data = value.encode("utf-8", "surrogateescape")
        n = len(data)
        if n > maximum:
            raise XdrError(f"string of {n} bytes exceeds its maximum of {maximum}")
        self._buf += _U32.pack(n)
        self._buf += data
        self._buf += _ZEROS[: _pad(n)]


class Unpacker:
    """Reads XDR values from a buffer, checking every length against what is left."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: Buffer) -> None:
        self._data = memoryview(data).cast("B")
        self._pos = 0
        self._end = len(self._data)

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def done(self) -> None:
        """Raise if bytes are left over (trailing garbage)."""
        if self._pos != self._end:
            raise XdrError(f"{self._end - self._pos} bytes of trailing data")

    def _take(self, n: int, what: str) -> int:
        pos = self._pos
        if self._end - pos < n:
            raise XdrError(f"truncated {what}: needs {n} bytes, {self._end - pos} left")
        self._pos = pos + n
        return pos

    def unpack_int(self) -> int:
        return int(_I32.unpack_from(self._data, self._take(4, "int"))[0])

    def unpack_uint(self) -> int:
        return int(_U32.unpack_from(self._data, self._take(4, "unsigned int"))[0])

    def unpack_hyper(self) -> int:
        return int(_I64.unpack_from(self._data, self._take(8, "hyper"))[0])

    def unpack_uhyper(self) -> int:
        return int(_U64.unpack_from(self._data, self._take(8, "unsigned hyper"))[0])

    def unpack_bool(self) -> bool:
        value = _U32.unpack_from(self._data, self._take(4, "bool"))[0]
        if value > 1:
            raise XdrError(f"bool must be 0 or 1, got {value}")
        return bool(value)

    def unpack_float(self) -> float:
        return float(_F32.unpack_from(self._data, self._take(4, "float"))[0])

    def unpack_double(self) -> float:
        return float(_F64.unpack_from(self._data, self._take(8, "double"))[0])

    def _bytes(self, n: int, what: str) -> bytes:
        padded = n + _pad(n)
        pos = self._take(padded, what)
        data = self._data[pos : pos + n].tobytes()
        if padded != n and any(self._data[pos + n : pos + padded]):
            raise XdrError(f"non-zero padding after {what}")
        return data

    def unpack_fopaque(self, size: int) -> bytes:
        if size < 0:
            raise XdrError(f"fixed opaque size must not be negative, got {size}")
        return self._bytes(size, "fixed opaque")

    def _length(self, maximum: int, what: str) -> int:
        n = int(_U32.unpack_from(self._data, self._take(4, f"{what} length"))[0])
        if n > maximum:
            raise XdrError(f"{what} of {n} bytes exceeds its maximum of {maximum}")
        return n

    def unpack_opaque(self, maximum: int = 0xFFFFFFFF) -> bytes:
        return self._bytes(self._length(maximum, "opaque"), "opaque")

    def unpack_string(self, maximum: int = 0xFFFFFFFF) -> str:
        data = self._bytes(self._length(maximum, "string"), "string")
        return data.decode("utf-8", "surrogateescape")

    def unpack_array_length(self, maximum: int) -> int:
        """Length prefix of a variable array, checked against ``maximum`` and the data left
        (each element takes at least 4 bytes), so a huge count allocates nothing."""
        n = int(_U32.unpack_from(self._data, self._take(4, "array length"))[0])
        if n > maximum:
            raise XdrError(f"array of {n} elements exceeds its maximum of {maximum}")
        if n * 4 > self._end - self._pos:
            raise XdrError(f"array of {n} elements cannot fit in {self._end - self._pos} bytes")
        return n


def join(buffers: Sequence[Buffer]) -> bytes:
    """Concatenate a packet list (tests and debugging only; the hot path never joins)."""
    return b"".join(buffers)
