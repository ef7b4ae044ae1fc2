# cython: language_level=3
"""The wire core, compiled: framing, receive buffers, chunking, XDR primitives.

Twin of ``virnet._wire_py`` (read its docstring for the receive design); the two have one
Python-visible interface and the parity tests (``tests/test_wire_parity.py``) hold them to
it: same names, signatures, results, exceptions and messages.  ``virnet._impl`` picks one.

How this file gets its speed without changing behaviour:

* Parsing is done with ``const unsigned char*`` and explicit lengths (``_ld32``), never
  with ``struct``; every pointer is checked against the ``Py_ssize_t`` bounds it came with.
* The scratch buffer is a ``bytearray`` that is never resized, so its storage pointer is
  taken once.  Views handed out by ``get_buffer`` are slices of a memoryview of it: they
  keep it alive on their own, unlike ``PyMemoryView_FromMemory`` over raw memory, which
  would dangle if the decoder died while the transport still held the view.
* A large packet's own buffer is allocated uninitialised (the bytes are received into it
  before anything reads them) after its length word passed the limit checks.
* Fast paths take only the common argument types (``int`` subclasses, ``float``, bytes,
  bytearray, 1-D memoryviews).  Anything else goes through a slow path written exactly
  like the pure twin (often with the same ``struct`` calls), so odd arguments give the
  same results and the same exceptions, messages included.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_CheckExact,
    PyByteArray_FromStringAndSize,
    PyByteArray_GET_SIZE,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.long cimport PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.memoryview cimport (
    PyMemoryView_Check,
    PyMemoryView_FromObject,
    PyMemoryView_GET_BUFFER,
)
from cpython.list cimport PyList_GET_ITEM
from cpython.number cimport PyNumber_Index
from cpython.object cimport Py_EQ, PyObject_RichCompareBool
from cpython.ref cimport PyObject

cdef extern from *:
    """
    static inline Py_ssize_t virnet_refcnt(PyObject *o) { return Py_REFCNT(o); }
    """
    Py_ssize_t _refcnt "virnet_refcnt" (PyObject* o)
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DecodeUTF8, PyUnicode_GET_LENGTH
from libc.math cimport isinf
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove, memset

import math
import struct

from virnet import constants as _constants
from virnet.errors import ProtocolError, XdrError


cdef extern from "Python.h":
    # Declared here without an exception clause: with an int argument (checked first)
    # they cannot fail, and the raw return code is what the fast paths want.
    long long _as_ll_overflow "PyLong_AsLongLongAndOverflow" (object o, int* overflow)
    int _get_buffer_raw "PyObject_GetBuffer" (object o, Py_buffer* view, int flags)
    void PyErr_Clear()
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)


cdef enum:
    # The wire's fixed sizes (checked against virnet.constants at import, below).
    LEN_SIZE = 4
    HEADER_SIZE = 24
    MIN_PACKET = 28
    STREAM_CHUNK = 262120
    C_SCRATCH_SIZE = 256 * 1024
    C_DIRECT_THRESHOLD = 64 * 1024
    POOL_BUFFER = 28 + 262120       # one full stream data packet
    POOL_MAX = 64                   # recycled buffers kept per decoder (16 MiB) ...
    POOL_KEEP = 16                  # ... and after trim_pool (4 MiB)
    STREAM_TYPE = 3             # MessageType.STREAM
    CONTINUE_STATUS = 2         # MessageStatus.CONTINUE
    SMALL_PACKER = 256          # Packer's inline buffer (sizeof Packer._small)

# max_message beyond this is "no limit" (length words are 32-bit); keeps the C copy of the
# limit exact for every integer while fitting a long long.
cdef long long LIMIT_CLAMP = 1 << 40

if (
    _constants.LEN_SIZE != LEN_SIZE
    or _constants.HEADER_SIZE != HEADER_SIZE
    or _constants.MIN_PACKET != MIN_PACKET
    or _constants.STREAM_CHUNK != STREAM_CHUNK
    or int(_constants.MessageType.STREAM) != STREAM_TYPE
    or int(_constants.MessageStatus.CONTINUE) != CONTINUE_STATUS
):  # pragma: no cover - guards the twins against drifting apart
    raise ImportError("virnet._wire was built against different wire constants")

from virnet.constants import MAX_MESSAGE

Buffer = bytes | bytearray | memoryview

SCRATCH_SIZE = C_SCRATCH_SIZE
#: Packets larger than this that are not already complete in the scratch buffer get their
#: own buffer: copying them out of the scratch would cost more than the extra read.
DIRECT_THRESHOLD = C_DIRECT_THRESHOLD

IS_COMPILED = True

# Only the slow paths use struct: they must fail exactly like the pure twin.
_PREFIX = struct.Struct(">IIIiiIi")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")


# ----------------------------------------------------------------------------- byte order

cdef inline uint32_t _ld32(const unsigned char* p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | p[3]


cdef inline uint64_t _ld64(const unsigned char* p) noexcept nogil:
    return ((<uint64_t>_ld32(p)) << 32) | _ld32(p + 4)


cdef inline void _st32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void _st64(unsigned char* p, uint64_t v) noexcept nogil:
    _st32(p, <uint32_t>(v >> 32))
    _st32(p + 4, <uint32_t>v)


cdef union _f32bits:
    uint32_t u
    float f


cdef union _f64bits:
    uint64_t u
    double d


# ----------------------------------------------------------------------------- arguments

cdef inline bint _as_ll(object o, long long* out) noexcept:
    """An int (or int subclass: bool, IntEnum) that fits a long long; False otherwise."""
    cdef int overflow = 0
    if not PyLong_Check(o):
        return False
    out[0] = _as_ll_overflow(o, &overflow)
    return overflow == 0


cdef inline bint _as_u32(object o, uint32_t* out) noexcept:
    cdef long long v
    if _as_ll(o, &v) and 0 <= v <= 0xFFFFFFFFLL:
        out[0] = <uint32_t>v
        return True
    return False


cdef inline bint _as_i32(object o, int32_t* out) noexcept:
    cdef long long v
    if _as_ll(o, &v) and -0x80000000 <= v <= 0x7FFFFFFF:
        out[0] = <int32_t>v
        return True
    return False


cdef int _exceeds(unsigned long long n, object maximum) except -1:
    """``n > maximum`` with Python's semantics, without a Python int when it is an int."""
    cdef int overflow = 0
    cdef long long m
    if PyLong_Check(maximum):
        m = _as_ll_overflow(maximum, &overflow)
        if overflow:
            return overflow < 0
        return m < 0 or <unsigned long long>m < n
    return 1 if n > maximum else 0


