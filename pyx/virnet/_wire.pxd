# Declarations of the compiled wire core (pyx/virnet/_wire.pyx).
#
# Cython finds this file because its path mirrors the module name ``virnet._wire``
# (``include_path=["pyx"]`` in setup.py).  Every cdef attribute lives here; the .pyx
# holds only code.

cimport cython
from libc.stdint cimport uint32_t


@cython.final
cdef class Message:
    # Python objects, exactly like the pure twin's slots: callers may read, compare and
    # even replace them, and an int/bytes/memoryview goes in and comes out unchanged.
    cdef public object prog
    cdef public object vers
    cdef public object proc
    cdef public object type
    cdef public object serial
    cdef public object status
    cdef public object payload


@cython.final
cdef class FrameDecoder:
    cdef object _max_obj            # max_message as given (what Python sees)
    cdef long long _max_c           # the same limit, clamped to C range for the hot check

    cdef bytearray _scratch         # fixed receive buffer: never resized
    cdef object _scratch_view       # memoryview(_scratch); get_buffer slices it
    cdef unsigned char* _base       # _scratch's storage (stable: the bytearray never resizes)
    cdef Py_ssize_t _size           # len(_scratch)
    cdef Py_ssize_t _start          # first unparsed byte in the scratch
    cdef Py_ssize_t _end            # one past the last received byte in the scratch

    cdef bytearray _body            # a large packet's own buffer, or None
    cdef object _body_view          # memoryview(_body)
    cdef unsigned char* _body_ptr
    cdef Py_ssize_t _body_len
    cdef Py_ssize_t _body_pos

    cdef list _pool                 # recycled packet-sized body buffers (see _pooled_body)

    cdef bint _peek                 # after a large packet: ask for one header only
    cdef object _failed             # None, or the reason of the ProtocolError


cdef class Packer:
    cdef char* _buf                 # _small, or PyMem memory once it outgrew it
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef char _small[256]


cdef class Unpacker:
    cdef Py_buffer _view            # held for the Unpacker's life (bytearrays stay locked)
    cdef bint _held
    cdef const unsigned char* _data
    cdef Py_ssize_t _pos
    cdef Py_ssize_t _end


@cython.final
cdef class Calls:
    cdef bint _is_client
    cdef uint32_t _next             # the next serial to allocate (never 0)
    cdef dict _pending              # serial -> (prog, vers, proc) of unanswered calls
