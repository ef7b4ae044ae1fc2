# cython: language_level=3
"""The inner loop of a direct run, compiled: twin of ``virnet._direct_loop_py``.

Read the twin's docstring for what the loop does and why it returns where it does.  Here
the whole loop runs in C with the GIL released: the run's thread then costs the loop
thread nothing while it moves packets, and per packet there are only its system calls
(one header read, a splice into the pipe, a splice out of it).  The result tuple, the
reasons and every return point are the twin's, one for one.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint32_t

from virnet import constants as _constants

cdef extern from "unistd.h" nogil:
    ssize_t read(int fd, void* buf, size_t count)

cdef extern from "fcntl.h" nogil:
    # Python.h defines _GNU_SOURCE, which declares splice(2).
    ctypedef int64_t loff_t
    ssize_t splice(int fd_in, loff_t* off_in, int fd_out, loff_t* off_out,
                   size_t length, unsigned int flags)
    unsigned int SPLICE_F_NONBLOCK


cdef enum:
    MIN_PACKET = 28
    STREAM_TYPE = 3             # MessageType.STREAM
    CONTINUE_STATUS = 2         # MessageStatus.CONTINUE

if (
    _constants.MIN_PACKET != MIN_PACKET
    or int(_constants.MessageType.STREAM) != STREAM_TYPE
    or int(_constants.MessageStatus.CONTINUE) != CONTINUE_STATUS
):  # pragma: no cover - guards the twins against drifting apart
    raise ImportError("virnet._direct_loop was built against different wire constants")

IS_COMPILED = True

cdef enum:
    C_BUDGET = 0
    C_STOPPED = 1
    C_WAIT = 2
    C_PARTIAL = 3
    C_FOREIGN = 4
    C_SOCKET = 5
    C_SINK = 6

BUDGET = C_BUDGET
STOPPED = C_STOPPED
WAIT = C_WAIT
PARTIAL = C_PARTIAL
FOREIGN = C_FOREIGN
SOCKET = C_SOCKET
SINK = C_SINK


cdef inline uint32_t _ld32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef struct _State:
    int64_t moved
    int64_t packets
    int64_t offset
    int64_t size
    int64_t left
    int64_t pending


cdef int _loop(
    int sock, int pipe_r, int pipe_w, int64_t pipe_size, int sink,
    uint32_t prog, uint32_t vers, uint32_t proc, uint32_t serial,
    int64_t max_payload, int64_t limit, int64_t budget,
    volatile unsigned char* stop, unsigned char* header, _State* st,
) noexcept nogil:
    cdef ssize_t got, k, m
    cdef int64_t size, length
    cdef loff_t pos
    while True:
        if stop[0]:
            return C_STOPPED
        while True:
            got = read(sock, header, MIN_PACKET)
            if got < 0 and errno == EINTR:
                continue
            break
        if got < 0:
            if errno == EAGAIN:
                return C_WAIT
            got = 0  # an error: the caller reads again and sees it
        if got < MIN_PACKET:
            st.left = got
            return C_PARTIAL
        length = _ld32(header)
        size = length - MIN_PACKET
        if (
            _ld32(header + 16) != STREAM_TYPE
            or _ld32(header + 24) != CONTINUE_STATUS
            or _ld32(header + 4) != prog
            or _ld32(header + 8) != vers
            or _ld32(header + 12) != proc
            or _ld32(header + 20) != serial
            or size <= 0
            or size > max_payload
            or (limit >= 0 and st.moved + size > limit)
        ):
            return C_FOREIGN
        st.left = size
        while st.left:
            k = splice(sock, NULL, pipe_w, NULL,
                       <size_t>(st.left if st.left < pipe_size else pipe_size),
                       SPLICE_F_NONBLOCK)
            if k < 0 and errno == EINTR:
                continue
            if k <= 0:
                st.size = size
                st.pending = 0
                return C_SOCKET
            st.left -= k
            while k:
                if st.offset < 0:
                    m = splice(pipe_r, NULL, sink, NULL, <size_t>k, 0)
                else:
                    pos = st.offset
                    m = splice(pipe_r, NULL, sink, &pos, <size_t>k, 0)
                if m < 0 and errno == EINTR:
                    continue
                if m <= 0:
                    st.size = size
                    st.pending = k
                    return C_SINK
                k -= m
                if st.offset >= 0:
                    st.offset += m
        st.moved += size
        st.packets += 1
        if st.moved >= budget:
            return C_BUDGET


def splice_packets(
    int sock,
    int pipe_r,
    int pipe_w,
    long long pipe_size,
    int sink,
    long long offset,
    tuple key,
    long long max_payload,
    long long limit,
    long long budget,
    bytearray stop not None,
    bytearray header not None,
):
    """Move whole data packets of stream ``key`` from ``sock`` into ``sink`` while
    every call succeeds at once; see ``virnet._direct_loop_py.splice_packets``."""
    if len(stop) < 1 or len(header) != MIN_PACKET:
        raise ValueError("stop must hold a byte and header 28 bytes")
    prog, vers, proc, serial = key
    cdef uint32_t c_prog = <uint32_t>(<long long>prog & 0xFFFFFFFF)
    cdef uint32_t c_vers = <uint32_t>(<long long>vers & 0xFFFFFFFF)
    cdef uint32_t c_proc = <uint32_t>(<long long>proc & 0xFFFFFFFF)
    cdef uint32_t c_serial = <uint32_t>(<long long>serial & 0xFFFFFFFF)
    cdef volatile unsigned char* c_stop = <unsigned char*>(<char*>stop)
    cdef unsigned char* c_header = <unsigned char*>(<char*>header)
    cdef _State st
    st.moved = 0
    st.packets = 0
    st.offset = offset
    st.size = 0
    st.left = 0
    st.pending = 0
    cdef int why
    with nogil:
        why = _loop(sock, pipe_r, pipe_w, pipe_size, sink, c_prog, c_vers, c_proc, c_serial,
                    max_payload, limit, budget, c_stop, c_header, &st)
    if why == C_PARTIAL:
        return why, st.moved, st.packets, st.offset, 0, st.left, 0
    if why == C_SOCKET or why == C_SINK:
        return why, st.moved, st.packets, st.offset, st.size, st.left, st.pending
    return why, st.moved, st.packets, st.offset, 0, 0, 0