cdef int _get_flat(object data, Py_buffer* pb) except -1:
    """A flat byte view of ``data``: what ``memoryview(data).cast("B")`` sees.

    Raises exactly what that expression raises for data it does not accept.
    """
    if PyBytes_CheckExact(data) or PyByteArray_CheckExact(data):
        return PyObject_GetBuffer(data, pb, PyBUF_SIMPLE)
    if PyMemoryView_Check(data) and PyMemoryView_GET_BUFFER(data).ndim == 1:
        # A contiguous 1-D view gives the same bytes as its cast; a strided or released
        # one fails here and is left to the cast below for the twin's exception.
        if _get_buffer_raw(data, pb, PyBUF_SIMPLE) == 0:
            return 0
        PyErr_Clear()
    flat = memoryview(data).cast("B")
    return PyObject_GetBuffer(flat, pb, PyBUF_SIMPLE)


# ----------------------------------------------------------------------------- Message

# no_gc: a Message holds ints and a bytes-like payload, nothing that can point back at it,
# so it cannot be part of a reference cycle.  Left to the GC, the thousands of Messages one
# read can produce cost more in collections than their decoding (about 230 ns against
# 85 ns each in a batch of 10,000).
@cython.freelist(256)
@cython.no_gc
cdef class Message:
    """One received packet: the header fields and the payload (bytes-like, maybe a view)."""

    def __init__(self, prog, vers, proc, type, serial, status, payload):
        self.prog = prog
        self.vers = vers
        self.proc = proc
        self.type = type
        self.serial = serial
        self.status = status
        self.payload = payload

    def __repr__(self):
        return (
            f"Message(prog={self.prog:#x}, vers={self.vers}, proc={self.proc}, "
            f"type={self.type}, serial={self.serial}, status={self.status}, "
            f"payload=<{len(self.payload)} bytes>)"
        )

    def __eq__(self, other):
        cdef Message o
        if not isinstance(other, Message):
            return NotImplemented
        o = <Message>other
        return (
            self.prog == o.prog
            and self.vers == o.vers
            and self.proc == o.proc
            and self.type == o.type
            and self.serial == o.serial
            and self.status == o.status
            and bytes(self.payload) == bytes(o.payload)
        )

    __hash__ = None


# The program number is above CPython's small-int cache but nearly always the same from
# one packet to the next: keep the last one's int instead of making a new one each time.
cdef object _last_prog = 0
cdef uint32_t _last_prog_value = 0


cdef inline Message _message(const unsigned char* p, object payload):
    """A Message from a packet's first 28 bytes (length word + header) and its payload."""
    global _last_prog, _last_prog_value
    cdef Message m = Message.__new__(Message)
    cdef uint32_t prog = _ld32(p + 4)
    if prog != _last_prog_value:
        _last_prog = prog
        _last_prog_value = prog
    m.prog = _last_prog
    m.vers = _ld32(p + 8)
    m.proc = <int32_t>_ld32(p + 12)
    m.type = <int32_t>_ld32(p + 16)
    m.serial = _ld32(p + 20)
    m.status = <int32_t>_ld32(p + 24)
    m.payload = payload
    return m


# ----------------------------------------------------------------------------- decoding

def check_length(length, max_message):
    """Reject a length word before anything is allocated for it."""
    if length < MIN_PACKET:
        raise ProtocolError(f"packet length {length} is below the minimum of {MIN_PACKET}")
    if length - LEN_SIZE > max_message:
        raise ProtocolError(
            f"packet length {length} exceeds the limit of {max_message + LEN_SIZE} bytes"
        )


cdef long long _clamp_limit(object value) except? -1:
    """max_message as a long long that compares with every 32-bit length like ``value``."""
    if not value == value:  # NaN: never exceeded
        return LIMIT_CLAMP
    if value >= LIMIT_CLAMP:
        return LIMIT_CLAMP
    if value <= -LIMIT_CLAMP:
        return -LIMIT_CLAMP
    return math.floor(value)


# Not picklable, like the twin (whose memoryviews refuse).  auto_pickle would also take the
# unsigned char* fields for C strings and read through them.
@cython.final
@cython.auto_pickle(False)
cdef class FrameDecoder:
    """Turns received bytes into ``Message`` objects; made for ``BufferedProtocol``.

    ``get_buffer()`` returns the writable view to receive into; ``buffer_updated(n)`` says
    how many bytes arrived there and returns the packets completed.  ``feed()`` does both
    for bytes that are already in memory.  After a ``ProtocolError`` the decoder is dead.
    """

    def __init__(self, max_message=MAX_MESSAGE, scratch_size=SCRATCH_SIZE):
        if max_message < HEADER_SIZE:
            raise ValueError(f"max_message must be at least {HEADER_SIZE}")
        if scratch_size < C_DIRECT_THRESHOLD + MIN_PACKET:
            raise ValueError(
                f"scratch_size must be at least {C_DIRECT_THRESHOLD + MIN_PACKET}"
            )
        self.max_message = max_message
        scratch = bytearray(scratch_size)
        self._scratch = scratch
        self._scratch_view = memoryview(scratch)
        self._base = <unsigned char*>PyByteArray_AS_STRING(scratch)
        self._size = len(scratch)
        self._start = 0
        self._end = 0
        self._body = None
        self._body_view = None
        self._body_ptr = NULL
        self._body_len = 0
        self._body_pos = 0
        self._pool = []
        self._peek = False
        self._failed = None

    @property
    def max_message(self):
        return self._max_obj

    @max_message.setter
    def max_message(self, value):
        self._max_c = _clamp_limit(value)
        self._max_obj = value

    @property
    def pending(self):
        """Bytes received that do not yet make a whole packet."""
        if self._body is not None:
            return self._body_pos
        return self._end - self._start

    @property
    def pooled(self):
        """Recycled packet buffers held for reuse (free or not)."""
        return len(self._pool)

    def trim_pool(self):
        """Keep at most POOL_KEEP recycled buffers: the connection's streams ended, and
        the buffers that several of them kept busy at once are given back."""
        del self._pool[POOL_KEEP:]

    def get_buffer(self, sizehint=-1):
        cdef unsigned char* p
        cdef Py_ssize_t n, off
        if _region(self, &p, &n):
            return self._body_view[self._body_pos:]
        off = p - self._base
        return self._scratch_view[off:off + n]

    def buffer_updated(self, nbytes):
        cdef list out = []
        cdef long long n
        if self._failed is not None:
            raise ProtocolError(self._failed)
        if self._scratch is None:
            raise RuntimeError("FrameDecoder.__init__() was not called")
        free = (
            self._body_len - self._body_pos if self._body is not None
            else self._size - self._end
        )
        if _as_ll(nbytes, &n):
            if not 0 <= n <= free:
                raise ValueError(f"nbytes must be in 0..{free}, got {nbytes}")
        else:
            # Not a C-sized int: the twin's comparison (and its TypeError), then a count
            # that C can use; a float is refused here where the twin would go wrong.
            if not 0 <= nbytes <= free:
                raise ValueError(f"nbytes must be in 0..{free}, got {nbytes}")
            n = PyNumber_Index(nbytes)
        _updated(self, <Py_ssize_t>n, out)
        return out

    def feed(self, data):
        """Decode bytes already in memory (copies them into the receive buffers)."""
        cdef Py_buffer pb
        cdef list out = []
        cdef const unsigned char* src
        cdef unsigned char* dst
        cdef Py_ssize_t pos = 0, total, room, n
        _get_flat(data, &pb)
        try:
            src = <const unsigned char*>pb.buf
            total = pb.len
            while pos < total:
                _region(self, &dst, &room)
                n = room if room < total - pos else total - pos
                memmove(dst, src + pos, <size_t>n)
                pos += n
                _updated(self, n, out)
        finally:
            PyBuffer_Release(&pb)
        return out


cdef int _region(FrameDecoder self, unsigned char** ptr, Py_ssize_t* size) except -1:
    """Where the next bytes go (get_buffer without the view): 1 for the body, 0 scratch."""
    if self._failed is not None:
        raise ProtocolError(self._failed)
    if self._scratch is None:
        raise RuntimeError("FrameDecoder.__init__() was not called")
    if self._body is not None:
        ptr[0] = self._body_ptr + self._body_pos
        size[0] = self._body_len - self._body_pos
        return 1
    if self._start == self._end:
        self._start = self._end = 0
        if self._peek:
            ptr[0] = self._base
            size[0] = MIN_PACKET
            return 0
    elif self._size - self._end < MIN_PACKET:
        _compact(self)
    ptr[0] = self._base + self._end
    size[0] = self._size - self._end
    return 0


cdef inline void _compact(FrameDecoder self) noexcept:
    cdef Py_ssize_t size = self._end - self._start
    memmove(self._base, self._base + self._start, <size_t>size)
    self._start = 0
    self._end = size


cdef inline int _updated(FrameDecoder self, Py_ssize_t nbytes, list out) except -1:
    """``nbytes`` (already checked against the free room) arrived where _region said."""
    if self._body is not None:
        self._body_pos += nbytes
        if self._body_pos < self._body_len:
            return 0
        out.append(_finish_body(self))
        return 0
    self._end += nbytes
    return _parse_scratch(self, out)


cdef bytearray _pooled_body(FrameDecoder self, Py_ssize_t length):
    """A buffer for one large packet.  Packets up to POOL_BUFFER bytes (every stream
    data packet) reuse buffers nobody references any more: a fresh 256 KiB allocation
    costs dozens of page faults and lands in cold cache, which halved throughput.  A
    pooled buffer is free when the pool's list holds its only reference (the delivered
    payload views keep a reference while they live)."""
    cdef list pool = self._pool
    cdef Py_ssize_t n = len(pool)
    cdef Py_ssize_t i
    cdef PyObject* candidate
    if length > POOL_BUFFER:
        return PyByteArray_FromStringAndSize(NULL, length)
    # First free buffer from the front: the same one or two buffers cycle while the
    # reader keeps up, so the kernel copies into cache-warm memory.
    for i in range(n):
        candidate = PyList_GET_ITEM(pool, i)
        if _refcnt(candidate) == 1:  # only the pool's list holds it
            return <bytearray>candidate
    body = PyByteArray_FromStringAndSize(NULL, POOL_BUFFER)
    if n < POOL_MAX:
        pool.append(body)
    return body


cdef Message _finish_body(FrameDecoder self):
    cdef const unsigned char* p = self._body_ptr
    view = self._body_view  # holds the body, so p stays valid after the fields are reset
    self._body = None
    self._body_view = None
    self._body_ptr = NULL
    self._body_len = 0
    self._body_pos = 0
    self._peek = True
    return _message(p, view[MIN_PACKET:])


cdef int _reject(FrameDecoder self, uint32_t length) except -1:
    """The pure twin's error path: check_length's reason, and the decoder stays dead."""
    try:
        check_length(length, self._max_obj)
    except ProtocolError as exc:
        reason = str(exc)
    else:  # pragma: no cover - the C check and check_length agree
        return 0
    self._failed = reason
    raise ProtocolError(reason) from None


cdef int _parse_scratch(FrameDecoder self, list out) except -1:
    cdef const unsigned char* base = self._base
    cdef Py_ssize_t start = self._start
    cdef Py_ssize_t end = self._end
    cdef Py_ssize_t avail, length
    cdef uint32_t word
    cdef bytearray body
    while end - start >= LEN_SIZE:
        word = _ld32(base + start)
        length = <Py_ssize_t>word
        if length < MIN_PACKET or <long long>length - LEN_SIZE > self._max_c:
            self._start = start
            _reject(self, word)
        avail = end - start
        if avail >= length:
            out.append(
                _message(
                    base + start,
                    PyBytes_FromStringAndSize(
                        <char*>base + start + MIN_PACKET, length - MIN_PACKET
                    ),
                )
            )
            start += length
            if length <= C_DIRECT_THRESHOLD:
                self._peek = False
            continue
        if length > C_DIRECT_THRESHOLD or length > self._size:
            # Give the packet its own buffer; the rest of it is read straight in.
            body = _pooled_body(self, length)
            self._body_ptr = <unsigned char*>PyByteArray_AS_STRING(body)
            memcpy(self._body_ptr, base + start, <size_t>avail)
            self._body = body
            self._body_view = PyMemoryView_FromObject(body)
            if PyByteArray_GET_SIZE(body) != length:
                self._body_view = self._body_view[:length]
            self._body_len = length
            self._body_pos = avail
            start = end
        else:
            self._peek = False
        break
    if start == end:
        start = end = 0
    self._start = start
    self._end = end
    return 0


# ----------------------------------------------------------------------------- encoding

cdef bytes _header(
    uint32_t length, uint32_t prog, uint32_t vers, int32_t proc, int32_t type,
    uint32_t serial, int32_t status,
):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, MIN_PACKET)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    _st32(p, length)
    _st32(p + 4, prog)
    _st32(p + 8, vers)
    _st32(p + 12, <uint32_t>proc)
    _st32(p + 16, <uint32_t>type)
    _st32(p + 20, serial)
    _st32(p + 24, <uint32_t>status)
    return out


cdef object _pack_header_slow(prog, vers, proc, type, serial, status, payload_len):
    try:
        return _PREFIX.pack(MIN_PACKET + payload_len, prog, vers, proc, type, serial, status)
    except struct.error as exc:
        raise XdrError(f"header field out of range: {exc}") from None


cdef object _pack_header(prog, vers, proc, type, serial, status, payload_len):
    cdef uint32_t p, v, s
    cdef int32_t pr, t, st
    cdef long long n
    if (
        _as_u32(prog, &p) and _as_u32(vers, &v) and _as_i32(proc, &pr)
        and _as_i32(type, &t) and _as_u32(serial, &s) and _as_i32(status, &st)
        and _as_ll(payload_len, &n) and -MIN_PACKET <= n <= 0xFFFFFFFFLL - MIN_PACKET
    ):
        return _header(<uint32_t>(n + MIN_PACKET), p, v, pr, t, s, st)
    return _pack_header_slow(prog, vers, proc, type, serial, status, payload_len)


def pack_header(prog, vers, proc, type, serial, status, payload_len=0):
    """Length word + header for a packet whose payload is ``payload_len`` bytes."""
    return _pack_header(prog, vers, proc, type, serial, status, payload_len)


cdef inline Py_ssize_t _payload_len(object payload) except -1:
    # The twin's ``len(payload) if not isinstance(payload, memoryview) else nbytes``.
    if PyBytes_CheckExact(payload):
        return len(<bytes>payload)
    if not isinstance(payload, memoryview):
        return len(payload)
    return payload.nbytes


cdef inline int _append_message(
    object out, prog, vers, proc, mtype, serial, status, payload
) except -1:
    """``out.extend(encode_message(...))`` without the intermediate list."""
    cdef Py_ssize_t n = _payload_len(payload)
    header = _pack_header(prog, vers, proc, mtype, serial, status, n)
    if type(out) is list:
        (<list>out).append(header)
        if n:
            (<list>out).append(payload)
    else:  # whatever the twin's ``out.extend`` does with it
        out.extend([header, payload] if n else [header])
    return 0


def encode_message(prog, vers, proc, type, serial, status, payload=b""):
    """A whole packet as ``[header, payload]`` for ``writelines`` (payload not copied)."""
    cdef Py_ssize_t n = _payload_len(payload)
    header = _pack_header(prog, vers, proc, type, serial, status, n)
    if n == 0:
        return [header]
    return [header, payload]


def queue_message(out, prog, vers, proc, type, serial, status, payload=b""):
    """``out.extend(encode_message(...))``: append a whole packet to an output queue."""
    _append_message(out, prog, vers, proc, type, serial, status, payload)


def encode_stream_data(prog, vers, proc, serial, data, chunk_size=STREAM_CHUNK):
    """STREAM+CONTINUE packets for ``data``, at most ``chunk_size`` payload bytes each.

    Returns ``[header, view, header, view, ...]``; the views are slices of ``data``, so
    nothing is copied.  Empty ``data`` gives one empty packet, which is how a download
    signals EOF.
    """
    cdef uint32_t p, v, s
    cdef int32_t pr
    cdef long long cs
    cdef Py_ssize_t total, pos, n
    cdef list out
    if not 0 < chunk_size <= STREAM_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{STREAM_CHUNK}")
    view = memoryview(data).cast("B")
    total = len(view)
    if total == 0:
        return [_pack_header(prog, vers, proc, STREAM_TYPE, serial, CONTINUE_STATUS, 0)]
    out = []
    pos = 0
    if not (
        _as_u32(prog, &p) and _as_u32(vers, &v) and _as_i32(proc, &pr)
        and _as_u32(serial, &s) and _as_ll(chunk_size, &cs)
    ):
        # The twin's loop, for arguments the fast path does not take (and their errors).
        while pos < total:
            step = min(chunk_size, total - pos)
            out.append(
                _pack_header(prog, vers, proc, STREAM_TYPE, serial, CONTINUE_STATUS, step)
            )
            out.append(view[pos : pos + step])
            pos += step
        return out
    # Every full chunk has the same header: one immutable bytes object serves them all.
    if total >= cs:
        full = _header(
            <uint32_t>(cs + MIN_PACKET), p, v, pr, STREAM_TYPE, s, CONTINUE_STATUS
        )
        while total - pos >= cs:
            out.append(full)
            out.append(view[pos : pos + cs])
            pos += <Py_ssize_t>cs
    if pos < total:
        n = total - pos
        out.append(_header(<uint32_t>(n + MIN_PACKET), p, v, pr, STREAM_TYPE, s, CONTINUE_STATUS))
        out.append(view[pos:total])
    return out


# ----------------------------------------------------------------------------- calls

cdef enum:
    CALL_TYPE = 0               # MessageType.CALL
    REPLY_TYPE = 1              # MessageType.REPLY
    OK_STATUS = 0               # MessageStatus.OK
    ERROR_STATUS = 1            # MessageStatus.ERROR

if (
    int(_constants.MessageType.CALL) != CALL_TYPE
    or int(_constants.MessageType.REPLY) != REPLY_TYPE
    or int(_constants.MessageStatus.OK) != OK_STATUS
    or int(_constants.MessageStatus.ERROR) != ERROR_STATUS
):  # pragma: no cover - guards the twins against drifting apart
    raise ImportError("virnet._wire was built against different wire constants")


cdef inline int _is_value(object field, long long value) except -1:
    """``field == value``: in C for an int that fits, else Python's comparison."""
    cdef long long v
    if _as_ll(field, &v):
        return v == value
    return 1 if field == value else 0


cdef inline int _same(object a, object b) except -1:
    # What a tuple comparison does per item: identity first, then ==.
    return PyObject_RichCompareBool(a, b, Py_EQ)


@cython.auto_pickle(False)
cdef class Calls:
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

    def __init__(self, is_client):
        self._is_client = bool(is_client)
        self._next = 1
        self._pending = {}

    @property
    def is_client(self):
        return self._is_client

    @is_client.setter
    def is_client(self, value):
        self._is_client = bool(value)

    @property
    def pending(self):
        """serial -> (prog, vers, proc) of every call sent and not answered yet."""
        return self._pending

    def allocate_serial(self):
        cdef uint32_t serial = self._next
        self._next = serial + 1 if serial != 0xFFFFFFFFU else 1
        return serial

    def add_call(self, out, prog, vers, proc, payload=b"", serial=None):
        """Register a call (a new serial unless ``serial`` is given) and append its CALL
        packet to ``out``; returns the serial."""
        cdef uint32_t s
        if serial is None:
            s = self._next
            self._next = s + 1 if s != 0xFFFFFFFFU else 1
            serial = s
        self._pending[serial] = (prog, vers, proc)
        _append_message(out, prog, vers, proc, CALL_TYPE, serial, OK_STATUS, payload)
        return serial

    def dispatch(self, core, msgs):
        """Check and route ``msgs`` in order (see the class docstring)."""
        cdef Message m
        cdef object expected
        cdef tuple want
        # Looked up once per read, not per packet.
        on_reply = None
        on_call = None
        for msg in msgs:
            if type(msg) is Message:
                m = <Message>msg
            else:  # not one of ours: route it exactly as the twin does
                m = Message.__new__(Message)
                m.prog, m.vers, m.proc = msg.prog, msg.vers, msg.proc
                m.type, m.serial, m.status, m.payload = (
                    msg.type, msg.serial, msg.status, msg.payload
                )
            if _is_value(m.type, REPLY_TYPE):
                if not self._is_client:
                    raise ProtocolError("REPLY sent to a server")
                status = m.status
                if not _is_value(status, OK_STATUS) and not _is_value(status, ERROR_STATUS):
                    raise ProtocolError(f"REPLY with invalid status {status}")
                expected = self._pending.pop(m.serial, None)
                if expected is None:
                    raise ProtocolError(f"REPLY with serial {m.serial} answers no call")
                if type(expected) is tuple and len(<tuple>expected) == 3:
                    want = <tuple>expected
                    matches = (
                        _same(want[0], m.prog) and _same(want[1], m.vers)
                        and _same(want[2], m.proc)
                    )
                else:
                    matches = not (expected != (m.prog, m.vers, m.proc))
                if not matches:
                    raise ProtocolError(
                        f"REPLY for serial {m.serial} names program {m.prog:#x} "
                        f"v{m.vers} procedure {m.proc}, not the call's"
                    )
                if on_reply is None:
                    on_reply = core.on_reply
                on_reply(m.serial, status, m.payload)
            elif _is_value(m.type, CALL_TYPE):
                if self._is_client:
                    raise ProtocolError("CALL sent to a client")
                if on_call is None:
                    on_call = core.on_call
                on_call(msg)
            else:
                core.receive_other(msg)


# ----------------------------------------------------------------------------- XDR: Packer

cdef int _grow(Packer self, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = self._len + extra
    cdef Py_ssize_t cap = self._cap * 2
    cdef char* mem
    if extra < 0 or need < 0:
        raise MemoryError()
    if cap < need:
        cap = need
    if self._buf == self._small:
        mem = <char*>PyMem_Malloc(<size_t>cap)
        if mem != NULL:
            memcpy(mem, self._small, <size_t>self._len)
    else:
        mem = <char*>PyMem_Realloc(self._buf, <size_t>cap)
    if mem == NULL:
        raise MemoryError()
    self._buf = mem
    self._cap = cap
    return 0


cdef inline unsigned char* _room(Packer self, Py_ssize_t n) except NULL:
    """Reserve ``n`` bytes at the end; the caller fills them all."""
    cdef unsigned char* p
    if self._cap - self._len < n:
        _grow(self, n)
    p = <unsigned char*>self._buf + self._len
    self._len += n
    return p


cdef inline int _put32(Packer self, uint32_t value) except -1:
    _st32(_room(self, 4), value)
    return 0


cdef inline int _put64(Packer self, uint64_t value) except -1:
    _st64(_room(self, 8), value)
    return 0


cdef int _put_padded(Packer self, const void* data, Py_ssize_t n) except -1:
    cdef Py_ssize_t pad = (4 - (n & 3)) & 3
    cdef unsigned char* p = _room(self, n + pad)
    memcpy(p, data, <size_t>n)
    memset(p + n, 0, <size_t>pad)
    return 0


cdef int _put_bytes(Packer self, bytes data) except -1:
    cdef Py_ssize_t n = len(data)
    memcpy(_room(self, n), PyBytes_AS_STRING(data), <size_t>n)
    return 0


cdef int _pack_slow(Packer self, value, lo, hi, str what, st) except -1:
    if not lo <= value <= hi:
        raise XdrError(f"{what} {value} out of range")
    return _put_bytes(self, st.pack(value))


def _restore_packer(cls, data):
    """Unpickle a Packer (or subclass) with ``data`` already packed."""
    cdef Packer packer = cls.__new__(cls)
    cdef Py_ssize_t n = len(<bytes>data)
    memcpy(_room(packer, n), PyBytes_AS_STRING(data), <size_t>n)
    return packer


@cython.auto_pickle(False)
cdef class Packer:
    """Appends XDR-encoded values to a growing buffer (RFC 4506)."""

    def __cinit__(self):
        self._buf = self._small
        self._cap = SMALL_PACKER
        self._len = 0

    def __init__(self):
        self._len = 0

    def __dealloc__(self):
        if self._buf != self._small:
            PyMem_Free(self._buf)

    def __reduce__(self):
        # Picklable and copyable like the twin: the bytes so far, plus a subclass's __dict__.
        return (_restore_packer, (type(self), self.getvalue()), getattr(self, "__dict__", None))

    def getvalue(self):
        return PyBytes_FromStringAndSize(self._buf, self._len)

    def __len__(self):
        return self._len

    def reset(self):
        self._len = 0
        if self._buf != self._small and self._cap > 64 * 1024:
            # Give a big buffer back, as the twin's bytearray.clear() does.
            PyMem_Free(self._buf)
            self._buf = self._small
            self._cap = SMALL_PACKER

    def pack_int(self, value):
        cdef int32_t v
        if _as_i32(value, &v):
            _put32(self, <uint32_t>v)
        else:
            _pack_slow(self, value, -0x80000000, 0x7FFFFFFF, "int", _I32)

    def pack_uint(self, value):
        cdef uint32_t v
        if _as_u32(value, &v):
            _put32(self, v)
        else:
            _pack_slow(self, value, 0, 0xFFFFFFFF, "unsigned int", _U32)

    def pack_hyper(self, value):
        cdef long long v
        if _as_ll(value, &v):
            _put64(self, <uint64_t>v)
        else:
            _pack_slow(
                self, value, -0x8000000000000000, 0x7FFFFFFFFFFFFFFF, "hyper", _I64
            )

    def pack_uhyper(self, value):
        cdef long long v
        if _as_ll(value, &v) and v >= 0:
            _put64(self, <uint64_t>v)
        else:
            _pack_slow(self, value, 0, 0xFFFFFFFFFFFFFFFF, "unsigned hyper", _U64)

    def pack_bool(self, value):
        _put32(self, 1 if value else 0)

    def pack_float(self, value):
        cdef double d
        cdef _f32bits bits
        if PyFloat_Check(value):
            d = PyFloat_AS_DOUBLE(value)
            bits.f = <float>d
            if not (isinf(bits.f) and not isinf(d)):  # overflow: the slow path says so
                _put32(self, bits.u)
                return
        try:
            _put_bytes(self, _F32.pack(value))
        except (OverflowError, struct.error) as exc:
            raise XdrError(f"float {value!r}: {exc}") from None

    def pack_double(self, value):
        cdef _f64bits bits
        if PyFloat_Check(value):
            bits.d = PyFloat_AS_DOUBLE(value)
            _put64(self, bits.u)
        else:
            _put_bytes(self, _F64.pack(value))

    def pack_fopaque(self, size, data):
        cdef Py_buffer pb
        cdef long long want
        _get_flat(data, &pb)
        try:
            if not (_as_ll(size, &want) and want == pb.len):
                if pb.len != size:
                    raise XdrError(f"fixed opaque needs exactly {size} bytes, got {pb.len}")
            _put_padded(self, pb.buf, pb.len)
        finally:
            PyBuffer_Release(&pb)

    def pack_opaque(self, data, maximum=0xFFFFFFFF):
        cdef Py_buffer pb
        _get_flat(data, &pb)
        try:
            if _exceeds(<unsigned long long>pb.len, maximum):
                raise XdrError(f"opaque of {pb.len} bytes exceeds its maximum of {maximum}")
            if pb.len > 0xFFFFFFFFLL:
                _U32.pack(pb.len)  # raises struct.error, as the twin does
            _put32(self, <uint32_t>pb.len)
            _put_padded(self, pb.buf, pb.len)
        finally:
            PyBuffer_Release(&pb)

    def pack_string(self, value, maximum=0xFFFFFFFF):
        cdef Py_ssize_t n
        cdef bytes data
        if not isinstance(value, str):
            raise XdrError(f"string expected, got {type(value).__name__}")
        if PyUnicode_CheckExact(value) and PyUnicode_IS_ASCII(value):
            # ASCII: the str's own storage is already its UTF-8 encoding.
            n = PyUnicode_GET_LENGTH(value)
            if _exceeds(<unsigned long long>n, maximum):
                raise XdrError(f"string of {n} bytes exceeds its maximum of {maximum}")
            _put32(self, <uint32_t>n)
            _put_padded(self, PyUnicode_DATA(value), n)
            return
        data = value.encode("utf-8", "surrogateescape")
        n = len(data)
        if _exceeds(<unsigned long long>n, maximum):
            raise XdrError(f"string of {n} bytes exceeds its maximum of {maximum}")
        if n > 0xFFFFFFFFLL:
            _U32.pack(n)
        _put32(self, <uint32_t>n)
        _put_padded(self, PyBytes_AS_STRING(data), n)


# ----------------------------------------------------------------------------- XDR: Unpacker

cdef int _truncated(Unpacker self, object n, str what) except -1:
    raise XdrError(f"truncated {what}: needs {n} bytes, {self._end - self._pos} left")


cdef inline Py_ssize_t _take(Unpacker self, Py_ssize_t n, str what) except -1:
    cdef Py_ssize_t pos = self._pos
    if self._end - pos < n:
        _truncated(self, n, what)
    self._pos = pos + n
    return pos


cdef Py_ssize_t _take_padded(Unpacker self, Py_ssize_t n, str what) except -1:
    """Position of ``n`` bytes plus XDR padding, the padding checked to be zero."""
    cdef Py_ssize_t pad = (4 - (n & 3)) & 3
    cdef Py_ssize_t pos = _take(self, n + pad, what)
    cdef const unsigned char* p = self._data + pos + n
    cdef Py_ssize_t i
    for i in range(pad):
        if p[i]:
            raise XdrError(f"non-zero padding after {what}")
    return pos


cdef inline bytes _read_bytes(Unpacker self, Py_ssize_t n, str what):
    cdef Py_ssize_t pos = _take_padded(self, n, what)
    return PyBytes_FromStringAndSize(<char*>self._data + pos, n)


cdef uint32_t _read_length(
    Unpacker self, object maximum, str what, str what_length
) except? 0xFFFFFFFF:
    cdef uint32_t n = _ld32(self._data + _take(self, 4, what_length))
    if _exceeds(n, maximum):
        raise XdrError(f"{what} of {n} bytes exceeds its maximum of {maximum}")
    return n


@cython.auto_pickle(False)
cdef class Unpacker:
    """Reads XDR values from a buffer, checking every length against what is left."""

    def __init__(self, data):
        cdef Py_buffer pb
        _get_flat(data, &pb)
        if self._held:
            PyBuffer_Release(&self._view)
        self._view = pb
        self._held = True
        self._data = <const unsigned char*>pb.buf
        self._pos = 0
        self._end = pb.len

    def __dealloc__(self):
        if self._held:
            self._held = False
            PyBuffer_Release(&self._view)

    @property
    def position(self):
        return self._pos

    @property
    def remaining(self):
        return self._end - self._pos

    def done(self):
        """Raise if bytes are left over (trailing garbage)."""
        if self._pos != self._end:
            raise XdrError(f"{self._end - self._pos} bytes of trailing data")

    def unpack_int(self):
        return <int32_t>_ld32(self._data + _take(self, 4, "int"))

    def unpack_uint(self):
        return _ld32(self._data + _take(self, 4, "unsigned int"))

    def unpack_hyper(self):
        return <int64_t>_ld64(self._data + _take(self, 8, "hyper"))

    def unpack_uhyper(self):
        return _ld64(self._data + _take(self, 8, "unsigned hyper"))

    def unpack_bool(self):
        cdef uint32_t value = _ld32(self._data + _take(self, 4, "bool"))
        if value > 1:
            raise XdrError(f"bool must be 0 or 1, got {value}")
        return value == 1

    def unpack_float(self):
        cdef _f32bits bits
        bits.u = _ld32(self._data + _take(self, 4, "float"))
        return <double>bits.f

    def unpack_double(self):
        cdef _f64bits bits
        bits.u = _ld64(self._data + _take(self, 8, "double"))
        return bits.d

    def unpack_fopaque(self, size):
        cdef long long n
        if _as_ll(size, &n) and 0 <= n <= 0x3FFFFFFFFFFFFFFFLL:
            return _read_bytes(self, <Py_ssize_t>n, "fixed opaque")
        # Negative, huge, or not an int: the twin's checks, in its order.
        if size < 0:
            raise XdrError(f"fixed opaque size must not be negative, got {size}")
        padded = size + ((4 - (size & 3)) & 3)
        if self._end - self._pos < padded:
            _truncated(self, padded, "fixed opaque")
        return _read_bytes(self, PyNumber_Index(size), "fixed opaque")

    def unpack_opaque(self, maximum=0xFFFFFFFF):
        return _read_bytes(self, _read_length(self, maximum, "opaque", "opaque length"), "opaque")

    def unpack_string(self, maximum=0xFFFFFFFF):
        cdef Py_ssize_t n = _read_length(self, maximum, "string", "string length")
        cdef Py_ssize_t pos = _take_padded(self, n, "string")
        return PyUnicode_DecodeUTF8(<char*>self._data + pos, n, "surrogateescape")

    def unpack_array_length(self, maximum):
        """Length prefix of a variable array, checked against ``maximum`` and the data left
        (each element takes at least 4 bytes), so a huge count allocates nothing."""
        cdef uint32_t n = _ld32(self._data + _take(self, 4, "array length"))
        if _exceeds(n, maximum):
            raise XdrError(f"array of {n} elements exceeds its maximum of {maximum}")
        if <Py_ssize_t>n * 4 > self._end - self._pos:
            raise XdrError(f"array of {n} elements cannot fit in {self._end - self._pos} bytes")
        return n


def join(buffers):
    """Concatenate a packet list (tests and debugging only; the hot path never joins)."""
    return b"".join(buffers)
